"""Benchmark: affine registration of brain pairs under large rotations, ours (KeyMorph) beside ANTs, in one table.

    pip install -e ".[bench]"            # antspyx
    python scripts/benchmark_affine.py --dataset_dir /path/to/synthseg_label_maps [--cache affine.json]
    python scripts/benchmark_affine.py --dataset_dir ... --pipeline     # part 2: affine + deformable

Protocol (part 1, affine)
-------------------------
Pairs (never seen in training): the held-out label maps ``training_seg_09`` -> ``training_seg_10`` and
``10 -> 09`` (inter-subject), each in two contrasts, T1-like and random, synthesised as
:func:`monai_ext.data.synthbrain.render_pair` does (skull-stripped images from the real label maps, each on a
2 mm 88x104x88 RAS grid centred on its own brain). The moving image is rotated about a random axis through its
brain's centroid by each angle of ``--angles`` (0, 15, 30, 45, 60, 90 degrees), scaled by a random
anisotropic factor within ``1 +- --scaling`` (5 %) and translated by a random vector of up to
``--translation`` mm (10 mm; the translation is put in the moving file's affine, the rotation and scaling are
rendered into the voxels through ``render_pair(..., moving_transform=...)``, labels nearest). Axis, scaling and
translation are drawn once per (pair, contrast) from ``--seed``, and the images' intensities are the same at
every angle, so the angle columns differ by the rotation only. Each pair is written as NIfTI files in world
coordinates (``<work_dir>/pairs/<moving>__<fixed>_<contrast>_rot<angle>/``: moving and fixed image, moving and
fixed structure-index label maps, each on its own grid; the two brains start apart by the two subjects'
centroids plus the translation) and every method registers those same files in world space:

* ``identity``: no transform (world identity);
* ``ours``: ``bundles/keymorph_brain_affine`` as users run it: :func:`monai_ext.cli.register` (the
  ``python -m monai_ext register keymorph_brain_affine MOVING FIXED OUT`` command, in-process) with
  ``--weights`` (default the bundle's ``models/model.pt``), reading its ``affine/transform_itk.tfm``;
* ``ants_affine``: ``ants.registration(fixed, moving, type_of_transform="Affine")``, antspyx defaults (centre
  of mass initialisation, then one affine stage: Mattes MI, 4 resolution levels, 2100x1200x1200x10 iterations);
* ``ants_multistart``: ``ants.affine_initializer`` (ANTs' multi-start search: rotations of
  ``--multistart_search_factor`` degree steps over +- ``--multistart_arc_fraction`` x 180 degrees about two
  principal axes of the fixed image, each with a short local MI search) as ``initial_transform`` of the same
  ``ants.registration(..., type_of_transform="Affine")``. The antspyx default arc (0.1, +- 18 degrees) cannot
  reach large rotations, hence 0.5 (+- 90 degrees) in 30 degree steps here (7 x 7 starts). The search grid is
  rotations about two axes only (a 2-parameter family), so a rotation about an arbitrary axis may lie far from
  every start.

Metrics per pair, all from the estimated world map ``A`` (fixed RAS mm point -> moving RAS mm point):

* ``Dice``: the moving label map resampled (nearest, 0 outside) onto the fixed grid through ``A``, Dice per
  structure of :data:`~monai_ext.data.synthbrain.BRAIN_LABELS` present in both label maps, mean over those;
* ``centroid error`` (mm): for each of those structures, the distance between the fixed structure's centroid
  mapped by ``A`` into the moving image and the moving image's own centroid of that structure (world
  coordinates), mean over structures. The two brains are different subjects, so this is an *inter-subject
  correspondence* error: even a perfect affine leaves the subjects' anatomical differences (a few mm), it is
  not a registration error against a ground truth;
* ``s/pair``: seconds of the registration call (ours: the whole ``register`` call, i.e. config parsing, loading
  weights, reading and resampling the files, inference and writing the transform, after one untimed warm-up call
  that pays the one-off Python / ITK lazy imports; ANTs: reading the two files and the registration, including
  the multi-start search);
* ``peak RSS``: the peak resident memory of the process running the method (each method in its own process).

The table has a row per method and a column per angle with ``Dice / centroid error`` averaged over pairs and
contrasts, then seconds per pair and peak RSS. Two targets are printed beside it: ours within 0.01 Dice of
``ants_affine`` at every angle up to 30 degrees, and ours at 90 degrees no more than 0.02 Dice below ours at 0.

Part 2 (``--pipeline``): on the pairs at ``--pipeline_angles`` (0, 45 and 90 degrees), Dice after the full
registration (the moving label map warped onto the fixed grid, nearest, as the tools write it):

* ``ours_pipeline``: ``bundles/sitreg_brain_raw`` (KeyMorph affine -> SITReg brain deformable in one workflow,
  ``python -m monai_ext register brain``; ``--weights`` as its ``affine_ckpt_path``, ``--sitreg_weights`` as its
  deformable weights) when that bundle exists, else the same chain done here: ``keymorph_brain_affine``
  (``register`` as above) gives ``A``; the moving image and label map are written again with the voxel -> world
  affine ``A^-1 M`` (the same voxels, placed in the fixed image's frame: no resampling) and registered to the
  fixed image with ``bundles/sitreg_brain`` (``register``), whose ``warped_label`` (one nearest interpolation
  through the composed map) is scored (the table's note says which of the two ran);
* ``ants_syn``: ``ants.registration(type_of_transform="SyN")`` with antspyx defaults (it runs its own
  affine stages first); the moving label map warped with ``ants.apply_transforms(..., "nearestNeighbor")``;
* ``ants_affine_sitreg``: the reference chain ``ants_affine`` -> our SITReg brain model (as in ours, with ANTs'
  affine in place of KeyMorph's).

Caching: every method's per-pair rows go into ``--cache`` (JSON, keyed by method and pair; the protocol settings
and, for the methods that use our weights, the weights' SHA-256 are stored with them), so a rerun computes only
what is missing; ``--refresh METHOD ...`` recomputes methods. The rendered pair files are kept in ``--work_dir``
and reused. ``--threads`` sets torch's and ITK / ANTs' threads. Progress goes to stderr, one line per pair.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METHODS = ("identity", "ours", "ants_affine", "ants_multistart")
PIPELINE_METHODS = ("ours_pipeline", "ants_syn", "ants_affine_sitreg")
ANGLES = (0.0, 15.0, 30.0, 45.0, 60.0, 90.0)
CONTRASTS = ("t1", "random")
SHAPE, SPACING = (88, 104, 88), 2.0
NUM_STRUCTURES = 31  # len(BRAIN_LABELS): structure indices 1..31 in the label files
_OURS_WEIGHTS = {"ours", "ours_pipeline", "ants_affine_sitreg"}  # methods whose rows depend on our weights
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


# --------------------------------------------------------------------------------------------------- pure helpers
def pair_key(moving: str, fixed: str, contrast: str, angle: float) -> str:
    """Cache key and folder name of one pair: ``<moving>__<fixed>_<contrast>_rot<angle>``."""
    return f"{moving}__{fixed}_{contrast}_rot{float(angle):g}"


def moving_geometry(
    generator, angle: float, translation: float = 10.0, scaling: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """The spatial perturbation of a moving image: ``(transform, shift)``.

    ``transform`` (4x4) is ``R(axis, angle) @ diag(scales)`` for ``render_pair(..., moving_transform=...)`` (it maps
    the moving grid into the label map about the brain's centroid, so the anatomy appears rotated / scaled by its
    inverse); ``shift`` (3,) mm is added to the moving file's origin. The random axis (standard normal), the
    scales (log-uniform within ``1 +- scaling`` per axis) and the shift (uniform direction, length uniform in
    ``[0, translation]``) are drawn from ``generator`` (a ``torch.Generator``) in that order, whatever ``angle``,
    so a pair gets the same axis, scaling and shift at every angle.
    """
    import torch

    from monai_ext.data.synthbrain import rotation_about_axis

    axis = torch.randn(3, generator=generator, dtype=torch.float64).numpy()
    log_scale = math.log1p(scaling) * (2 * torch.rand(3, generator=generator, dtype=torch.float64).numpy() - 1)
    direction = torch.randn(3, generator=generator, dtype=torch.float64).numpy()
    length = translation * float(torch.rand(1, generator=generator, dtype=torch.float64))
    transform = rotation_about_axis(axis, angle) @ np.diag([*np.exp(log_scale), 1.0])
    shift = direction / max(np.linalg.norm(direction), 1e-12) * length
    return transform, shift


def rotation_angle(matrix: np.ndarray) -> float:
    """Angle (degrees) of the rotation nearest to the linear part of a 4x4 (or 3x3) matrix (polar decomposition)."""
    u, _, vt = np.linalg.svd(np.asarray(matrix, float)[:3, :3])
    rotation = u @ vt
    return math.degrees(math.acos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0)))


def lps_to_ras(matrix: np.ndarray) -> np.ndarray:
    """A 4x4 map between LPS world points (ITK / ANTs) as the same map between RAS points (and back)."""
    return _FLIP @ np.asarray(matrix, float) @ _FLIP


def resample_labels(
    moving_label: np.ndarray,
    moving_affine: np.ndarray,
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray,
    matrix: np.ndarray,
) -> np.ndarray:
    """``moving_label`` (voxel -> world ``moving_affine``) on the fixed grid (``fixed_shape``, ``fixed_affine``)
    through the world map ``matrix`` (fixed point -> moving point): nearest neighbour, 0 outside."""
    to_moving = np.linalg.inv(moving_affine) @ np.asarray(matrix, float) @ np.asarray(fixed_affine, float)
    grid = np.indices(tuple(fixed_shape), dtype=np.float64).reshape(3, -1)
    voxels = np.rint(to_moving[:3, :3] @ grid + to_moving[:3, 3:]).astype(np.int64)
    inside = np.all((voxels >= 0) & (voxels < np.array(moving_label.shape)[:, None]), axis=0)
    out = np.zeros(grid.shape[1], dtype=moving_label.dtype)
    out[inside] = moving_label[tuple(voxels[:, inside])]
    return out.reshape(tuple(fixed_shape))


def common_labels(fixed_label: np.ndarray, moving_label: np.ndarray, labels: Sequence[int]) -> list[int]:
    """The ``labels`` present in both label maps."""
    fixed, moving = set(np.unique(fixed_label).tolist()), set(np.unique(moving_label).tolist())
    return [int(v) for v in labels if v in fixed and v in moving]


def mean_dice(warped: np.ndarray, fixed: np.ndarray, labels: Sequence[int]) -> float:
    """Mean Dice over ``labels`` of two label maps on one grid (a label absent from ``warped`` scores 0);
    NaN without labels."""
    scores = []
    for value in labels:
        a, b = warped == value, fixed == value
        total = int(a.sum()) + int(b.sum())
        scores.append(2.0 * int((a & b).sum()) / total if total else float("nan"))
    return float(np.nanmean(scores)) if scores else float("nan")


def label_centroids(label: np.ndarray, affine: np.ndarray, labels: Sequence[int]) -> dict[int, np.ndarray]:
    """World centroid (mm, via the voxel -> world ``affine``) of each of ``labels`` present in ``label``."""
    out = {}
    for value in labels:
        voxels = np.argwhere(label == value)
        if len(voxels):
            out[int(value)] = (np.asarray(affine, float) @ np.append(voxels.mean(0), 1.0))[:3]
    return out


def centroid_error(
    fixed_centroids: Mapping[int, np.ndarray], moving_centroids: Mapping[int, np.ndarray], matrix: np.ndarray
) -> float:
    """Mean distance (mm) between each fixed centroid mapped by ``matrix`` (fixed world -> moving world) and the
    moving centroid of the same label, over the labels of both; NaN without common labels."""
    common = sorted(set(fixed_centroids) & set(moving_centroids))
    if not common:
        return float("nan")
    matrix = np.asarray(matrix, float)
    errors = [
        np.linalg.norm(matrix[:3, :3] @ fixed_centroids[k] + matrix[:3, 3] - moving_centroids[k]) for k in common
    ]
    return float(np.mean(errors))


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _cell(value: float, digits: int) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def aggregate(rows: Mapping[str, Mapping[str, float]], angle: float, column: str) -> float:
    """Mean of ``column`` over the rows (keys from :func:`pair_key`) at ``angle`` (all pairs and contrasts)."""
    suffix = f"_rot{float(angle):g}"
    return _mean([row.get(column, float("nan")) for key, row in rows.items() if key.endswith(suffix)])


def format_table(
    results: Mapping[str, Mapping], methods: Sequence[str], angles: Sequence[float], centroid: bool = True
) -> str:
    """Markdown table: a row per method, a column per angle (``Dice / centroid error mm``, or Dice alone), then
    seconds per pair and peak RSS (GB). ``results[method]`` holds ``rows`` (:func:`pair_key` -> metrics) and
    ``peak_rss_gb``."""
    head = [f"{a:g} deg" + (" Dice / mm" if centroid else " Dice") for a in angles]
    lines = ["| method | " + " | ".join(head) + " | s/pair | peak RSS GB |", "|---" * (len(angles) + 3) + "|"]
    for method in methods:
        entry = results.get(method, {})
        rows = entry.get("rows", {})
        cells = []
        for angle in angles:
            dice = _cell(aggregate(rows, angle, "dice"), 3)
            cells.append(f"{dice} / {_cell(aggregate(rows, angle, 'centroid_mm'), 1)}" if centroid else dice)
        seconds = _mean([r.get("seconds", float("nan")) for r in rows.values()])
        peak = entry.get("peak_rss_gb", float("nan"))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_cell(seconds, 1)} | {_cell(peak, 2)} |")
    return "\n".join(lines)


def check_targets(results: Mapping[str, Mapping], angles: Sequence[float]) -> list[str]:
    """The two targets as lines ``PASS`` / ``FAIL`` / ``n/a`` with their numbers: ours within 0.01 Dice of
    ``ants_affine`` at every angle <= 30 degrees; ours at 90 degrees at most 0.02 Dice below ours at 0."""
    ours = results.get("ours", {}).get("rows", {})
    ants = results.get("ants_affine", {}).get("rows", {})
    lines = []
    small = [a for a in angles if a <= 30]
    gaps = [(a, aggregate(ours, a, "dice") - aggregate(ants, a, "dice")) for a in small]
    gaps = [(a, g) for a, g in gaps if math.isfinite(g)]
    if gaps:
        verdict = "PASS" if all(g >= -0.01 for _, g in gaps) else "FAIL"
        detail = ", ".join(f"{a:g} deg {g:+.3f}" for a, g in gaps)
    else:
        verdict, detail = "n/a", "needs ours and ants_affine at angles <= 30"
    lines.append(f"target 1 [{verdict}]: ours - ants_affine Dice >= -0.01 up to 30 deg ({detail})")
    drop = aggregate(ours, 90, "dice") - aggregate(ours, 0, "dice")
    if math.isfinite(drop):
        verdict, detail = ("PASS" if drop >= -0.02 else "FAIL"), f"{drop:+.3f}"
    else:
        verdict, detail = "n/a", "needs ours at 0 and 90 deg"
    lines.append(f"target 2 [{verdict}]: ours Dice at 90 deg - at 0 deg >= -0.02 ({detail})")
    return lines


def check_pipeline_target(results: Mapping[str, Mapping], angles: Sequence[float]) -> str:
    """The pipeline target as a ``PASS`` / ``FAIL`` / ``n/a`` line: at every angle, ``ours_pipeline`` within 0.01 Dice
    of (or above) ``ants_affine_sitreg``, the deformable model on the same pairs pre-aligned by ANTs."""
    ours = results.get("ours_pipeline", {}).get("rows", {})
    ants = results.get("ants_affine_sitreg", {}).get("rows", {})
    gaps = [(a, aggregate(ours, a, "dice") - aggregate(ants, a, "dice")) for a in angles]
    gaps = [(a, g) for a, g in gaps if math.isfinite(g)]
    if not gaps:
        return "pipeline target [n/a]: needs ours_pipeline and ants_affine_sitreg"
    verdict = "PASS" if all(g >= -0.01 for _, g in gaps) else "FAIL"
    detail = ", ".join(f"{a:g} deg {g:+.3f}" for a, g in gaps)
    return f"pipeline target [{verdict}]: ours_pipeline - ants_affine_sitreg Dice >= -0.01 ({detail})"


def resolve_name(name: str, names: Sequence[str]) -> str:
    """A label-map stem from ``name``: exact, else the only stem ending with it (``09`` -> ``training_seg_09``)."""
    if name in names:
        return name
    matches = [n for n in names if n.endswith(name)]
    if len(matches) != 1:
        raise SystemExit(f"--pairs: {name!r} names none or several of the held-out maps {list(names)}")
    return matches[0]


# --------------------------------------------------------------------------------------------------- pair files
def _held_out(dataset_dir: str) -> list[str]:
    from monai_ext.data.synthbrain import label_map_files

    return [Path(p).name.split(".")[0] for p in label_map_files(dataset_dir, "validate")]


def _pair_list(dataset_dir: str, pairs: Sequence[str] | None, contrasts: Sequence[str], angles: Sequence[float]):
    held = _held_out(dataset_dir)
    if pairs:
        ordered = []
        for spec in pairs:
            if ":" not in spec:
                raise SystemExit(f"--pairs takes MOVING:FIXED, got {spec!r}")
            moving, fixed = (resolve_name(s, held) for s in spec.split(":", 1))
            ordered.append((moving, fixed))
    else:
        ordered = [(m, f) for m in held for f in held if m != f]
    return [(m, f, c, float(a)) for c in contrasts for m, f in ordered for a in angles]


def _files(folder: Path) -> dict[str, Path]:
    return {k: folder / f"{k}.nii.gz" for k in ("moving_image", "moving_label", "fixed_image", "fixed_label")}


def write_pair(
    folder: Path,
    moving_map,
    fixed_map,
    contrast: str,
    angle: float,
    seeds: tuple[int, int],
    translation: float,
    scaling: float,
) -> dict[str, Path]:
    """Render one pair (``render_pair`` with the :func:`moving_geometry` of ``seeds[1]``, images from ``seeds[0]``)
    and write its four NIfTI files into ``folder`` (images float32, labels uint8 structure indices); returns them."""
    import nibabel as nib
    import torch

    from monai_ext.data.synthbrain import grid_affine, render_pair

    transform, shift = moving_geometry(torch.Generator().manual_seed(seeds[1]), angle, translation, scaling)
    item = render_pair(
        moving_map, fixed_map, SHAPE, SPACING, contrast == "t1", torch.Generator().manual_seed(seeds[0]), transform
    )
    moving_affine = grid_affine(SHAPE, SPACING, moving_map.centroid)
    moving_affine[:3, 3] += shift
    fixed_affine = grid_affine(SHAPE, SPACING, fixed_map.centroid)
    files = _files(folder)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    for key, affine in (("moving", moving_affine), ("fixed", fixed_affine)):
        image = item[f"{key}_image"][0].numpy().astype(np.float32)
        label = item[f"{key}_label"][0].numpy().astype(np.uint8)
        nib.save(nib.Nifti1Image(image, affine), tmp / files[f"{key}_image"].name)
        nib.save(nib.Nifti1Image(label, affine), tmp / files[f"{key}_label"].name)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return files


def prepare_pairs(dataset_dir: str, work_dir: Path, pairs, seed: int, translation: float, scaling: float) -> None:
    """Write the files of every pair not yet in ``work_dir/pairs`` (label maps loaded once, only if needed)."""
    from monai_ext.data.synthbrain import load_brain_label_map

    held = _held_out(dataset_dir)
    root = work_dir / "pairs"
    root.mkdir(parents=True, exist_ok=True)
    maps = {}
    for moving, fixed, contrast, angle in pairs:
        folder = root / pair_key(moving, fixed, contrast, angle)
        if all(p.is_file() for p in _files(folder).values()):
            continue
        for name in (moving, fixed):
            if name not in maps:
                maps[name] = load_brain_label_map(Path(dataset_dir) / f"{name}.nii.gz")
        # image seed as monai_ext.data.synthbrain.held_out_pairs; geometry from its own generator
        base = seed + 1000 * CONTRASTS.index(contrast) + 10 * held.index(moving) + held.index(fixed)
        write_pair(folder, maps[moving], maps[fixed], contrast, angle, (base, base + 7_000_003), translation, scaling)
        print(f"wrote {folder}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- methods (child)
def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(str(path))
    return np.asarray(image.dataobj), np.asarray(image.affine, float)


def affine_metrics(files: Mapping[str, Path], matrix: np.ndarray, seconds: float) -> dict:
    """Dice and centroid error of the world map ``matrix`` (fixed RAS -> moving RAS) on a pair's files."""
    fixed_label, fixed_affine = _load(files["fixed_label"])
    moving_label, moving_affine = _load(files["moving_label"])
    labels = common_labels(fixed_label, moving_label, range(1, NUM_STRUCTURES + 1))
    warped = resample_labels(moving_label, moving_affine, fixed_label.shape, fixed_affine, matrix)
    error = centroid_error(
        label_centroids(fixed_label, fixed_affine, labels), label_centroids(moving_label, moving_affine, labels), matrix
    )
    return {
        "dice": mean_dice(warped, fixed_label, labels),
        "centroid_mm": error,
        "seconds": seconds,
        "rotation_deg": rotation_angle(matrix),
    }


def _quiet():
    """Send this process's stdout (the bundles' per-pair summary lines) to stderr."""
    return contextlib.redirect_stdout(sys.stderr)


def run_keymorph(files: Mapping[str, Path], weights: str, out: Path) -> np.ndarray:
    """``keymorph_brain_affine`` through :func:`monai_ext.cli.register`; the world map fixed RAS -> moving RAS."""
    from monai_ext.cli import register
    from monai_ext.io.itk_fields import read_itk_affine

    with _quiet():
        register(
            str(REPO / "bundles" / "keymorph_brain_affine"), str(files["moving_image"]), str(files["fixed_image"]),
            str(out), weights=weights, outputs=["transform_itk"], overwrite=True,
        )  # fmt: skip
    (tfm,) = out.glob("*/affine/transform_itk.tfm")
    return read_itk_affine(tfm).numpy()


def _ants_matrix(path: str) -> np.ndarray:
    """An ANTs affine ``.mat`` (LPS, fixed point -> moving point, with centre) as a 4x4 RAS world matrix."""
    import ants

    transform = ants.read_transform(path)
    params, centre = np.asarray(transform.parameters, float), np.asarray(transform.fixed_parameters, float)
    linear, translation = params[:9].reshape(3, 3), params[9:12]
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = translation + centre - linear @ centre
    return lps_to_ras(lps)


def run_ants_affine(files: Mapping[str, Path], multistart: bool, options: Mapping) -> tuple[np.ndarray, float]:
    """ANTs ``Affine`` (optionally initialised by ``ants.affine_initializer``): world matrix and seconds."""
    import ants

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        fixed = ants.image_read(str(files["fixed_image"]))
        moving = ants.image_read(str(files["moving_image"]))
        extra = {}
        if multistart:
            init = ants.affine_initializer(
                fixed, moving, search_factor=options["search_factor"], radian_fraction=options["arc_fraction"],
                use_principal_axis=False, local_search_iterations=10, txfn=os.path.join(tmp, "init.mat"),
            )  # fmt: skip
            extra["initial_transform"] = [init]
        prefix = os.path.join(tmp, "r_")
        result = ants.registration(fixed, moving, type_of_transform="Affine", outprefix=prefix, **extra)
        seconds = time.perf_counter() - start
        (mat,) = [t for t in result["fwdtransforms"] if t.endswith(".mat")]
        return _ants_matrix(mat), seconds


def _dice_files(warped_path, files: Mapping[str, Path]) -> float:
    fixed_label, _ = _load(files["fixed_label"])
    moving_label, _ = _load(files["moving_label"])
    warped = np.rint(np.asarray(_load(Path(warped_path))[0])).astype(np.int64)
    return mean_dice(warped, fixed_label, common_labels(fixed_label, moving_label, range(1, NUM_STRUCTURES + 1)))


def run_sitreg_after(files: Mapping[str, Path], matrix: np.ndarray, weights: str | None, out: Path) -> Path:
    """Our SITReg brain model after the affine ``matrix``: the moving files re-written in the fixed frame
    (affine ``matrix^-1 M``, same voxels), registered with ``bundles/sitreg_brain``; its ``warped_label`` path."""
    import nibabel as nib

    from monai_ext.cli import register

    staged = out / "affine_moved"
    staged.mkdir(parents=True, exist_ok=True)
    for key in ("moving_image", "moving_label"):
        data, affine = _load(files[key])
        nib.save(nib.Nifti1Image(data, np.linalg.inv(matrix) @ affine), staged / f"{key}.nii.gz")
    flags = {} if weights is None else {"weights": weights}
    with _quiet():
        register(
            str(REPO / "bundles" / "sitreg_brain"), str(staged / "moving_image.nii.gz"), str(files["fixed_image"]),
            str(out / "sitreg"), moving_label=str(staged / "moving_label.nii.gz"),
            fixed_label=str(files["fixed_label"]), outputs=["warped_label"], overwrite=True, **flags,
        )  # fmt: skip
    (warped,) = (out / "sitreg").glob("*/warped_label.nii.gz")
    return warped


def run_pipeline(method: str, files: Mapping[str, Path], args, out: Path) -> dict:
    """Part 2: one full registration; Dice of the warped moving label map and seconds."""
    start = time.perf_counter()
    note = ""
    if method == "ants_syn":
        import ants

        fixed = ants.image_read(str(files["fixed_image"]))
        moving = ants.image_read(str(files["moving_image"]))
        result = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=str(out / "syn_"))
        seconds = time.perf_counter() - start
        warped = ants.apply_transforms(
            ants.image_read(str(files["fixed_label"])), ants.image_read(str(files["moving_label"])),
            result["fwdtransforms"], interpolator="nearestNeighbor",
        )  # fmt: skip
        warped_path = out / "syn_warped_label.nii.gz"
        ants.image_write(warped, str(warped_path))
    elif method == "ours_pipeline" and (REPO / "bundles" / "sitreg_brain_raw" / "configs").is_dir():
        from monai_ext.cli import register

        note = "ours_pipeline = bundles/sitreg_brain_raw"
        flags = {} if args.sitreg_weights is None else {"weights": args.sitreg_weights}
        with _quiet():
            register(
                str(REPO / "bundles" / "sitreg_brain_raw"), str(files["moving_image"]), str(files["fixed_image"]),
                str(out / "raw"), moving_label=str(files["moving_label"]), fixed_label=str(files["fixed_label"]),
                overwrite=True, outputs=["warped_label"], affine_ckpt_path=args.weights, **flags,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        (warped_path,) = (out / "raw").glob("*/warped_label.nii.gz")
    else:
        if method == "ours_pipeline":
            note = "ours_pipeline = keymorph_brain_affine -> sitreg_brain, chained by this script"
            matrix = run_keymorph(files, args.weights, out / "keymorph")
        else:
            matrix, _ = run_ants_affine(files, False, {})
        warped_path = run_sitreg_after(files, matrix, args.sitreg_weights, out)
        seconds = time.perf_counter() - start
    return {"dice": _dice_files(warped_path, files), "seconds": seconds, "note": note}


def _import_bundle_modules(bundles: Sequence[str]) -> None:
    """Import :mod:`monai_ext.cli` and the modules the bundles' configs import (``"$import x.y"``), so that Python
    import time is not charged to the first timed pair."""
    import importlib

    importlib.import_module("monai_ext.cli")
    for bundle in bundles:
        config = REPO / "bundles" / bundle / "configs" / "inference.json"
        if config.is_file():
            for statement in json.loads(config.read_text()).get("imports", []):
                if statement.startswith("$import ") and "," not in statement and " as " not in statement:
                    importlib.import_module(statement[len("$import ") :].strip())


def _child(method: str, keys: Sequence[str], args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.work_dir) / "pairs"
    options = {"search_factor": args.multistart_search_factor, "arc_fraction": args.multistart_arc_fraction}
    if method in ("ours", "ours_pipeline", "ants_affine_sitreg") and keys:
        _import_bundle_modules(("keymorph_brain_affine", "sitreg_brain", "sitreg_brain_raw"))
        if Path(args.weights).is_file():  # an untimed warm-up call: ITK's lazy loading etc.
            with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
                run_keymorph(_files(root / keys[0]), args.weights, Path(tmp))
    rows = {}
    for key in keys:
        files = _files(root / key)
        cpu = time.process_time()
        with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
            if method == "identity":
                row = affine_metrics(files, np.eye(4), 0.0)
            elif method == "ours":
                start = time.perf_counter()
                matrix = run_keymorph(files, args.weights, Path(tmp))
                row = affine_metrics(files, matrix, time.perf_counter() - start)
            elif method in ("ants_affine", "ants_multistart"):
                matrix, seconds = run_ants_affine(files, method == "ants_multistart", options)
                row = affine_metrics(files, matrix, seconds)
            else:
                row = run_pipeline(method, files, args, Path(tmp))
        row["cpu_seconds"] = time.process_time() - cpu  # all threads of this process, metrics included
        rows[key] = row
        detail = f"dice {row['dice']:.3f}" + (f", centroid {row['centroid_mm']:.1f} mm" if "centroid_mm" in row else "")
        print(f"[{method}] {key}: {detail}, {row['seconds']:.1f} s", file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    Path(args._result).write_text(json.dumps({"rows": rows, "peak_rss_gb": peak}))


# --------------------------------------------------------------------------------------------------- driver
def _sha256(path: str) -> str | None:
    if not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run_methods(methods, keys, args, root: dict, section: str, protocol: dict) -> dict:
    """Each method's rows for ``keys`` from ``root[section]`` (the cache), computing the missing ones in a child
    process per method and saving the cache after each method."""
    cache = root.setdefault(section, {})
    weights_id = {"weights": _sha256(args.weights), "sitreg_weights": _sha256(args.sitreg_weights or str(
        REPO / "bundles" / "sitreg_brain" / "models" / "model.pt"))}  # fmt: skip
    results = {}
    for method in methods:
        stored = cache.get(method, {})
        ident = {**protocol, **(weights_id if method in _OURS_WEIGHTS else {})}
        if method == "ants_multistart":
            ident["multistart"] = [args.multistart_search_factor, args.multistart_arc_fraction]
        if stored.get("rows") and stored.get("protocol") != ident:
            print(f"cache: {section} {method} had other settings or weights: recomputing", file=sys.stderr)
        if method in args.refresh or stored.get("protocol") != ident:
            stored = {"rows": {}}
        missing = [k for k in keys if k not in stored["rows"]]
        if missing:
            with tempfile.NamedTemporaryFile(suffix=".json", dir=args.work_dir, delete=False) as f:
                result_file = f.name
            command = [sys.executable, __file__, "--_child", method, "--_keys", json.dumps(missing)]
            command += ["--_result", result_file, "--work_dir", args.work_dir, "--threads", str(args.threads)]
            command += ["--weights", args.weights, "--multistart_search_factor", str(args.multistart_search_factor)]
            command += ["--multistart_arc_fraction", str(args.multistart_arc_fraction)]
            if args.sitreg_weights:
                command += ["--sitreg_weights", args.sitreg_weights]
            env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(args.threads)}
            try:
                subprocess.run(command, stdout=sys.stderr, check=True, env=env)
                fresh = json.loads(Path(result_file).read_text())
            finally:
                Path(result_file).unlink(missing_ok=True)
            stored = {
                "protocol": ident,
                "rows": {**stored["rows"], **fresh["rows"]},
                "peak_rss_gb": max(fresh["peak_rss_gb"], stored.get("peak_rss_gb", 0.0)),
            }
        cache[method] = stored
        results[method] = {"rows": {k: stored["rows"][k] for k in keys}, "peak_rss_gb": stored.get("peak_rss_gb")}
        if args.cache:
            Path(args.cache).write_text(json.dumps(root, indent=1))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset_dir", default="/work/shared/data/synthseg_label_maps",
        help="folder of the SynthSeg label maps holding the held-out training_seg_09 / 10 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--pairs", nargs="+", default=None, metavar="MOVING:FIXED",
        help="held-out pairs, map names or their unique endings (e.g. 09:10); default: both directions",
    )  # fmt: skip
    parser.add_argument("--contrasts", nargs="+", default=list(CONTRASTS), choices=CONTRASTS)
    parser.add_argument("--angles", nargs="+", type=float, default=list(ANGLES), help="rotation angles (degrees)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="part 1 methods")
    parser.add_argument("--pipeline", action="store_true", help="also run part 2 (affine + deformable)")
    parser.add_argument("--pipeline_angles", nargs="+", type=float, default=[0.0, 45.0, 90.0], help="part 2 angles")
    parser.add_argument(
        "--pipeline_methods", nargs="+", default=list(PIPELINE_METHODS), choices=PIPELINE_METHODS, help="part 2 methods"
    )
    parser.add_argument(
        "--weights", default=str(REPO / "bundles" / "keymorph_brain_affine" / "models" / "model.pt"),
        help="keymorph_brain_affine weights (default: the bundle's models/model.pt)",
    )  # fmt: skip
    parser.add_argument("--sitreg_weights", default=None, help="sitreg_brain weights (default: the bundle's model.pt)")
    parser.add_argument("--translation", type=float, default=10.0, help="largest moving translation (mm)")
    parser.add_argument("--scaling", type=float, default=0.05, help="moving scaling bound (1 +- scaling per axis)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the pairs' images and geometry")
    parser.add_argument(
        "--multistart_search_factor", type=float, default=30.0, help="ants.affine_initializer step (degrees)"
    )
    parser.add_argument(
        "--multistart_arc_fraction", type=float, default=0.5,
        help="ants.affine_initializer arc: +- this fraction of 180 degrees (antspyx default 0.1)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch and ITK / ANTs threads")
    parser.add_argument(
        "--work_dir", default=None,
        help="folder of the rendered pair files (default: the --cache path without .json, else <tmp>/benchmark_affine)",
    )  # fmt: skip
    parser.add_argument("--cache", default=None, help="JSON file of per-pair rows reused across runs")
    parser.add_argument(
        "--refresh", nargs="*", default=[], choices=METHODS + PIPELINE_METHODS, help="methods to recompute"
    )
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_keys", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        _child(args._child, json.loads(args._keys), args)
        return
    if args.work_dir is None:
        default = Path(args.cache).with_suffix("") if args.cache else Path(tempfile.gettempdir()) / "benchmark_affine"
        args.work_dir = str(default)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    uses_keymorph = "ours" in args.methods or (args.pipeline and "ours_pipeline" in args.pipeline_methods)
    if uses_keymorph and not Path(args.weights).is_file():
        raise SystemExit(f"--weights {args.weights} not found (train keymorph_brain_affine or give --weights)")
    protocol = {"seed": args.seed, "translation": args.translation, "scaling": args.scaling, "shape": list(SHAPE),
                "spacing": SPACING}  # fmt: skip
    cache = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).is_file() else {}

    pairs = _pair_list(args.dataset_dir, args.pairs, args.contrasts, args.angles)
    all_pairs = pairs + (
        _pair_list(args.dataset_dir, args.pairs, args.contrasts, args.pipeline_angles) if args.pipeline else []
    )
    prepare_pairs(args.dataset_dir, Path(args.work_dir), all_pairs, args.seed, args.translation, args.scaling)
    keys = [pair_key(*p) for p in pairs]
    results = _run_methods(args.methods, keys, args, cache, "affine", protocol)
    n_pairs = len({(m, f) for m, f, _, _ in pairs})
    print(
        f"\nPart 1, affine: {n_pairs} held-out pair(s) x {len(args.contrasts)} contrast(s) per angle at 2 mm, moving "
        f"rotated about a random axis (+ scaling <= {args.scaling:g}, translation <= {args.translation:g} mm), "
        f"{args.threads} threads; cells: mean Dice (31 structures) / mean inter-subject centroid error (mm)"
    )
    print(format_table(results, args.methods, args.angles))
    print("\n".join(check_targets(results, args.angles)))
    if args.pipeline:
        pipeline_pairs = _pair_list(args.dataset_dir, args.pairs, args.contrasts, args.pipeline_angles)
        pipeline_keys = [pair_key(*p) for p in pipeline_pairs]
        results = _run_methods(args.pipeline_methods, pipeline_keys, args, cache, "pipeline", protocol)
        notes = {r.get("note") for e in results.values() for r in e["rows"].values()} - {"", None}
        title = "\nPart 2, affine + deformable: Dice after the full registration"
        print(title + "".join(f"; {n}" for n in sorted(notes)))
        print(format_table(results, args.pipeline_methods, args.pipeline_angles, centroid=False))
        print(check_pipeline_target(results, args.pipeline_angles))


if __name__ == "__main__":
    main()
