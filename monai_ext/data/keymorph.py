"""KeyMorph data: IXI / CSV subject lists, modality-aware pair sampling, same-subject modality pairs.

Layouts (those of the authors' reference implementation):

* **IXI** (:func:`ixi_subjects`): ``data_root/{T1,T2,PD}/<name>.nii.gz`` images, optional brain masks
  ``data_root/{mod}_mask/<name>_mask.nii.gz`` and label maps ``data_root/{mod}_seg/<name>_seg.nii.gz``. Files are
  sorted by name per modality; ``split="train"`` takes indices ``[0, 428)``, ``"test"`` ``[428, 528)`` (the
  reference's ``IXIDataset``), ``"all"`` every file.
* **CSV option 1** (:func:`csv_pairs`): explicit pair rows with columns ``fixed_img_path, moving_img_path``, optional
  ``fixed_seg_path, moving_seg_path, fixed_mask_path, moving_mask_path`` (the string ``"None"`` or an empty cell =
  missing) and ``train`` (true / false). Pairs are used as listed.
* **CSV option 2** (:func:`csv_subjects`): one row per image with ``img_path, modality``, optional ``seg_path``,
  ``mask_path``, ``train``: per-modality subject lists.

Subjects are dicts ``{"image": path, ["mask": path], ["label": path], "name": str, "modality": str,
"subject": str}``; ``subject`` (the name without a trailing ``-<mod>`` / ``_<mod>``) links the modalities of one
person (:func:`same_subject_pairs`).

Pairs (:func:`modality_pairs`): without ``mix_modalities`` all *ordered* pairs of distinct images within each
modality; with it all ordered pairs across two distinct modalities. The reference builds the within-modality pairs
with ``itertools.product`` and so also registers every image to itself (and its directory mode pairs a folder
with itself); those self-pairs teach nothing (the identity is exact) and are excluded here: an image is never
paired with itself (same path).

Pair dicts are ``{"moving_<key>": ..., "fixed_<key>": ...}`` (:func:`monai_ext.data.base.pair_item`), the keys the
training / evaluation iterations read. Training draws ``pairs_per_epoch`` of them per epoch (the reference's 32 steps
per epoch over a shuffled loader) with :class:`monai_ext.data.pairs.RegistrationPairDataset` (``pairing="listed"``:
random permutations of the pair list, reproducible per ``(seed, epoch)``), with its ``extras`` the same-subject
two-modality items (:func:`consistency_subject_pairs`) for the keypoint-consistency step. Self-supervised
pretraining reads single images instead (:func:`keymorph_images`: every subject image of the split), at most
``pairs_per_epoch`` per epoch (:func:`pretrain_epoch_length`).

Preprocessing (:func:`keymorph_transforms`, to model space): :func:`keymorph_pair_transforms` and
:func:`keymorph_image_transforms` pick the keys from what the items carry (label maps, consistency images), so the
bundle configs name a mode's setting (``supervised``, ``moving_label``, ``consistency_weight``) instead of
computing key lists.
"""

from __future__ import annotations

import csv
import itertools
import os
import re
from collections.abc import Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose, Orientationd

from monai_ext.data.base import IMAGE_SUFFIXES, image_stem, pair_item
from monai_ext.data.model_space import model_space_transforms

__all__ = [
    "IXI_MODALITIES",
    "IXI_SPLITS",
    "subject_id",
    "ixi_subjects",
    "csv_subjects",
    "csv_pairs",
    "modality_pairs",
    "same_subject_pairs",
    "keymorph_subjects",
    "keymorph_images",
    "pretrain_epoch_length",
    "keymorph_pairs",
    "keymorph_transforms",
    "PAIR_IMAGE_KEYS",
    "PAIR_LABEL_KEYS",
    "CONSISTENCY_IMAGE_KEYS",
    "keymorph_pair_transforms",
    "keymorph_image_transforms",
    "consistency_subject_pairs",
    "paired_files",
    "folder_images",
]

IXI_MODALITIES = ("T1", "T2", "PD")
IXI_SPLITS = {"train": (0, 428), "test": (428, 528), "all": (0, None)}
_TRUE = ("1", "true", "yes", "train")
#: keys of the two images of a pair dict (:func:`monai_ext.data.base.pair_item`)
PAIR_IMAGE_KEYS = ("moving_image", "fixed_image")
#: keys of the two label maps of a pair dict
PAIR_LABEL_KEYS = ("moving_label", "fixed_label")
#: keys of the same-subject two-modality images for the consistency step: the ``image_1`` / ``image_2`` of a
#: :func:`same_subject_pairs` item merged into a training pair under the ``consistency_`` prefix
#: (the ``extras`` of :class:`monai_ext.data.pairs.RegistrationPairDataset`)
CONSISTENCY_IMAGE_KEYS = ("consistency_image_1", "consistency_image_2")


def subject_id(name: str, modality: str) -> str:
    """``name`` without a trailing ``-<modality>`` / ``_<modality>`` (case-insensitive): the person's id."""
    return re.sub(rf"[-_]{re.escape(modality)}$", "", name, flags=re.IGNORECASE)


def _split(items: list, split: str) -> list:
    if split not in IXI_SPLITS:
        raise ValueError(f"split must be one of {sorted(IXI_SPLITS)}, got {split!r}")
    start, stop = IXI_SPLITS[split]
    return items[start:stop]


def ixi_subjects(
    data_root: str | os.PathLike,
    modalities: Sequence[str] = IXI_MODALITIES,
    split: str = "train",
    masks: bool = False,
    labels: bool = False,
) -> dict[str, list[dict[str, str]]]:
    """Per-modality subject lists of an IXI-layout folder (module docstring).

    Args:
        data_root: folder holding one sub-folder per modality.
        modalities: modality folder names to read.
        split: ``"train"`` (sorted files ``[0, 428)``), ``"test"`` (``[428, 528)``) or ``"all"``.
        masks, labels: add ``"mask"`` / ``"label"`` paths (which must exist).

    Raises:
        FileNotFoundError: a missing modality folder, mask or label file. ValueError: a modality without images
            in the split.
    """
    root = Path(data_root)
    if not modalities:
        raise ValueError("modalities must not be empty")
    out: dict[str, list[dict[str, str]]] = {}
    for modality in modalities:
        folder = root / modality
        if not folder.is_dir():
            raise FileNotFoundError(f"IXI modality folder not found: {folder}")
        files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
        files = _split(files, split)
        if not files:
            raise ValueError(f"no images of modality {modality!r} in split {split!r} under {folder}")
        subjects = []
        for path in files:
            name = image_stem(path)
            subject = {"image": str(path), "name": name, "modality": modality, "subject": subject_id(name, modality)}
            for wanted, key, suffix in ((masks, "mask", "mask"), (labels, "label", "seg")):
                if wanted:
                    extra = root / f"{modality}_{suffix}" / f"{name}_{suffix}.nii.gz"
                    if not extra.is_file():
                        raise FileNotFoundError(f"{key} of {path} not found: expected {extra}")
                    subject[key] = str(extra)
            subjects.append(subject)
        out[modality] = subjects
    return out


def _read_csv(path: str | os.PathLike, required: Sequence[str]) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    with path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        raise ValueError(f"{path} has no rows")
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}; it has {sorted(rows[0])}")
    return rows


def _cell(row: Mapping[str, str], column: str) -> str | None:
    value = (row.get(column) or "").strip()
    return None if value in ("", "None") else value


def _in_split(row: Mapping[str, str], split: str) -> bool:
    if split == "all" or "train" not in row:
        return True
    is_train = (row["train"] or "").strip().lower() in _TRUE
    return is_train == (split == "train")


def csv_subjects(csv_path: str | os.PathLike, split: str = "train") -> dict[str, list[dict[str, str]]]:
    """CSV option 2: per-modality subject lists from rows ``img_path, modality[, seg_path, mask_path, train]``.

    ``split``: ``"train"`` (rows whose ``train`` is true), ``"test"`` (false) or ``"all"``; without a ``train``
    column every row is used. Relative paths are resolved against the CSV's folder.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    base = Path(csv_path).parent
    out: dict[str, list[dict[str, str]]] = {}
    for row in _read_csv(csv_path, ("img_path", "modality")):
        if not _in_split(row, split):
            continue
        image, modality = _cell(row, "img_path"), _cell(row, "modality")
        if image is None or modality is None:
            raise ValueError(f"{csv_path}: every row needs img_path and modality, got {dict(row)}")
        subject = {"image": str(base / image), "modality": modality}
        for column, key in (("seg_path", "label"), ("mask_path", "mask")):
            if _cell(row, column) is not None:
                subject[key] = str(base / _cell(row, column))
        subject["name"] = image_stem(image)
        subject["subject"] = subject_id(subject["name"], modality)
        out.setdefault(modality, []).append(subject)
    if not out:
        raise ValueError(f"{csv_path} has no rows in split {split!r}")
    return out


def csv_pairs(csv_path: str | os.PathLike, split: str = "train") -> list[dict[str, str]]:
    """CSV option 1: the listed pairs as pair dicts (``moving_image``, ``fixed_image``, optional ``*_label`` /
    ``*_mask``, ``*_name``). Rows pairing a file with itself are rejected."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    base = Path(csv_path).parent
    pairs = []
    for number, row in enumerate(_read_csv(csv_path, ("fixed_img_path", "moving_img_path")), start=2):
        if not _in_split(row, split):
            continue
        sides = {}
        for side in ("moving", "fixed"):
            image = _cell(row, f"{side}_img_path")
            if image is None:
                raise ValueError(f"{csv_path} line {number}: {side}_img_path is missing")
            item = {"image": str(base / image), "name": image_stem(image)}
            for column, key in (("seg_path", "label"), ("mask_path", "mask")):
                if _cell(row, f"{side}_{column}") is not None:
                    item[key] = str(base / _cell(row, f"{side}_{column}"))
            sides[side] = item
        if Path(sides["moving"]["image"]).resolve() == Path(sides["fixed"]["image"]).resolve():
            raise ValueError(f"{csv_path} line {number}: an image is paired with itself ({sides['moving']['image']})")
        pairs.append(pair_item(sides["moving"], sides["fixed"]))
    if not pairs:
        raise ValueError(f"{csv_path} has no pairs in split {split!r}")
    return pairs


def _same_file(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return os.path.abspath(a["image"]) == os.path.abspath(b["image"])


def modality_pairs(
    subjects: Mapping[str, Sequence[Mapping[str, Any]]], mix_modalities: bool = False
) -> list[dict[str, Any]]:
    """Pair dicts ``(moving, fixed)`` from per-modality subject lists; never an image with itself.

    * ``mix_modalities=False``: every ordered pair of two different images of the same modality
      (``n (n - 1)`` per modality);
    * ``mix_modalities=True``: for every ordered pair of two distinct modalities ``(a, b)``, every (moving of
      ``a``, fixed of ``b``) pair (the reference uses unordered modality combinations; both directions are used
      here so that neither modality is always the fixed one).

    Raises ``ValueError`` when no pair exists (e.g. one image per modality, or one modality with mixing).
    """
    modalities = sorted(subjects)
    if mix_modalities:
        combos = [(subjects[a], subjects[b]) for a, b in itertools.permutations(modalities, 2)]
    else:
        combos = [(subjects[m], subjects[m]) for m in modalities]
    pairs = [
        pair_item(moving, fixed)
        for movings, fixeds in combos
        for moving, fixed in itertools.product(movings, fixeds)
        if not _same_file(moving, fixed)
    ]
    if not pairs:
        kind = "across distinct modalities" if mix_modalities else "within a modality"
        raise ValueError(f"no image pairs {kind} in modalities {modalities} (need two images to pair)")
    return pairs


def same_subject_pairs(subjects: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Same-subject two-modality items for the keypoint-consistency loss
    (:class:`monai_ext.losses.keymorph.KeypointConsistencyLoss`).

    For every subject id present in at least two modalities and every unordered pair of those modalities
    ``(a < b)``: ``{"image_1": path of a, "image_2": path of b, "modality_1": a, "modality_2": b, "subject": id}``
    (plus ``mask_1`` / ``mask_2`` when present). The two images must be co-registered (IXI "centered" data);
    that is not checked here.
    """
    by_subject: dict[str, dict[str, Mapping[str, Any]]] = {}
    for modality in sorted(subjects):
        for item in subjects[modality]:
            by_subject.setdefault(item.get("subject", item.get("name")), {})[modality] = item
    out = []
    for sid in sorted(by_subject):
        for a, b in itertools.combinations(sorted(by_subject[sid]), 2):
            first, second = by_subject[sid][a], by_subject[sid][b]
            item = {"image_1": first["image"], "image_2": second["image"], "modality_1": a, "modality_2": b}
            item["subject"] = sid
            if "mask" in first and "mask" in second:
                item.update(mask_1=first["mask"], mask_2=second["mask"])
            out.append(item)
    if not out:
        raise ValueError("no subject has images of two modalities (same-subject pairs need matching names)")
    return out


def keymorph_subjects(
    dataset: str,
    data_path: str | os.PathLike,
    split: str = "train",
    modalities: Sequence[str] = IXI_MODALITIES,
    labels: bool = False,
) -> dict[str, list[dict[str, str]]]:
    """Per-modality subjects of ``dataset`` ``"ixi"`` (:func:`ixi_subjects`) or ``"csv"`` (:func:`csv_subjects`)."""
    if dataset == "ixi":
        return ixi_subjects(data_path, modalities, split, labels=labels)
    if dataset == "csv":
        return csv_subjects(data_path, split)
    raise ValueError(f"subject lists need dataset 'ixi' or 'csv', got {dataset!r}")


def keymorph_images(
    dataset: str,
    data_path: str | os.PathLike,
    split: str = "train",
    modalities: Sequence[str] = IXI_MODALITIES,
    labels: bool = False,
) -> list[dict[str, str]]:
    """Every subject of :func:`keymorph_subjects` as one flat list (the pretraining images), modality by modality
    in the order of :func:`keymorph_subjects` and, within a modality, in its file order.

    Items are the subject dicts ``{"image", "name", "modality", "subject"[, "mask", "label"]}``.
    """
    subjects = keymorph_subjects(dataset, data_path, split, modalities, labels)
    return [subject for per_modality in subjects.values() for subject in per_modality]


def pretrain_epoch_length(dataset: Sized, pairs_per_epoch: int) -> int:
    """Iterations of a pretraining epoch: ``min(pairs_per_epoch, len(dataset))``.

    The trainer's ``epoch_length``: an epoch draws at most ``pairs_per_epoch`` items of the (shuffled) data loader
    over ``dataset``, never more than the dataset holds; with fewer, ignite continues the loader's iterator in the
    next epoch.
    """
    return min(int(pairs_per_epoch), len(dataset))


def keymorph_pairs(
    dataset: str,
    data_path: str | os.PathLike,
    split: str = "train",
    modalities: Sequence[str] = IXI_MODALITIES,
    mix_modalities: bool = False,
    labels: bool = False,
    max_pairs: int | None = None,
    seed: int = 23,
) -> list[dict[str, Any]]:
    """Pair dicts of a training / evaluation split, the bundles' single entry point.

    Args:
        dataset: ``"ixi"`` (``data_path`` = IXI root), ``"csv"`` (option 2 subject CSV, pairs by
            :func:`modality_pairs`) or ``"csv_pairs"`` (option 1 pair CSV, used as listed).
        split: ``"train"`` / ``"test"`` (``"all"``).
        modalities: IXI modality folders (ignored for CSVs).
        mix_modalities: cross-modality pairs instead of within-modality pairs.
        labels: IXI: require label maps (supervised training, Dice).
        max_pairs: keep a random subset of this many pairs (seeded; e.g. a small validation set).
        seed: seed of the subset.
    """
    if dataset == "csv_pairs":
        pairs = csv_pairs(data_path, split)
    elif dataset in ("ixi", "csv"):
        pairs = modality_pairs(keymorph_subjects(dataset, data_path, split, modalities, labels), mix_modalities)
    else:
        raise ValueError(f"dataset must be 'ixi', 'csv' or 'csv_pairs', got {dataset!r}")
    if labels and any("moving_label" not in p or "fixed_label" not in p for p in pairs):
        raise ValueError(f"labels=True but some pairs of {data_path} have no label maps")
    if max_pairs is not None and max_pairs < len(pairs):
        keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(int(seed)))[: int(max_pairs)]
        pairs = [pairs[i] for i in sorted(keep.tolist())]
    return pairs


def keymorph_transforms(
    image_keys: Sequence[str],
    label_keys: Sequence[str] = (),
    pixdim: Sequence[float] | None = (1.0, 1.0, 1.0),
    spatial_size: Sequence[int] | None = (256, 256, 256),
    swap_hw: bool = False,
) -> Compose:
    """KeyMorph / BrainMorph preprocessing to model space (that of the authors' registration script), from MONAI
    transforms.

    :func:`monai_ext.data.model_space.model_space_transforms` with RAS orientation, ``pixdim`` resampling,
    symmetric crop / pad to ``spatial_size`` and **min-max** intensity scaling (percentiles 0 and 100, the reference's
    ``rescale_intensity``). BrainMorph: 1 mm, 256^3. IXI half resolution: 2 mm, 128^3 (the reference average-pools
    its 1 mm 256^3 data by 2).

    ``swap_hw``: the IXI half-resolution models were trained on tensors whose last two axes were swapped
    (``permute(0, 1, 3, 2)`` in the reference's half-resolution data loading). Reorienting to ``"RSA"`` instead
    of ``"RAS"`` is that swap with the affine kept correct (``Orientationd`` updates the metadata), so outputs
    still map back to native space.
    """
    base = model_space_transforms(
        image_keys, label_keys, pixdim=pixdim, spatial_size=spatial_size, intensity="percentile", percentiles=(0, 100)
    )
    if not swap_hw:
        return base
    keys = list(image_keys) + list(label_keys)
    return Compose([base, Orientationd(keys=keys, axcodes="RSA", labels=None)])


def _wants_labels(labels: bool | str | os.PathLike | None) -> bool:
    """``labels`` of the transform factories: a bool, or a label path whose presence (not ``None``, not empty)
    says that the items carry label maps."""
    if isinstance(labels, bool):
        return labels
    return labels is not None and str(labels) != ""


def keymorph_pair_transforms(
    labels: bool | str | os.PathLike | None = False,
    consistency: bool | float = False,
    pixdim: Sequence[float] | None = (1.0, 1.0, 1.0),
    spatial_size: Sequence[int] | None = (256, 256, 256),
    swap_hw: bool = False,
) -> Compose:
    """:func:`keymorph_transforms` of pair dicts: the keys follow from which inputs the pairs carry.

    Images :data:`PAIR_IMAGE_KEYS` always; label maps :data:`PAIR_LABEL_KEYS` when ``labels`` is true or a label
    path (the bundles pass ``supervised`` / ``val_labels`` in training and the ``moving_label`` path in inference,
    ``None`` there meaning no labels); the same-subject images :data:`CONSISTENCY_IMAGE_KEYS` when ``consistency``
    is true or a positive number (the training's ``consistency_weight``; the training dataset,
    :class:`monai_ext.data.pairs.RegistrationPairDataset`, adds those images to every item when its ``extras`` are
    the same-subject pairs of :func:`consistency_subject_pairs`).

    Args:
        labels: load and resample the pair's label maps too (nearest neighbour).
        consistency: load the two consistency images too.
        pixdim, spatial_size, swap_hw: as in :func:`keymorph_transforms`.
    """
    image_keys = list(PAIR_IMAGE_KEYS)
    if float(consistency) > 0:
        image_keys += list(CONSISTENCY_IMAGE_KEYS)
    label_keys = list(PAIR_LABEL_KEYS) if _wants_labels(labels) else []
    return keymorph_transforms(image_keys, label_keys, pixdim, spatial_size, swap_hw)


def keymorph_image_transforms(
    labels: bool | str | os.PathLike | None = False,
    pixdim: Sequence[float] | None = (1.0, 1.0, 1.0),
    spatial_size: Sequence[int] | None = (256, 256, 256),
    swap_hw: bool = False,
) -> Compose:
    """:func:`keymorph_transforms` of single-image dicts (``"image"`` and, when ``labels`` is true or a label path
    / folder that is not ``None`` or empty, ``"label"``): groupwise inputs (:func:`folder_images`) and pretraining
    images."""
    return keymorph_transforms(["image"], ["label"] if _wants_labels(labels) else [], pixdim, spatial_size, swap_hw)


def consistency_subject_pairs(
    consistency_weight: float,
    dataset: str,
    data_path: str | os.PathLike,
    split: str = "train",
    modalities: Sequence[str] = IXI_MODALITIES,
) -> list[dict[str, Any]] | None:
    """The same-subject items (``extras``) of the training :class:`monai_ext.data.pairs.RegistrationPairDataset`
    for a training with ``consistency_weight``.

    ``None`` (no consistency items, the subject lists are not even read) when ``consistency_weight`` is not
    positive; otherwise :func:`same_subject_pairs` of :func:`keymorph_subjects` ``(dataset, data_path, split,
    modalities)``: two modalities of one subject per item.
    """
    if not float(consistency_weight) > 0:
        return None
    return same_subject_pairs(keymorph_subjects(dataset, data_path, split, modalities))


def _listing(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.name.lower().endswith(IMAGE_SUFFIXES)}


def paired_files(
    moving: str | os.PathLike,
    fixed: str | os.PathLike,
    moving_label: str | os.PathLike | None = None,
    fixed_label: str | os.PathLike | None = None,
) -> list[dict[str, str]]:
    """Inference pairs from two files or two folders (pair dicts with ``*_image``, ``*_name``, ``*_label``).

    Files: one pair. Folders: files with the same name in both folders are paired (sorted by name), label maps are
    the same names in the label folders. Never an image with itself: the same file given as moving and fixed (or two
    folders that are the same folder) raises ``ValueError`` (the reference's directory mode silently registered
    every image to itself). Raises ``FileNotFoundError`` for missing paths and ``ValueError`` when nothing pairs.
    """
    moving, fixed = Path(moving), Path(fixed)
    labels = (moving_label is None, fixed_label is None)
    if labels[0] != labels[1]:
        raise ValueError("give both moving_label and fixed_label, or neither")
    for name, path in (("moving", moving), ("fixed", fixed)):
        if not path.exists():
            raise FileNotFoundError(f"{name} not found: {path}")
    if moving.is_file() and fixed.is_file():
        names = [(moving, fixed, None)]
    elif moving.is_dir() and fixed.is_dir():
        left, right = _listing(moving), _listing(fixed)
        names = [(left[n], right[n], n) for n in left if n in right]
        if not names:
            raise ValueError(f"no file name is present in both {moving} and {fixed}")
    else:
        raise ValueError(f"moving and fixed must both be files or both be folders, got {moving} and {fixed}")
    pairs = []
    for moving_path, fixed_path, name in names:
        if moving_path.resolve() == fixed_path.resolve():
            raise ValueError(f"an image cannot be registered to itself: {moving_path}")
        item = {
            "moving_image": str(moving_path),
            "fixed_image": str(fixed_path),
            "moving_name": image_stem(moving_path),
            "fixed_name": image_stem(fixed_path),
        }
        if moving_label is not None:
            for side, root in (("moving", Path(moving_label)), ("fixed", Path(fixed_label))):
                path = root / name if name is not None else root
                if not path.is_file():
                    raise FileNotFoundError(f"{side} label map not found: {path}")
                item[f"{side}_label"] = str(path)
        pairs.append(item)
    return pairs


def folder_images(folder: str | os.PathLike, label_folder: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Groupwise inputs: every image of ``folder`` (sorted) as ``{"image", "name"[, "label"]}``; label maps are the
    files of the same name in ``label_folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    items = []
    for name, path in _listing(folder).items():
        item = {"image": str(path), "name": image_stem(path)}
        if label_folder is not None:
            label = Path(label_folder) / name
            if not label.is_file():
                raise FileNotFoundError(f"label map of {path} not found: {label}")
            item["label"] = str(label)
        items.append(item)
    if not items:
        raise ValueError(f"no images in {folder}")
    return items
