"""LUMIR (Learn2Reg 2024 task 1: large-scale unsupervised brain MRI registration, 160x224x192, 1 mm).

Files (Google Drive, as linked by the challenge and used by SITReg)::

    LUMIR_dataset.json        {"training": [{"image": "./imagesTr/LUMIRMRI_XXXX_0000.nii.gz"}, ...],
                               "validation": [{"fixed": "./imagesVal/...", "moving": "./imagesVal/..."}, ...]}
    LUMIR.zip                 -> imagesTr/*.nii.gz (3384 T1 images, no labels), imagesVal/*.nii.gz
    SanityCheckLabelsTr.zip   -> labelsTr/<case>.nii.gz (label maps of a few training cases, "sanity_check")

Checksums: none are published (:data:`LUMIR_SHA256` are ``None``). Google Drive answers large files with
a confirmation web page instead of the file; :func:`download_lumir` then stops with a message telling
where to place the archive downloaded in a browser. Use of the data is bound by the challenge terms
(https://learn2reg.grand-challenge.org/).

Splits (SITReg ``src/data/lumir/data.py``): train = the json's "training" images; validate = the
json's (moving, fixed) "validation" pairs; "sanity_check" = every unordered pair (or both directions)
of the cases with a label map in ``labelsTr``; no test split. Pipeline: no crop, ``x / 255``, and
the body mask ``intensity > 0`` as the NCC mask (``use_body_mask_as_mask_with_erosion: 0``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.transforms import Compose, CopyItemsd, Lambdad

from monai_ext.data.base import all_pairs, check_files, pair_item, prepare_archive, volume_transforms
from monai_ext.data.download import download_file

__all__ = [
    "LUMIR_JSON_URL",
    "LUMIR_IMAGES_URL",
    "LUMIR_LABELS_URL",
    "LUMIR_SHA256",
    "LUMIR_JSON",
    "LUMIR_SCALE",
    "download_lumir",
    "lumir_cases",
    "lumir_label_keys",
    "lumir_pairs",
    "lumir_transforms",
]

_DRIVE = "https://drive.google.com/uc?export=download&id="
LUMIR_JSON_URL = _DRIVE + "1b0hyH7ggjCysJG-VGvo38XVE8bFVRMxb"
LUMIR_IMAGES_URL = _DRIVE + "1PTHAX9hZX7HBXXUGVvI1ar1LUf4aVbq9"
LUMIR_LABELS_URL = _DRIVE + "14IQ_hiyMoheQqB_LrveDayzFaOe0YrEP"
LUMIR_SHA256: dict[str, str | None] = {"json": None, "images": None, "labels": None}  # not published
LUMIR_JSON = "LUMIR_dataset.json"
LUMIR_SCALE = (0.0, 255.0)  # (shift, scale): x -> x / 255
_LABELS_ARCHIVE = "SanityCheckLabelsTr.zip"


def download_lumir(
    dataset_dir: str | os.PathLike,
    json_url: str = LUMIR_JSON_URL,
    images_url: str = LUMIR_IMAGES_URL,
    labels_url: str | None = LUMIR_LABELS_URL,
    keep_archive: bool = True,
    progress: bool = True,
    download: bool = True,
) -> Path:
    """Fetch ``LUMIR_dataset.json``, ``LUMIR.zip`` (extracted into ``dataset_dir``) and the sanity-check labels
    (extracted into ``dataset_dir/labelsTr``; skipped with ``labels_url=None``). Each part is skipped when
    already present, so a folder prepared by hand is used as it is. ``download=False`` fetches nothing (a bundle's
    ``download`` setting: the data are expected in ``dataset_dir`` already).

    Returns:
        ``dataset_dir`` as a ``Path``.
    """
    dataset_dir = Path(dataset_dir)
    if not download:
        return dataset_dir
    download_file(json_url, dataset_dir / LUMIR_JSON, sha256=LUMIR_SHA256["json"], progress=progress)
    try:
        json.loads((dataset_dir / LUMIR_JSON).read_text())
    except ValueError as err:
        (dataset_dir / LUMIR_JSON).unlink()
        raise ValueError(
            f"the file downloaded from {json_url} is not json (probably a web page); it was deleted. Download "
            f"{LUMIR_JSON} by hand and place it at {dataset_dir / LUMIR_JSON}."
        ) from err
    prepare_archive(dataset_dir, images_url, "LUMIR.zip", "imagesTr", LUMIR_SHA256["images"], keep_archive, progress)
    if labels_url is not None:
        # extract_archive's completion marker tells that the label archive was unpacked
        prepare_archive(dataset_dir / "labelsTr", labels_url, _LABELS_ARCHIVE, f".{_LABELS_ARCHIVE}.extracted",
                        LUMIR_SHA256["labels"], keep_archive, progress)
    return dataset_dir


def _listing(dataset_dir: str | os.PathLike) -> dict:
    path = Path(dataset_dir, LUMIR_JSON)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: set dataset_dir to the LUMIR folder (see download_lumir)")
    return json.loads(path.read_text())


def _case(dataset_dir: str | os.PathLike, relative: str) -> dict[str, str]:
    path = Path(dataset_dir, relative)
    return {"image": str(path), "name": path.name.split(".")[0]}


def lumir_cases(dataset_dir: str | os.PathLike, division: str) -> list[dict[str, str]]:
    """``{"image", "name"}`` dicts of "train" (json "training") or ``{"image", "label", "name"}`` of "sanity_check"."""
    if division == "train":
        cases = [_case(dataset_dir, entry["image"]) for entry in _listing(dataset_dir)["training"]]
    elif division == "sanity_check":
        labels = sorted(Path(dataset_dir, "labelsTr").glob("*.nii.gz"))
        if not labels:
            raise FileNotFoundError(f"no label maps in {Path(dataset_dir, 'labelsTr')} (see download_lumir)")
        cases = [
            {"image": str(Path(dataset_dir, "imagesTr", p.name)), "label": str(p), "name": p.name.split(".")[0]}
            for p in labels
        ]
    else:
        raise ValueError(f"division must be 'train' or 'sanity_check' (validate comes as pairs), got {division!r}")
    check_files([c["image"] for c in cases], f"listed in {LUMIR_JSON} or labelsTr (incomplete extraction?)")
    return cases


def lumir_label_keys(division: str) -> list[str]:
    """Label-map keys of the pairs of ``division``: none for ``"validate"`` (its labels are not public), the pair's
    ``["moving_label", "fixed_label"]`` otherwise (``"sanity_check"``); the ``label_keys`` of
    :func:`lumir_transforms` in a bundle's validation."""
    return [] if division == "validate" else ["moving_label", "fixed_label"]


def lumir_pairs(dataset_dir: str | os.PathLike, division: str, both_directions: bool = False) -> list[dict[str, str]]:
    """Pair dicts of "validate" (the json's (moving, fixed) pairs, in order) or "sanity_check" (all pairs of
    the labelled cases; ``both_directions`` gives ordered pairs). LUMIR has no public test split."""
    if division == "sanity_check":
        return all_pairs(lumir_cases(dataset_dir, division), both_directions)
    if division != "validate":
        raise ValueError(f"division must be 'validate' or 'sanity_check' (no public test split), got {division!r}")
    pairs = [
        pair_item(_case(dataset_dir, entry["moving"]), _case(dataset_dir, entry["fixed"]))
        for entry in _listing(dataset_dir)["validation"]
    ]
    check_files([p[k] for p in pairs for k in ("moving_image", "fixed_image")], "incomplete extraction of LUMIR.zip?")
    return pairs


def _positive(image: torch.Tensor) -> torch.Tensor:
    """Body mask ``image > 0`` as float (a module-level function: picklable for data-loader workers)."""
    return (image > 0).to(torch.float32)


def lumir_transforms(
    image_keys: Sequence[str] = ("moving_image", "fixed_image"),
    mask_keys: Sequence[str] = ("moving_mask", "fixed_mask"),
    label_keys: Sequence[str] = (),
) -> Compose:
    """Load a pair dict: images ``(1, 160, 224, 192)`` float32 ``/ 255``; the body masks ``image > 0`` are
    written to ``mask_keys`` (aligned with ``image_keys``; ``()`` for none); ``label_keys`` int64
    (e.g. ``("moving_label", "fixed_label")`` for "sanity_check")."""
    transforms = volume_transforms(image_keys, label_keys=label_keys, shift_scale=LUMIR_SCALE)
    if mask_keys:
        if len(mask_keys) != len(image_keys):
            raise ValueError(f"mask_keys must have one key per image key {list(image_keys)}, got {list(mask_keys)}")
        transforms = Compose([
            transforms,
            CopyItemsd(keys=list(image_keys), names=list(mask_keys)),
            Lambdad(keys=list(mask_keys), func=_positive),
        ])
    return transforms
