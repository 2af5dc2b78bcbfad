"""Lung250M-4B data module against a tiny fake archive of the same layout served on 127.0.0.1."""

from __future__ import annotations

import gzip
import io
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from http_server import serve

from monai_ext.data.base import AvgPoold, centered_crop_or_pad_offsets, volume_transforms
from monai_ext.data.lung250m import (
    LUNG250M_DIVISIONS,
    download_lung250m,
    load_lung250m_landmarks,
    lung250m_case_names,
    lung250m_cases,
    lung250m_pairs,
    lung250m_transforms,
)
from monai_ext.data.pairs import RegistrationPairDataset

# axis 0: 8 -> 5 (crop 3: SITReg removes 1 before, MONAI's centre crop would remove 2), axis 1: 4 -> 6 (pad 1 + 1),
# axis 2: 6 -> 4 (crop 1 + 1); then 2x pooling drops the 5th voxel of axis 0 -> (2, 3, 2)
SHAPE, TARGET = (8, 4, 6), (5, 6, 4)
AFFINE = np.array([[1.0, 0, 0, -3], [0, 2.0, 0, 5], [0, 0, 1.5, 7], [0, 0, 0, 1]])


def _nifti(array):
    return gzip.compress(nib.Nifti1Image(array, AFFINE).to_bytes())


@pytest.fixture(scope="module")
def fake_lung():
    """(zip bytes, arrays, landmarks): 2 training cases, every validation case, no test case."""
    rng = np.random.default_rng(1)
    files, arrays, landmarks = {}, {}, {}
    names = [("Tr", "case_001"), ("Tr", "case_003")] + [("Ts", n) for n in LUNG250M_DIVISIONS["validate"]]
    for split, name in names:
        for index in (1, 2):
            hu = rng.uniform(-1100, 300, SHAPE).astype(np.float32)
            mask = np.ones(SHAPE, np.uint8)
            mask[rng.uniform(size=SHAPE) < 0.1] = 0
            arrays[f"{name}_{index}"] = (hu, mask)
            files[f"images{split}/{name}_{index}.nii.gz"] = _nifti(hu)
            files[f"masks{split}/{name}_{index}.nii.gz"] = _nifti(mask)
        if split == "Ts":
            landmarks[str(int(name[-3:]))] = torch.rand(4, 6, dtype=torch.float64) * 3 + 1
    buffer = io.BytesIO()
    torch.save(landmarks, buffer)
    files["lms_validation.pth"] = buffer.getvalue()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for path, data in files.items():
            zipped.writestr(path, data)
    return archive.getvalue(), arrays, landmarks


def _expected(array, target):
    """Centred crop-or-pad (pad diff // 2 before, crop (-diff) // 2 before) then 2x average pooling, in numpy."""
    out = np.zeros(target, np.float64)
    src, dst = [], []
    for s, t in zip(array.shape, target):
        if t >= s:
            before = (t - s) // 2
            src.append(slice(0, s)), dst.append(slice(before, before + s))
        else:
            before = (s - t) // 2
            src.append(slice(before, before + t)), dst.append(slice(0, t))
    out[tuple(dst)] = array[tuple(src)]
    d, h, w = (s // 2 for s in target)
    return out[: 2 * d, : 2 * h, : 2 * w].reshape(d, 2, h, 2, w, 2).mean(axis=(1, 3, 5))


def test_download_splits_pipeline_and_landmarks(fake_lung, tmp_path):
    data, arrays, landmarks = fake_lung
    with serve({"/Lung250M-4B.zip": data}) as server:
        root = download_lung250m(tmp_path, url=server.url + "/Lung250M-4B.zip", progress=False)
        download_lung250m(tmp_path, url=server.url + "/Lung250M-4B.zip")  # landmarks present: no request
        assert len(server.requests) == 1
    assert lung250m_case_names(root, "train") == ["case_001", "case_003"]
    assert len(lung250m_case_names(root, "validate")) == 16 and "case_113" in LUNG250M_DIVISIONS["validate"]
    with pytest.raises(FileNotFoundError, match="case_104_1.nii.gz"):
        lung250m_cases(root, "test")
    with pytest.raises(ValueError, match="division"):
        lung250m_case_names(root, "sanity")

    first, second = load_lung250m_landmarks(root, "case_054")
    table = landmarks["54"].float()
    torch.testing.assert_close(first, table[:, :3] - 0.5)
    torch.testing.assert_close(second, table[:, 3:] - 0.5)

    pair = lung250m_pairs(root, "validate")[0]
    assert pair["moving_name"] == "case_054" and pair["moving_image"].endswith("imagesTs/case_054_1.nii.gz")
    item = lung250m_transforms(crop_or_pad_to=TARGET)(pair)
    offset = np.array(centered_crop_or_pad_offsets(SHAPE, TARGET))
    np.testing.assert_array_equal(offset, [-1, 1, -1])
    for side, index in (("moving", 1), ("fixed", 2)):
        hu, mask = arrays[f"case_054_{index}"]
        image = item[f"{side}_image"]
        assert image.shape == (1, 2, 3, 2) and image.dtype == torch.float32
        intensity = np.clip(_expected((hu + 1024) * mask, TARGET), 0, 1024) / 1024
        np.testing.assert_allclose(image[0].numpy(), intensity, rtol=0, atol=1e-6)
        # a pooled voxel is in the mask only if all 8 fine voxels were (zero padding counts as outside)
        np.testing.assert_array_equal(item[f"{side}_mask"][0].numpy(), _expected(mask, TARGET) >= 1 - 1e-5)
        points = table[:, :3] if index == 1 else table[:, 3:]
        np.testing.assert_allclose(item[f"{side}_landmarks"].numpy(), points.numpy() - 0.5 + offset, atol=1e-6)
        # coarse voxel j is fine voxel 2 j + 0.5 of the padded grid, i.e. 2 j + 0.5 - offset of the file's grid
        step = np.diag([2.0, 2.0, 2.0, 1.0])
        step[:3, 3] = 0.5 - offset
        np.testing.assert_allclose(image.affine.numpy(), AFFINE @ step, atol=1e-6)


def test_intra_case_training_items(fake_lung, tmp_path):
    data, _, _ = fake_lung
    with serve({"/x.zip": data}) as server:
        root = download_lung250m(tmp_path, url=server.url + "/x.zip", progress=False)
    cases = lung250m_cases(root, "train")
    assert "landmarks" not in cases[0]
    dataset = RegistrationPairDataset(cases, lung250m_transforms(crop_or_pad_to=TARGET), pairing="intra")
    item = dataset[0]
    assert item["moving_image"].shape == item["fixed_mask"].shape == (1, 2, 3, 2)
    assert item["moving_image"].meta["filename_or_obj"].endswith("case_001_1.nii.gz")
    assert item["fixed_image"].meta["filename_or_obj"].endswith("case_001_2.nii.gz")


def test_centered_crop_or_pad_offsets_and_bad_arguments():
    """Padding 4 -> 7 puts 3 // 2 = 1 voxel before; cropping 7 -> 4 removes 3 // 2 = 1 before; 8 -> 5 removes 1."""
    assert centered_crop_or_pad_offsets((4, 7, 8, 5), (7, 4, 5, 5)) == [1, -1, -1, 0]
    with pytest.raises(ValueError, match="spatial_size"):
        centered_crop_or_pad_offsets((4, 4), (4, 4, 4))
    with pytest.raises(ValueError, match="scale"):
        volume_transforms(["image"], shift_scale=(0.0, 0.0))
    with pytest.raises(ValueError, match="factor"):
        AvgPoold("image", (2, 2))({"image": torch.zeros(1, 4, 4, 4)})
