"""Visual quality assurance of one registration: a PNG of mid-slices, checkerboard, deformed grid and Jacobian.

Layout: one row per view (the three mid-slices across axes 0, 1, 2 for 3-D volumes, one row for 2-D images),
columns *fixed*, *moving*, *warped*, a *checkerboard* of fixed and warped, the *deformed grid* (the lines of
the fixed grid mapped by ``x + u(x)``, drawn over the warped slice) and the *Jacobian determinant* of
``x + u(x)`` (diverging colormap centred at 1; voxels with ``det <= 0``, folds, in solid :data:`FOLD_COLOR`).
A slice across axis ``a`` is shown with the first remaining array axis horizontal and the second vertical
(origin lower left), the same for every panel; in RAS model space an axis-2 slice is therefore an axial view
with R to the right and A up. The deformed grid shows the in-plane displacement components only.

Drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display needed); written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure

from monai_ext.data.atomic import atomic_output
from monai_ext.metrics.deformation import jacobian_determinant
from monai_ext.spatial.sampling import check_ddf

__all__ = ["qa_figure", "FOLD_COLOR"]

FOLD_COLOR = (0.0, 1.0, 0.0)  # pure green: absent from the Jacobian colormap (RdBu) and the grey images
_IMSHOW = {"origin": "lower", "interpolation": "nearest"}  # voxels drawn as blocks, first axis to the right
_COLUMNS = ("fixed", "moving", "warped", "checkerboard", "deformed grid", "Jacobian det")
_KEYPOINT_STYLE = {  # name -> (marker, colour, panels it is drawn on)
    "moving": ("o", "tab:red", ("moving",)),
    "fixed": ("o", "tab:cyan", ("fixed", "warped")),
    "aligned": ("x", "tab:orange", ("warped",)),
}


def _volume(image, name: str, n: int) -> np.ndarray:
    """``(*spatial)`` float32 array from ``(*spatial)``, ``(1, *spatial)`` or ``(1, 1, *spatial)``."""
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    if array.ndim < n or int(np.prod(array.shape[:-n])) != 1:
        raise ValueError(
            f"{name} must be (*spatial), (1, *spatial) or (1, 1, *spatial) with {n} spatial dims, got {array.shape}"
        )
    array = array.reshape(array.shape[-n:])
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains non-finite values")
    return array


def _window(array: np.ndarray) -> tuple[float, float]:
    """The 1st and 99th intensity percentiles, which the panels map to 0 and 1."""
    low, high = np.percentile(array, (1, 99))
    return float(low), float(high)


def _scaled(plane: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """``plane`` scaled by ``window`` (:func:`_window`) into [0, 1], clipped."""
    low, high = window
    return np.clip((plane - low) / (high - low), 0, 1) if high > low else np.zeros_like(plane)


def _slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2-D slice across ``axis`` (ignored for 2-D arrays), transposed for ``imshow(origin="lower")``."""
    plane = np.take(array, index, axis=axis) if array.ndim == 3 else array
    return plane.T


def _plane_indices(shape: Sequence[int], axis: int, index: int) -> np.ndarray:
    """Voxel indices ``(n, *plane)`` of the slice ``index`` across ``axis`` (the whole grid in 2-D), untransposed:
    only the panels' slices of the grid are formed, never the whole 3-D grid."""
    if len(shape) == 2:
        return np.indices(shape)
    indices = np.indices([1 if a == axis else s for a, s in enumerate(shape)])
    indices[axis] = index
    return np.take(indices, 0, axis=1 + axis)


def _views(shape: Sequence[int]) -> list[tuple[int, tuple[int, int]]]:
    """``(axis, (horizontal axis, vertical axis))`` per row."""
    if len(shape) == 2:
        return [(-1, (0, 1))]
    return [(a, tuple(d for d in range(3) if d != a)) for a in range(3)]


def _jacobian(ddf: torch.Tensor, jacobian, shape: tuple[int, ...]) -> np.ndarray:
    """Determinant map on the fixed grid; the border missing from central differences is NaN (not drawn)."""
    if jacobian is None:
        jacobian = jacobian_determinant(ddf.double(), "central")
    n = len(shape)
    det = _volume(jacobian, "jacobian", n)
    if det.shape == tuple(s - 2 for s in shape):
        det = np.pad(det, 1, constant_values=np.nan)
    elif det.shape != shape:
        raise ValueError(
            f"jacobian must have the fixed grid's shape {shape} or the interior's (each - 2), got {det.shape}"
        )
    return det


def _keypoints(keypoints: Mapping[str, torch.Tensor | np.ndarray] | None, n: int) -> dict[str, np.ndarray]:
    if keypoints is None:
        return {}
    unknown = set(keypoints) - set(_KEYPOINT_STYLE)
    if unknown:
        raise ValueError(f"keypoints keys must be among {sorted(_KEYPOINT_STYLE)}, got {sorted(unknown)}")
    out = {}
    for name, points in keypoints.items():
        array = (
            points.detach().cpu().double().numpy()
            if isinstance(points, torch.Tensor)
            else np.asarray(points, np.float64)
        )
        array = array.reshape(array.shape[-2:]) if array.ndim == 3 and array.shape[0] == 1 else array
        if array.ndim != 2 or array.shape[1] != n or not np.isfinite(array).all():
            raise ValueError(
                f"keypoints[{name!r}] must be finite (N, {n}) or (1, N, {n}) voxel coordinates, got {array.shape}"
            )
        out[name] = array
    return out


def _draw_keypoints(ax, column: str, points: dict[str, np.ndarray], axis: int, in_plane, index: int, size: int):
    """Draw the point sets belonging to ``column``'s panel: those within ``max(2, size / 8)`` voxels of the slice."""
    for name, array in points.items():
        marker, colour, targets = _KEYPOINT_STYLE[name]
        if column in targets:
            near = np.abs(array[:, axis] - index) <= max(2, size / 8) if axis >= 0 else np.ones(len(array), bool)
            ax.scatter(array[near, in_plane[0]], array[near, in_plane[1]], s=9, marker=marker, c=colour, linewidths=0.8)


def _draw_grid(ax, mapped: np.ndarray, axes: tuple[int, int], step: int) -> None:
    """Lines of constant fixed coordinate, through their mapped in-plane positions ``mapped`` ``(n, H, V)``."""
    h, v = mapped[axes[0]], mapped[axes[1]]
    for i in range(0, h.shape[0], step):
        ax.plot(h[i, :], v[i, :], color="gold", linewidth=0.6)
    for j in range(0, h.shape[1], step):
        ax.plot(h[:, j], v[:, j], color="gold", linewidth=0.6)


def qa_figure(
    fixed: torch.Tensor | np.ndarray,
    moving: torch.Tensor | np.ndarray,
    warped: torch.Tensor | np.ndarray,
    ddf: torch.Tensor,
    path: str | os.PathLike,
    keypoints: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    jacobian: torch.Tensor | np.ndarray | None = None,
    grid_step: int | None = None,
    panel_inches: float = 2.0,
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """Write a QA PNG of one registration (see the module docstring for the layout).

    Args:
        fixed: fixed image ``(*spatial)``, ``(1, *spatial)`` or ``(1, 1, *spatial)``, ``n`` = 2 or 3 spatial dims.
        moving: moving image, same forms (its grid may differ from the fixed one; its own mid-slices are shown).
        warped: moving image warped onto the fixed grid (fixed grid shape).
        ddf: ``(1, n, *spatial)`` voxel DDF on the fixed grid mapping fixed voxels to moving voxels.
        path: destination ``.png``.
        keypoints: optional KeyMorph points, voxel coordinates ``(N, n)`` or ``(1, N, n)``: ``"moving"`` (moving
            grid, drawn on the moving panel), ``"fixed"`` (fixed grid, on the fixed and warped panels) and
            ``"aligned"`` (moving points mapped onto the fixed grid, on the warped panel). Points within
            ``max(2, size / 8)`` voxels of a slice are projected onto it.
        jacobian: determinant map on the fixed grid (full shape, or the interior of central differences);
            computed with :func:`monai_ext.metrics.deformation.jacobian_determinant` (central) when ``None``.
        grid_step: spacing of the drawn grid lines in voxels; default ``max(1, max(spatial) // 16)``.
        panel_inches, dpi: each panel is ``panel_inches`` square; the PNG is ``6 * panel_inches * dpi`` pixels wide
            and ``rows * panel_inches * dpi`` high (rows = 3 for 3-D, 1 for 2-D).
        title: optional figure title.

    Returns:
        the path written.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end with .png, got {path}")
    check_ddf(ddf)
    if ddf.shape[0] != 1:
        raise ValueError(f"ddf must hold one field (1, n, *spatial), got batch size {ddf.shape[0]}")
    n = ddf.shape[1]
    shape = tuple(ddf.shape[2:])
    images = {
        "fixed": _volume(fixed, "fixed", n),
        "moving": _volume(moving, "moving", n),
        "warped": _volume(warped, "warped", n),
    }
    for name in ("fixed", "warped"):
        if images[name].shape != shape:
            raise ValueError(f"{name} must be on the ddf's (fixed) grid {shape}, got {images[name].shape}")
    det = _jacobian(ddf, jacobian, shape)
    points = _keypoints(keypoints, n)
    windows = {name: _window(image) for name, image in images.items()}  # "fixed", "moving", "warped"
    displacement = ddf[0].detach().cpu()
    step = grid_step or max(1, max(shape) // 16)
    tile = max(2, max(shape) // 8)

    def grey(column: str, axis: int, index: int) -> np.ndarray | None:  # the panel's grey slice, if it has one
        if column in images:
            return _scaled(_slice(images[column], axis, index), windows[column])
        if column == "checkerboard":
            checker = (_plane_indices(shape, axis, index) // tile).sum(0).T % 2 == 0
            return np.where(checker, grey("fixed", axis, index), grey("warped", axis, index))
        if column == "deformed grid":
            return 0.5 * grey("warped", axis, index)
        return None

    def mapped(axis: int, index: int) -> np.ndarray:  # x + u(x) on the slice, (n, *plane)
        plane = displacement.select(1 + axis, index) if n == 3 else displacement
        return plane.double().numpy() + _plane_indices(shape, axis, index)

    finite = det[np.isfinite(det)]
    norm = TwoSlopeNorm(
        vcenter=1.0, vmin=min(0.0, float(finite.min(initial=0.0))), vmax=max(2.0, float(finite.max(initial=2.0)))
    )

    views = _views(shape)
    figure = Figure(figsize=(len(_COLUMNS) * panel_inches, len(views) * panel_inches), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(views), len(_COLUMNS), squeeze=False)
    figure.subplots_adjust(left=0.01, right=0.965, bottom=0.01, top=0.9 if title else 0.93, wspace=0.05, hspace=0.12)
    if title:
        figure.suptitle(title, fontsize=9)
    for row, (axis, in_plane) in zip(axes, views):
        for ax, column in zip(row, _COLUMNS):
            grid = images["moving"].shape if column == "moving" else shape
            index = grid[axis] // 2 if n == 3 else 0
            ax.set_xticks([])
            ax.set_yticks([])
            shown = grey(column, axis, index)
            if shown is not None:
                ax.imshow(shown, cmap="gray", vmin=0, vmax=1, **_IMSHOW)
            if column == "deformed grid":
                _draw_grid(ax, mapped(axis, index), in_plane, step)
            if column == "Jacobian det":
                det_slice = _slice(det, axis, index)
                shown_det = ax.imshow(det_slice, cmap="RdBu_r", norm=norm, **_IMSHOW)
                folds = np.ma.masked_where(~(det_slice <= 0), np.ones_like(det_slice))
                ax.imshow(folds, cmap=ListedColormap([FOLD_COLOR]), vmin=0, vmax=1, **_IMSHOW)
                figure.colorbar(shown_det, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            _draw_keypoints(ax, column, points, axis, in_plane, index, grid[axis])
            ax.set_xlim(-0.5, grid[in_plane[0]] - 0.5)  # the panel's grid, whatever was drawn over it
            ax.set_ylim(-0.5, grid[in_plane[1]] - 0.5)
            ax.set_title(column if n == 2 else f"{column}, axis {axis} = {index}", fontsize=6)
    fold_count = int((det <= 0).sum())
    figure.text(0.99, 0.995, f"folds (det <= 0): {fold_count} voxels", ha="right", va="top", fontsize=7)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return path
