"""Per-pair registration outputs on the native grids, written by an ignite handler attached to an evaluator.

For each pair of ``engine.state.output`` (as :class:`monai_ext.engines.registration.RegistrationEvalIteration`
produces it, decollated or batched) :class:`RegistrationWriter` writes ``<output_dir>/<moving>__<fixed>/``:

=====================  ===================================  ===================================================
output name            file                                 content
=====================  ===================================  ===================================================
``warped_image``       ``warped_image.nii.gz``              native moving image resampled (linear) onto the
                                                            native fixed grid, fixed affine; 0 beyond half a
                                                            voxel outside the moving image (as ITK / ANTs)
``warped_label``       ``warped_label.nii.gz``              native moving label map, nearest, 0 outside, integer
``forward_ddf``        ``forward_ddf.nii.gz``               ``(X, Y, Z, n)`` voxel DDF on the native fixed grid,
                                                            native fixed voxel -> native moving voxel
``inverse_ddf``        ``inverse_ddf.nii.gz``               the same on the native moving grid, moving -> fixed
``forward_field_itk``  ``forward_field_itk.nii.gz``         ITK / ANTs displacement field (LPS mm, fixed points
                                                            -> moving points): warps the moving image onto the
                                                            fixed grid (``antsApplyTransforms -t``)
``inverse_field_itk``  ``inverse_field_itk.nii.gz``         the same from the moving grid into the fixed image
``jacobian``           ``jacobian.nii.gz``                  determinant of the world-space Jacobian of the
                                                            forward map on the native fixed grid (>1: the moving
                                                            region is larger; <=0: folding)
``metrics``            ``metrics.json``                     Dice before / after (label maps given as files: on
                                                            the native grids, see below), folding, SDlogJ, NDV,
                                                            inverse consistency (model grid)
``qa``                 ``qa.png``                           :func:`~monai_ext.io.qa.qa_figure` on the native grids
=====================  ===================================  ===================================================

Native grids: the model works on preprocessed images (reoriented, resampled, cropped). MONAI's ``LoadImage``
keeps the file's affine and shape in ``meta["original_affine"]`` and ``meta["spatial_shape"]`` while the
spatial transforms update ``MetaTensor.affine``; with both, :func:`monai_ext.io.native.ddf_model_to_native`
turns the model DDF into a DDF between the native grids, and the native moving image and label map (read
again from ``meta["filename_or_obj"]`` with :func:`monai_ext.io.native.load_image`, so intensity preprocessing
does not leak into the outputs) are warped with it in one interpolation. Outputs without file metadata (plain
tensors) are written in model space with the model affine (identity if there is none).

Dice: when both label maps come from files, ``metrics.json`` scores the files themselves, on the native grids, as a
user's own tools would score the outputs: ``dice`` (and ``dice_label_<l>``, ``hd95``) compares the written
``warped_label`` with the fixed label file, ``dice_before`` the moving label file resampled onto the fixed grid
through world coordinates (the files as they lie), ``dice_inverse`` the fixed label file warped onto the moving
grid with the inverse field against the moving label file (:func:`native_overlap`). Scoring the model-grid copies
instead would resample each label map twice by nearest neighbour: each copy then sits up to half a model voxel
away from its image, which caps the Dice of a precise registration. Without label files the model-grid
:func:`~monai_ext.metrics.overlap.pair_metrics` are written.

A pair is written into a hidden temporary folder that is renamed onto its final name only when every file is
complete: a failure or an interruption leaves nothing of that pair. An existing pair folder is refused unless
``overwrite`` is set; then the new files replace those of the same names in it, one atomic rename each, and every
other file there (the user's, or an output not written this time) is kept. Files and folders get the modes of
the process's umask. Nothing specific to one network: any registration with forward (and optionally inverse)
DDFs works.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch

from monai_ext.metrics.overlap import label_overlap, pair_metrics
from monai_ext.io.itk_fields import write_displacement_field, write_image
from monai_ext.io.native import ddf_model_to_native, load_image
from monai_ext.io.qa import qa_figure
from monai_ext.io.validation import (
    InputError,
    MissingInputError,
    OutputExistsError,
    check_existing_outputs,
    check_output_dir,
    check_pairs,
)
from monai_ext.data.atomic import atomic_output, umask_mode
from monai_ext.data.base import image_stem
from monai_ext.metrics.deformation import jacobian_determinant
from monai_ext.spatial.coordinates import invert_homogeneous
from monai_ext.spatial.sampling import affine_to_ddf, warp

__all__ = [
    "OUTPUTS",
    "RegistrationWriter",
    "check_pair_files",
    "pair_label_keys",
    "pair_folder_name",
    "pair_folder_names",
    "summary_line",
]

OUTPUTS = (
    "warped_image",
    "warped_label",
    "forward_ddf",
    "inverse_ddf",
    "forward_field_itk",
    "inverse_field_itk",
    "jacobian",
    "metrics",
    "qa",
)
_FILES = {name: f"{name}.nii.gz" for name in OUTPUTS} | {"metrics": "metrics.json", "qa": "qa.png"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def check_pair_files(
    pairs: Sequence[Mapping[str, Any]],
    required: Sequence[str] = ("moving_image", "fixed_image"),
    optional: Sequence[str] = ("moving_label", "fixed_label"),
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    spatial_dims: int = 3,
) -> list[dict[str, Any]]:
    """Check user pair dicts before any work (a bundle's ``dataset#data``), so that bad input fails up front.

    Every pair must hold the ``required`` keys and all or none of ``optional``; every named file must be a
    readable, finite, ``spatial_dims``-D image, not constant, with its label maps / masks on its grid and no image
    paired with itself (:func:`monai_ext.io.validation.check_pairs`). With ``output_dir``: that folder must be
    writable and not a file, and the pair folders the :class:`RegistrationWriter` would write there must not
    exist unless ``overwrite`` (:func:`monai_ext.io.validation.check_existing_outputs`).

    Returns the pairs as a list of dicts; raises :class:`monai_ext.io.validation.InputError` (a ``ValueError``;
    :class:`~monai_ext.io.validation.MissingInputError`, also a ``FileNotFoundError``, for a missing file) whose
    one-line message names the pair index, the key and the path.
    """
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise InputError(f"pairs must be a non-empty list of dicts, got {pairs!r}")
    for index, pair in enumerate(pairs):
        if not isinstance(pair, Mapping):
            raise InputError(f"pairs[{index}] must be a dict with keys {list(required)}, got {pair!r}")
        missing = [key for key in required if key not in pair]
        if missing:
            raise InputError(f"pairs[{index}] lacks {missing}; it has {sorted(pair)}")
        labels = [key for key in optional if key in pair]
        if labels and len(labels) != len(optional):
            raise InputError(f"pairs[{index}] must give all of {list(optional)} or none, got {labels}")
        for key in (*required, *labels):
            if not Path(pair[key]).is_file():
                raise MissingInputError(f"pairs[{index}][{key!r}]: file not found: {pair[key]}")
    if output_dir is not None:
        check_output_dir(output_dir)
        check_existing_outputs(output_dir, pair_folder_names(pairs), overwrite)
    return check_pairs(pairs, spatial_dims)


def pair_label_keys(
    pairs: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("moving_label", "fixed_label")
) -> list[str]:
    """The label-map keys to load for ``pairs``: those of ``keys`` that the first pair holds, in ``keys`` order.

    A bundle's preprocessing ``label_keys`` (``{"_target_": ..., "pairs": "@dataset#data"}``): after
    :func:`check_pair_files` every pair holds all of ``("moving_label", "fixed_label")`` or none, so this is both
    or ``[]``. Raises ``ValueError`` for no pairs.
    """
    if not pairs:
        raise ValueError("pair_label_keys needs at least one pair")
    return [key for key in keys if key in pairs[0]]


def pair_folder_names(pairs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The folder names the :class:`RegistrationWriter` gives ``pairs`` in one run (:func:`pair_folder_name`;
    a name already used gets ``_<index>``)."""
    names: list[str] = []
    for index, pair in enumerate(pairs):
        name = pair_folder_name(pair, index)
        names.append(f"{name}_{index}" if name in names else name)
    return names


def pair_folder_name(
    item: Mapping[str, Any], index: int = 0, moving_key: str = "moving_image", fixed_key: str = "fixed_image"
) -> str:
    """``<moving_name>__<fixed_name>`` from ``moving_name`` / ``fixed_name``, else from the images' file names
    (the ``MetaTensor`` s' ``filename_or_obj``, or the paths of a pair dict before loading).

    File names give their stems (``a.nii.gz`` -> ``a``), prefixed with the parent folder's name when both stems are
    equal (``OAS1_0001/aligned_norm.nii.gz`` -> ``OAS1_0001_aligned_norm``); without either ``moving<index>`` /
    ``fixed<index>``. Characters other than letters, digits and ``._-`` become ``_``.
    """
    names: list[str | None] = [item.get("moving_name"), item.get("fixed_name")]
    images = [item.get(moving_key), item.get(fixed_key)]
    files = [
        image.meta.get("filename_or_obj")
        if isinstance(image, MetaTensor)
        else (os.fspath(image) if isinstance(image, (str, os.PathLike)) else None)
        for image in images
    ]
    stems = [image_stem(str(f)) if f else None for f in files]
    for i, (side, file, stem) in enumerate(zip(("moving", "fixed"), files, stems)):
        if names[i] is None and stem is not None:
            names[i] = f"{Path(str(file)).parent.name}_{stem}" if stems[0] == stems[1] else stem
        names[i] = _UNSAFE.sub("_", str(names[i])).strip("._") if names[i] is not None else f"{side}{index}"
    return "__".join(names)


class _Grid:
    """Model and native geometry of one image of a pair (``affine``: voxel to RAS, float64)."""

    def __init__(self, image: torch.Tensor, label: torch.Tensor | None) -> None:
        meta = image.meta if isinstance(image, MetaTensor) else {}
        n = image.ndim - 1
        self.model_affine = (
            image.affine.to(torch.float64) if isinstance(image, MetaTensor) else torch.eye(n + 1, dtype=torch.float64)
        )
        self.model = image.as_tensor() if isinstance(image, MetaTensor) else image
        self.label = label.as_tensor() if isinstance(label, MetaTensor) else label
        filename = meta.get("filename_or_obj")
        self.native = bool(filename) and "original_affine" in meta and "spatial_shape" in meta
        if self.native:
            self.file = str(filename)
            self.affine = torch.as_tensor(np.asarray(meta["original_affine"]), dtype=torch.float64)
            self.shape = tuple(int(s) for s in np.asarray(meta["spatial_shape"]).reshape(-1))
            label_meta = label.meta if isinstance(label, MetaTensor) else {}
            self.label_file = label_meta.get("filename_or_obj") or None
        else:
            self.affine, self.shape = self.model_affine, tuple(image.shape[1:])

    def image(self) -> torch.Tensor:
        """``(1, *shape)`` intensity image on this grid (the file when native)."""
        return load_image(self.file, spatial_dims=len(self.shape)).as_tensor() if self.native else self.model

    def label_map(self) -> torch.Tensor | None:
        """``(1, *shape)`` integer label map on this grid, or ``None``."""
        if self.native and self.label_file:
            return load_image(self.label_file, spatial_dims=len(self.shape), label=True).as_tensor()
        return None if self.native else self.label


def _to_native(ddf: torch.Tensor, target: _Grid, source: _Grid) -> torch.Tensor:
    """Model DDF ``(n, *model)`` on ``target``'s model grid into ``source``'s -> ``(1, n, *target.shape)`` float32
    voxel DDF from ``target``'s native voxels into ``source``'s native voxels."""
    ddf = (ddf.as_tensor() if isinstance(ddf, MetaTensor) else ddf)[None].to(torch.float32)
    return ddf_model_to_native(ddf, target.model_affine, source.model_affine, target.affine, target.shape, source.affine)


def native_overlap(
    fixed: _Grid,
    moving: _Grid,
    stages: Mapping[str, torch.Tensor],
    labels: Sequence[int] | None = None,
    hd95: bool = False,
    inverse: torch.Tensor | None = None,
) -> dict[str, Any] | None:
    """Dice of the label maps on their own grids (the files' native grids; the model grid for tensors without a
    file), or ``None`` unless both grids have a label map (module docstring).

    ``stages``: ``{suffix: (1, n, *fixed.shape) native voxel DDF}`` (fixed native voxel -> moving native voxel); the
    suffix ``"_before"`` may map to ``None``: the files as they lie in world space. ``inverse``: the native DDF
    ``(1, n, *moving.shape)`` for ``dice_inverse``. HD95 (voxels of the fixed grid) for the stage ``""`` only.
    Returns ``num_labels`` and :func:`~monai_ext.metrics.overlap.label_overlap`'s columns per stage.
    """
    fixed_label, moving_label = fixed.label_map(), moving.label_map()
    if fixed_label is None or moving_label is None:
        return None
    if labels is None:
        present = torch.cat([fixed_label.unique(), moving_label.unique()]).unique()
        labels = [int(v) for v in present if v != 0]
    if not labels:
        return None
    row: dict[str, Any] = {"num_labels": len(labels)}
    as_lying = invert_homogeneous(moving.affine) @ fixed.affine
    for suffix, ddf in stages.items():
        ddf = affine_to_ddf(as_lying[None].float(), fixed.shape) if ddf is None else ddf
        warped = warp(moving_label[None], ddf, "nearest", "zeros")
        row.update(label_overlap(warped, fixed_label[None], labels, suffix, hd95 and not suffix))
    if inverse is not None:
        warped = warp(fixed_label[None], inverse, "nearest", "zeros")
        row.update(label_overlap(warped, moving_label[None], labels, "_inverse", hd95))
    return row


def _world_jacobian(ddf: torch.Tensor, fixed_affine: torch.Tensor, moving_affine: torch.Tensor) -> torch.Tensor:
    """``(*spatial)`` Jacobian determinant of the world map of a voxel DDF ``(1, n, *spatial)`` between two grids.

    Central differences give the voxel map's determinant on the interior; times ``det(A_m) / det(A_f)`` (the
    affines' linear parts) it is the mm^3 / mm^3 volume change. The one-voxel border repeats its neighbours.
    """
    n = ddf.shape[1]
    ratio = torch.linalg.det(moving_affine[:n, :n]) / torch.linalg.det(fixed_affine[:n, :n])
    det = jacobian_determinant(ddf.double())[0, 0] * ratio
    return torch.nn.functional.pad(det[None, None], (1, 1) * n, mode="replicate")[0, 0]


def _write_ddf_nifti(path: Path, ddf: torch.Tensor, affine: torch.Tensor) -> None:
    """A voxel DDF ``(1, n, *spatial)`` as a float32 NIfTI ``(*spatial, n)`` (components = array axes, voxels)."""
    array = ddf[0].detach().cpu().movedim(0, -1).to(torch.float32).numpy()
    with atomic_output(path) as tmp:
        nib.save(nib.Nifti1Image(array, affine.numpy()), str(tmp))


def _strict(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _number(value: Any, scale: float = 1.0) -> str:
    return "nan" if value is None else f"{scale * float(value):.3f}"


def summary_line(row: Mapping[str, Any], name: str) -> str:
    """One line for a pair's :func:`~monai_ext.metrics.overlap.pair_metrics` row (``None`` = not finite),
    e.g. ``moving__fixed: Dice 0.716 -> 0.841, folding 0.000% of voxels`` (with ``dice_affine``, the Dice after
    an affine stage: ``Dice 0.052 -> 0.716 (affine) -> 0.841``)."""
    parts = [name + ":"]
    if "dice" in row:
        before = f"{_number(row['dice_before'])} -> " if "dice_before" in row else ""
        before += f"{_number(row['dice_affine'])} (affine) -> " if "dice_affine" in row else ""
        parts.append(f"Dice {before}{_number(row['dice'])},")
    parts.append(f"folding {_number(row['folding_fraction'], 100)}% of voxels")
    return " ".join(parts)


def _merge_into(source: Path, target: Path) -> None:
    """Move every file of the folder tree ``source`` onto the same relative path under ``target`` (one atomic
    ``os.replace`` each, replacing a file of that name); other files of ``target`` are left alone."""
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            if destination.exists() and not destination.is_dir():
                raise OutputExistsError(f"output {destination} exists and is not a folder: move it away")
            if not destination.exists():
                destination.mkdir()
                umask_mode(destination)
        elif destination.is_dir():
            raise OutputExistsError(f"output {destination} exists and is a folder: move it away")
        else:
            os.replace(path, destination)


class RegistrationWriter:
    """Ignite handler writing the selected per-pair outputs (module docstring) after every evaluator iteration.

    Args:
        output_dir: root folder; created when the first pair is written.
        outputs: names from :data:`OUTPUTS` (default: all). Outputs whose inputs are absent (labels,
            ``inverse_ddf``) are skipped for that pair with a log message.
        labels: label values for the metrics (default: those present), see
            :func:`~monai_ext.metrics.overlap.pair_metrics`.
        hd95: add HD95 (voxels) to ``metrics.json``.
        moving_key, fixed_key, moving_label_key, fixed_label_key: keys of the engine output.
        overwrite: write into a pair folder that exists already, replacing only the files of the same names
            (other files are kept); without it such a folder raises
            :class:`~monai_ext.io.validation.OutputExistsError` before the pair is written.

    A subclass that writes more files lists their names in :attr:`extra_output_names`: ``outputs`` may then name
    them too, and ``self.extra_outputs`` holds the selected ones (``self.outputs`` the generic ones, possibly none).
    """

    #: output names a subclass adds to :data:`OUTPUTS` (written by its own ``_write``)
    extra_output_names: tuple[str, ...] = ()

    def __init__(
        self,
        output_dir: str | os.PathLike,
        outputs: Sequence[str] = OUTPUTS,
        labels: Sequence[int] | None = None,
        hd95: bool = False,
        moving_key: str = "moving_image",
        fixed_key: str = "fixed_image",
        moving_label_key: str = "moving_label",
        fixed_label_key: str = "fixed_label",
        overwrite: bool = False,
    ) -> None:
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        valid = [*OUTPUTS, *self.extra_output_names]
        unknown = sorted(set(outputs) - set(valid))
        if unknown or not outputs:
            raise ValueError(f"outputs must be a non-empty subset of {valid}, got unknown {unknown}")
        self.output_dir = Path(output_dir)
        self.outputs = [name for name in OUTPUTS if name in outputs]
        self.extra_outputs = [name for name in self.extra_output_names if name in outputs]
        self.labels = labels
        self.hd95 = hd95
        self.keys = (moving_key, fixed_key, moving_label_key, fixed_label_key)
        self.overwrite = bool(overwrite)
        self.logger = logging.getLogger(__name__)
        self.written: list[Path] = []  # folders written in the current run

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the pairs written (at every run start: names repeated within one run get ``_<index>``)."""
        self.written = []

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        items = decollate_batch(output, detach=True) if isinstance(output, Mapping) else list(output)
        for item in items:
            self.write_pair(item, len(self.written))

    def write_pair(self, item: Mapping[str, Any], index: int = 0) -> Path:
        """Write one decollated pair; returns its folder."""
        moving_key, fixed_key, moving_label_key, fixed_label_key = self.keys
        if not isinstance(item.get("forward_ddf"), torch.Tensor) or fixed_key not in item or moving_key not in item:
            raise ValueError(
                f"engine output must hold {moving_key!r}, {fixed_key!r} and 'forward_ddf', got {sorted(item)}"
            )
        folder = self.output_dir / pair_folder_name(item, index, moving_key, fixed_key)
        if folder in self.written:  # the same names twice in one run: keep both
            folder = folder.with_name(f"{folder.name}_{index}")
        check_existing_outputs(self.output_dir, [folder.name], self.overwrite)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=self.output_dir))
        try:
            umask_mode(staging)  # mkdtemp makes it private (0o700); the result is an ordinary folder
            self._write(item, staging, folder.name)
            files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
            if folder.exists():
                _merge_into(staging, folder)
                shutil.rmtree(staging)
            else:
                os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.written.append(folder)
        self.logger.info(f"wrote {', '.join(files)} to {folder}")
        return folder

    def _write(self, item: Mapping[str, Any], folder: Path, name: str) -> None:
        moving_key, fixed_key, moving_label_key, fixed_label_key = self.keys
        fixed = _Grid(item[fixed_key], item.get(fixed_label_key))
        moving = _Grid(item[moving_key], item.get(moving_label_key))
        self._write_outputs(item, folder, name, fixed, moving, _to_native(item["forward_ddf"], fixed, moving))

    def pair_row(
        self,
        item: Mapping[str, Any],
        fixed: _Grid,
        moving: _Grid,
        forward: torch.Tensor,
        inverse: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The ``metrics.json`` row of a pair: the deformation metrics of
        :func:`~monai_ext.metrics.overlap.pair_metrics` (model space) and the Dice of the native label files
        (:func:`native_overlap`; the model-space Dice when there are none). ``forward``: the native voxel DDF
        ``(1, n, *fixed.shape)`` (fixed native voxel -> moving native voxel); ``inverse``: ``(1, n, *moving.shape)``
        (moving native voxel -> fixed native voxel) or ``None``. Subclasses add columns that need them."""
        overlap = native_overlap(fixed, moving, {"_before": None, "": forward}, self.labels, self.hd95, inverse)
        if overlap is None:
            return pair_metrics(item, self.labels, self.hd95)
        deformation = pair_metrics({k: v for k, v in item.items() if k not in self.keys[2:]}, self.labels)
        names = {key: deformation.pop(key) for key in ("moving_name", "fixed_name")}
        return {**names, **overlap, **deformation}

    def _write_outputs(
        self, item: Mapping[str, Any], folder: Path, name: str, fixed: _Grid, moving: _Grid, forward: torch.Tensor
    ) -> None:
        """Write the selected outputs of one pair into ``folder``; ``forward`` as in :meth:`pair_row`."""
        model_inverse = item.get("inverse_ddf")
        wanted = set(self.outputs)
        shape = "x".join(str(s) for s in forward.shape[2:])
        self.logger.info(f"{name}: writing {', '.join(sorted(wanted))} on the native grids (fixed {shape})")
        inverse = None
        if isinstance(model_inverse, torch.Tensor) and wanted & {"inverse_ddf", "inverse_field_itk", "metrics"}:
            inverse = _to_native(model_inverse, moving, fixed)
        path = {key: folder / _FILES[key] for key in OUTPUTS}
        warped_image = None
        if wanted & {"warped_image", "qa"}:
            warped_image = warp(moving.image()[None].to(forward.dtype), forward, padding="itk")[0]
        if "warped_image" in wanted:
            write_image(path["warped_image"], warped_image, fixed.affine)
        if "warped_label" in wanted:
            label = moving.label_map()
            if label is None:
                self.logger.info(f"{name}: no moving label map, warped_label skipped")
            else:
                write_image(path["warped_label"], warp(label[None], forward, "nearest", "zeros")[0], fixed.affine)
        if "forward_ddf" in wanted:
            _write_ddf_nifti(path["forward_ddf"], forward, fixed.affine)
        if "forward_field_itk" in wanted:
            write_displacement_field(path["forward_field_itk"], forward, fixed.affine, moving.affine)
        if wanted & {"inverse_ddf", "inverse_field_itk"}:
            if inverse is None:
                self.logger.info(f"{name}: no inverse_ddf in the engine output, inverse outputs skipped")
            else:
                if "inverse_ddf" in wanted:
                    _write_ddf_nifti(path["inverse_ddf"], inverse, moving.affine)
                if "inverse_field_itk" in wanted:
                    write_displacement_field(path["inverse_field_itk"], inverse, moving.affine, fixed.affine)
        jacobian = None
        if wanted & {"jacobian", "qa"}:
            jacobian = _world_jacobian(forward, fixed.affine, moving.affine)
        if "jacobian" in wanted:
            write_image(path["jacobian"], jacobian.to(torch.float32), fixed.affine)
        if "metrics" in wanted:
            row = self.pair_row(item, fixed, moving, forward, inverse)
            payload = {key: _strict(value) for key, value in row.items()}
            with atomic_output(path["metrics"]) as tmp:
                tmp.write_text(json.dumps(payload, indent=2))
            self.logger.info(summary_line(payload, name))
        if "qa" in wanted:
            qa_figure(fixed.image(), moving.image(), warped_image, forward, path["qa"], jacobian=jacobian, title=name)
