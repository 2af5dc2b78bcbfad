"""The Learn2Reg 2023 NLST lung CT task (inhale / exhale pairs of one subject, 1.5 mm isotropic).

Archive: ``NLST2023.zip`` at :data:`NLST_URL` (the Learn2Reg data host used by SITReg). Layout after
extraction::

    NLST/NLST_dataset.json      "training_paired_images" and "registration_val": [{"fixed", "moving"}]
    NLST/imagesTr/NLST_XXXX_0000.nii.gz, NLST_XXXX_0001.nii.gz     CT in HU
    NLST/masksTr/NLST_XXXX_000{0,1}.nii.gz                          lung masks
    NLST/keypointsTr/NLST_XXXX_000{0,1}.csv                         corresponding keypoints, voxel indices

Checksum: none is published for the archive (:data:`NLST_SHA256` is ``None``; pass one to
:func:`download_nlst` to verify a copy you trust). Use of the data is bound by the Learn2Reg terms
(https://learn2reg.grand-challenge.org/Datasets/) and the NLST / TCIA licence.

Splits and pipeline as the SITReg authors' reference implementation: training cases = the case names of
``training_paired_images``, validation = those of ``registration_val``; there is no test split. Image
0 (``_0000``) is the moving image and image 1 (``_0001``) the fixed one, as SITReg's registration
indices (the json calls ``_0001`` "moving"; SITReg is symmetric and infers both directions).
Intensity: ``(HU + 1024) * lung mask``, clipped to [0, 1024], divided by 1024; no crop, no pooling.
Keypoints are ``(N, 3)`` voxel coordinates of their image, used as stored (no half-voxel shift).
Training adds :class:`monai_ext.data.affine_augmentation.RandSITRegAffined` (p = 0.9 per image).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from monai.transforms import Compose

from monai_ext.data.base import check_files, intra_pair_item, prepare_archive, volume_transforms

__all__ = [
    "NLST_URL",
    "NLST_ARCHIVE",
    "NLST_SHA256",
    "NLST_JSON",
    "NLST_DIVISIONS",
    "LUNG_CT_SHIFT",
    "LUNG_CT_CLIP",
    "LUNG_CT_SCALE",
    "download_nlst",
    "nlst_case_names",
    "nlst_cases",
    "nlst_pairs",
    "nlst_transforms",
]

NLST_URL = "https://cloud.imi.uni-luebeck.de/s/pERQBNyEFNLY8gR/download/NLST2023.zip"
NLST_ARCHIVE = "NLST2023.zip"
NLST_SHA256: str | None = None  # not published
NLST_JSON = "NLST/NLST_dataset.json"
NLST_DIVISIONS = {"train": "training_paired_images", "validate": "registration_val"}
LUNG_CT_SHIFT = 1024.0  # HU of air -> 0
LUNG_CT_CLIP = (0.0, 1024.0)
LUNG_CT_SCALE = (0.0, 1024.0)  # (shift, scale) after clipping


def download_nlst(
    dataset_dir: str | os.PathLike,
    url: str = NLST_URL,
    sha256: str | None = NLST_SHA256,
    keep_archive: bool = True,
    progress: bool = True,
    download: bool = True,
) -> Path:
    """Download and extract ``NLST2023.zip`` into ``dataset_dir`` unless ``NLST/NLST_dataset.json`` is there.

    ``url`` may be a mirror or a ``file://`` URL; the transfer resumes after an interruption. ``download=False``
    fetches nothing (a bundle's ``download`` setting: the data are expected in ``dataset_dir`` already).

    Returns:
        ``dataset_dir`` as a ``Path`` (the data live in ``dataset_dir/NLST``).
    """
    if not download:
        return Path(dataset_dir)
    return prepare_archive(dataset_dir, url, NLST_ARCHIVE, NLST_JSON, sha256, keep_archive, progress)


def nlst_case_names(dataset_dir: str | os.PathLike, division: str) -> list[str]:
    """Case names (``NLST_XXXX``) of ``division`` ("train" or "validate"), in json order."""
    if division not in NLST_DIVISIONS:
        raise ValueError(f"division must be one of {list(NLST_DIVISIONS)} (NLST has no public test split), got {division!r}")
    listing = Path(dataset_dir, NLST_JSON)
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} not found: set dataset_dir to the folder holding NLST/ (see download_nlst)")
    entries = json.loads(listing.read_text())[NLST_DIVISIONS[division]]
    names = ["_".join(Path(entry["fixed"]).name.split("_")[:2]) for entry in entries]
    return list(dict.fromkeys(names))


def nlst_cases(dataset_dir: str | os.PathLike, division: str) -> list[dict]:
    """Intra-case dicts ``{"image": (p0, p1), "mask": (m0, m1), "keypoints": (k0, k1), "name"}``.

    Two-element entries are (image 0 = moving, image 1 = fixed): the input of
    :class:`monai_ext.data.pairs.RegistrationPairDataset` with ``pairing="intra"``.
    """
    root = Path(dataset_dir, "NLST")
    cases = []
    for name in nlst_case_names(dataset_dir, division):
        case = {
            key: tuple(str(root / folder / f"{name}_{index:04d}{suffix}") for index in (0, 1))
            for key, folder, suffix in (
                ("image", "imagesTr", ".nii.gz"), ("mask", "masksTr", ".nii.gz"), ("keypoints", "keypointsTr", ".csv")
            )
        }
        check_files([p for paths in case.values() for p in paths], f"listed in {NLST_JSON} (incomplete extraction?)")
        cases.append({**case, "name": name})
    return cases


def nlst_pairs(dataset_dir: str | os.PathLike, division: str) -> list[dict]:
    """One pair dict per case: ``moving_<key>`` = image 0, ``fixed_<key>`` = image 1 (keys image, mask, keypoints, name)."""
    return [intra_pair_item(case) for case in nlst_cases(dataset_dir, division)]


def nlst_transforms(
    image_keys: Sequence[str] = ("moving_image", "fixed_image"),
    mask_keys: Sequence[str] = ("moving_mask", "fixed_mask"),
    point_keys: Sequence[str] = ("moving_keypoints", "fixed_keypoints"),
) -> Compose:
    """Load a pair dict: images ``(1, D, H, W)`` float32 in [0, 1], masks 0/1 float32, keypoints ``(N, 3)`` float32.

    ``mask_keys`` and ``point_keys`` are aligned with ``image_keys``; pass ``point_keys=()`` to skip keypoints.
    """
    return volume_transforms(
        image_keys,
        mask_keys,
        point_keys=dict(zip(point_keys, image_keys)),
        clip=LUNG_CT_CLIP,
        shift_scale=LUNG_CT_SCALE,
        lung_shift=LUNG_CT_SHIFT,
    )
