"""Model space vs native space.

A bundle's network sees images in **model space**: the image after MONAI preprocessing
(:func:`monai_ext.data.model_space.model_space_transforms`: reorientation to RAS, resampling to a fixed voxel
size, crop/pad to a fixed shape, intensity scaling), whose grid is described by the ``MetaTensor.affine``
(voxel to RAS mm) after those transforms. Users want results on each image's **native grid**: the affine and shape of its
file. The network's DDF lives on the model fixed grid and points into the model moving grid;
:func:`ddf_model_to_native` turns it into a DDF on the native fixed grid pointing into the native moving
grid, with which :func:`monai_ext.spatial.sampling.warp` resamples the native moving image (or label map,
``mode="nearest"``) directly onto the native fixed grid, in one interpolation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

from monai_ext.data.base import fill_nan_background, image_readers
from monai_ext.spatial.coordinates import ddf_voxel_to_world, invert_homogeneous, voxel_to_world
from monai_ext.spatial.sampling import affine_to_ddf, check_ddf, sample, voxel_grid

__all__ = ["ddf_model_to_native", "load_image"]

_UNITS = ("voxel", "ras", "lps")


def _batched_affine(affine, name: str, n: int, batch: int) -> torch.Tensor:
    """``(batch, n + 1, n + 1)`` float64 voxel to RAS matrices from one matrix or a batch."""
    try:
        matrix = voxel_to_world(affine).to(torch.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: {err}") from None
    if matrix.shape[-1] != n + 1:
        raise ValueError(f"{name} must be ({n + 1}, {n + 1}) for a {n}-D ddf, got {tuple(matrix.shape)}")
    if matrix.ndim == 2:
        matrix = matrix[None]
    if matrix.shape[0] not in (1, batch):
        raise ValueError(f"{name} holds {matrix.shape[0]} matrices for a batch of {batch} fields")
    return matrix.expand(batch, n + 1, n + 1)


def ddf_model_to_native(
    ddf_model: torch.Tensor,
    model_fixed_affine,
    model_moving_affine,
    native_fixed_affine,
    native_fixed_shape: Sequence[int],
    native_moving_affine,
    units: str = "voxel",
) -> torch.Tensor:
    """Model-space DDF -> DDF on the native fixed grid.

    A native fixed voxel ``x`` goes to world (``N_f``), to a model fixed voxel ``y = M_f^-1 N_f x``, through the
    model DDF to the model moving voxel ``y + u(y)`` (``u`` multilinearly interpolated, border-extrapolated
    outside the model grid), to world (``M_m``) and to the native moving voxel ``N_m^-1 M_m (y + u(y))``.
    All affines are voxel to RAS mm matrices ``(n + 1, n + 1)`` or ``(B, n + 1, n + 1)`` (e.g. ``MetaTensor.affine``).

    Args:
        ddf_model: ``(B, n, *model_shape)`` voxel DDF on the model fixed grid into the model moving grid.
        model_fixed_affine, model_moving_affine: affines of the preprocessed (model-space) fixed and moving images.
        native_fixed_affine, native_fixed_shape: affine and spatial shape of the fixed image's file.
        native_moving_affine: affine of the moving image's file.
        units: ``"voxel"``: voxel DDF from native fixed voxels to native moving voxels (warp the native moving
            image with it); ``"ras"`` / ``"lps"``: world displacement in mm at every native fixed voxel, moving
            world point minus fixed world point (``"lps"`` is what ITK / ANTs displacement fields hold).

    Returns:
        ``(B, n, *native_fixed_shape)`` in the DDF's dtype.
    """
    if isinstance(ddf_model, MetaTensor):
        ddf_model = ddf_model.as_tensor()
    check_ddf(ddf_model, "ddf_model")
    if units not in _UNITS:
        raise ValueError(f"units must be one of {_UNITS}, got {units!r}")
    batch, n = ddf_model.shape[:2]
    shape = tuple(int(s) for s in native_fixed_shape)
    if len(shape) != n or min(shape) < 1:
        raise ValueError(f"native_fixed_shape must hold {n} positive sizes, got {tuple(native_fixed_shape)}")
    model_fixed, model_moving, native_fixed, native_moving = (
        _batched_affine(a, name, n, batch)
        for a, name in (
            (model_fixed_affine, "model_fixed_affine"),
            (model_moving_affine, "model_moving_affine"),
            (native_fixed_affine, "native_fixed_affine"),
            (native_moving_affine, "native_moving_affine"),
        )
    )
    dtype, device = ddf_model.dtype, ddf_model.device
    native_to_model = (invert_homogeneous(model_fixed) @ native_fixed).to(dtype=dtype, device=device)
    model_to_native = (invert_homogeneous(native_moving) @ model_moving).to(device)
    to_model = affine_to_ddf(native_to_model, shape)  # y - x, native fixed voxel -> model fixed voxel
    model_coords = voxel_grid(shape, dtype, device)[None] + to_model
    # displacement from native fixed voxel x to the model moving voxel y + u(y); with the identity as the "fixed"
    # frame, ddf_voxel_to_world gives P (x + d) - x with P the model moving -> native moving voxel map
    to_model_moving = to_model + sample(ddf_model, model_coords)
    identity = torch.eye(n + 1, dtype=torch.float64, device=device)
    voxel = ddf_voxel_to_world(to_model_moving, identity, model_to_native)
    if units == "voxel":
        return voxel
    lps = units == "lps"
    return ddf_voxel_to_world(voxel, voxel_to_world(native_fixed, lps), voxel_to_world(native_moving, lps))


def _grid_matches(image: MetaTensor, reference: MetaTensor, atol: float) -> bool:
    return image.shape[1:] == reference.shape[1:] and np.allclose(
        np.asarray(image.affine, dtype=np.float64), np.asarray(reference.affine, dtype=np.float64), atol=atol
    )


def load_image(
    path: str | os.PathLike,
    spatial_dims: int = 3,
    label: bool = False,
    reference: MetaTensor | None = None,
    atol: float = 1e-3,
) -> MetaTensor:
    """Load and check one image file (NIfTI ``.nii``/``.nii.gz``, NRRD, MHA, MGZ, ...) with MONAI's ``LoadImage``.

    The readers are those of the bundles' loading (:func:`monai_ext.data.base.image_readers`: NIfTI by nibabel,
    other formats by ITK; both give the same RAS affine). ITK's NIfTI reader is avoided because it silently
    replaces NaN and infinite voxels with 0, hiding corrupt data: here infinite voxels are refused, and NaN voxels of an intensity image (the "no data" background of
    some SPM and FSL outputs) read as its lowest finite value, as the bundles' loading does
    (:func:`monai_ext.data.base.fill_nan_background`, where the bundles warn about them).

    Args:
        path: the file.
        spatial_dims: required number of spatial dimensions (a 3-D bundle rejects 2-D images and single slices).
        label: a label map: values must be integers; returned as ``torch.int64``.
        reference: the image a label map belongs to; the label map's grid (shape and affine) must match it.
        atol: tolerance (mm) on the affine for the ``reference`` check.

    Returns:
        ``MetaTensor`` ``(1, *spatial)`` (float32, or int64 for labels) with ``.affine`` the voxel to RAS matrix.

    Raises:
        FileNotFoundError: missing file. ValueError: unreadable file, wrong dimensionality or channel count,
        infinite voxels, no finite voxel, non-integer (or NaN) labels, grid differing from ``reference``; every
        message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    # label maps are read as float64 (exact for any label below 2^53), which also gives native byte order: torch
    # cannot take the big-endian integers of an MGZ label map (FreeSurfer's aseg.mgz) as they are stored
    loader = LoadImage(
        reader=image_readers(), image_only=True, ensure_channel_first=True, dtype=np.float64 if label else np.float32
    )
    try:
        image = loader(str(path))
    except Exception as err:  # MONAI wraps ITK's C++ errors in RuntimeError with a long message
        raise ValueError(f"cannot read image {path}: {str(err).strip().splitlines()[0]}") from None
    shape = tuple(image.shape[1:])
    if len(shape) != spatial_dims or min(shape) < 2:
        raise ValueError(f"{path}: expected a single-channel {spatial_dims}-D image, got spatial shape {shape}")
    if image.shape[0] != 1:
        raise ValueError(f"{path}: expected a single-channel image, got {image.shape[0]} channels")
    if image.is_floating_point() and torch.isinf(image).any():
        raise ValueError(f"{path}: {int(torch.isinf(image).sum())} voxels are infinite")
    if label:
        if image.is_floating_point() and not torch.equal(image, image.round()):  # NaN included
            raise ValueError(f"{path}: a label map must hold integer values, not NaN or fractional ones")
        image = image.to(torch.int64)
    else:
        try:
            image = fill_nan_background(image)[0]
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    if reference is not None and not _grid_matches(image, reference, atol):
        raise ValueError(
            f"{path}: grid (shape {shape}, affine {np.round(np.asarray(image.affine), 4).tolist()}) does not match its "
            f"image (shape {tuple(reference.shape[1:])}, affine {np.round(np.asarray(reference.affine), 4).tolist()})"
        )
    return image
