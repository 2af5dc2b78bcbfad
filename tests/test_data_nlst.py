"""NLST data module against a tiny fake NLST2023.zip of the same layout served on 127.0.0.1."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from http_server import serve
from monai.transforms import Compose

from monai_ext.data.affine_augmentation import RandSITRegAffined
from monai_ext.data.download import DownloadError
from monai_ext.data.nlst import NLST_ARCHIVE, download_nlst, nlst_case_names, nlst_cases, nlst_pairs, nlst_transforms
from monai_ext.data.pairs import RegistrationPairDataset

SHAPE = (6, 5, 7)
TRAIN, VALIDATE = ["NLST_0001", "NLST_0002"], ["NLST_0101"]


def _nifti_bytes(array: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, np.diag([1.5, 1.5, 1.5, 1.0])).to_bytes())


@pytest.fixture(scope="module")
def fake_nlst():
    """(zip bytes, {relative path: array}) with the NLST2023 layout: 3 cases, HU images, masks, keypoints."""
    rng = np.random.default_rng(0)
    arrays, files = {}, {}
    for name in TRAIN + VALIDATE:
        for index in (0, 1):
            stem = f"{name}_{index:04d}"
            hu = rng.uniform(-1100, 300, SHAPE).astype(np.float32)
            mask = (rng.uniform(size=SHAPE) > 0.3).astype(np.uint8)
            points = rng.uniform(0, 4, (5, 3)).round(3)
            arrays[stem] = (hu, mask, points)
            files[f"NLST/imagesTr/{stem}.nii.gz"] = _nifti_bytes(hu)
            files[f"NLST/masksTr/{stem}.nii.gz"] = _nifti_bytes(mask)
            files[f"NLST/keypointsTr/{stem}.csv"] = "\n".join(",".join(map(str, p)) for p in points).encode()
    def entries(names):
        return [{"fixed": f"./imagesTr/{n}_0000.nii.gz", "moving": f"./imagesTr/{n}_0001.nii.gz"} for n in names]
    files["NLST/NLST_dataset.json"] = json.dumps(
        {"name": "NLST", "training_paired_images": entries(TRAIN), "registration_val": entries(VALIDATE)}
    ).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return buffer.getvalue(), arrays


def test_download_splits_and_pipeline(fake_nlst, tmp_path):
    data, arrays = fake_nlst
    with serve({"/NLST2023.zip": data}) as server:
        server.cut["/NLST2023.zip"] = len(data) // 2
        with pytest.raises(DownloadError, match="resume"):
            download_nlst(tmp_path, url=server.url + "/NLST2023.zip", progress=False)
        root = download_nlst(tmp_path, url=server.url + "/NLST2023.zip", progress=False)
        download_nlst(tmp_path, url=server.url + "/NLST2023.zip")  # json present: no request
        assert [r[1] for r in server.requests] == [None, f"bytes={len(data) // 2}-"]
    assert (root / NLST_ARCHIVE).is_file()
    assert nlst_case_names(root, "train") == TRAIN and nlst_case_names(root, "validate") == VALIDATE
    with pytest.raises(ValueError, match="no public test split"):
        nlst_case_names(root, "test")

    (pair,) = nlst_pairs(root, "validate")
    assert Path(pair["moving_image"]).name == "NLST_0101_0000.nii.gz"
    assert Path(pair["fixed_keypoints"]).name == "NLST_0101_0001.csv"
    assert pair["moving_name"] == pair["fixed_name"] == "NLST_0101"
    item = nlst_transforms()(pair)
    for side, index in (("moving", 0), ("fixed", 1)):
        hu, mask, points = arrays[f"NLST_0101_{index:04d}"]
        # SITReg's NLST intensity: (HU + 1024) * mask, clip, /1024
        expected = np.clip((hu + 1024) * mask, 0, 1024) / 1024
        assert item[f"{side}_image"].shape == (1, *SHAPE) and item[f"{side}_image"].dtype == torch.float32
        np.testing.assert_allclose(item[f"{side}_image"][0].numpy(), expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(item[f"{side}_mask"][0].numpy(), mask)
        np.testing.assert_allclose(item[f"{side}_keypoints"].numpy(), points, rtol=0, atol=1e-6)


def test_intra_case_training_with_augmentation(fake_nlst, tmp_path):
    data, _ = fake_nlst
    with serve({"/a.zip": data}) as server:
        root = download_nlst(tmp_path, url=server.url + "/a.zip", progress=False, keep_archive=False)
    assert not (root / NLST_ARCHIVE).exists()
    keys = ["moving_image", "fixed_image"]
    augment = RandSITRegAffined(keys, mask_keys=["moving_mask", "fixed_mask"],
                                point_keys=["moving_keypoints", "fixed_keypoints"], prob=1.0)
    augment.set_random_state(seed=0)
    dataset = RegistrationPairDataset(nlst_cases(root, "train"), Compose([nlst_transforms(), augment]), pairing="intra")
    assert [dataset.pair_indices(i) for i in range(len(dataset))] == [(0, 0), (1, 1)]
    item = dataset[1]
    assert item["moving_name"] == "NLST_0002"
    for key in keys:
        assert item[key].shape == (1, *SHAPE) and item[f"{key}_fov_mask"].shape == (1, *SHAPE)
        assert item[f"{key}_aug_matrix"].shape == (4, 4)
    # masks are cut to the FOV of the augmented image
    assert bool((item["moving_mask"] <= item["moving_image_fov_mask"]).all())


def test_missing_files_and_non_archive_responses(fake_nlst, tmp_path):
    data, _ = fake_nlst
    with serve({"/page": b"<html>please log in</html>", "/a.zip": data}) as server:
        with pytest.raises(DownloadError, match="not a zip/tar archive"):
            download_nlst(tmp_path / "a", url=server.url + "/page", progress=False)
        assert not (tmp_path / "a" / NLST_ARCHIVE).exists()  # deleted: a rerun downloads again
        root = download_nlst(tmp_path / "b", url=server.url + "/a.zip", progress=False)
    (root / "NLST" / "keypointsTr" / "NLST_0002_0001.csv").unlink()
    with pytest.raises(FileNotFoundError, match="NLST_0002_0001.csv"):
        nlst_cases(root, "train")
    with pytest.raises(FileNotFoundError, match="download_nlst"):
        nlst_case_names(tmp_path / "empty", "train")
