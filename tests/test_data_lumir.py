"""LUMIR data module against tiny fake files of the same layout (json, LUMIR.zip, label zip) on 127.0.0.1."""

from __future__ import annotations

import gzip
import io
import json
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from http_server import serve

from monai_ext.data.download import DownloadError
from monai_ext.data.lumir import download_lumir, lumir_cases, lumir_pairs, lumir_transforms

SHAPE = (5, 6, 4)
TRAIN = ["LUMIRMRI_0000_0000", "LUMIRMRI_0001_0000", "LUMIRMRI_0002_0000"]
VALIDATION = [("LUMIRMRI_3455_0000", "LUMIRMRI_3454_0000")]  # (moving, fixed)


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def fake_lumir():
    rng = np.random.default_rng(2)
    arrays = {name: rng.integers(0, 3, SHAPE).astype(np.uint8) * rng.integers(0, 256, SHAPE).astype(np.uint8)
              for name in TRAIN + [n for pair in VALIDATION for n in pair]}
    labels = {name: rng.integers(0, 4, SHAPE).astype(np.int16) for name in TRAIN[:2]}
    def nifti(array):
        return gzip.compress(nib.Nifti1Image(array, np.eye(4)).to_bytes())
    images = _zip({f"{'imagesTr' if n in TRAIN else 'imagesVal'}/{n}.nii.gz": nifti(a) for n, a in arrays.items()})
    label_zip = _zip({f"{n}.nii.gz": nifti(a) for n, a in labels.items()})
    listing = json.dumps({
        "training": [{"image": f"./imagesTr/{n}.nii.gz"} for n in TRAIN],
        "validation": [{"fixed": f"./imagesVal/{f}.nii.gz", "moving": f"./imagesVal/{m}.nii.gz"} for m, f in VALIDATION],
    }).encode()
    files = {"/json": listing, "/images.zip": images, "/labels.zip": label_zip}
    return files, arrays, labels


def test_download_splits_and_pipeline(fake_lumir, tmp_path):
    files, arrays, labels = fake_lumir
    with serve(files) as server:
        urls = {"json_url": server.url + "/json", "images_url": server.url + "/images.zip",
                "labels_url": server.url + "/labels.zip"}
        root = download_lumir(tmp_path, **urls, progress=False)
        download_lumir(tmp_path, **urls, progress=False)  # every part present: no request
        assert len(server.requests) == 3
    assert [c["name"] for c in lumir_cases(root, "train")] == TRAIN
    (pair,) = lumir_pairs(root, "validate")
    assert (pair["moving_name"], pair["fixed_name"]) == VALIDATION[0]
    assert pair["moving_image"].endswith("imagesVal/LUMIRMRI_3455_0000.nii.gz")
    sanity = lumir_pairs(root, "sanity_check")
    assert [(p["moving_name"], p["fixed_name"]) for p in sanity] == [(TRAIN[0], TRAIN[1])]
    assert len(lumir_pairs(root, "sanity_check", both_directions=True)) == 2
    with pytest.raises(ValueError, match="no public test split"):
        lumir_pairs(root, "test")

    item = lumir_transforms(label_keys=("moving_label", "fixed_label"))(sanity[0])
    for side, name in (("moving", TRAIN[0]), ("fixed", TRAIN[1])):
        assert item[f"{side}_image"].dtype == torch.float32 and item[f"{side}_image"].shape == (1, *SHAPE)
        np.testing.assert_allclose(item[f"{side}_image"][0].numpy(), arrays[name] / 255.0, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(item[f"{side}_mask"][0].numpy(), arrays[name] > 0)
        assert item[f"{side}_label"].dtype == torch.int64
        np.testing.assert_array_equal(item[f"{side}_label"][0].numpy(), labels[name])


def test_web_page_instead_of_file_is_reported(fake_lumir, tmp_path):
    files, _, _ = fake_lumir
    page = b"<html>Google Drive can't scan this file for viruses</html>"
    with serve({**files, "/page": page}) as server:
        with pytest.raises(ValueError, match="not json"):
            download_lumir(tmp_path, json_url=server.url + "/page", progress=False)
        assert not (tmp_path / "LUMIR_dataset.json").exists()
        with pytest.raises(DownloadError, match="by hand"):
            download_lumir(tmp_path, json_url=server.url + "/json", images_url=server.url + "/page", progress=False)
        assert not (tmp_path / "LUMIR.zip").exists()
    with pytest.raises(FileNotFoundError, match="labelsTr"):
        lumir_cases(tmp_path, "sanity_check")
