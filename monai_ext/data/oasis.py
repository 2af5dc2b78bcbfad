"""The Learn2Reg "neurite-oasis" v1.0 release of OASIS-1 (414 T1 brain MRIs with FreeSurfer labels).

Archive: ``neurite-oasis.v1.0.tar`` (6.6 GB, plain tar) at :data:`OASIS_URL`. Each subject folder
``OASIS_OAS1_XXXX_MR1/`` holds, among others, ``aligned_norm.nii.gz`` (skull-stripped, bias-corrected,
affinely aligned T1, 160x192x224 voxels of 1 mm, intensities already in [0, 1]) and
``aligned_seg35.nii.gz`` (35 FreeSurfer structures, labels 1..35, 0 = background); ``subjects.txt``
lists the subject folders. Use of the data is bound by the OASIS data use agreement
(https://www.oasis-brains.org).

Checksum: the publisher (neurite / FreeSurfer FTP) publishes **no** checksum for the archive.
:data:`OASIS_SHA256` is the SHA-256 recorded by the third-party ``torch-em`` dataset loader
(``torch_em/data/datasets/medical/oasis.py``); it is the default of :func:`download_oasis` and can be
replaced (or disabled with ``sha256=None``) by the caller.

Split and crop follow the OASIS configuration of the SITReg authors' reference implementation: subjects in
``subjects.txt`` order, train = first 255, validate = [255:275], test = [275:]; every volume is
cropped by ``[[0, 0], [24, 24], [16, 16]]`` voxels (before, after) per axis, 160x192x224 ->
160x144x192; no intensity normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from monai.transforms import Compose

from monai_ext.data.base import all_pairs, prepare_archive, volume_transforms

__all__ = [
    "OASIS_URL",
    "OASIS_ARCHIVE",
    "OASIS_SHA256",
    "OASIS_CROP",
    "OASIS_DIVISIONS",
    "OASIS_IMAGE_FILE",
    "OASIS_LABEL_FILE",
    "download_oasis",
    "oasis_subjects",
    "oasis_cases",
    "oasis_pairs",
    "oasis_transforms",
]

OASIS_URL = "https://surfer.nmr.mgh.harvard.edu/ftp/data/neurite/data/neurite-oasis.v1.0.tar"
OASIS_ARCHIVE = "neurite-oasis.v1.0.tar"
OASIS_SHA256 = "86dd117dda17f736ade8a4088d7e98e066e1181950fe8b406f1a35f7fb743e78"
OASIS_CROP = ((0, 0), (24, 24), (16, 16))
OASIS_DIVISIONS = {"train": slice(0, 255), "validate": slice(255, 275), "test": slice(275, None)}
OASIS_IMAGE_FILE = "aligned_norm.nii.gz"
OASIS_LABEL_FILE = "aligned_seg35.nii.gz"


def download_oasis(
    dataset_dir: str | os.PathLike,
    url: str = OASIS_URL,
    sha256: str | None = OASIS_SHA256,
    keep_archive: bool = True,
    progress: bool = True,
    download: bool = True,
) -> Path:
    """Download and extract the archive into ``dataset_dir`` unless ``subjects.txt`` is already there.

    Pointing ``dataset_dir`` at an existing extraction (any folder with ``subjects.txt`` and the
    subject folders) skips the download. ``url`` may be a mirror or a ``file://`` URL; ``sha256`` is
    the expected digest of the archive (see the module docstring; ``None`` skips the check).
    The transfer resumes after an interruption (:func:`monai_ext.data.download.download_file`). ``download=False``
    fetches nothing (a bundle's ``download`` setting: the data are expected in ``dataset_dir`` already).

    Returns:
        ``dataset_dir`` as a ``Path``.
    """
    if not download:
        return Path(dataset_dir)
    return prepare_archive(dataset_dir, url, OASIS_ARCHIVE, "subjects.txt", sha256, keep_archive, progress)


def oasis_subjects(
    dataset_dir: str | os.PathLike, division: str, divisions: Mapping[str, Sequence[int | None]] | None = None
) -> list[str]:
    """Subject folder names of ``division`` ("train", "validate", "test" or "all"), in ``subjects.txt`` order.

    ``divisions`` overrides the split as ``{division: (start, stop)}`` indices into ``subjects.txt``
    (default :data:`OASIS_DIVISIONS`: the first 255 train, the next 20 validate, the rest test).
    """
    splits = OASIS_DIVISIONS if divisions is None else {k: slice(*v) for k, v in divisions.items()}
    if division != "all" and division not in splits:
        raise ValueError(f"division must be one of {[*splits, 'all']}, got {division!r}")
    listing = Path(dataset_dir) / "subjects.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} not found: set dataset_dir to the extracted neurite-oasis folder")
    subjects = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return subjects if division == "all" else subjects[splits[division]]


def oasis_cases(
    dataset_dir: str | os.PathLike,
    division: str,
    divisions: Mapping[str, Sequence[int | None]] | None = None,
    image_file: str = OASIS_IMAGE_FILE,
    label_file: str = OASIS_LABEL_FILE,
) -> list[dict[str, str]]:
    """One ``{"image", "label", "name"}`` dict of file paths per subject of ``division`` (see :func:`oasis_subjects`).

    ``image_file`` / ``label_file`` name the files inside each subject folder: the affinely aligned
    ``aligned_norm`` / ``aligned_seg35`` by default, ``norm.nii.gz`` / ``seg35.nii.gz`` for the raw data.
    """
    cases = []
    for name in oasis_subjects(dataset_dir, division, divisions):
        case = {"image": str(Path(dataset_dir, name, image_file)), "label": str(Path(dataset_dir, name, label_file))}
        for path in case.values():
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path} listed in subjects.txt is missing (incomplete extraction?)")
        cases.append({**case, "name": name})
    return cases


def oasis_pairs(
    dataset_dir: str | os.PathLike,
    division: str,
    divisions: Mapping[str, Sequence[int | None]] | None = None,
    image_file: str = OASIS_IMAGE_FILE,
    label_file: str = OASIS_LABEL_FILE,
) -> list[dict[str, str]]:
    """Evaluation pairs: every unordered pair ``(i < j)`` of the division's subjects, as MONAI data dicts.

    Subject ``i`` is the moving image and ``j`` the fixed one (SITReg's "forward" maps image-2
    coordinates to image 1). Keys: ``moving_image``, ``fixed_image``, ``moving_label``, ``fixed_label``,
    ``moving_name``, ``fixed_name``.
    """
    return all_pairs(oasis_cases(dataset_dir, division, divisions, image_file, label_file))


def oasis_transforms(
    image_keys: Sequence[str] = ("moving_image", "fixed_image"),
    label_keys: Sequence[str] = ("moving_label", "fixed_label"),
    crop: Sequence[Sequence[int]] | None = OASIS_CROP,
) -> Compose:
    """Load (channel first), crop and type the images and label maps of a pair (or case) dict.

    Images come out as float32 ``(1, D, H, W)`` MetaTensors with their (crop-corrected) affine, label
    maps as int64 ``(1, D, H, W)``. ``crop=None`` keeps the full volume.
    """
    return volume_transforms(image_keys, label_keys=label_keys, crop=crop)
