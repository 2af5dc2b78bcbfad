"""Outputs of an affine + deformable registration
(:class:`~monai_ext.engines.affine_deformable.AffineDeformableIteration`).

The full map from a fixed physical point ``x`` to the moving physical point is ``T(x) = A(x + d(x))``: ``A`` the
affine (world, fixed point -> moving point), ``d`` the deformable displacement on the fixed grid. The engine output
carries ``A`` (``affine_world``, RAS mm) and a moving model image whose affine already includes ``A``, so the
generic outputs of :class:`~monai_ext.io.outputs.RegistrationWriter` (warped image and label map, voxel DDFs,
ITK displacement fields, Jacobian, ``qa.png``) are those of the full map ``T``, on the fixed image's native grid,
sampling the original moving file. :class:`AffineDeformableWriter` adds, in ``<output_dir>/<moving>__<fixed>/``:

========================  ==============================  ==========================================================
output name               file                            content
========================  ==============================  ==========================================================
``affine_itk``            ``affine_itk.mat``              ``A`` as an ITK affine transform file (LPS mm, fixed
                                                          point -> moving point; the format ``antsRegistration``
                                                          writes, read by ITK, ANTs and 3D Slicer)
``deformable_field_itk``  ``deformable_field_itk.nii.gz`` ``d``: ITK / ANTs displacement field on the native fixed
                                                          grid (LPS mm), fixed point -> affinely aligned point
``keypoints``             ``keypoints_fixed.csv``,        the affine stage's keypoints (world RAS mm and the file's
                          ``keypoints_moving.csv``,       voxel coordinates, as :func:`~monai_ext.io.keymorph_outputs.
                          ``keypoints_aligned.csv``       write_keypoints`); ``aligned``: the moving keypoints mapped
                                                          into the fixed image by ``A^-1``
========================  ==============================  ==========================================================

ANTs, ITK and Slicer apply the two in the ANTs order, the field first for a fixed point, then the affine::

    antsApplyTransforms -d 3 -i moving.nii.gz -r fixed.nii.gz -t deformable_field_itk.nii.gz -t affine_itk.mat \\
        -o warped.nii.gz

(in ITK: a ``CompositeTransform`` with the affine added first and the field second). ``metrics.json`` holds the
Dice over the label maps on the fixed image's **native** grid at three stages: ``dice_before`` (the files as they
lie in world space), ``dice_affine`` (after ``A``), ``dice`` and ``dice_label_<l>`` (after ``T``, the written
``warped_label``), and ``num_labels``; the deformable field's ``folding_fraction``, ``sdlogj``, ``ndv``,
``ic_mse`` / ``ic_max`` (model grid, :func:`~monai_ext.metrics.overlap.pair_metrics`); the affine stage's
``affine_determinant``, ``keypoint_residual_mm``, ``foreground_dice_affine`` and ``warnings`` (the checks of
:func:`~monai_ext.engines.affine_deformable.keypoint_affine_checks` that failed, empty when all passed).
``jacobian.nii.gz`` is the determinant of ``T``'s Jacobian (``det(A)`` times that of the deformable part).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_ext.io.itk_fields import write_displacement_field, write_itk_affine
from monai_ext.io.keymorph_outputs import write_keypoints
from monai_ext.io.outputs import OUTPUTS, RegistrationWriter, _Grid, native_overlap
from monai_ext.metrics.overlap import pair_metrics
from monai_ext.spatial.affine import transform_points
from monai_ext.spatial.coordinates import invert_homogeneous
from monai_ext.spatial.sampling import affine_to_ddf

__all__ = ["AFFINE_DEFORMABLE_OUTPUTS", "DEFAULT_OUTPUTS", "AffineDeformableWriter"]

AFFINE_DEFORMABLE_OUTPUTS = ("affine_itk", "deformable_field_itk", "keypoints")
DEFAULT_OUTPUTS = ("warped_image", "warped_label", "jacobian", "metrics", "qa", *AFFINE_DEFORMABLE_OUTPUTS)
_FILES = {"affine_itk": "affine_itk.mat", "deformable_field_itk": "deformable_field_itk.nii.gz"}
_CHECKS = ("affine_determinant", "keypoint_residual_mm", "foreground_dice_affine")


class AffineDeformableWriter(RegistrationWriter):
    """:class:`~monai_ext.io.outputs.RegistrationWriter` for affine + deformable engine outputs (module docstring).

    Engine output items hold, besides the generic keys, ``affine_key`` (``(n + 1, n + 1)`` RAS mm, fixed point
    -> moving point), ``keypoints_fixed`` / ``keypoints_moving`` (``(K, n)`` world RAS mm; for ``keypoints``), the
    check values (``affine_determinant``, ``keypoint_residual_mm``, ``foreground_dice_affine``) and
    ``affine_warnings`` (one line per failed check), as
    :class:`~monai_ext.engines.affine_deformable.AffineDeformableIteration` writes them.

    Args:
        output_dir: root folder.
        outputs: names of :data:`monai_ext.io.outputs.OUTPUTS` and :data:`AFFINE_DEFORMABLE_OUTPUTS`; default
            :data:`DEFAULT_OUTPUTS`.
        affine_key: key of ``A`` in the engine output.
        kwargs: ``labels`` (values of the Dice; default the non-zero values present in either label map), ``hd95``
            (after ``T``, native fixed voxels), the keys and ``overwrite``, as in the parent.
    """

    extra_output_names = AFFINE_DEFORMABLE_OUTPUTS

    def __init__(
        self,
        output_dir: str | os.PathLike,
        outputs: Sequence[str] = DEFAULT_OUTPUTS,
        affine_key: str = "affine_world",
        **kwargs: Any,
    ) -> None:
        super().__init__(output_dir, outputs, **kwargs)
        self.affine_key = affine_key

    def _affine(self, item: Mapping[str, Any]) -> torch.Tensor:
        affine = item.get(self.affine_key)
        if not isinstance(affine, torch.Tensor) or affine.ndim != 2 or affine.shape[0] != affine.shape[1]:
            shape = tuple(affine.shape) if isinstance(affine, torch.Tensor) else type(affine).__name__
            raise ValueError(f"engine output must hold the affine {self.affine_key!r} (n + 1, n + 1), got {shape}")
        return affine.detach().cpu().to(torch.float64)

    def pair_row(
        self,
        item: Mapping[str, Any],
        fixed: _Grid,
        moving: _Grid,
        forward: torch.Tensor,
        inverse: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Native-grid Dice before / after the affine / after the full map, the deformable field's model-space
        metrics and the affine checks (module docstring); ``forward`` / ``inverse`` as in the base class."""
        label_keys = self.keys[2:]
        deformable = pair_metrics({k: v for k, v in item.items() if k not in label_keys}, self.labels)
        row = {key: deformable.pop(key) for key in ("moving_name", "fixed_name")}
        to_moving_voxels = invert_homogeneous(moving.affine)
        affine_stage = affine_to_ddf((to_moving_voxels @ self._affine(item) @ fixed.affine)[None].float(), fixed.shape)
        stages = {"_before": None, "_affine": affine_stage, "": forward}
        row.update(native_overlap(fixed, moving, stages, self.labels, self.hd95) or {})
        row.update(deformable)
        for key in _CHECKS:
            if key in item:
                row[key] = float(item[key])
        warnings = item.get("affine_warnings")
        row["warnings"] = warnings.splitlines() if isinstance(warnings, str) else []
        return row

    def _write_outputs(
        self, item: Mapping[str, Any], folder: Path, name: str, fixed: _Grid, moving: _Grid, forward: torch.Tensor
    ) -> None:
        super()._write_outputs(item, folder, name, fixed, moving, forward)
        affine = self._affine(item)
        wanted = set(self.extra_outputs)
        if "affine_itk" in wanted:
            write_itk_affine(folder / _FILES["affine_itk"], affine)
        if "deformable_field_itk" in wanted:  # T(x) = A(x + d(x)): d points into the moving image pre-aligned by A
            prealigned = invert_homogeneous(affine) @ moving.affine
            write_displacement_field(folder / _FILES["deformable_field_itk"], forward, fixed.affine, prealigned)
        if "keypoints" in wanted:
            points = {side: item.get(f"keypoints_{side}") for side in ("fixed", "moving")}
            if any(p is None for p in points.values()):
                self.logger.info(f"{name}: no keypoints in the engine output, keypoint files skipped")
                return
            world = torch.eye(affine.shape[0], dtype=torch.float64)
            aligned = transform_points(invert_homogeneous(affine)[None], points["moving"].double()[None])[0]
            write_keypoints(folder / "keypoints_fixed.csv", points["fixed"], world, fixed.affine)
            write_keypoints(folder / "keypoints_moving.csv", points["moving"], world, moving.affine)
            write_keypoints(folder / "keypoints_aligned.csv", aligned, world, fixed.affine)
