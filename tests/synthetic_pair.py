"""A small synthetic pair on disk for CLI / bundle tests (random label map, known smooth deformation)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_ext.data.synthesis import make_synthetic_pair

#: command-line overrides for a 2-level, 8-channel SITReg (sitreg_oasis configs) with one instance-optimisation
#: step: seconds per pair on a CPU
TINY_SITREG = [
    "--instance_optimization_steps", "1",
    "--crop", "None",
    "--network_def#features", "[8,8]",
    "--network_def#feature_convolutions", "[1,1]",
    "--network_def#deformation_features", "[8,8]",
    "--network_def#deformation_convolutions", "[1,1]",
]  # fmt: skip

FILES = {
    "moving_image": "moving.nii.gz",
    "moving_label": "moving_label.nii.gz",
    "fixed_image": "fixed.nii.gz",
    "fixed_label": "fixed_label.nii.gz",
    "true_forward_ddf": "true_forward_ddf.nii.gz",
}


def test_affine(shape: Sequence[int], spacing: Sequence[float] = (2.5, 2.5, 3.0)) -> np.ndarray:
    """Voxel to RAS matrix: first axis flipped ("LAS"), voxel sizes ``spacing`` mm, volume centre at
    world ``(10, -20, 15)`` mm."""
    linear = np.diag(np.asarray(spacing, np.float64) * np.array([-1.0, 1.0, 1.0]))
    centre = (np.asarray(shape, np.float64) - 1) / 2
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.array([10.0, -20.0, 15.0]) - linear @ centre
    return affine


test_affine.__test__ = False  # a helper, not a test


def write_synthetic_pair(
    data_dir: str | os.PathLike, shape: Sequence[int] = (16, 16, 16), seed: int = 0, max_displacement: float = 4.0
) -> dict[str, Path]:
    """:func:`monai_ext.data.synthesis.make_synthetic_pair` (12 labels) as NIfTI files (:data:`FILES`) with
    :func:`test_affine`; ``true_forward_ddf`` is the ``(*shape, 3)`` voxel DDF on the fixed grid into the moving
    image. Returns ``{key: path}``."""
    shape = tuple(int(s) for s in shape)
    pair = make_synthetic_pair(shape, seed=seed, num_labels=12, max_displacement=max_displacement)
    arrays = {
        "moving_image": pair["moving_image"][0].numpy().astype(np.float32),
        "fixed_image": pair["fixed_image"][0].numpy().astype(np.float32),
        "moving_label": pair["moving_label"][0].numpy().astype(np.int16),
        "fixed_label": pair["fixed_label"][0].numpy().astype(np.int16),
        "true_forward_ddf": pair["ddf"].movedim(0, -1).numpy().astype(np.float32),
    }
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, array in arrays.items():
        paths[key] = data_dir / FILES[key]
        nib.save(nib.Nifti1Image(array, test_affine(shape)), str(paths[key]))
    return paths
