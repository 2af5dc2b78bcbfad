"""Sampling, warping and composition of dense displacement fields (DDFs).

Conventions used throughout ``monai_ext`` (the same as MONAI's ``Warp``):

* tensors are ``(B, C, *spatial)`` with ``spatial`` of length ``n`` (2 or 3);
* a DDF ``u`` has shape ``(B, n, *spatial)`` in **voxel units**, channel ``i`` being the
  displacement along spatial axis ``i`` (array order, not ``grid_sample``'s reversed x, y, z);
* the DDF defines the map ``phi(x) = x + u(x)`` from the grid it lives on (the *fixed* grid) into
  the *moving* image: warping reads ``moving(x + u(x))`` for every fixed-grid voxel ``x``;
* voxel index = voxel centre; between grid points values are multilinearly interpolated, and
  outside the grid the DDF is extrapolated by replicating its border ("border" padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

__all__ = [
    "voxel_grid",
    "sample",
    "sample_points",
    "warp",
    "compose",
    "affine_to_ddf",
    "check_ddf",
    "all_finite",
    "upsample_ddf",
    "downsample_ddf",
]

_MODES = {"linear": "bilinear", "nearest": "nearest"}
_PADDINGS = ("border", "zeros", "itk")


@lru_cache(maxsize=None)
def _warp_block(mode: str, padding: str) -> Warp:
    """One MONAI ``Warp`` per (mode, padding): it is stateless, and constructing it emits a warning each time."""
    return Warp(mode=_MODES[mode], padding_mode=padding)


def check_ddf(ddf: torch.Tensor, name: str = "ddf") -> None:
    """Raise ``ValueError`` unless ``ddf`` is a finite ``(B, n, *spatial)`` DDF with ``n`` 2 or 3."""
    if not isinstance(ddf, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ddf).__name__}")
    n = ddf.ndim - 2
    if n not in (2, 3) or ddf.shape[1] != n:
        raise ValueError(f"{name} must have shape (B, n, *spatial) with n = len(spatial) in (2, 3), got {tuple(ddf.shape)}")
    if not all_finite(ddf.detach()):
        raise ValueError(f"{name} contains non-finite values")


def all_finite(x: torch.Tensor) -> bool:
    """``torch.isfinite(x).all()`` in one reduction without temporaries: the range ``aminmax`` is finite
    (NaN propagates into it). Integer tensors are finite; an empty tensor is."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return bool(low > -math.inf and high < math.inf)


def voxel_grid(
    spatial_shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Voxel coordinates of a grid, shape ``(n, *spatial_shape)``; channel ``i`` is the index along axis ``i``."""
    axes = [torch.arange(int(s), dtype=dtype, device=device) for s in spatial_shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def sample(
    volume: torch.Tensor,
    coords: torch.Tensor | None,
    mode: str = "linear",
    padding: str = "border",
    *,
    displacement: torch.Tensor | None = None,
    accumulate: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample ``volume`` at voxel coordinates.

    Args:
        volume: ``(B, C, *spatial)``, ``n = len(spatial)`` in (2, 3).
        coords: ``(B, n, *query)`` voxel coordinates of ``volume`` (channel ``i`` along spatial axis ``i``);
            ``query`` may have any number of dimensions (points, a grid of another size, ...).
            A batch size of 1 in either argument is broadcast. ``None``: the voxel grid of ``displacement``'s
            spatial shape (``voxel_grid``), formed block by block instead of as a whole (``displacement`` is then
            a DDF on that grid and ``query`` its spatial shape).
        mode: ``"linear"`` (multilinear) or ``"nearest"``.
        padding: ``"border"`` (replicate the edge value), ``"zeros"`` (interpolate towards 0 beyond the edge
            voxel centres, ``grid_sample``'s zeros), or ``"itk"``: ITK's resampling convention (also that of
            ``antsApplyTransforms``), border-replicated interpolation for points within half a voxel outside
            the grid (continuous index in ``[-0.5, size - 0.5)`` on every axis) and 0 beyond.
        displacement: optional ``(B, n, *query)`` voxel displacement: the points sampled are
            ``coords + displacement`` (e.g. a grid and a DDF), formed directly in the sampling grid.
        accumulate: optional ``(B, C, *query)`` tensor added to the samples (the result is
            ``accumulate + samples``, e.g. a DDF composed with the sampled one).
        out: optional contiguous tensor of the result's shape and dtype to write the result into; it may be
            ``accumulate`` or ``displacement`` themselves (each block of points is read before it is
            written), never ``volume``. Not with autograd.

    Returns:
        ``(B, C, *query)``.

    ``torch.nn.functional.grid_sample`` is used directly (rather than MONAI's ``Warp``) because the
    query points need not form a grid of the volume's own size.
    """
    n = volume.ndim - 2
    if n not in (2, 3):
        raise ValueError(f"volume must be (B, C, *spatial) with 2 or 3 spatial dims, got {tuple(volume.shape)}")
    for name, points in (("coords", coords), ("displacement", displacement)):
        if points is not None and (points.ndim < 2 or points.shape[1] != n):
            raise ValueError(f"{name} must be (B, {n}, ...) voxel coordinates, got {tuple(points.shape)}")
    if coords is None:
        if displacement is None or displacement.ndim != n + 2:
            raise ValueError(f"coords=None needs a displacement (B, {n}, *spatial) on the grid it stands for")
        if padding == "itk":
            coords = voxel_grid(displacement.shape[2:], displacement.dtype, displacement.device)[None]
    if coords is not None and displacement is not None and displacement.shape[2:] != coords.shape[2:]:
        raise ValueError(f"displacement {tuple(displacement.shape)} and coords {tuple(coords.shape)} differ in shape")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    if padding not in _PADDINGS:
        raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
    if padding == "itk":
        if displacement is not None:
            coords = coords + displacement
        sizes = torch.tensor(volume.shape[2:], dtype=coords.dtype, device=coords.device).view(1, n, *([1] * (coords.ndim - 2)))
        inside = ((coords >= -0.5) & (coords < sizes - 0.5)).all(1, keepdim=True)
        result = sample(volume, coords, mode, "border") * inside.to(volume.dtype if volume.is_floating_point() else coords.dtype)
        result = result if accumulate is None else accumulate + result
        return result if out is None else out.copy_(result)
    batches = {int(t.shape[0]) for t in (volume, coords, displacement) if t is not None}  # int(): traced sizes
    located = coords if coords is not None else displacement
    if len(batches - {1}) > 1:
        raise ValueError(f"batch sizes of volume {tuple(volume.shape)} and coords {tuple(located.shape)} differ")
    batch = max(batches)
    if not volume.is_floating_point():
        volume = volume.to(located.dtype)
    channels, out_shape = volume.shape[1], located.shape[2:]
    points = None if coords is None else coords.reshape(coords.shape[0], n, -1)
    offsets = None if displacement is None else displacement.reshape(displacement.shape[0], n, -1)
    grid_batch = max(1 if points is None else points.shape[0], 1 if offsets is None else offsets.shape[0])
    addend = None
    if accumulate is not None:
        addend = torch.broadcast_to(accumulate, (batch, channels, *out_shape)).reshape(batch, channels, -1)
    count = math.prod(out_shape)
    tracked = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (volume, points, offsets, addend)
    )
    if tracked and points is None:
        points = voxel_grid(out_shape, offsets.dtype, offsets.device)[None].reshape(1, n, -1)
    dtype = volume.dtype if addend is None else torch.promote_types(volume.dtype, addend.dtype)
    if out is not None:
        _check_out(out, (batch, channels, *out_shape), dtype, volume, tracked)
    # grid_sample reads coordinate 0 along the *last* volume axis: the volume's axes are reversed (a view) so
    # that the coordinates keep the array axis order; align_corners=True normalisation of voxel i on an axis of
    # size s: i / ((s - 1) / 2) - 1 (any finite value for s == 1, where grid_sample reads index 0)
    volume = volume.permute(0, 1, *range(n + 1, 1, -1))
    halves = torch.tensor([max(s - 1, 1) / 2 for s in volume.shape[:1:-1]], dtype=located.dtype, device=located.device)
    minus_one = halves.new_full((), -1.0)
    # coords=None (never with autograd): a block of whole slices along the first query axis, whose grid is the
    # slice index there and the (broadcast) in-slice indices on the other axes; the normalised indices are formed
    # once, and each block's grid in one pass per axis, (index / half - 1) + offset / half
    slice_size = math.prod(out_shape[1:])
    normalised_axes = [
        torch.arange(s, dtype=located.dtype, device=located.device).div_(halves[axis]).sub_(1)
        for axis, s in enumerate(out_shape)
    ]

    def samples_at(first: int, last: int) -> torch.Tensor:  # (B, C, last - first) samples, any strides
        size = last - first
        chunks = _point_chunks(volume, batch, size)
        if points is None:
            grid = volume.new_empty((grid_batch, size + -size % chunks, n))
            grid[:, size:] = 0
            block_offsets = offsets[..., first:last].reshape(grid_batch, n, -1, *out_shape[1:])
            block_grid = grid[:, :size].view(grid_batch, -1, *out_shape[1:], n)
            rows = slice(first // slice_size, last // slice_size)
            for axis in range(n):
                index = normalised_axes[axis][rows] if axis == 0 else normalised_axes[axis]
                scale = 1.0 / float(halves[axis])
                view = index.view(-1, *([1] * (n - 1 - axis)))
                torch.add(view, block_offsets[:, axis], alpha=scale, out=block_grid[..., axis])
        else:
            part = points[..., first:last]
            if offsets is not None:
                part = part + offsets[..., first:last]
            if tracked:  # (out= has no autograd)
                grid = torch.addcdiv(minus_one, part.transpose(1, 2), halves).to(volume.dtype).contiguous()
                grid = F.pad(grid, (0, 0, 0, -size % chunks))  # (grid_batch, padded, n)
            else:
                grid = volume.new_empty((part.shape[0], size + -size % chunks, n))
                grid[:, size:] = 0
                torch.addcdiv(minus_one, part, halves.view(1, n, 1), out=grid[:, :size].transpose(1, 2))
        samples = F.grid_sample(
            volume.expand(batch * chunks, *volume.shape[1:]),
            grid.expand(batch, -1, -1).reshape(batch * chunks, -1, *([1] * (n - 1)), n),
            mode=_MODES[mode],
            padding_mode=padding,
            align_corners=True,
        )
        # (batch * chunks, C, points per chunk): the chunks back in order
        samples = samples.view(batch, chunks, channels, -1).transpose(1, 2)
        return samples.reshape(batch, channels, -1)[..., :size] if size % chunks else samples

    if tracked:
        samples = samples_at(0, count).reshape(batch, channels, count)
        result = samples if addend is None else addend + samples
        return result.reshape(batch, channels, *out_shape)
    # without autograd, on a CPU, blocks of points whose temporaries stay small enough for the allocator to recycle
    # (large fresh allocations cost page faults as slow as the sampling itself); results written in place
    result = out if out is not None else volume.new_empty((batch, channels, *out_shape), dtype=dtype)
    flat = result.view(batch, channels, count)
    block = max(1, count)
    if volume.device.type == "cpu":
        block = max(1, _BLOCK_ELEMENTS // ((n + channels) * max(batch, grid_batch)))
        block += -block % max(1, torch.get_num_threads())
    if points is None:  # whole slices
        block = max(1, block // slice_size) * slice_size
    for first in range(0, count, block):
        last = min(count, first + block)
        samples = samples_at(first, last)
        target = flat[..., first:last].view(samples.shape)
        if addend is None:
            target.copy_(samples)
        else:
            torch.add(addend[..., first:last].reshape(samples.shape), samples, out=target)
    return result


# elements of the grid and the samples of one block of points in a sampling without autograd (16 MiB in float32)
_BLOCK_ELEMENTS = 1 << 22


def _check_out(
    out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, volume: torch.Tensor, tracked: bool
) -> None:
    """``sample(..., out=out)``: a contiguous tensor of the result's shape and dtype, not the sampled volume."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {tuple(shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    if out.untyped_storage().data_ptr() == volume.untyped_storage().data_ptr():
        raise ValueError("out must not share memory with the sampled volume (it is read while out is written)")
    if tracked:
        raise ValueError("out= is not supported with autograd")


# fewest points per thread for which splitting a 3-D sampling over threads pays off
_MIN_POINTS_PER_THREAD = 1 << 15


def _point_chunks(volume: torch.Tensor, batch: int, count: int) -> int:
    """Number of equal chunks to split the ``count`` query points of a single (``batch == 1``) sampling into.

    PyTorch's 3-D CPU ``grid_sample`` parallelises over the batch only, so a single volume would be
    sampled by one thread. Presenting ``k`` chunks of the points as a batch of ``k`` (the volume expanded
    without copy) lets ``k`` threads work; every point is computed exactly as without chunks.
    """
    if volume.ndim != 5 or volume.device.type != "cpu" or batch != 1:
        return 1
    return max(1, min(torch.get_num_threads(), count // _MIN_POINTS_PER_THREAD))


def sample_points(volume: torch.Tensor, points: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """Sample ``volume`` ``(B, C, *spatial)`` at points ``(B, N, n)`` in voxel coordinates; returns ``(B, N, C)``.

    Border extrapolation, multilinear (or nearest) interpolation.
    """
    if points.ndim != 3 or points.shape[-1] != volume.ndim - 2:
        raise ValueError(f"points must be (B, N, {volume.ndim - 2}) voxel coordinates, got {tuple(points.shape)}")
    return sample(volume, points.transpose(1, 2), mode=mode).transpose(1, 2)


def warp(image: torch.Tensor, ddf: torch.Tensor, mode: str = "linear", padding: str = "border") -> torch.Tensor:
    """Warp ``image`` (the moving image) by ``ddf``: returns ``image(x + ddf(x))`` on the DDF's (fixed) grid.

    Args:
        image: moving image ``(B, C, *spatial_moving)``.
        ddf: ``(B, n, *spatial_fixed)`` voxel displacement from fixed-grid voxels into the moving image.
        mode: ``"linear"`` for intensities and one-hot label maps (soft Dice), ``"nearest"`` for label maps;
            integer label maps keep their dtype.
        padding: ``"border"``, ``"zeros"`` or ``"itk"`` outside the moving image (see :func:`sample`).

    Returns:
        the warped image ``(B, C, *spatial_fixed)``.

    Uses MONAI's ``Warp`` when the two grids have the same size (identical convention), the general
    sampler otherwise.
    """
    check_ddf(ddf)
    if image.ndim != ddf.ndim:
        raise ValueError(f"image {tuple(image.shape)} and ddf {tuple(ddf.shape)} must have the same number of spatial dims")
    dtype = image.dtype
    moving = image if image.is_floating_point() else image.to(ddf.dtype)
    if moving.shape[2:] == ddf.shape[2:] and moving.shape[0] == ddf.shape[0] and padding != "itk":
        out = _warp_block(mode, padding)(moving.to(ddf.dtype), ddf)
    else:
        out = sample(moving.to(ddf.dtype), None, mode, padding, displacement=ddf)
    return out.round().to(dtype) if not dtype.is_floating_point else out.to(dtype)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """DDF of ``outer o inner`` resampled on ``inner``'s grid: ``u(x) = inner(x) + outer(x + inner(x))``.

    Both are ``(B, n, *spatial)`` voxel DDFs; ``outer`` is interpolated multilinearly with border
    extrapolation. Warping by the result equals warping by ``outer`` and then by ``inner``
    (``warp(warp(m, outer), inner)``) up to interpolation error.
    """
    check_ddf(outer, "outer")
    check_ddf(inner, "inner")
    return sample(outer, None, displacement=inner, accumulate=inner)


def upsample_ddf(ddf: torch.Tensor, factor: int, spatial_shape: Sequence[int]) -> torch.Tensor:
    """A voxel DDF of a grid downsampled by ``factor`` as a voxel DDF of the full grid ``spatial_shape``.

    ``ddf`` is ``(B, n, *coarse)``, ``coarse = ceil(spatial_shape / factor)``; coarse voxel ``j`` is centred at
    full-resolution ``factor * j + (factor - 1) / 2`` (the grids share the left edge of their first voxel,
    :func:`monai_ext.spatial.coordinates.downsampled_voxel_to_voxel`). Multilinear interpolation with border
    extrapolation; the displacements are scaled by ``factor`` (coarse voxels -> full-resolution voxels).
    Returns ``(B, n, *spatial_shape)``.
    """
    if factor == 1:
        return ddf
    # interpolate's half-pixel mapping with an explicit scale factor is this grid convention, (x + 0.5) / f - 0.5,
    # with the source index clamped to the grid (border); it is several times faster than a general sampling,
    # backward included. The upsampled grid covers factor * coarse >= spatial_shape voxels: cropped.
    mode = "trilinear" if ddf.ndim == 5 else "bilinear"
    out = F.interpolate(ddf, scale_factor=factor, mode=mode, align_corners=False, recompute_scale_factor=False)
    return out[(..., *(slice(0, int(s)) for s in spatial_shape))] * factor


def downsample_ddf(ddf: torch.Tensor, factor: int) -> torch.Tensor:
    """A voxel DDF ``(B, n, *spatial)`` averaged onto the grid downsampled by ``factor`` (the grid convention of
    :func:`upsample_ddf`): the mean over each ``factor**n`` block (a partial block at the far edge over the voxels it
    holds), displacements divided by ``factor``. Returns ``(B, n, *ceil(spatial / factor))``.
    """
    if factor == 1:
        return ddf
    pool = F.avg_pool3d if ddf.ndim == 5 else F.avg_pool2d
    return pool(ddf, factor, stride=factor, ceil_mode=True) / factor


def affine_to_ddf(matrix: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Dense voxel DDF of an affine map given in voxel coordinates.

    Args:
        matrix: ``(B, n + 1, n + 1)`` homogeneous matrix mapping fixed-grid voxel coordinates to
            moving voxel coordinates (column-vector convention, array axis order).
        spatial_shape: the fixed grid's shape, length ``n``.

    Returns:
        ``(B, n, *spatial_shape)`` with ``u(x) = A x + t - x``.
    """
    n = len(spatial_shape)
    if matrix.ndim != 3 or matrix.shape[1:] != (n + 1, n + 1):
        raise ValueError(f"matrix must be (B, {n + 1}, {n + 1}), got {tuple(matrix.shape)}")
    grid = voxel_grid(spatial_shape, matrix.dtype, matrix.device).reshape(n, -1)
    mapped = matrix[:, :n, :n] @ grid + matrix[:, :n, n:]
    return (mapped - grid).reshape(matrix.shape[0], n, *spatial_shape)
