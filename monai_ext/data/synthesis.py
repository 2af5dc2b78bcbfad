"""SynthMorph-style synthetic brain-like data, generated locally (no download).

* :func:`random_label_map`: smooth random label map = argmax of Gaussian-smoothed noise channels,
  labels ``1..num_labels`` inside a head-like ellipsoid, 0 outside.
* :func:`synthesize_image`: label map -> image with a random intensity per label, Gaussian blur and
  noise, in ``[0, 1]``.
* :func:`random_ddf`: smooth random voxel DDF (random control values on a coarse grid, multilinearly
  upsampled) with a chosen maximum displacement.
* :func:`make_synthetic_pair`: a (moving, fixed) pair related by a known DDF.
* :func:`write_synthetic_oasis`: a small dataset folder in the neurite-oasis layout (tests, demo).
* :func:`image_from_label_map`: a synthetic image for a real label map (e.g. SynthSeg training maps).

All functions are deterministic for a given ``seed`` (their own ``torch.Generator``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from monai_ext.data.oasis import OASIS_IMAGE_FILE, OASIS_LABEL_FILE
from monai_ext.spatial.sampling import voxel_grid, warp

__all__ = [
    "random_label_map",
    "synthesize_image",
    "random_ddf",
    "make_synthetic_pair",
    "write_synthetic_oasis",
    "image_from_label_map",
]


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 4:
        raise ValueError(f"shape must have 2 or 3 spatial sizes of at least 4 voxels, got {shape}")
    return shape


def _blur(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(C, *spatial)`` with ``sigma`` voxels (MONAI's separable ``GaussianFilter``)."""
    if sigma <= 0:
        return volume
    return GaussianFilter(volume.ndim - 1, sigma)(volume.unsqueeze(0)).squeeze(0)


def random_label_map(
    shape: Sequence[int], num_labels: int = 6, sigma: float | None = None, seed: int = 0
) -> torch.Tensor:
    """Smooth random label map ``(*shape)`` int64: labels ``1..num_labels`` inside an ellipsoid, 0 outside.

    ``sigma`` (voxels) sets the blob size; default ``max(shape) / 8``. The ellipsoid's semi-axes are
    0.42 x the size along each axis, centred.
    """
    shape = _check_shape(shape)
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_labels, *shape), generator=generator)
    labels = _blur(noise, max(shape) / 8 if sigma is None else sigma).argmax(0) + 1
    centre = torch.tensor([(s - 1) / 2 for s in shape]).view(-1, *([1] * len(shape)))
    radii = torch.tensor([0.42 * s for s in shape]).view(-1, *([1] * len(shape)))
    inside = (((voxel_grid(shape) - centre) / radii) ** 2).sum(0) <= 1
    return torch.where(inside, labels, torch.zeros_like(labels))


def synthesize_image(
    label_map: torch.Tensor,
    seed: int = 0,
    blur_sigma: float = 1.0,
    noise_std: float = 0.02,
    noise_seed: int | None = None,
) -> torch.Tensor:
    """Synthetic image ``(*spatial)`` float32 in ``[0, 1]`` from a non-negative integer label map ``(*spatial)``.

    Label 0 is black; label value ``v`` gets intensity ``table[v]`` drawn uniformly from ``[0.2, 1]``
    (``table`` of ``max(256, max label + 1)`` entries from ``seed``, so maps sharing a seed share their
    contrast). The image is then blurred (``blur_sigma`` voxels) and Gaussian noise of std
    ``noise_std`` (drawn from ``noise_seed``, default ``seed``) is added.
    """
    if label_map.is_floating_point() or label_map.ndim not in (2, 3) or label_map.min() < 0:
        raise ValueError(
            f"label_map must be a non-negative integer (*spatial) tensor with 2 or 3 dims, "
            f"got {label_map.dtype} {tuple(label_map.shape)}"
        )
    table = 0.2 + 0.8 * torch.rand(max(256, int(label_map.max()) + 1), generator=torch.Generator().manual_seed(seed))
    table[0] = 0.0
    image = _blur(table[label_map.long()].unsqueeze(0), blur_sigma).squeeze(0)
    noise = torch.Generator().manual_seed(seed if noise_seed is None else noise_seed)
    return (image + noise_std * torch.randn(image.shape, generator=noise)).clamp(0, 1)


def random_ddf(
    shape: Sequence[int], max_displacement: float = 2.0, control_spacing: int = 8, seed: int = 0
) -> torch.Tensor:
    """Smooth random DDF ``(n, *shape)`` in voxel units with ``max |u| = max_displacement`` voxels.

    Random normal values on a control grid of spacing ``h <= control_spacing`` voxels are multilinearly
    upsampled (``align_corners=True``) and rescaled, so every partial derivative of ``u`` is at most
    ``2 max_displacement / h``; with ``max_displacement < h / (2 n)`` the Jacobian of ``u`` has norm < 1
    and ``x + u(x)`` cannot fold (larger values usually do not fold either, but are not guaranteed).
    """
    shape = _check_shape(shape)
    generator = torch.Generator().manual_seed(seed)
    coarse_shape = [max(2, -(-s // control_spacing) + 1) for s in shape]
    coarse = torch.randn((1, len(shape), *coarse_shape), generator=generator)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    ddf = F.interpolate(coarse, size=shape, mode=mode, align_corners=True)[0]
    return ddf * (max_displacement / ddf.abs().amax().clamp(min=1e-12))


def make_synthetic_pair(
    shape: Sequence[int] = (32, 32, 32), seed: int = 0, num_labels: int = 6, max_displacement: float = 2.0
) -> dict[str, torch.Tensor]:
    """A (moving, fixed) pair related by a known smooth DDF.

    Returns:
        dict with ``moving_image``, ``fixed_image`` float32 ``(1, *shape)``, ``moving_label``,
        ``fixed_label`` int64 ``(1, *shape)`` and ``ddf`` ``(n, *shape)`` (voxels, on the fixed grid) with
        ``fixed_image = warp(moving_image, ddf)`` (linear) and ``fixed_label = warp(moving_label, ddf)``
        (nearest), i.e. ``fixed(x) = moving(x + ddf(x))``.
    """
    moving_label = random_label_map(shape, num_labels, seed=seed)
    moving_image = synthesize_image(moving_label, seed=seed)
    ddf = random_ddf(shape, max_displacement, seed=seed + 1)
    fixed_image = warp(moving_image[None, None], ddf[None])[0]
    fixed_label = warp(moving_label[None, None], ddf[None], mode="nearest")[0]
    return {
        "moving_image": moving_image[None],
        "fixed_image": fixed_image,
        "moving_label": moving_label[None],
        "fixed_label": fixed_label,
        "ddf": ddf,
    }


def _save_nifti(array: np.ndarray, path: Path) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def write_synthetic_oasis(
    root: str | os.PathLike,
    num_subjects: int = 4,
    shape: Sequence[int] = (32, 32, 32),
    num_labels: int = 6,
    max_displacement: float = 3.0,
    seed: int = 0,
) -> Path:
    """Write a small synthetic dataset in the neurite-oasis layout and return ``root``.

    ``root/subjects.txt`` lists ``OASIS_OAS1_0001_MR1`` ... and each folder holds ``aligned_norm.nii.gz``
    (float32) and ``aligned_seg35.nii.gz`` (int16 labels ``0..num_labels``), 1 mm identity affine. Every
    subject is a common random template label map warped (nearest) by its own random DDF; the label
    intensities are shared (same ``seed``) and the noise differs, so subjects resemble brains of one population.
    """
    root = Path(root)
    shape = _check_shape(shape)
    template = random_label_map(shape, num_labels, seed=seed)
    names = []
    for index in range(num_subjects):
        name = f"OASIS_OAS1_{index + 1:04d}_MR1"
        ddf = random_ddf(shape, max_displacement, seed=seed + 1000 + index)
        label = warp(template[None, None], ddf[None], mode="nearest")[0, 0]
        image = synthesize_image(label, seed=seed, noise_seed=seed + 10_000 + index)
        (root / name).mkdir(parents=True, exist_ok=True)
        _save_nifti(image.numpy().astype(np.float32), root / name / OASIS_IMAGE_FILE)
        _save_nifti(label.numpy().astype(np.int16), root / name / OASIS_LABEL_FILE)
        names.append(name)
    (root / "subjects.txt").write_text("\n".join(names) + "\n")
    return root


def image_from_label_map(
    label_map: str | os.PathLike | torch.Tensor | np.ndarray,
    seed: int = 0,
    blur_sigma: float = 1.0,
    noise_std: float = 0.02,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic image for a real label map (a NIfTI path, e.g. ``synthseg_label_maps/training_seg_01.nii.gz``,
    or an integer array ``(*spatial)``).

    Returns:
        ``(image, label)``: float32 ``(1, *spatial)`` in ``[0, 1]`` and the int64 label map ``(1, *spatial)``.
    """
    if isinstance(label_map, (str, os.PathLike)):
        import nibabel as nib

        label_map = np.asarray(nib.load(str(label_map)).dataobj)
    label = (
        torch.as_tensor(np.asarray(label_map)).round().to(torch.int64)
        if not torch.is_tensor(label_map)
        else label_map.long()
    )
    image = synthesize_image(label, seed=seed, blur_sigma=blur_sigma, noise_std=noise_std)
    return image[None], label[None]
