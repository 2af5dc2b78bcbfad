"""Pieces shared by the dataset modules and the loaders: archive preparation, pair dicts, image file formats and
readers, NaN backgrounds and SITReg's volume pipeline.

SITReg's generic pipeline (that of the authors' reference implementation), in order: crop -> centred crop-or-pad ->
average-pool by the downsampling factor -> clip -> ``(x - shift) / scale``; masks go through crop,
crop-or-pad and pooling and are then thresholded at ``>= 1 - 1e-5`` (a pooled voxel is inside only
if every fine voxel was); label maps are only cropped / padded (evaluation at full resolution).
:func:`volume_transforms` builds it from MONAI transforms plus the three hand-written ones below
(MONAI's ``ResizeWithPadOrCrop`` centres an even-minus-odd crop one voxel differently, and MONAI
has no average-pooling transform). Before it, NaN voxels of the images read as their background
(:class:`FillNaNBackgroundd`, also used by :mod:`monai_ext.data.model_space`).

Points (landmarks, keypoints) are ``(N, n)`` float tensors of voxel coordinates in array-axis order
of the image they belong to; the transforms keep them on the same voxels as the image.
"""

from __future__ import annotations

import itertools
import math
import os
import tarfile
import warnings
import zipfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor, NibabelReader
from monai.transforms import (
    AsDiscreted,
    BorderPad,
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientation,
    ScaleIntensityRanged,
    SpatialCrop,
    SpatialCropd,
)
from nibabel.orientations import aff2axcodes

from monai_ext.data.download import DownloadError, download_file, extract_archive
from monai_ext.errors import InputError
from monai_ext.spatial.coordinates import downsampled_voxel_to_voxel

__all__ = [
    "MASK_THRESHOLD",
    "prepare_archive",
    "pair_item",
    "intra_pair_item",
    "all_pairs",
    "check_files",
    "centered_crop_or_pad_offsets",
    "CenteredCropOrPadd",
    "AvgPoold",
    "ShiftAndMaskd",
    "LoadPointsd",
    "OrientLiked",
    "IMAGE_SUFFIXES",
    "image_stem",
    "image_readers",
    "fill_nan_background",
    "FillNaNBackgroundd",
    "volume_transforms",
]

MASK_THRESHOLD = 1 - 1e-5
#: file name endings of the image formats the package reads (:func:`image_readers`), longest first per format
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh")


def prepare_archive(
    dataset_dir: str | os.PathLike,
    url: str,
    archive_name: str,
    marker: str,
    sha256: str | None = None,
    keep_archive: bool = True,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dataset_dir/archive_name`` and extract it there, unless ``dataset_dir/marker`` exists.

    ``marker`` is a path (relative to ``dataset_dir``) that a complete extraction contains, e.g. the
    dataset's json. The transfer resumes after an interruption and is verified against ``sha256``
    when given (:func:`monai_ext.data.download.download_file`). A downloaded file that is not an
    archive (a web page from a share host, e.g. a login or confirmation page) is deleted and reported.

    Returns:
        ``dataset_dir`` as a ``Path``.
    """
    dataset_dir = Path(dataset_dir)
    if (dataset_dir / marker).exists():
        return dataset_dir
    archive = download_file(url, dataset_dir / archive_name, sha256=sha256, progress=progress)
    if not (zipfile.is_zipfile(archive) or tarfile.is_tarfile(archive)):
        archive.unlink()
        raise DownloadError(
            f"the file downloaded from {url} is not a zip/tar archive (the server probably answered with a web "
            f"page); it was deleted. Download the archive by hand in a browser and place it at {archive}, or "
            f"extract it into {dataset_dir}, then run again."
        )
    extract_archive(archive, dataset_dir)
    if not keep_archive:
        archive.unlink()
    if not (dataset_dir / marker).exists():
        raise FileNotFoundError(f"the archive from {url} did not contain {marker} (expected at {dataset_dir / marker})")
    return dataset_dir


def pair_item(moving: Mapping[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """``{"moving_<key>": moving[key], "fixed_<key>": fixed[key]}`` for every key (a MONAI pair dict)."""
    return {**{f"moving_{k}": v for k, v in moving.items()}, **{f"fixed_{k}": v for k, v in fixed.items()}}


def intra_pair_item(case: Mapping[str, Any]) -> dict[str, Any]:
    """Pair dict of an intra-case dict: two-element tuples / lists are (moving = image 0, fixed = image 1),
    other values (the case name, ...) go to both sides."""
    def side(i: int) -> dict[str, Any]:
        return {k: v[i] if isinstance(v, (tuple, list)) else v for k, v in case.items()}

    return pair_item(side(0), side(1))


def all_pairs(cases: Sequence[Mapping[str, Any]], both_directions: bool = False) -> list[dict[str, Any]]:
    """Pair dicts of every unordered pair ``(i < j)`` (moving ``i``, fixed ``j``), or every ordered pair."""
    pairs = itertools.permutations(cases, 2) if both_directions else itertools.combinations(cases, 2)
    return [pair_item(a, b) for a, b in pairs]


def check_files(paths: Sequence[str | os.PathLike], hint: str) -> None:
    """Raise ``FileNotFoundError`` naming the first missing path and ``hint`` (what to do about it)."""
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} is missing: {hint}")


def crop_slices(crop: Sequence[Sequence[int]]) -> list[slice]:
    """Slices removing ``crop[i] = (before, after)`` voxels along spatial axis ``i``."""
    if any(len(c) != 2 or min(c) < 0 for c in crop):
        raise ValueError(f"crop must be a sequence of (before, after) non-negative voxel counts, got {crop}")
    return [slice(int(before), -int(after) if after else None) for before, after in crop]


def centered_crop_or_pad_offsets(shape: Sequence[int], target: Sequence[int]) -> list[int]:
    """Per-axis voxel shift of :class:`CenteredCropOrPadd`: ``+(diff // 2)`` when padding, ``-(|diff| // 2)`` when cropping.

    ``diff = target - shape``; a voxel at index ``i`` of the input is at ``i + offset`` afterwards.
    """
    if len(shape) != len(target):
        raise ValueError(f"spatial_size must have {len(shape)} entries for a {len(shape)}-D image, got {tuple(target)}")
    return [(t - s) // 2 if t >= s else -((s - t) // 2) for s, t in zip(shape, target)]


class CenteredCropOrPadd(MapTransform):
    """Crop or zero-pad every spatial axis to ``spatial_size``, centred as in SITReg.

    Along an axis with ``diff = spatial_size - size``: padding puts ``diff // 2`` voxels before and the
    rest after; cropping removes ``(-diff) // 2`` voxels before and the rest after. Images keep their
    (updated) MetaTensor affine. ``point_keys`` maps a point key to the image key whose grid the
    points live on; those ``(N, n)`` voxel coordinates are shifted with the image.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int],
        point_keys: Mapping[str, str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = [int(s) for s in spatial_size]
        if min(self.spatial_size) < 1:
            raise ValueError(f"spatial_size must be positive, got {spatial_size}")
        self.point_keys = dict(point_keys or {})

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        offsets = {}
        for key in self.key_iterator(d):
            shape = d[key].shape[1:]
            offset = centered_crop_or_pad_offsets(shape, self.spatial_size)
            start = [max(-o, 0) for o in offset]
            end = [b + min(s, t) for b, s, t in zip(start, shape, self.spatial_size)]
            image = SpatialCrop(roi_start=start, roi_end=end)(d[key])
            border = [p for o, s, t in zip(offset, shape, self.spatial_size) for p in (max(o, 0), max(t - s - o, 0))]
            d[key] = BorderPad(spatial_border=border)(image) if any(border) else image
            offsets[key] = offset
        for point_key, image_key in self.point_keys.items():
            if point_key in d and image_key in offsets:
                points = torch.as_tensor(d[point_key])
                d[point_key] = points + points.new_tensor(offsets[image_key])
        return d


class AvgPoold(MapTransform):
    """Average-pool images (or masks) by an integer ``factor`` per axis (kernel = stride = factor).

    Trailing voxels that do not fill a whole window are dropped (``avg_pool``'s floor, as in SITReg).
    A MetaTensor's affine is updated so that coarse voxel ``j`` sits at the centre of its window,
    fine voxel ``f j + (f - 1) / 2`` (:func:`monai_ext.spatial.coordinates.downsampled_voxel_to_voxel`);
    the rest of its metadata (``original_affine``, ``spatial_shape``: the file's native grid) is kept.
    """

    def __init__(self, keys: KeysCollection, factor: int | Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.factor = factor

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            n = image.ndim - 1
            factor = (self.factor,) * n if isinstance(self.factor, int) else tuple(self.factor)
            if len(factor) != n or min(factor) < 1:
                raise ValueError(f"factor must be a positive int or {n} of them, got {self.factor}")
            if min(s // f for s, f in zip(image.shape[1:], factor)) < 1:
                raise ValueError(f"{key} of shape {tuple(image.shape)} is smaller than the pooling factor {factor}")
            plain = torch.as_tensor(image).as_subclass(torch.Tensor).float()
            pooled = (F.avg_pool2d if n == 2 else F.avg_pool3d)(plain[None], factor, factor)[0].to(plain.dtype)
            if isinstance(image, MetaTensor):
                step = downsampled_voxel_to_voxel(factor, n, dtype=torch.float64)
                meta = {k: v for k, v in image.meta.items() if k != "affine"}
                # meta["spatial_shape"] stays the file's shape (with "original_affine": the native grid that
                # RegistrationWriter writes the outputs on), as MONAI's own spatial transforms keep it
                pooled = MetaTensor(pooled, affine=image.affine.to(torch.float64) @ step, meta=meta)
            d[key] = pooled
        return d


class ShiftAndMaskd(MapTransform):
    """``image = (image + shift) * mask`` with ``mask`` read from ``mask_keys`` (aligned with ``keys``).

    The lung CT recipe of SITReg's Lung250M-4B and NLST pipelines: ``shift = 1024`` maps air
    (-1024 HU) to 0 and everything outside the lung mask is set to 0.
    """

    def __init__(self, keys: KeysCollection, mask_keys: KeysCollection, shift: float = 1024.0) -> None:
        super().__init__(keys)
        self.mask_keys = [mask_keys] if isinstance(mask_keys, str) else list(mask_keys)
        if len(self.mask_keys) != len(self.keys):
            raise ValueError(f"mask_keys must have one key per image key {list(self.keys)}, got {self.mask_keys}")
        self.shift = float(shift)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, mask_key in zip(self.keys, self.mask_keys):
            if d[key].shape != d[mask_key].shape:
                raise ValueError(f"{key} {tuple(d[key].shape)} and {mask_key} {tuple(d[mask_key].shape)} differ in shape")
            d[key] = (d[key] + self.shift) * (d[mask_key] > 0)
        return d


class LoadPointsd(MapTransform):
    """Load point sets: a ``.csv`` path (one point per row, comma separated) becomes a float32 ``(N, n)`` tensor.

    Tensors and arrays pass through (as float32 tensors), so eagerly loaded landmarks can share a pipeline.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (str, os.PathLike)):
                value = np.loadtxt(value, delimiter=",", ndmin=2)
            points = (value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))).float()
            if points.ndim != 2 or points.shape[1] not in (2, 3):
                raise ValueError(f"{key} must hold (N, 2) or (N, 3) points, got shape {tuple(points.shape)}")
            d[key] = points
        return d


class OrientLiked(MapTransform):
    """Store ``keys`` in the orientation of ``reference_key``'s image: an exact axis permutation / flip (MONAI
    ``Orientation``, affine updated), nothing when the two already share their orientation codes.

    SITReg's task pipelines register voxel arrays as the task's data store them; a moving image stored in another
    orientation than the fixed one (an LPS copy of a RAS file) would otherwise be registered mirrored or
    transposed in world space. Hand-written because MONAI's ``Orientationd`` takes fixed axis codes, not those
    of another item. ``point_keys`` (voxel coordinates, :class:`LoadPointsd`) of a reoriented image cannot
    follow: such an item raises :class:`monai_ext.errors.InputError` (a ``ValueError``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str,
        point_keys: Sequence[str] = (),
        allow_missing_keys: bool = True,
    ):
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.point_keys = tuple(point_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.reference_key not in d:
            return d
        axcodes = "".join(aff2axcodes(np.asarray(d[self.reference_key].affine)))
        for key in self.key_iterator(d):
            if "".join(aff2axcodes(np.asarray(d[key].affine))) == axcodes:
                continue
            if any(d.get(point) is not None for point in self.point_keys):
                raise InputError(
                    f"{key} is stored in another orientation than {self.reference_key} ({axcodes}) and has voxel "
                    f"landmarks {list(self.point_keys)}: store both images in one orientation"
                )
            d[key] = Orientation(axcodes=axcodes, labels=None)(d[key])
        return d


def image_stem(path: str | os.PathLike) -> str:
    """A file's name without its image suffix (:data:`IMAGE_SUFFIXES`, any case): ``a.nii.gz`` -> ``a``; other
    names are returned whole."""
    name = Path(path).name
    return next((name[: -len(suffix)] for suffix in IMAGE_SUFFIXES if name.lower().endswith(suffix)), name)


def image_readers() -> list:
    """The image readers of every ``LoadImage(d)`` of the package: NIfTI (``.nii``, ``.nii.gz``) by nibabel, every
    other format (NRRD, MHA / MHD, FreeSurfer's MGZ, ...) by ITK; both give the voxel to RAS affine.

    MONAI tries the readers given last first, each on the suffixes it claims. Explicit because MONAI's default list
    does not read MGZ files, and because ITK's NIfTI reader silently turns NaN voxels into 0 (nibabel keeps them, so
    that they are reported: :class:`FillNaNBackgroundd`).
    """
    return [ITKReader(), NibabelReader()]


def fill_nan_background(image: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``image`` (any shape, e.g. ``(1, *spatial)``) with its NaN voxels set to its lowest finite value, and their count.

    Some tools store "no data" outside the head or body as NaN (SPM's masked and normalised images, divisions by
    zero in FSL); ITK's NIfTI reader silently reads those voxels as 0. Here they read as the image's background,
    its lowest finite value (0 for most MRI, about -1024 for CT), so that the intensity steps and resampling see a
    plain background. Infinite voxels are left as they are (corrupt data: the input checks refuse them). Returns
    ``image`` itself when it holds no NaN; raises ``ValueError`` when every voxel is NaN or infinite.
    """
    if not image.is_floating_point():
        return image, 0
    nan = torch.isnan(image)
    count = int(nan.sum())
    if count == 0:
        return image, 0
    low = float(torch.where(torch.isfinite(image), image, math.inf).amin())
    if low == math.inf:
        rest = ", the rest infinite" if count < image.numel() else ""
        raise ValueError(f"no finite voxel: {count} of {image.numel()} voxels are NaN{rest}")
    return image.masked_fill(nan, low), count


class FillNaNBackgroundd(MapTransform):
    """:func:`fill_nan_background` on intensity images (``(C, *spatial)``, after ``LoadImaged``), with a
    ``UserWarning`` naming the file and the number of NaN voxels (MONAI has no NaN-replacing transform)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], count = fill_nan_background(d[key])
            if count:
                source = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                warnings.warn(
                    f"{source}: {count} NaN voxels ({100 * count / d[key].numel():.1f}%) read as background "
                    "(the image's lowest value)",
                    UserWarning,
                    stacklevel=2,
                )
        return d


def volume_transforms(
    image_keys: Sequence[str],
    mask_keys: Sequence[str] = (),
    label_keys: Sequence[str] = (),
    point_keys: Mapping[str, str] | None = None,
    crop: Sequence[Sequence[int]] | None = None,
    crop_or_pad_to: Sequence[int] | None = None,
    downsample: int | Sequence[int] = 1,
    clip: tuple[float, float] | None = None,
    shift_scale: tuple[float, float] | None = None,
    lung_shift: float | None = None,
) -> Compose:
    """SITReg's volume pipeline (module docstring) as a MONAI ``Compose`` over a case or pair dict.

    Args:
        image_keys: intensity images (file paths in, float32 ``(1, *spatial)`` MetaTensors out; NaN voxels read as
            the image's lowest value, :class:`FillNaNBackgroundd`).
        mask_keys: masks, aligned with ``image_keys`` when ``lung_shift`` is set; pooled and thresholded.
        label_keys: label maps, cropped / padded only (int64, full resolution).
        point_keys: ``{point key: image key}``; ``.csv`` paths or ``(N, n)`` voxel coordinates of that image,
            shifted by the crop / pad (not by pooling: they stay in full-resolution voxels).
        crop: ``(before, after)`` voxels removed per axis, or ``None``.
        crop_or_pad_to: centred crop-or-pad target shape, or ``None``.
        downsample: average-pooling factor (1 = none).
        clip: ``(low, high)`` intensity clip, or ``None``.
        shift_scale: ``(shift, scale)``: ``x -> (x - shift) / scale``, or ``None``.
        lung_shift: if set, ``image = (image + lung_shift) * mask`` right after loading (:class:`ShiftAndMaskd`).

    Pair items (``moving_*`` and ``fixed_image`` among the keys): the moving image, its mask and label map are
    first stored in the fixed image's orientation (:class:`OrientLiked`), so that voxel-space registration is
    right in world space whatever orientation each file was saved in; outputs go back to the native grids.
    """
    image_keys, mask_keys, label_keys = list(image_keys), list(mask_keys), list(label_keys)
    point_keys = dict(point_keys or {})
    grid_keys = image_keys + mask_keys + label_keys
    transforms: list = [LoadImaged(keys=grid_keys, reader=image_readers(), ensure_channel_first=True, image_only=True)]
    if image_keys:
        transforms.append(FillNaNBackgroundd(image_keys))
    moving = [key for key in grid_keys if key.startswith("moving_")]
    if moving and "fixed_image" in grid_keys:
        moving_points = [point for point, image in point_keys.items() if image in moving]
        transforms.append(OrientLiked(moving, "fixed_image", moving_points))
    if point_keys:
        transforms.append(LoadPointsd(keys=list(point_keys), allow_missing_keys=True))
    if lung_shift is not None:
        transforms.append(ShiftAndMaskd(image_keys, mask_keys, lung_shift))
    if crop is not None:
        if point_keys:
            raise ValueError("crop together with point_keys is not supported; use crop_or_pad_to for point data")
        transforms.append(SpatialCropd(keys=grid_keys, roi_slices=crop_slices(crop)))
    if crop_or_pad_to is not None:
        transforms.append(CenteredCropOrPadd(grid_keys, crop_or_pad_to, point_keys))
    pooled = image_keys + mask_keys
    if downsample != 1 and pooled:
        transforms.append(AvgPoold(pooled, downsample))
    if (clip is not None or shift_scale is not None) and image_keys:
        # (x - shift) / scale as MONAI's linear range map; with clip, the range is [low, high] and the output is clipped
        shift, scale = shift_scale if shift_scale is not None else (0.0, 1.0)
        low, high = clip if clip is not None else (shift, shift + scale)
        if scale == 0 or not high > low:
            raise ValueError(f"shift_scale must have a non-zero scale and clip low < high, got {shift_scale}, {clip}")
        transforms.append(ScaleIntensityRanged(
            image_keys, a_min=low, a_max=high, b_min=(low - shift) / scale, b_max=(high - shift) / scale,
            clip=clip is not None,
        ))
    if mask_keys:
        transforms.append(AsDiscreted(mask_keys, threshold=MASK_THRESHOLD))
    transforms.append(EnsureTyped(keys=image_keys + mask_keys, dtype=torch.float32))
    if label_keys:
        transforms.append(EnsureTyped(keys=label_keys, dtype=torch.int64))
    return Compose(transforms)
