"""Preprocessing from image files to a network's **model space**, shared by the bundles and the datasets.

A bundle's network sees images after MONAI preprocessing: reorientation to RAS, resampling to a fixed voxel
size, crop/pad to a fixed shape and intensity scaling (:func:`model_space_transforms`), or a grid centred on
each image's foreground (:class:`ForegroundCentredGridd`), optionally built in another image's world frame
through a given affine registration (``frame_keys``: the moving grid of an affinely pre-aligned pair). The grid of
the result is described by its ``MetaTensor.affine`` (voxel to RAS mm of the image's own file world), which
:func:`monai_ext.io.native.ddf_model_to_native` uses to bring a model-space DDF back to the files' native grids.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    SpatialResample,
    Spacingd,
)

from monai_ext.data.base import FillNaNBackgroundd, image_readers
from monai_ext.data.synthbrain import grid_affine, normalize_intensity, subtract_background

__all__ = ["REFINE_SUFFIX", "ForegroundCentredGridd", "loading_transforms", "model_space_transforms"]

_INTENSITY = ("percentile", "foreground_percentile", "zscore", None)
_CENTRES = ("field_of_view", "foreground")
REFINE_SUFFIX = "_refine"  # key suffix of an image's finer copy for intensity refinement (``refine_pixdim``)


class ForegroundCentredGridd(MapTransform):
    """Resample each image onto its own axis-aligned RAS grid of ``spatial_size`` voxels of ``pixdim`` mm whose
    centre is the world position (mm) of the image's foreground centroid; label maps follow their image's grid.

    Works in world space with the full affine (any orientation, oblique or anisotropic storage): one linear
    (images) or nearest (labels) resampling with MONAI's ``SpatialResample``, zero outside the image. The
    foreground is the voxels above ``threshold`` x the image's 99th percentile. A pair of images of one anatomy
    thus lands on grids aligned at their centroids, as the brain models of this package are trained (each
    training image on a grid centred on its brain). The outputs are ``MetaTensor`` s whose ``.affine`` is the
    new grid's; the file's ``original_affine`` / ``spatial_shape`` metadata are kept for the native outputs.

    With ``frame_keys`` an image's grid is built in another frame: ``data[frame_keys[key]]`` is an
    ``(n + 1, n + 1)`` RAS mm map ``A`` from that frame to the image's world, e.g. an affine registration
    mapping fixed world points to moving world points. The grid is then axis-aligned in the frame, centred on the
    centroid mapped into it (``A^-1 c``), and its ``.affine`` is ``A @ G`` (``G`` the frame grid): the resampled
    moving image is the moving image pre-aligned by ``A`` onto the fixed image's world axes, while its affine
    still says where each model voxel lies in the moving file's world, so native outputs compose ``A`` exactly.

    Args:
        keys: image keys.
        label_keys: label-map keys, the ``i``-th following the grid of ``keys[i]``.
        pixdim: isotropic voxel size (mm).
        spatial_size: grid shape ``(D, H, W)`` along R, A, S (of the frame).
        threshold: foreground threshold as a fraction of the 99th percentile.
        frame_keys: image key -> data key of its frame map ``A`` (tensor or array ``(n + 1, n + 1)``, float64);
            images without an entry use their own world (``A`` = identity).
        refine_pixdim: also write each image on a finer grid of the same centre and extent with voxels of
            ``refine_pixdim`` mm (``spatial_size * pixdim / refine_pixdim`` voxels, rounded) under
            ``<key>_refine`` (:data:`REFINE_SUFFIX`), e.g. for an intensity refinement of the network's result.
        min_extent_mm: warn (``UserWarning``) when an image's foreground spans less than this along a world axis,
            e.g. a slab or a partial field of view given to a model of whole brains; ``None``: no check.
        max_foreground_ml: warn (``UserWarning``) when an image's foreground is larger than this (mL), e.g. a
            whole head (2.5-4.5 L) given to a model of skull-stripped brains (1-1.7 L); ``None``: no check.
        allow_missing_keys: skip absent keys (e.g. pairs without label maps).
    """

    def __init__(
        self,
        keys: Sequence[str],
        label_keys: Sequence[str] = (),
        pixdim: float = 2.0,
        spatial_size: Sequence[int] = (88, 104, 88),
        threshold: float = 0.1,
        frame_keys: Mapping[str, str] | None = None,
        refine_pixdim: float | None = None,
        min_extent_mm: float | None = None,
        max_foreground_ml: float | None = None,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_extent_mm = None if min_extent_mm is None else float(min_extent_mm)
        self.max_foreground_ml = None if max_foreground_ml is None else float(max_foreground_ml)
        if refine_pixdim is not None and not refine_pixdim > 0:
            raise ValueError(f"refine_pixdim must be > 0, got {refine_pixdim}")
        self.refine_pixdim = None if refine_pixdim is None else float(refine_pixdim)
        if len(label_keys) > len(self.keys):
            raise ValueError(f"label_keys {list(label_keys)} must follow image keys {list(self.keys)} one to one")
        self.label_of = dict(zip(self.keys, label_keys))
        self.pixdim = float(pixdim)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.threshold = float(threshold)
        self.frame_keys = dict(frame_keys or {})
        unknown = sorted(set(self.frame_keys) - set(self.keys))
        if unknown:
            raise ValueError(f"frame_keys {unknown} are not image keys {list(self.keys)}")
        self.image_resampler = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float64)
        self.label_resampler = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float64)

    def centroid(self, image: MetaTensor) -> np.ndarray:
        """World position (RAS mm) of the foreground centroid of ``image`` ``(1, *spatial)``; with ``min_extent_mm``
        / ``max_foreground_ml`` also warns when the foreground's world bounding box is narrower than that along an
        axis / when its volume is larger than that."""
        values = image[0].float()
        sample_values = values.flatten()[:: max(1, values.numel() // (1 << 22))]
        level = self.threshold * float(torch.quantile(sample_values, 0.99))
        mask = values > level
        if not mask.any():
            mask = torch.ones_like(values, dtype=torch.bool)
        indices = torch.nonzero(mask).double()
        affine = np.asarray(image.affine, dtype=np.float64)
        if self.min_extent_mm is not None:
            self._check_extent(indices, affine, image)
        if self.max_foreground_ml is not None:
            self._check_volume(len(indices), affine, image)
        return (affine @ np.append(indices.mean(0).numpy(), 1.0))[:3]

    def _check_extent(self, indices: torch.Tensor, affine: np.ndarray, image: torch.Tensor) -> None:
        """Warn when the world bounding box (mm) of the foreground voxels ``indices`` ``(N, n)`` is narrower than
        ``min_extent_mm`` along a world axis."""
        low, high = indices.amin(0).numpy() - 0.5, indices.amax(0).numpy() + 0.5  # voxel box, outer faces
        corners = np.array(list(itertools.product(*zip(low, high))))  # (2^n, n)
        world = corners @ affine[:-1, :-1].T
        extent = world.max(0) - world.min(0)
        if extent.min() < self.min_extent_mm:
            name = image.meta.get("filename_or_obj", "an image") if isinstance(image, MetaTensor) else "an image"
            warnings.warn(
                f"{name}: its foreground spans only {' x '.join(f'{e:.0f}' for e in extent)} mm along the world "
                f"axes (R, A, S), under {self.min_extent_mm:.0f} mm along one: this model expects whole brains, "
                "and a slab or partial field of view may register poorly",
                UserWarning,
                stacklevel=3,
            )

    def _check_volume(self, count: int, affine: np.ndarray, image: torch.Tensor) -> None:
        """Warn when ``count`` foreground voxels of the grid ``affine`` hold more than ``max_foreground_ml``."""
        litres = count * abs(np.linalg.det(affine[:-1, :-1])) / 1e6
        if litres * 1000 > self.max_foreground_ml:
            name = image.meta.get("filename_or_obj", "an image") if isinstance(image, MetaTensor) else "an image"
            warnings.warn(
                f"{name}: its foreground is {litres:.1f} L, more than a skull-stripped brain (about 1-1.7 L): this "
                "model expects skull-stripped brains, and whole-head images register poorly (strip the skull first, "
                "e.g. with SynthStrip, HD-BET or FSL's bet)",
                UserWarning,
                stacklevel=3,
            )

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            centre = self.centroid(image)
            frame = None
            if key in self.frame_keys:
                frame = np.asarray(torch.as_tensor(d[self.frame_keys[key]]).detach().cpu(), dtype=np.float64)
                centre = np.linalg.solve(frame, np.append(centre, 1.0))[:3]
            if self.refine_pixdim is not None:
                fine_size = [max(1, round(n * self.pixdim / self.refine_pixdim)) for n in self.spatial_size]
                fine = grid_affine(fine_size, self.refine_pixdim, centre)
                fine = torch.as_tensor(fine if frame is None else frame @ fine)
                d[f"{key}{REFINE_SUFFIX}"] = self.image_resampler(image, dst_affine=fine, spatial_size=fine_size).float()
            target = grid_affine(self.spatial_size, self.pixdim, centre)
            target = torch.as_tensor(target if frame is None else frame @ target)
            d[key] = self.image_resampler(image, dst_affine=target, spatial_size=self.spatial_size).float()
            label_key = self.label_of.get(key)
            if label_key in d:
                d[label_key] = self.label_resampler(d[label_key].double(), dst_affine=target, spatial_size=self.spatial_size)
        return d


def loading_transforms(image_keys: Sequence[str], label_keys: Sequence[str] = ()) -> Compose:
    """The loading steps of :func:`model_space_transforms`: ``LoadImaged`` (image only) + ``EnsureChannelFirstd``
    on ``image_keys`` then ``label_keys``, then NaN voxels of the images read as their lowest value
    (:class:`~monai_ext.data.base.FillNaNBackgroundd`); file paths in, channel-first ``MetaTensor`` s
    ``(1, *spatial)`` with their file metadata out (the input of ``model_space_transforms(..., load=False)``)."""
    keys = list(image_keys) + list(label_keys)
    return Compose(
        [
            LoadImaged(keys=keys, reader=image_readers(), image_only=True),
            EnsureChannelFirstd(keys=keys),
            FillNaNBackgroundd(list(image_keys)),
        ]
    )


def model_space_transforms(
    image_keys: Sequence[str],
    label_keys: Sequence[str] = (),
    pixdim: Sequence[float] | float | None = None,
    spatial_size: Sequence[int] | None = None,
    intensity: str | None = "percentile",
    percentiles: tuple[float, float] = (0.5, 99.5),
    centre: str = "field_of_view",
    load: bool = True,
    frame_keys: Mapping[str, str] | None = None,
    refine_pixdim: float | None = None,
    min_extent_mm: float | None = None,
    max_foreground_ml: float | None = None,
) -> Compose:
    """MONAI preprocessing from files to model space, shared by the bundles.

    ``LoadImaged`` (:func:`~monai_ext.data.base.image_readers`: nibabel for NIfTI, ITK for NRRD / MHA / MGZ)
    -> ``EnsureChannelFirstd``
    -> NaN voxels of the images to their lowest value (:class:`~monai_ext.data.base.FillNaNBackgroundd`)
    -> with an ``intensity`` scaling, the images' backgrounds to ~0
    (:func:`monai_ext.data.synthbrain.subtract_background`) -> ``Orientationd("RAS")``
    -> ``Spacingd(pixdim)`` (linear for images, nearest for labels)
    -> ``ResizeWithPadOrCropd(spatial_size)`` (symmetric, zero padding) -> intensity scaling of the images
    -> labels as ``torch.int64``.
    The outputs are ``MetaTensor`` s whose ``.affine`` is the model-space affine used by :func:`monai_ext.io.native.ddf_model_to_native`.
    No input checks happen here: validate user files with :func:`monai_ext.io.native.load_image` first.

    Args:
        image_keys: keys of intensity images (e.g. ``["fixed_image", "moving_image"]``).
        label_keys: keys of label maps.
        pixdim: model voxel size in mm, per axis or one number for every axis (isotropic); ``None`` keeps the
            native voxel size.
        spatial_size: model grid shape; ``None`` keeps the resampled shape.
        intensity: ``"percentile"`` (``ScaleIntensityRangePercentilesd``: the ``percentiles`` map to [0, 1], clipped),
            ``"foreground_percentile"`` (:func:`monai_ext.data.synthbrain.normalize_intensity`: the upper
            percentile of the positive voxels maps to 1, as the brain models are trained),
            ``"zscore"`` (``NormalizeIntensityd``: zero mean, unit variance), or ``None``.
        centre: ``"field_of_view"`` (the steps above: the grid is centred on the resampled field of view) or
            ``"foreground"`` (:class:`ForegroundCentredGridd`: an RAS grid of ``spatial_size`` and isotropic
            ``pixdim`` centred on each image's foreground centroid, replacing orientation, spacing and crop).
        load: start with ``LoadImaged`` + ``EnsureChannelFirstd`` (file paths in); ``False`` for data already
            loaded that way (channel-first ``MetaTensor`` s with their file metadata).
        frame_keys: ``centre="foreground"`` only: grids built in another frame (:class:`ForegroundCentredGridd`).
        refine_pixdim: ``centre="foreground"`` only: also write each image on a finer grid of the same centre and
            extent with voxels of ``refine_pixdim`` mm under ``<key>_refine`` (:data:`REFINE_SUFFIX`; intensity
            scaled alike), for an intensity refinement of the network's result at that precision
            (:func:`monai_ext.engines.affine_refinement.refine_keymorph_result`).
        min_extent_mm: ``centre="foreground"`` only: warn about images whose foreground is narrower than this
            along a world axis (:class:`ForegroundCentredGridd`).
        max_foreground_ml: ``centre="foreground"`` only: warn about images whose foreground is larger than this
            (mL; :class:`ForegroundCentredGridd`).
    """
    if isinstance(pixdim, (int, float)):
        pixdim = (float(pixdim),)  # isotropic: Spacingd repeats the last value over the remaining axes
    if intensity not in _INTENSITY:
        raise ValueError(f"intensity must be one of {_INTENSITY}, got {intensity!r}")
    if centre not in _CENTRES:
        raise ValueError(f"centre must be one of {_CENTRES}, got {centre!r}")
    if centre == "foreground" and (pixdim is None or spatial_size is None or len(set(pixdim)) != 1):
        raise ValueError(f"centre='foreground' needs an isotropic pixdim and a spatial_size, got {pixdim} and {spatial_size}")
    if frame_keys and centre != "foreground":
        raise ValueError("frame_keys needs centre='foreground'")
    for name, value in (("min_extent_mm", min_extent_mm), ("max_foreground_ml", max_foreground_ml)):
        if value is not None and centre != "foreground":
            raise ValueError(f"{name} needs centre='foreground', got centre={centre!r}")
    if refine_pixdim is not None and centre != "foreground":
        raise ValueError(f"refine_pixdim needs centre='foreground', got centre={centre!r}")
    images, labels = list(image_keys), list(label_keys)
    keys = images + labels
    if not images or len(set(keys)) != len(keys):
        raise ValueError(f"image_keys must be non-empty and distinct from label_keys, got {images} and {labels}")
    transforms = list(loading_transforms(images, labels).transforms) if load else []
    if intensity is not None:  # background to ~0 before any resampling pads with 0 (offset or z-scored scans)
        transforms.append(Lambdad(images, subtract_background))
    # the keys of intensity scaling: the images and their finer copies
    scaled = images + ([f"{key}{REFINE_SUFFIX}" for key in images] if refine_pixdim is not None else [])
    if centre == "foreground":
        transforms.append(
            ForegroundCentredGridd(
                images, labels, pixdim[0], spatial_size, frame_keys=frame_keys, refine_pixdim=refine_pixdim,
                min_extent_mm=min_extent_mm, max_foreground_ml=max_foreground_ml,
            )  # fmt: skip
        )
    else:
        transforms.append(Orientationd(keys=keys, axcodes="RAS", labels=None))
        if pixdim is not None:
            transforms.append(
                Spacingd(keys=keys, pixdim=pixdim, mode=["bilinear"] * len(images) + ["nearest"] * len(labels))
            )
        if spatial_size is not None:
            transforms.append(ResizeWithPadOrCropd(keys=keys, spatial_size=spatial_size))
    if intensity == "foreground_percentile":
        transforms.append(Lambdad(scaled, normalize_intensity))
    elif intensity == "percentile":
        lower, upper = percentiles
        transforms.append(ScaleIntensityRangePercentilesd(scaled, lower, upper, b_min=0.0, b_max=1.0, clip=True))
    elif intensity == "zscore":
        transforms.append(NormalizeIntensityd(scaled))
    if labels:
        transforms.append(EnsureTyped(labels, dtype=torch.int64))
    return Compose(transforms)
