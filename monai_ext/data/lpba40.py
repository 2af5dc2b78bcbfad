"""LPBA40 (LONI Probabilistic Brain Atlas: 40 T1 brain MRIs with 56 manually delineated structures).

The data are distributed by LONI under a data use agreement and are **not downloaded automatically by
default**. Get the two archives from https://resource.loni.usc.edu/resources/atlases-downloads/
(:data:`LPBA40_ARCHIVES`; the direct URLs in :data:`LPBA40_URLS` are the ones SITReg's code uses, for
``prepare_lpba40(..., download=True)`` after accepting the agreement) and put them in ``dataset_dir``,
or extract them there so that, for every subject ``Sxx``::

    dataset_dir/LPBA40/delineation_space/Sxx/Sxx.delineation.structure.label.{hdr,img.gz}
    dataset_dir/LPBA40/native_space/Sxx/Sxx.native.brain.bfc.{hdr,img.gz}
    dataset_dir/LPBA40/native_space/Sxx/tissue/Sxx.native.tissue.{hdr,img.gz}
    dataset_dir/LPBA40/native_space/Sxx/transforms/Sxx.delineation.to.native.air

(each outer archive holds an inner ``LPBA40subjects.*.zip`` with this tree; ``.img`` instead of
``.img.gz`` is accepted too). No checksums are published.

:func:`prepare_lpba40` then writes ``dataset_dir/Sxx/Sxx.delineation.brain.bfc.nii.gz`` and
``Sxx.delineation.structure.label.nii.gz`` as the SITReg authors' reference implementation does: the
native-space skull-stripped, bias-corrected image and tissue map are resampled into delineation
space through the inverse of the AIR affine (linear interpolation, border extrapolation), the image
is divided by its mean white-matter intensity (resampled tissue label 3) and multiplied by the brain
mask (tissue > 1e-5, SITReg: > 0); the Analyze label map is converted to NIfTI. Affines are ``diag(-s_x, -s_y, s_z)``
(SITReg's convention). Splits are fixed lists (:data:`LPBA40_DIVISIONS`); evaluation pairs are all
unordered pairs of a division; every volume is cropped by :data:`LPBA40_CROP` (-> 160x192x160).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose

from monai_ext.data.atomic import atomic_output
from monai_ext.data.base import all_pairs, check_files, volume_transforms
from monai_ext.data.download import download_file, extract_archive
from monai_ext.spatial.sampling import sample

__all__ = [
    "LPBA40_PAGE",
    "LPBA40_ARCHIVES",
    "LPBA40_URLS",
    "LPBA40_CROP",
    "LPBA40_DIVISIONS",
    "LPBA40_LABELS",
    "AirTransform",
    "read_air",
    "air_resample",
    "prepare_lpba40",
    "lpba40_cases",
    "lpba40_pairs",
    "lpba40_transforms",
]

LPBA40_PAGE = "https://resource.loni.usc.edu/resources/atlases-downloads/"
LPBA40_ARCHIVES = (
    "LPBA40_Subjects_Delineation_Space_MRI_and_label_files.zip",
    "LPBA40_Subjects_Native_Space_MRI_data_and_masks.zip",
)
LPBA40_URLS = {name: "https://resource.loni.usc.edu/atlasfiles/" + name for name in LPBA40_ARCHIVES}
LPBA40_CROP = ((11, 10), (20, 5), (0, 21))
LPBA40_DIVISIONS = {
    "train": [f"S{i:02d}" for i in (*range(1, 11), 17, 18, 20, 21, 22, 23, 25, 27, 30, 31, 33, 35, 36, 37, 40)],
    "validate": ["S14", "S16", "S19", "S26", "S39"],
    "test": ["S11", "S12", "S13", "S15", "S24", "S28", "S29", "S32", "S34", "S38"],
}
LPBA40_LABELS = (
    *range(21, 35), *range(41, 51), *range(61, 69), *range(81, 93), 101, 102, 121, 122, *range(161, 167), 181, 182
)
_IMAGE = "{}.delineation.brain.bfc.nii.gz"
_LABEL = "{}.delineation.structure.label.nii.gz"
_WHITE_MATTER = 3
# SITReg: white matter |tissue - 3| < 1e-5, brain tissue > 0; the brain test uses the same 1e-5 here so that
# float32 round-off of the sampler at exact voxel positions (~1e-7) does not count as brain
_TOLERANCE = 1e-5
# AIR 5 "struct AIR_Air16": double e[4][4]; char s_file[128]; struct AIR_Key_info s; char r_file[128];
# struct AIR_Key_info r; char comment[128]; int s_hash, r_hash; unsigned short s_volume, r_volume;
# char reserved[116]. Key_info = unsigned bits, x_dim, y_dim, z_dim; double x_size, y_size, z_size.
_AIR = struct.Struct("<16d128s4I3d128s4I3d128s2i2H116s")


class AirTransform(NamedTuple):
    """An AIR 5 affine (``.air``): ``matrix`` maps voxel coordinates of the *standard* file, scaled to cubic
    voxels of its smallest voxel size, to voxel coordinates of the *reslice* file (column vectors ``[x, y, z, 1]``)."""

    matrix: np.ndarray  # (4, 4) float64
    standard_shape: tuple[int, int, int]
    standard_voxel_size: tuple[float, float, float]
    reslice_shape: tuple[int, int, int]
    reslice_voxel_size: tuple[float, float, float]


def read_air(path: str | os.PathLike) -> AirTransform:
    """Read a little-endian AIR 5 ``.air`` file (720 bytes); ``e`` is stored transposed (``e[j][i]`` multiplies axis ``j``)."""
    data = Path(path).read_bytes()
    if len(data) != _AIR.size:
        raise ValueError(f"{path} has {len(data)} bytes; an AIR 5 affine file has {_AIR.size}")
    fields = _AIR.unpack(data)
    matrix = np.asarray(fields[:16], dtype=np.float64).reshape(4, 4).T
    standard, reslice = fields[17:24], fields[25:32]  # (bits, x_dim, y_dim, z_dim, x_size, y_size, z_size)
    return AirTransform(matrix, tuple(standard[1:4]), tuple(standard[4:7]), tuple(reslice[1:4]), tuple(reslice[4:7]))


def air_resample(volume: np.ndarray, voxel_size: Sequence[float], air: AirTransform) -> np.ndarray:
    """Resample a *standard*-space volume onto the *reslice* grid through the inverse of ``air``.

    For a reslice voxel ``v``, the standard voxel is ``(M^-1 v) * min(standard voxel size) / voxel_size``
    (``M`` acts on cubic voxels). Linear interpolation, border extrapolation; SITReg's
    ``inverse_transform_volume_by_air``, used with standard = native space, reslice = delineation space.

    Args:
        volume: ``(x, y, z)`` standard-space array.
        voxel_size: its voxel size (normally ``air.standard_voxel_size``).

    Returns:
        ``air.reslice_shape`` float32 array.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be a 3-D array, got shape {volume.shape}")
    scale = min(air.standard_voxel_size) / np.asarray(voxel_size, dtype=np.float64)
    to_standard = np.diag([*scale, 1.0]) @ np.linalg.inv(air.matrix)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in air.reslice_shape], indexing="ij"))
    coords = np.einsum("ij,j...->i...", to_standard[:3, :3], grid) + to_standard[:3, 3, None, None, None]
    source = torch.as_tensor(np.asarray(volume, dtype=np.float32))[None, None]
    return sample(source, torch.as_tensor(coords, dtype=torch.float32)[None])[0, 0].numpy()


def _load_analyze(header: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Array ``(x, y, z)`` and voxel size of an Analyze / NIfTI pair whose image may be gzipped (``.img.gz``)."""
    image_path = header.with_suffix(".img")
    if image_path.is_file():
        image_bytes = image_path.read_bytes()
    elif image_path.with_suffix(".img.gz").is_file():
        image_bytes = gzip.decompress(image_path.with_suffix(".img.gz").read_bytes())
    else:
        raise FileNotFoundError(f"{image_path}(.gz) belonging to {header} is missing")
    header_bytes = header.read_bytes()
    klass = nib.Nifti1Pair if header_bytes[344:347] == b"ni1" else nib.AnalyzeImage
    image = klass.from_file_map({
        "header": nib.FileHolder(fileobj=io.BytesIO(header_bytes)),
        "image": nib.FileHolder(fileobj=io.BytesIO(image_bytes)),
    })
    array = np.asarray(image.dataobj)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    return array, tuple(float(z) for z in image.header.get_zooms()[:3])


def _save(array: np.ndarray, voxel_size: Sequence[float], path: Path) -> None:
    affine = np.diag([-voxel_size[0], -voxel_size[1], voxel_size[2], 1.0])
    with atomic_output(path) as partial:  # a complete file or none; the temporary name keeps the .nii.gz suffix
        nib.save(nib.Nifti1Image(array, affine), str(partial))


def _missing_message(dataset_dir: Path) -> str:
    return (
        f"LPBA40 raw data not found in {dataset_dir}. LPBA40 is distributed by LONI under a data use agreement: "
        f"download {LPBA40_ARCHIVES[0]} and {LPBA40_ARCHIVES[1]} from {LPBA40_PAGE} and put them in {dataset_dir} "
        "(or pass download=True after accepting the agreement), or extract them there so that "
        f"{dataset_dir}/LPBA40/delineation_space/S01/S01.delineation.structure.label.hdr (+ .img or .img.gz) and "
        f"{dataset_dir}/LPBA40/native_space/S01/{{S01.native.brain.bfc.hdr, tissue/S01.native.tissue.hdr, "
        "transforms/S01.delineation.to.native.air}} exist for every subject; then run prepare_lpba40 again."
    )


def _unpack(dataset_dir: Path, urls: Mapping[str, str] | None, progress: bool) -> None:
    """Extract the two archives and their inner ``LPBA40subjects.*.zip``, merging the ``LPBA40/`` trees into
    ``dataset_dir/LPBA40`` (extracted in hidden staging folders, removed afterwards)."""
    archives = [dataset_dir / name for name in LPBA40_ARCHIVES]
    if urls is not None:
        archives = [download_file(urls[a.name], a, progress=progress) for a in archives]
    if not all(a.is_file() for a in archives):
        raise FileNotFoundError(_missing_message(dataset_dir))
    for archive in archives:
        stage = dataset_dir / f".{archive.name}.staging"
        extract_archive(archive, stage)
        for inner in sorted(stage.glob("*.zip")):
            extract_archive(inner, stage / inner.stem)
        trees = [p for p in sorted(stage.rglob("LPBA40")) if p.is_dir()]
        if not trees:
            raise FileNotFoundError(f"{archive} holds no LPBA40/ folder. " + _missing_message(dataset_dir))
        for child in list(trees[0].iterdir()):  # delineation_space / native_space and the licence files
            target = dataset_dir / "LPBA40" / child.name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(child, target)
        shutil.rmtree(stage)


def _process_subject(dataset_dir: Path, name: str) -> None:
    delineation = dataset_dir / "LPBA40" / "delineation_space" / name
    native = dataset_dir / "LPBA40" / "native_space" / name
    air = read_air(native / "transforms" / f"{name}.delineation.to.native.air")
    image, image_size = _load_analyze(native / f"{name}.native.brain.bfc.hdr")
    tissue, tissue_size = _load_analyze(native / "tissue" / f"{name}.native.tissue.hdr")
    image = air_resample(image.astype(np.float32), image_size, air).astype(np.float64)
    tissue = air_resample(tissue.astype(np.float32), tissue_size, air)
    white_matter = np.abs(tissue - _WHITE_MATTER) < _TOLERANCE
    if not white_matter.any():
        raise ValueError(f"{name}: no white-matter voxel (tissue label {_WHITE_MATTER}) after resampling")
    image = image / image[white_matter].mean() * (tissue > _TOLERANCE)
    label, label_size = _load_analyze(delineation / f"{name}.delineation.structure.label.hdr")
    if label.shape != image.shape:
        raise ValueError(f"{name}: label map {label.shape} and the AIR reslice grid {image.shape} differ")
    _save(image.astype(np.float32), air.reslice_voxel_size, dataset_dir / name / _IMAGE.format(name))
    _save(label.astype(np.int16), label_size, dataset_dir / name / _LABEL.format(name))


def prepare_lpba40(
    dataset_dir: str | os.PathLike,
    download: bool = False,
    urls: Mapping[str, str] = LPBA40_URLS,
    progress: bool = True,
) -> Path:
    """Create the preprocessed delineation-space NIfTI files of every subject (module docstring).

    Subjects already processed are skipped. Raw data are looked up in ``dataset_dir/LPBA40``, else
    extracted from the two LONI archives in ``dataset_dir`` (downloaded first from ``urls``, archive name ->
    URL, with ``download=True``; only after accepting LONI's agreement); without either a
    ``FileNotFoundError`` explains where to put which files.

    Returns:
        ``dataset_dir`` as a ``Path``.
    """
    dataset_dir = Path(dataset_dir)
    subjects = [s for names in LPBA40_DIVISIONS.values() for s in names]
    if all((dataset_dir / s / _IMAGE.format(s)).is_file() for s in subjects):
        return dataset_dir
    raw = dataset_dir / "LPBA40" / "delineation_space"
    if not raw.is_dir():
        _unpack(dataset_dir, urls if download else None, progress)
    if not raw.is_dir():
        raise FileNotFoundError(_missing_message(dataset_dir))
    for name in sorted(p.name for p in raw.iterdir() if p.is_dir()):
        if not (dataset_dir / name / _IMAGE.format(name)).is_file():
            _process_subject(dataset_dir, name)
    return dataset_dir


def lpba40_cases(dataset_dir: str | os.PathLike, division: str) -> list[dict[str, str]]:
    """``{"image", "label", "name"}`` of the preprocessed subjects of ``division`` ("train", "validate", "test")."""
    if division not in LPBA40_DIVISIONS:
        raise ValueError(f"division must be one of {list(LPBA40_DIVISIONS)}, got {division!r}")
    cases = [
        {"image": str(Path(dataset_dir, s, _IMAGE.format(s))), "label": str(Path(dataset_dir, s, _LABEL.format(s))), "name": s}
        for s in LPBA40_DIVISIONS[division]
    ]
    check_files([c[k] for c in cases for k in ("image", "label")], "run prepare_lpba40(dataset_dir) first")
    return cases


def lpba40_pairs(dataset_dir: str | os.PathLike, division: str, both_directions: bool = False) -> list[dict[str, str]]:
    """Evaluation pairs of ``division``: every unordered pair (moving ``i``, fixed ``j > i``), or every ordered pair."""
    return all_pairs(lpba40_cases(dataset_dir, division), both_directions)


def lpba40_transforms(
    image_keys: Sequence[str] = ("moving_image", "fixed_image"),
    label_keys: Sequence[str] = ("moving_label", "fixed_label"),
    crop: Sequence[Sequence[int]] | None = LPBA40_CROP,
) -> Compose:
    """Load and crop a pair (or case) dict: images float32 ``(1, 160, 192, 160)`` (already normalised by
    :func:`prepare_lpba40`), labels int64. Evaluate Dice on :data:`LPBA40_LABELS`."""
    return volume_transforms(image_keys, label_keys=label_keys, crop=crop)
