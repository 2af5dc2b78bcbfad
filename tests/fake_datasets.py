"""Tiny fake datasets written to disk in each public dataset's extracted layout (for bundle tests).

Images are smooth random volumes (a coarse random grid upsampled trilinearly) so that local NCC has
structure to work with; label maps and masks are thresholds of them. Every writer returns the dataset
folder to point a bundle's ``dataset_dir`` at.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from monai_ext.data.lpba40 import LPBA40_DIVISIONS, LPBA40_LABELS
from monai_ext.data.lung250m import LUNG250M_DIVISIONS, LUNG250M_LANDMARKS
from monai_ext.data.synthesis import write_synthetic_oasis

__all__ = ["write_oasis_raw", "write_lpba40", "write_lung250m", "write_nlst", "write_lumir"]


def _smooth(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Random smooth volume in [0, 1]: a 4^3 random grid upsampled trilinearly to ``shape``."""
    coarse = torch.from_numpy(rng.uniform(size=(1, 1, 4, 4, 4)))
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()


def _save(array: np.ndarray, path: Path, spacing: float = 1.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([spacing, spacing, spacing, 1.0])), str(path))


def write_oasis_raw(root: Path, num_subjects: int = 3, shape: Sequence[int] = (12, 12, 12)) -> Path:
    """neurite-oasis layout with the raw ``norm.nii.gz`` / ``seg35.nii.gz`` files (copies of the synthetic aligned ones)."""
    root = write_synthetic_oasis(root, num_subjects=num_subjects, shape=shape, num_labels=3)
    for subject in (root / "subjects.txt").read_text().split():
        for name in ("norm", "seg35"):
            shutil.copy(root / subject / f"aligned_{name}.nii.gz", root / subject / f"{name}.nii.gz")
    return root


def write_lpba40(root: Path, shape: Sequence[int] = (14, 14, 13), seed: int = 0) -> Path:
    """The preprocessed layout written by ``prepare_lpba40``: ``Sxx/Sxx.delineation.{brain.bfc,structure.label}.nii.gz``."""
    rng = np.random.default_rng(seed)
    labels = np.array(LPBA40_LABELS[:3])
    for subject in (s for names in LPBA40_DIVISIONS.values() for s in names):
        image = _smooth(rng, shape).astype(np.float32)
        label = np.where(image > 0.5, labels[(image * 6).astype(int) % 3], 0).astype(np.int16)
        _save(image, root / subject / f"{subject}.delineation.brain.bfc.nii.gz")
        _save(label, root / subject / f"{subject}.delineation.structure.label.nii.gz")
    return root


def _lung_case(rng: np.random.Generator, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(HU image, lung mask): lungs near -800 HU inside a mask, tissue around."""
    smooth = _smooth(rng, shape)
    mask = (smooth > 0.3).astype(np.uint8)
    return (-1000 + 800 * smooth).astype(np.float32), mask


def write_lung250m(root: Path, shape: Sequence[int] = (18, 14, 18), num_train: int = 2, seed: int = 0) -> Path:
    """Lung250M-4B layout: ``imagesTr``/``masksTr`` (train), ``imagesTs``/``masksTs`` (validate + test), landmarks."""
    rng = np.random.default_rng(seed)
    names = [("Tr", f"case_{i:03d}") for i in range(1, num_train + 1)]
    names += [("Ts", n) for n in LUNG250M_DIVISIONS["validate"] + LUNG250M_DIVISIONS["test"]]
    landmarks = {}
    for split, name in names:
        for index in (1, 2):
            image, mask = _lung_case(rng, shape)
            _save(image, root / f"images{split}" / f"{name}_{index}.nii.gz")
            _save(mask, root / f"masks{split}" / f"{name}_{index}.nii.gz")
        if split == "Ts":
            points = rng.uniform(3, min(shape) - 5, (6, 3))  # inside the grid after any 1-voxel crop
            moved = points + rng.uniform(-0.5, 0.5, points.shape)
            landmarks[str(int(name[-3:]))] = torch.from_numpy(np.concatenate([points, moved], 1))
    torch.save(landmarks, root / LUNG250M_LANDMARKS)
    return root


def write_nlst(root: Path, shape: Sequence[int] = (12, 12, 12), train: int = 2, validate: int = 1, seed: int = 0) -> Path:
    """NLST2023 layout: ``NLST/NLST_dataset.json``, ``imagesTr``, ``masksTr``, ``keypointsTr`` (1.5 mm voxels)."""
    rng = np.random.default_rng(seed)
    data = root / "NLST"
    names = [f"NLST_{i:04d}" for i in range(1, train + validate + 1)]
    for name in names:
        points = rng.uniform(2, min(shape) - 3, (5, 3))  # stays inside the grid with the +-0.5 motion below
        for index in (0, 1):
            image, mask = _lung_case(rng, shape)
            _save(image, data / "imagesTr" / f"{name}_{index:04d}.nii.gz", 1.5)
            _save(mask, data / "masksTr" / f"{name}_{index:04d}.nii.gz", 1.5)
            moved = points + index * rng.uniform(-0.5, 0.5, points.shape)
            (data / "keypointsTr").mkdir(parents=True, exist_ok=True)
            np.savetxt(data / "keypointsTr" / f"{name}_{index:04d}.csv", moved, delimiter=",", fmt="%.4f")

    def entries(selected):
        return [{"fixed": f"./imagesTr/{n}_0000.nii.gz", "moving": f"./imagesTr/{n}_0001.nii.gz"} for n in selected]

    listing = {"training_paired_images": entries(names[:train]), "registration_val": entries(names[train:])}
    (data / "NLST_dataset.json").write_text(json.dumps(listing))
    return root


def write_lumir(root: Path, shape: Sequence[int] = (12, 12, 12), train: int = 4, seed: int = 0) -> Path:
    """LUMIR layout: ``LUMIR_dataset.json``, ``imagesTr`` (uint8-range T1), ``imagesVal`` and ``labelsTr`` of 2 cases."""
    rng = np.random.default_rng(seed)
    train_names = [f"LUMIRMRI_{i:04d}_0000" for i in range(train)]
    val_names = ["LUMIRMRI_3455_0000", "LUMIRMRI_3454_0000"]
    for folder, names in (("imagesTr", train_names), ("imagesVal", val_names)):
        for name in names:
            smooth = _smooth(rng, shape)
            image = np.where(smooth > 0.25, 255 * smooth, 0).astype(np.float32)  # background 0: body mask = image > 0
            _save(image, root / folder / f"{name}.nii.gz")
            if folder == "imagesTr" and name in train_names[:2]:
                _save(((smooth > 0.5) + (smooth > 0.7)).astype(np.int16), root / "labelsTr" / f"{name}.nii.gz")
    listing = {
        "training": [{"image": f"./imagesTr/{n}.nii.gz"} for n in train_names],
        "validation": [{"fixed": f"./imagesVal/{val_names[1]}.nii.gz", "moving": f"./imagesVal/{val_names[0]}.nii.gz"}],
    }
    (root / "LUMIR_dataset.json").write_text(json.dumps(listing))
    return root
