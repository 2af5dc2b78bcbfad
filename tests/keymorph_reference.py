"""Test helpers reproducing the KeyMorph reference's grid conventions (fixtures README section 2).

The reference builds its base grid with ``linspace(-1, 1, N)`` per axis (align_corners=True positions), maps it,
reverses the last axis to ``grid_sample``'s (x, y, z) order and samples with ``align_corners=False``; its
real-world helpers convert normalized <-> voxel with the align_corners=False formula. These are written
independently of ``monai_ext`` so that fixture tests check the package against the reference's definitions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "as_tensors",
    "normalized_grid",
    "voxel_to_linspace",
    "to_sampling_grid",
    "reference_warp",
    "norm_to_voxel",
    "voxel_to_norm",
]


def as_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Fixture arrays as tensors (same dtypes)."""
    return {key: torch.from_numpy(value) for key, value in arrays.items()}


def normalized_grid(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """KeyMorph's ij base grid (``linspace(-1, 1)`` per axis), flattened in C order: ``(1, N, n)``."""
    axes = [torch.linspace(-1, 1, int(s), dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, len(shape))


def voxel_to_linspace(shape: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Voxel index -> KeyMorph's normalized ij coordinate ``2 v / (N - 1) - 1`` (for ``tps_dense``'s ``to_points``)."""
    size = torch.tensor([float(s) for s in shape])
    return lambda voxels: 2 * voxels / (size.to(voxels) - 1) - 1


def to_sampling_grid(points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(1, N, n)`` ij points -> ``grid_sample`` grid ``(1, *shape, n)`` in (x, y, z) order."""
    return points.reshape(1, *[int(s) for s in shape], -1).flip(-1)


def reference_warp(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The fixtures' warp: trilinear, border, align_corners=False."""
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def norm_to_voxel(points: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """KeyMorph's real-world helper, align_corners=False: ``v = (p + 1) N / 2 - 0.5``."""
    return (points + 1) * shape / 2 - 0.5


def voxel_to_norm(voxels: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`norm_to_voxel`: ``p = 2 (v + 0.5) / N - 1``."""
    return 2 * (voxels + 0.5) / shape - 1
