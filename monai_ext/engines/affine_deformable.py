"""Two-stage registration of raw (unaligned) pairs: a KeyMorph affine, then a deformable network on the aligned pair.

:class:`AffineDeformableIteration` is an ``iteration_update`` for MONAI's ``SupervisedEvaluator`` whose batches
hold the pair as loaded from the files (``LoadImaged`` + ``EnsureChannelFirstd``: channel-first ``MetaTensor`` s
with their file affines, any orientation, voxel size, field of view and position). Per pair:

1. **affine** (``affine_preprocessing``, e.g. 4 mm grids centred on each image's foreground, and
   ``affine_network``, a :class:`~monai_ext.networks.keymorph.KeyMorph`): the keypoints of both images give the
   closed-form affine fit ``inverse_matrix_voxel`` (fixed model voxel -> moving model voxel), which the two model
   grids' affines ``M_f``, ``M_m`` turn into the world map ``A = M_m @ inverse_matrix_voxel @ M_f^-1``: **RAS mm,
   fixed point -> moving point** (the pull-back direction of ITK / ANTs transforms).
2. **deformable** (``preprocessing``, e.g. the SITReg brain model's 2 mm grids, built with
   ``frame_keys={"moving_image": "affine_world"}`` so that the moving grid is the fixed-frame grid mapped by ``A``,
   see :class:`~monai_ext.data.model_space.ForegroundCentredGridd`, then ``iteration``, e.g.
   :class:`~monai_ext.engines.registration.RegistrationEvalIteration` on ``engine.network``): the network sees the
   moving image pre-aligned by ``A``, and its ``forward_ddf`` ``u`` (model voxels, fixed grid -> moving grid) is
   the deformable part. Because the moving model image's ``MetaTensor.affine`` is ``A @ G`` (where its voxels lie
   in the moving file's world), every native output of
   :class:`~monai_ext.io.outputs.RegistrationWriter` is the full map ``T(x) = A(x + u_w(x))`` for a fixed world
   point ``x`` (``u_w`` = ``u`` in world mm): the fixed point goes through the deformable part first, then the
   affine, and the warped image samples the original moving file through ``A``.

Checks (logged as warnings and returned per pair): ``det(A)`` outside ``determinant_range`` (extreme scaling),
a keypoint fit residual above ``max_keypoint_residual_mm`` (RMS of ``|A p_f - p_m|`` over the keypoints, mm), or
a foreground Dice below ``min_foreground_dice`` after the affine (moving foreground warped onto the fixed model
grid vs the fixed foreground, intensities above 0.1 after the foreground-percentile normalisation): images
that are not brains, or pairs that do not overlap after the alignment. A pair whose keypoints admit no affine
(e.g. all heatmaps empty or coplanar keypoints) raises :class:`AffineFitError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor, decollate_batch, list_data_collate
from torch import nn

from monai_ext.data.model_space import REFINE_SUFFIX
from monai_ext.engines.affine_refinement import refine_keymorph_result
from monai_ext.engines.registration import RegistrationEvalIteration
from monai_ext.networks.keymorph import normalized_to_voxels
from monai_ext.spatial.affine import transform_points
from monai_ext.spatial.coordinates import change_frames, invert_homogeneous
from monai_ext.spatial.sampling import warp

__all__ = ["AffineFitError", "keypoint_affine_checks", "AffineDeformableIteration"]

logger = logging.getLogger(__name__)

_FOREGROUND = 0.1  # intensity threshold of the foreground after foreground-percentile normalisation


class AffineFitError(ValueError):
    """The keypoints of a pair admit no affine fit (e.g. an image without keypoints or coplanar keypoints)."""


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def keypoint_affine_checks(
    affine_world: torch.Tensor,
    keypoints_fixed: torch.Tensor,
    keypoints_moving: torch.Tensor,
    moving_aligned: torch.Tensor,
    fixed: torch.Tensor,
    determinant_range: Sequence[float] = (0.5, 2.0),
    max_keypoint_residual_mm: float = 10.0,
    min_foreground_dice: float = 0.5,
) -> tuple[dict[str, float], list[str]]:
    """Plausibility of an affine registration from keypoints; returns ``(values, warnings)``.

    Args:
        affine_world: ``(n + 1, n + 1)`` RAS mm map, fixed point -> moving point.
        keypoints_fixed, keypoints_moving: ``(K, n)`` corresponding keypoints, world RAS mm.
        moving_aligned: ``(1, *spatial)`` moving image warped by the affine onto the fixed model grid.
        fixed: ``(1, *spatial)`` fixed model image (both normalised so that the foreground exceeds 0.1).
        determinant_range, max_keypoint_residual_mm, min_foreground_dice: warning thresholds.

    Returns:
        ``values``: ``affine_determinant`` (volume ratio moving / fixed), ``keypoint_residual_mm`` (RMS of
        ``|A p_f - p_m|``) and ``foreground_dice_affine``; ``warnings``: one sentence per failed check.
    """
    n = affine_world.shape[-1] - 1
    determinant = float(torch.linalg.det(affine_world[:n, :n].double()))
    mapped = transform_points(affine_world.double()[None], keypoints_fixed.double()[None])[0]
    residual = float((mapped - keypoints_moving.double()).square().sum(-1).mean().sqrt())
    a, b = _plain(moving_aligned) > _FOREGROUND, _plain(fixed) > _FOREGROUND
    total = int(a.sum() + b.sum())
    dice = 2 * float((a & b).sum()) / total if total else 0.0
    values = {"affine_determinant": determinant, "keypoint_residual_mm": residual, "foreground_dice_affine": dice}
    warnings = []
    low, high = determinant_range
    if not low <= determinant <= high:
        warnings.append(
            f"the affine scales volumes by {determinant:.3g} (outside [{low:g}, {high:g}]): the images differ in "
            "size, or one of them is not a brain"
        )
    if residual > max_keypoint_residual_mm:
        warnings.append(
            f"the keypoints fit the affine poorly (RMS residual {residual:.1f} mm > {max_keypoint_residual_mm:g} mm): "
            "the keypoints do not correspond, is each image a brain?"
        )
    if dice < min_foreground_dice:
        warnings.append(
            f"the images hardly overlap after the affine alignment (foreground Dice {dice:.2f} < "
            f"{min_foreground_dice:g}): check that both are skull-stripped brains with a similar field of view"
        )
    return values, warnings


class AffineDeformableIteration:
    """``iteration_update`` for ``SupervisedEvaluator``: KeyMorph affine, then a deformable registration (module
    docstring).

    ``engine.state.output`` is ``iteration``'s (``moving_image``, ``fixed_image``, ``forward_ddf``,
    ``inverse_ddf``, warped images and labels on the deformable model grids; the moving model image's affine is
    ``A @ G``) plus, per pair: ``affine_world`` ``(n + 1, n + 1)`` (RAS mm, fixed point -> moving point),
    ``keypoints_fixed`` / ``keypoints_moving`` ``(K, n)`` (world RAS mm), ``affine_determinant``,
    ``keypoint_residual_mm``, ``foreground_dice_affine`` (scalars) and ``affine_warnings`` (a string: one line
    per failed check, empty when all pass); stacked along a batch dimension when ``iteration`` returns a batch
    rather than MONAI's decollated list of pairs.

    Args:
        affine_network: a :class:`~monai_ext.networks.keymorph.KeyMorph` (run in eval mode without gradients on
            ``engine.state.device``); its weights are loaded by a handler like the deformable network's.
        affine_preprocessing: loaded pair -> the affine model's grids (``moving_key`` / ``fixed_key``), e.g.
            :func:`~monai_ext.data.model_space.model_space_transforms` with ``load=False``.
        preprocessing: loaded pair with ``affine_key`` -> the deformable model's grids, e.g.
            :func:`~monai_ext.data.model_space.model_space_transforms` with ``load=False`` and
            ``frame_keys={"moving_image": "affine_world"}``.
        iteration: the deformable ``iteration_update`` (default
            :class:`~monai_ext.engines.registration.RegistrationEvalIteration`; e.g. wrapped in
            :class:`~monai_ext.engines.instance_optimization.InstanceOptimization`).
        determinant_range, max_keypoint_residual_mm, min_foreground_dice: thresholds of
            :func:`keypoint_affine_checks`.
        moving_key, fixed_key: batch keys of the images; ``affine_key``: key of ``A`` for ``preprocessing``.
        refine_steps: mutual-information refinement of the keypoint fit, Adam steps per smoothing level
            (:func:`~monai_ext.engines.affine_refinement.refine_keymorph_result`), on the finer copies
            ``<key>_refine`` when ``affine_preprocessing`` writes them (``refine_pixdim``); ``()``: the fit alone.
    """

    def __init__(
        self,
        affine_network: nn.Module,
        affine_preprocessing: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        preprocessing: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        iteration: Callable[[Any, Mapping[str, Any]], Mapping[str, Any]] | None = None,
        determinant_range: Sequence[float] = (0.5, 2.0),
        max_keypoint_residual_mm: float = 10.0,
        min_foreground_dice: float = 0.5,
        moving_key: str = "moving_image",
        fixed_key: str = "fixed_image",
        affine_key: str = "affine_world",
        refine_steps: Sequence[int] = (),
    ) -> None:
        model = getattr(affine_network, "module", affine_network)
        if not hasattr(model, "register"):
            raise TypeError(f"affine_network must be a KeyMorph (with register), got {type(model).__name__}")
        if len(determinant_range) != 2 or not 0 < determinant_range[0] <= determinant_range[1]:
            raise ValueError(f"determinant_range must be (low, high) with 0 < low <= high, got {determinant_range}")
        self.affine_network = model
        self.affine_preprocessing = affine_preprocessing
        self.preprocessing = preprocessing
        self.iteration = RegistrationEvalIteration(moving_key, fixed_key) if iteration is None else iteration
        self.thresholds = (
            tuple(float(v) for v in determinant_range),
            float(max_keypoint_residual_mm),
            float(min_foreground_dice),
        )
        self.keys = (moving_key, fixed_key, affine_key)
        self.refine_steps = tuple(int(v) for v in refine_steps)

    def _name(self, item: Mapping[str, Any]) -> str:
        """``<moving file name> -> <fixed file name>`` (the keys for images without a file) for messages."""
        names = []
        for key in self.keys[:2]:
            image = item[key]
            file = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
            names.append(Path(str(file)).name if file else key)
        return " -> ".join(names)

    def affine(self, item: Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
        """The affine stage of one loaded (unbatched) pair: ``{affine_key: A (n + 1, n + 1) float64 RAS,
        "keypoints_fixed", "keypoints_moving": (K, n) world RAS mm, the check values, "affine_warnings"}``;
        each warning is also logged. Raises :class:`AffineFitError` when the keypoints admit no affine."""
        moving_key, fixed_key, affine_key = self.keys
        grids = self.affine_preprocessing({moving_key: item[moving_key], fixed_key: item[fixed_key]})
        moving, fixed = grids[moving_key], grids[fixed_key]
        self.affine_network.eval()
        try:
            with torch.no_grad():
                result = self.affine_network.register(
                    _plain(moving)[None].to(device), _plain(fixed)[None].to(device), "affine"
                )["affine"]
        except ValueError as err:
            raise AffineFitError(
                f"{self._name(item)}: the keypoints admit no affine alignment ({err}); is each image a brain?"
            ) from None
        if sum(self.refine_steps):
            fine = [grids.get(f"{key}{REFINE_SUFFIX}") for key in (moving_key, fixed_key)]
            fine_pair = None if any(x is None for x in fine) else tuple(x[None].to(device).float() for x in fine)
            pair = [x[None].to(device).float() for x in (moving, fixed)]
            result = refine_keymorph_result(result, *pair, self.refine_steps, refine_grids=fine_pair)
        model_fixed, model_moving = (torch.as_tensor(x.affine, dtype=torch.float64) for x in (fixed, moving))
        voxel_map = result["inverse_matrix_voxel"][0].detach().double().cpu()  # fixed model voxel -> moving model voxel
        affine_world = change_frames(voxel_map, model_fixed, model_moving)
        if not torch.isfinite(affine_world).all():
            raise AffineFitError(f"{self._name(item)}: the keypoint affine is not finite; is each image a brain?")
        keypoints = {}
        read_moving = not getattr(self.affine_network, "reference_grid", False)  # the fit's moving read convention
        for side, image, align_corners in (("fixed", fixed, True), ("moving", moving, read_moving)):
            points = result[f"points_{side}"][0].detach().double().cpu()
            voxels = normalized_to_voxels(points, image.shape[1:], align_corners)
            to_world = torch.as_tensor(image.affine, dtype=torch.float64)[None]
            keypoints[f"keypoints_{side}"] = transform_points(to_world, voxels[None])[0]
        aligned = warp(_plain(moving)[None].to(result["ddf"]), result["ddf"], padding="zeros")[0].cpu()
        values, warnings = keypoint_affine_checks(
            affine_world, keypoints["keypoints_fixed"], keypoints["keypoints_moving"], aligned, _plain(fixed),
            *self.thresholds,
        )  # fmt: skip
        for warning in warnings:
            logger.warning(f"{self._name(item)}: {warning}")
        return {affine_key: affine_world, **keypoints, **values, "affine_warnings": "\n".join(warnings)}

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("batchdata must not be None")
        items, stages = [], []
        for item in decollate_batch(batchdata, detach=True):
            stage = self.affine(item, engine.state.device)
            items.append(self.preprocessing({**item, self.keys[2]: stage[self.keys[2]]}))
            stages.append(stage)
        output = self.iteration(engine, list_data_collate(items))
        if isinstance(output, Mapping):  # a batch: strings as a list, tensors and numbers stacked
            for key, value in stages[0].items():
                values = [stage[key] for stage in stages]
                output[key] = values if isinstance(value, str) else torch.stack([torch.as_tensor(v) for v in values])
        else:  # MONAI's engines decollate the output into one dict per pair when the model step completes
            for item, stage in zip(output, stages):
                item.update(stage)
        return output
