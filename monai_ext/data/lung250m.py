"""Lung250M-4B (inhale / exhale lung CT pairs, Falta et al., NeurIPS 2023 datasets track).

Archive: :data:`LUNG250M_URL`, the Nextcloud share used by SITReg (a zip of the selected folders,
saved as ``Lung250M-4B.zip``). Layout after extraction::

    imagesTr/case_XXX_1.nii.gz, case_XXX_2.nii.gz   training CT (HU), _1 = inhale, _2 = exhale
    masksTr/case_XXX_{1,2}.nii.gz                   lung masks
    imagesTs/, masksTs/                             validation and test cases, same naming
    lms_validation.pth                              {str(case number): (N, 6) landmarks}, columns 0-2 of
                                                    image _1 and 3-5 of image _2, voxel coordinates
    segTr/, segTs/                                  vessel segmentations (not used)

Checksum: none is published (:data:`LUNG250M_SHA256` is ``None``). Licence and the cases that must be
added by hand (DIR-Lab COPD) are described at https://github.com/multimodallearning/Lung250M-4B;
the EMPIRE10 cases 002 and 008 are left out of the validation split (their terms of use), as in SITReg.

Splits as SITReg's code (``src/data/lung250m_4b/data.py``): train = every case in ``imagesTr``,
validate = 054, 055, 056, 094, 097 and 113-123, test = 104-112 (see :data:`LUNG250M_DIVISIONS`).
Pipeline (as SITReg's Lung250M-4B configuration): ``(HU + 1024) * lung mask`` -> centred crop-or-pad to 320x224x320 ->
2x average pooling (160x112x160) -> clip [0, 1024] -> /1024; masks pooled and thresholded. Image
``_1`` is image 0 (moving), ``_2`` image 1 (fixed). Landmarks are shifted by -0.5 voxel on loading
(SITReg's reading of the file's voxel convention) and then with the crop / pad; they stay in voxels
of the full-resolution (cropped / padded) grid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.transforms import Compose

from monai_ext.data.base import check_files, intra_pair_item, prepare_archive, volume_transforms
from monai_ext.data.nlst import LUNG_CT_CLIP, LUNG_CT_SCALE, LUNG_CT_SHIFT

__all__ = [
    "LUNG250M_URL",
    "LUNG250M_ARCHIVE",
    "LUNG250M_SHA256",
    "LUNG250M_LANDMARKS",
    "LUNG250M_DIVISIONS",
    "LUNG250M_CROP_OR_PAD",
    "LUNG250M_DOWNSAMPLE",
    "LUNG250M_LANDMARK_SHIFT",
    "download_lung250m",
    "lung250m_case_names",
    "load_lung250m_landmarks",
    "lung250m_cases",
    "lung250m_pairs",
    "lung250m_transforms",
]

LUNG250M_URL = (
    "https://cloud.imi.uni-luebeck.de/s/s64fqbPpXNexBPP/download?path=%2F&files=%5B%22masksTs%22%2C%22masksTr"
    "%22%2C%22imagesTr%22%2C%22imagesTs%22%2C%22segTr%22%2C%22segTs%22%2C%22lms_validation.pth%22%5D"
)
LUNG250M_ARCHIVE = "Lung250M-4B.zip"
LUNG250M_SHA256: str | None = None  # not published
LUNG250M_LANDMARKS = "lms_validation.pth"
LUNG250M_DIVISIONS = {
    "validate": [f"case_{i:03d}" for i in (54, 55, 56, 94, 97, *range(113, 124))],
    "test": [f"case_{i:03d}" for i in range(104, 113)],
}
LUNG250M_CROP_OR_PAD = (320, 224, 320)
LUNG250M_DOWNSAMPLE = 2
LUNG250M_LANDMARK_SHIFT = -0.5


def download_lung250m(
    dataset_dir: str | os.PathLike,
    url: str = LUNG250M_URL,
    sha256: str | None = LUNG250M_SHA256,
    keep_archive: bool = True,
    progress: bool = True,
    download: bool = True,
) -> Path:
    """Download and extract the archive into ``dataset_dir`` unless ``lms_validation.pth`` is already there;
    ``download=False`` fetches nothing (a bundle's ``download`` setting: the data are expected there already)."""
    if not download:
        return Path(dataset_dir)
    return prepare_archive(dataset_dir, url, LUNG250M_ARCHIVE, LUNG250M_LANDMARKS, sha256, keep_archive, progress)


def lung250m_case_names(dataset_dir: str | os.PathLike, division: str) -> list[str]:
    """Case names (``case_XXX``) of ``division``: "train" (sorted, from ``imagesTr``), "validate" or "test"."""
    if division == "train":
        folder = Path(dataset_dir, "imagesTr")
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: set dataset_dir to the extracted Lung250M-4B folder")
        return sorted({p.name[: -len("_1.nii.gz")] for p in folder.glob("case_*_[12].nii.gz")})
    if division not in LUNG250M_DIVISIONS:
        raise ValueError(f"division must be one of {['train', *LUNG250M_DIVISIONS]}, got {division!r}")
    return list(LUNG250M_DIVISIONS[division])


def load_lung250m_landmarks(dataset_dir: str | os.PathLike, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmarks ``(N, 3)`` float32 of image ``_1`` and image ``_2`` of case ``name``, shifted by -0.5 voxel."""
    path = Path(dataset_dir, LUNG250M_LANDMARKS)
    check_files([path], "set dataset_dir to the extracted Lung250M-4B folder")
    table = torch.load(path, map_location="cpu")
    key = str(int(name[-3:]))
    if key not in table:
        raise KeyError(f"{path} holds no landmarks for {name} (key {key!r})")
    both = torch.as_tensor(table[key]).float()
    if both.ndim != 2 or both.shape[1] != 6:
        raise ValueError(f"landmarks of {name} in {path} must be (N, 6), got {tuple(both.shape)}")
    return both[:, :3] + LUNG250M_LANDMARK_SHIFT, both[:, 3:] + LUNG250M_LANDMARK_SHIFT


def lung250m_cases(dataset_dir: str | os.PathLike, division: str) -> list[dict]:
    """Intra-case dicts ``{"image": (p1, p2), "mask": (m1, m2), "name"}`` plus ``"landmarks"`` (tensors) for
    validate / test; two-element entries are (image 0 = ``_1``, image 1 = ``_2``)."""
    split = "Tr" if division == "train" else "Ts"
    cases = []
    for name in lung250m_case_names(dataset_dir, division):
        case = {
            key: tuple(str(Path(dataset_dir, f"{folder}{split}", f"{name}_{i}.nii.gz")) for i in (1, 2))
            for key, folder in (("image", "images"), ("mask", "masks"))
        }
        check_files([*case["image"], *case["mask"]], "incomplete extraction, or a case that must be added by hand")
        if division != "train":
            case["landmarks"] = load_lung250m_landmarks(dataset_dir, name)
        cases.append({**case, "name": name})
    return cases


def lung250m_pairs(dataset_dir: str | os.PathLike, division: str) -> list[dict]:
    """One pair dict per case: ``moving_<key>`` = image ``_1``, ``fixed_<key>`` = image ``_2``."""
    return [intra_pair_item(case) for case in lung250m_cases(dataset_dir, division)]


def lung250m_transforms(
    image_keys: Sequence[str] = ("moving_image", "fixed_image"),
    mask_keys: Sequence[str] = ("moving_mask", "fixed_mask"),
    point_keys: Sequence[str] = ("moving_landmarks", "fixed_landmarks"),
    crop_or_pad_to: Sequence[int] | None = LUNG250M_CROP_OR_PAD,
    downsample: int = LUNG250M_DOWNSAMPLE,
) -> Compose:
    """Load a pair dict: images ``(1, 160, 112, 160)`` float32 in [0, 1] (defaults), masks 0/1 float32 after
    pooling and thresholding, landmarks (if present) ``(N, 3)`` full-resolution voxels of the padded grid."""
    return volume_transforms(
        image_keys,
        mask_keys,
        point_keys=dict(zip(point_keys, image_keys)),
        crop_or_pad_to=crop_or_pad_to,
        downsample=downsample,
        clip=LUNG_CT_CLIP,
        shift_scale=LUNG_CT_SCALE,
        lung_shift=LUNG_CT_SHIFT,
    )
