"""Pairwise registration with MONAI's stock engines (``SupervisedTrainer`` / ``SupervisedEvaluator``).

MONAI's default iteration computes ``loss_function(network(image), label)``; a symmetric registration
loss needs both images and both DDFs. The callables below replace the iteration through the engines'
``iteration_update`` argument (rather than packing both images into MONAI's ``image`` / ``label`` keys and a
dict-valued network output), so the ``train#trainer`` and ``validate#evaluator`` ids, handlers, checkpointing
and tracking stay MONAI's::

    "trainer": {"_target_": "SupervisedTrainer", ..., "loss_function": "@loss",
                "iteration_update": {"_target_": "monai_ext.engines.registration.RegistrationTrainIteration"}}
    "evaluator": {"_target_": "SupervisedEvaluator", ...,
                  "iteration_update": {"_target_": "monai_ext.engines.registration.RegistrationEvalIteration"},
                  "key_val_metric": {"val_mean_dice": {"_target_": "monai_ext.engines.registration.RegistrationMetrics",
                                                       "output_dir": "@output_dir"}}}

Batches are dicts with ``moving_image`` / ``fixed_image`` ``(B, C, *spatial)`` (and optionally
``moving_label`` / ``fixed_label`` integer maps ``(B, 1, *spatial)``, masks, ``moving_name`` /
``fixed_name``). ``forward_ddf`` ``(B, n, *spatial)`` lives on the fixed grid and warps the moving image
onto it (``moving(x + forward_ddf(x))``); ``inverse_ddf`` lives on the moving grid and warps the fixed
image onto the moving one. DDFs are in voxel units.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.metrics import Metric
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.utils import CommonKeys as Keys

from monai_ext.metrics.deformation import (
    folding_fraction,
    inverse_consistency_error,
    non_diffeomorphic_volume,
    sdlogj,
)
from monai_ext.io.writers import umask_mode
from monai_ext.spatial.sampling import warp

__all__ = [
    "SymmetricPairNetwork",
    "forward_and_inverse",
    "to_device",
    "pair_from_batch",
    "as_loss_terms",
    "backward_and_step",
    "RegistrationTrainIteration",
    "LabelRegistrationTrainIteration",
    "RegistrationEvalIteration",
    "RegistrationMetrics",
    "pooled_onehot",
    "label_overlap",
    "pair_metrics",
]


class SymmetricPairNetwork(torch.nn.Module):
    """``forward(moving, fixed) -> (forward_ddf, inverse_ddf)`` of a network with ``forward_and_inverse``.

    ``DistributedDataParallel`` only synchronises gradients of computations that go through its own
    ``forward``; wrapping this module (not the bare network) lets multi-GPU training keep SITReg's
    single symmetric pass. The wrapped network is ``.network`` (save that one: its state-dict keys are
    the single-device ones).
    """

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        if not hasattr(network, "forward_and_inverse"):
            raise TypeError(f"{type(network).__name__} has no forward_and_inverse(moving, fixed) method")
        self.network = network

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network.forward_and_inverse(moving, fixed)


def forward_and_inverse(
    network: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(forward_ddf, inverse_ddf)`` of a pair.

    Uses ``network.forward_and_inverse(moving, fixed)`` when the network has it (SITReg: one symmetric
    pass), or ``network(moving, fixed)`` when it is a :class:`SymmetricPairNetwork` (possibly inside
    ``DistributedDataParallel``); otherwise a tensor-in/tensor-out network is run twice,
    ``network(cat(moving, fixed))`` and ``network(cat(fixed, moving))``.
    """
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} images must have the same shape")
    if isinstance(getattr(network, "module", network), SymmetricPairNetwork):
        return network(moving, fixed)
    if hasattr(network, "forward_and_inverse"):
        return network.forward_and_inverse(moving, fixed)
    return network(torch.cat([moving, fixed], dim=1)), network(torch.cat([fixed, moving], dim=1))


def to_device(engine: Any, batch: Mapping[str, Any], keys: Sequence[str | None]) -> list[torch.Tensor | None]:
    """Batch items ``keys`` on the engine's device (``None`` for a ``None`` or absent key)."""
    out = []
    for key in keys:
        if key is None or key not in batch:
            out.append(None)
            continue
        value = batch[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"batch[{key!r}] must be a tensor, got {type(value).__name__}")
        out.append(value.to(engine.state.device, non_blocking=engine.non_blocking))
    return out


def pair_from_batch(
    engine: Any, batchdata: Mapping[str, Any] | None, keys: Sequence[str | None]
) -> list[torch.Tensor | None]:
    """:func:`to_device` of ``keys`` = (moving, fixed, ...) with a clear error when the batch lacks either image."""
    if batchdata is None:
        raise ValueError("batchdata must not be None")
    tensors = to_device(engine, batchdata, keys)
    if tensors[0] is None or tensors[1] is None:
        raise ValueError(f"batch must contain {keys[0]!r} and {keys[1]!r}, got keys {sorted(batchdata)}")
    return tensors


def as_loss_terms(terms: Mapping[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
    """A loss function's result as a dict holding the total under ``"loss"`` (a bare tensor is the total)."""
    if not isinstance(terms, Mapping):
        return {Keys.LOSS: terms}
    if Keys.LOSS not in terms:
        raise ValueError(f"the loss function must return a dict with key 'loss', got keys {sorted(terms)}")
    return dict(terms)


def backward_and_step(engine: Any, terms: Mapping[str, torch.Tensor], loss: torch.Tensor | None = None) -> None:
    """Record the loss terms in ``engine.state.output``, backpropagate the total and step ``engine.optimizer``.

    Every term except ``"loss"`` is stored detached; the total (``loss``, default ``terms["loss"].mean()``)
    is stored under ``"loss"``. Fires ``LOSS_COMPLETED`` and ``BACKWARD_COMPLETED`` like MONAI's own iteration.
    """
    loss = terms[Keys.LOSS].mean() if loss is None else loss
    engine.state.output.update({k: v.detach() for k, v in terms.items() if k != Keys.LOSS})
    engine.state.output[Keys.LOSS] = loss
    engine.fire_event(IterationEvents.LOSS_COMPLETED)
    loss.backward()
    engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
    engine.optimizer.step()


class RegistrationTrainIteration:
    """``iteration_update`` for ``SupervisedTrainer``: one symmetric registration training step.

    Runs :func:`forward_and_inverse` on ``engine.network``, then
    ``engine.loss_function(moving, fixed, forward_ddf, inverse_ddf, moving_mask=..., fixed_mask=...)``, which
    must return a dict with the total ``"loss"`` (as ``monai_ext.losses.symmetric.SymmetricRegistrationLoss``)
    or a scalar tensor; backpropagates and steps ``engine.optimizer``. ``engine.inferer`` is not used.
    Fires ``FORWARD_COMPLETED``, ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED`` and ``MODEL_COMPLETED`` like
    MONAI's own iteration (decollation and postprocessing hang on the last one).

    ``engine.state.output``: ``moving_image``, ``fixed_image``, ``forward_ddf`` (also as ``pred``),
    ``inverse_ddf``, ``loss`` (the total, a scalar tensor) and every other loss term under its own key,
    detached. AMP and gradient accumulation are not supported (SITReg uses neither).

    Args:
        moving_key, fixed_key: batch keys of the images.
        moving_mask_key, fixed_mask_key: optional batch keys of masks passed to the loss.
    """

    def __init__(
        self,
        moving_key: str = "moving_image",
        fixed_key: str = "fixed_image",
        moving_mask_key: str | None = None,
        fixed_mask_key: str | None = None,
    ) -> None:
        self.keys = (moving_key, fixed_key, moving_mask_key, fixed_mask_key)

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        if getattr(engine, "amp", False) or getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("RegistrationTrainIteration supports neither amp nor accumulation_steps > 1")
        moving, fixed, moving_mask, fixed_mask = pair_from_batch(engine, batchdata, self.keys)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        forward_ddf, inverse_ddf = forward_and_inverse(engine.network, moving, fixed)
        engine.state.output = {
            self.keys[0]: moving,
            self.keys[1]: fixed,
            "forward_ddf": forward_ddf,
            "inverse_ddf": inverse_ddf,
            Keys.PRED: forward_ddf,
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = engine.loss_function(
            moving, fixed, forward_ddf, inverse_ddf, moving_mask=moving_mask, fixed_mask=fixed_mask
        )
        backward_and_step(engine, as_loss_terms(terms))
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def pooled_onehot(label: torch.Tensor, num_classes: int, shape: Sequence[int]) -> torch.Tensor:
    """One-hot of an integer label map ``(B, 1, *spatial)`` average-pooled onto the grid ``shape`` that
    ceil-halves ``spatial`` ``t`` times: ``(B, num_classes, *shape)`` float32, voxel ``j`` holding the
    fraction of input voxels ``2^t j .. 2^t (j + 1) - 1`` per class (voxels past the input's end, where the
    halving rounded up, count as none: as zero padding then average pooling, as the SITReg encoder does).

    Counted with one ``bincount`` instead of materialising the full-resolution one-hot map.
    """
    spatial = tuple(label.shape[2:])
    factor = 1
    while tuple(-(-s // factor) for s in spatial) != tuple(shape):
        factor *= 2
        if factor > 2 * max(spatial):
            raise ValueError(f"shape {tuple(shape)} is not a ceil-halving of {spatial}")
    batch, cells = label.shape[0], math.prod(shape)
    index = torch.zeros(spatial, dtype=torch.long, device=label.device)
    stride = 1
    for axis in reversed(range(len(spatial))):
        coarse = torch.arange(spatial[axis], device=label.device) // factor
        index += (coarse * stride).view(*([1] * axis), -1, *([1] * (len(spatial) - axis - 1)))
        stride *= shape[axis]
    flat = label[:, 0].long() * cells + index + (torch.arange(batch, device=label.device) * num_classes * cells).view(
        -1, *([1] * len(spatial))
    )
    counts = torch.bincount(flat.flatten(), minlength=batch * num_classes * cells)
    return counts.view(batch, num_classes, *shape).float() / factor ** len(spatial)


class LabelRegistrationTrainIteration:
    """``iteration_update`` for ``SupervisedTrainer``: a symmetric training step driven by label maps.

    As SynthMorph (Hoffmann et al., IEEE TMI 2022) the images only feed the network; the loss compares the
    warped *label maps*, which makes training independent of the images' contrast. The network's
    ``forward_and_inverse(moving, fixed, full_resolution=False)`` gives the DDFs on its transformation grid
    (:class:`monai_ext.networks.sitreg.SITReg` with ``transformation_downsampling_factor``); the one-hot label
    maps ``(B, num_classes, *spatial)`` are average-pooled to that grid (soft partial-volume labels) and
    ``engine.loss_function(moving_onehot, fixed_onehot, forward_ddf, inverse_ddf)`` is evaluated there,
    e.g. :class:`monai_ext.losses.symmetric.SymmetricRegistrationLoss` with MONAI's ``DiceLoss`` as the
    similarity (soft Dice of the linearly warped one-hot maps). Evaluating the loss on the coarse grid keeps
    the step cheap: the warp of ``num_classes`` channels costs as much as ``num_classes / 3`` compositions.

    Batches hold the images ``(B, C, *spatial)`` and integer label maps ``(B, 1, *spatial)`` with values in
    ``0..num_classes - 1``. ``engine.state.output`` is as :class:`RegistrationTrainIteration`'s (DDFs on the
    transformation grid).

    With ``saturation_weight > 0`` the mean squared pre-``tanh`` output of every deformation block
    (``network.deformation_blocks``, captured with forward hooks) is added to the loss with that weight (term
    ``saturation``). SITReg's level update composes the block output for (image 1, image 2) with the inverse
    of its output for (image 2, image 1), so any part of the output that does not change when the images are
    swapped cancels out and no loss term sees it; under Adam it drifts, pushes the bounded ``tanh`` into
    saturation and then blocks every gradient (the network collapses to the identity). The penalty keeps the
    useless symmetric part near zero while the registration (antisymmetric) part stays free to grow.

    Args:
        num_classes: number of label values including background 0.
        saturation_weight: weight of the pre-``tanh`` penalty (0: none).
        moving_key, fixed_key, moving_label_key, fixed_label_key: batch keys.
    """

    def __init__(
        self,
        num_classes: int,
        saturation_weight: float = 0.0,
        moving_key: str = "moving_image",
        fixed_key: str = "fixed_image",
        moving_label_key: str = "moving_label",
        fixed_label_key: str = "fixed_label",
    ) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 (background and one label), got {num_classes}")
        if saturation_weight < 0:
            raise ValueError(f"saturation_weight must be >= 0, got {saturation_weight}")
        self.num_classes = int(num_classes)
        self.saturation_weight = float(saturation_weight)
        self.keys = (moving_key, fixed_key, moving_label_key, fixed_label_key)

    def _check_label(self, label: torch.Tensor | None, key: str) -> torch.Tensor:
        if label is None:
            raise ValueError(f"batch must contain the label map {key!r}")
        if label.is_floating_point() or label.ndim < 4 or label.shape[1] != 1:
            raise ValueError(f"{key} must be an integer (B, 1, *spatial) label map, got {label.dtype} {tuple(label.shape)}")
        if int(label.min()) < 0 or int(label.max()) >= self.num_classes:
            raise ValueError(f"{key} values must lie in 0..{self.num_classes - 1}, got {int(label.min())}..{int(label.max())}")
        return label

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        if getattr(engine, "amp", False) or getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("LabelRegistrationTrainIteration supports neither amp nor accumulation_steps > 1")
        moving, fixed, moving_label, fixed_label = pair_from_batch(engine, batchdata, self.keys)
        moving_label = self._check_label(moving_label, self.keys[2])
        fixed_label = self._check_label(fixed_label, self.keys[3])
        network = engine.network
        if not hasattr(network, "forward_and_inverse"):
            raise TypeError(f"{type(network).__name__} has no forward_and_inverse(moving, fixed, full_resolution=...)")
        network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        pre_tanh: list[torch.Tensor] = []
        hooks = []
        if self.saturation_weight:
            if not hasattr(network, "deformation_blocks"):
                raise TypeError(f"saturation_weight needs a network with deformation_blocks (SITReg), got {type(network).__name__}")
            hooks = [
                block.register_forward_hook(lambda module, inputs, output: pre_tanh.append(output))
                for block in network.deformation_blocks.values()
            ]
        try:
            forward_ddf, inverse_ddf = network.forward_and_inverse(moving, fixed, full_resolution=False)
        finally:
            for hook in hooks:
                hook.remove()
        engine.state.output = {
            self.keys[0]: moving,
            self.keys[1]: fixed,
            "forward_ddf": forward_ddf,
            "inverse_ddf": inverse_ddf,
            Keys.PRED: forward_ddf,
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        shape = forward_ddf.shape[2:]
        terms = as_loss_terms(
            engine.loss_function(
                pooled_onehot(moving_label, self.num_classes, shape),
                pooled_onehot(fixed_label, self.num_classes, shape),
                forward_ddf,
                inverse_ddf,
            )
        )
        if pre_tanh:
            terms["saturation"] = torch.stack([value.square().mean() for value in pre_tanh]).mean()
            terms[Keys.LOSS] = terms[Keys.LOSS] + self.saturation_weight * terms["saturation"]
        backward_and_step(engine, terms)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class RegistrationEvalIteration:
    """``iteration_update`` for ``SupervisedEvaluator``: DDFs, warped images and warped label maps of a pair.

    ``engine.state.output`` holds ``moving_image``, ``fixed_image``, ``forward_ddf`` (also as ``pred``),
    ``inverse_ddf``, ``moving_image_warped`` (moving on the fixed grid, linear, border),
    ``fixed_image_warped`` (fixed on the moving grid), and when the labels are in the batch
    ``moving_label``, ``fixed_label``, ``moving_label_warped`` (by ``forward_ddf``) and
    ``fixed_label_warped`` (by ``inverse_ddf``): nearest neighbour, 0 outside the field of view (as the
    SITReg evaluator). Outputs on the fixed grid (``forward_ddf``, ``*_warped`` of the moving side) carry the
    fixed image's MetaTensor metadata (affine, file name), those on the moving grid the moving image's, so
    ``SaveImaged`` writes them with the right geometry. Non-tensor batch items (``moving_name``,
    ``fixed_name``) are copied as well, so handlers reading ``engine.state.output`` (``from_engine``,
    :class:`RegistrationMetrics`) see them.
    """

    def __init__(
        self,
        moving_key: str = "moving_image",
        fixed_key: str = "fixed_image",
        moving_label_key: str = "moving_label",
        fixed_label_key: str = "fixed_label",
    ) -> None:
        self.keys = (moving_key, fixed_key, moving_label_key, fixed_label_key)

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        moving, fixed, moving_label, fixed_label = pair_from_batch(engine, batchdata, self.keys)
        engine.network.eval()
        with torch.no_grad():
            forward_ddf, inverse_ddf = forward_and_inverse(engine.network, moving, fixed)
            forward_ddf, inverse_ddf = _on_grid(forward_ddf, fixed), _on_grid(inverse_ddf, moving)
            output = {k: v for k, v in batchdata.items() if not isinstance(v, torch.Tensor)}
            output.update(
                {
                    self.keys[0]: moving,
                    self.keys[1]: fixed,
                    "forward_ddf": forward_ddf,
                    "inverse_ddf": inverse_ddf,
                    Keys.PRED: forward_ddf,
                    f"{self.keys[0]}_warped": _on_grid(warp(moving, forward_ddf), fixed),
                    f"{self.keys[1]}_warped": _on_grid(warp(fixed, inverse_ddf), moving),
                }
            )
            if moving_label is not None and fixed_label is not None:
                label_warp = {"mode": "nearest", "padding": "zeros"}
                output.update(
                    {
                        self.keys[2]: moving_label,
                        self.keys[3]: fixed_label,
                        f"{self.keys[2]}_warped": _on_grid(warp(moving_label, forward_ddf, **label_warp), fixed),
                        f"{self.keys[3]}_warped": _on_grid(warp(fixed_label, inverse_ddf, **label_warp), moving),
                    }
                )
        engine.state.output = output
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _on_grid(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor`` carrying ``reference``'s metadata (affine, file name) when ``reference`` is a MetaTensor.

    Warping a MetaTensor keeps the *moving* image's metadata, but the result lives on the other grid.
    """
    if not isinstance(reference, MetaTensor):
        return tensor
    out = MetaTensor(tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor)
    out.copy_meta_from(reference)  # meta dict, applied operations and the is_batch flag
    return out


def _nan_mean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def label_overlap(
    warped: torch.Tensor, target: torch.Tensor, labels: Sequence[int], suffix: str = "", hd95: bool = False
) -> dict[str, float]:
    """Dice (and HD95) of two ``(1, 1, *spatial)`` integer label maps on the same grid.

    Returns ``dice<suffix>`` (mean over ``labels`` ignoring labels absent from both maps, which are NaN),
    with an empty ``suffix`` also ``dice_label_<label>`` per label, and with ``hd95`` ``hd95<suffix>``: MONAI's
    95th-percentile Hausdorff distance in **voxel units**, mean over the labels present in both maps.
    Dice is MONAI ``compute_dice`` on one-hot maps.
    """
    values = torch.tensor(list(labels), device=target.device).view(1, -1, *([1] * (target.ndim - 2)))
    pred, ref = (warped.round().long() == values), (target.round().long() == values)
    dice = compute_dice(pred.float(), ref.float(), include_background=True, ignore_empty=False)[0].cpu().double()
    in_pred, in_ref = pred.flatten(2).any(-1)[0].cpu(), ref.flatten(2).any(-1)[0].cpu()
    dice[~in_pred & ~in_ref] = math.nan
    row = {f"dice{suffix}": _nan_mean(dice)}
    if not suffix:
        row.update({f"dice_label_{label}": float(d) for label, d in zip(labels, dice)})
    if not hd95:
        return row
    distances = torch.full((len(labels),), math.nan, dtype=torch.float64)
    both = in_pred & in_ref
    if both.any():
        distances[both] = (
            compute_hausdorff_distance(
                pred[:, both].float(), ref[:, both].float(), include_background=True, percentile=95
            )[0]
            .cpu()
            .double()
        )
    row[f"hd95{suffix}"] = _nan_mean(distances)
    return row


def pair_metrics(
    item: Mapping[str, Any], labels: Sequence[int] | None = None, hd95: bool = False, index: int = 0
) -> dict[str, Any]:
    """Metrics of one pair of an evaluation output (as :class:`RegistrationEvalIteration` writes, decollated).

    ``item`` holds unbatched tensors: ``forward_ddf`` ``(n, *spatial)`` (required), optionally ``inverse_ddf``,
    ``moving_label`` / ``fixed_label`` ``(1, *spatial)`` with ``moving_label_warped`` / ``fixed_label_warped``,
    and ``moving_name`` / ``fixed_name`` (else the images' file names, else ``pair<index>``).

    Returns ``moving_name``, ``fixed_name``; with labels ``num_labels`` (how many label values the Dice
    columns average over), ``dice_before`` (moving vs fixed labels unregistered),
    ``dice``, ``dice_label_<l>``, ``dice_inverse`` (and ``hd95``, ``hd95_inverse``), see :func:`label_overlap`;
    ``folding_fraction``, ``sdlogj``, ``ndv`` (3-D, else NaN) of ``forward_ddf``, and with ``inverse_ddf``
    ``ic_mse`` / ``ic_max`` (voxels), see :mod:`monai_ext.metrics.deformation`. ``labels`` defaults to the
    non-zero values present in either map.
    """

    def batched(key: str) -> torch.Tensor | None:
        value = item.get(key)
        if not isinstance(value, torch.Tensor):
            return None
        return (value.as_tensor() if isinstance(value, MetaTensor) else value).unsqueeze(0)

    row: dict[str, Any] = {}
    for side in ("moving", "fixed"):
        name = item.get(f"{side}_name")
        if name is None and hasattr(item.get(f"{side}_image"), "meta"):
            name = item[f"{side}_image"].meta.get("filename_or_obj")
        row[f"{side}_name"] = str(name) if name is not None else f"pair{index}"
    forward_ddf, inverse_ddf = batched("forward_ddf"), batched("inverse_ddf")
    if forward_ddf is None:
        raise ValueError(f"engine output must contain 'forward_ddf', got keys {sorted(item)}")
    moving_label, fixed_label = batched("moving_label"), batched("fixed_label")
    if moving_label is not None and fixed_label is not None:
        if labels is None:
            present = torch.cat([moving_label.flatten(), fixed_label.flatten()]).round().long().unique()
            labels = [int(v) for v in present if v != 0]
        if labels:
            row["num_labels"] = len(labels)
            if moving_label.shape == fixed_label.shape:
                row["dice_before"] = label_overlap(moving_label, fixed_label, labels, "_before")["dice_before"]
            for suffix, warped, target in (
                ("", "moving_label_warped", fixed_label),
                ("_inverse", "fixed_label_warped", moving_label),
            ):
                if batched(warped) is None:
                    raise ValueError(f"engine output has label maps but no {warped!r} (use RegistrationEvalIteration)")
                row.update(label_overlap(batched(warped), target, labels, suffix, hd95))
    ddf = forward_ddf.double()
    row["folding_fraction"] = float(folding_fraction(ddf)[0])
    row["sdlogj"] = float(sdlogj(ddf)[0])
    row["ndv"] = float(non_diffeomorphic_volume(ddf)[0]) if ddf.shape[1] == 3 else math.nan
    if inverse_ddf is not None:
        consistency = inverse_consistency_error(ddf, inverse_ddf.double())
        row["ic_mse"], row["ic_max"] = float(consistency["mse"][0]), float(consistency["max"][0])
    return row


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through ``write(stream)`` into a temporary file beside ``path``, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as stream:
            write(stream)
        umask_mode(tmp)  # mkstemp makes the file private (0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class RegistrationMetrics(Metric):
    """Per-pair registration metrics, summarised per evaluation run; an ignite ``Metric`` for ``key_val_metric``.

    For every pair in ``engine.state.output`` (as produced by :class:`RegistrationEvalIteration`,
    decollated or not), the columns of :func:`pair_metrics`:

    * ``dice_before``: Dice of the unregistered ``moving_label`` vs ``fixed_label`` (mean over labels).
    * ``dice`` / ``dice_label_<label>``: Dice of ``moving_label_warped`` vs ``fixed_label`` per label (MONAI
      ``compute_dice`` on one-hot maps), NaN for a label absent from both; ``dice`` = mean over labels
      ignoring NaN. ``dice_inverse``: the same for ``fixed_label_warped`` vs ``moving_label``.
    * ``hd95`` / ``hd95_inverse`` (if ``hd95``): MONAI ``compute_hausdorff_distance(percentile=95)`` per label in
      **voxel units** (as SITReg), mean over the labels present in both maps. It needs one distance
      transform per label and direction (tens of seconds per OASIS pair on a CPU): SITReg reports it on
      the test set only, so switch it off for per-epoch validation.
    * ``folding_fraction``, ``sdlogj`` and (3-D) ``ndv`` of ``forward_ddf``; ``ic_mse`` and ``ic_max``
      (inverse consistency of ``forward_ddf`` o ``inverse_ddf``, voxels) when ``inverse_ddf`` is present;
      see :mod:`monai_ext.metrics.deformation`.

    ``compute()`` returns the mean ``dice`` over pairs (the key metric, e.g. ``"val_mean_dice"``); on
    completion the mean of every other summary column is also put in ``engine.state.metrics`` as
    ``<prefix><column>``, and, if ``output_dir`` is set, ``per_pair.csv``, ``summary.csv`` and
    ``summary.json`` (mean, std, count over pairs, NaN/inf ignored) are written there atomically
    (overwritten on every run). Single-process only (no gathering across ranks).

    Args:
        labels: label values to evaluate (background excluded); default: the non-zero values present in
            either map of each pair.
        hd95: compute the HD95 columns.
        output_dir: folder of the CSV/JSON files; ``None`` writes nothing.
        prefix: prefix of the extra ``engine.state.metrics`` keys.
        output_transform: applied to ``engine.state.output`` first.
    """

    def __init__(
        self,
        labels: Sequence[int] | None = None,
        hd95: bool = True,
        output_dir: str | os.PathLike | None = None,
        prefix: str = "val_",
        output_transform: Callable = lambda x: x,
    ) -> None:
        if labels is not None and (len(labels) == 0 or 0 in labels):
            raise ValueError(f"labels must be a non-empty sequence of non-background label values, got {labels}")
        self.labels = None if labels is None else [int(v) for v in labels]
        self.hd95 = hd95
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.prefix = prefix
        self.rows: list[dict[str, Any]] = []
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self.rows = []

    def iteration_completed(self, engine: Any) -> None:
        self.update(self._output_transform(engine.state.output))

    def update(self, output: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Add the pairs of one iteration: a list of per-pair dicts (decollated) or one batched dict."""
        if isinstance(output, Mapping):
            size = output["forward_ddf"].shape[0]
            items = [
                {k: (v[i] if isinstance(v, (torch.Tensor, list, tuple)) else v) for k, v in output.items()}
                for i in range(size)
            ]
        else:
            items = list(output)
        with warnings.catch_warnings():
            # MONAI's metric internals warn about empty channels and a deprecated argument they pass themselves
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            for item in items:
                self.rows.append(pair_metrics(item, self.labels, self.hd95, len(self.rows)))

    def summary(self) -> dict[str, dict[str, float]]:
        """``{column: {"mean", "std", "count"}}`` over pairs for every numeric column, NaN/inf ignored."""
        columns = [c for c in dict.fromkeys(k for row in self.rows for k in row) if not c.endswith("_name")]
        out = {}
        for column in columns:
            values = torch.tensor([row.get(column, math.nan) for row in self.rows], dtype=torch.float64)
            finite = values[torch.isfinite(values)]
            out[column] = {
                "mean": float(finite.mean()) if finite.numel() else math.nan,
                "std": float(finite.std(unbiased=False)) if finite.numel() else math.nan,
                "count": int(finite.numel()),
            }
        return out

    def compute(self) -> float:
        if not self.rows:
            raise ValueError("RegistrationMetrics received no pairs")
        return self.summary().get("dice", {"mean": math.nan})["mean"]

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        summary = self.summary()
        for column, stats in summary.items():
            if not column.startswith("dice_label_"):
                engine.state.metrics[f"{self.prefix}{column}"] = stats["mean"]
        if self.output_dir is not None:
            self.write(self.output_dir, summary)

    def write(self, output_dir: str | os.PathLike, summary: Mapping[str, Mapping[str, float]] | None = None) -> None:
        """Write ``per_pair.csv``, ``summary.csv`` and ``summary.json`` into ``output_dir`` (atomic renames)."""
        output_dir = Path(output_dir)
        summary = self.summary() if summary is None else summary
        fields = list(dict.fromkeys(k for row in self.rows for k in row))

        def per_pair(stream):
            writer = csv.DictWriter(stream, fieldnames=fields, restval="nan")
            writer.writeheader()
            writer.writerows(self.rows)

        def summary_csv(stream):
            writer = csv.writer(stream)
            writer.writerow(["metric", "mean", "std", "count"])
            writer.writerows([c, s["mean"], s["std"], s["count"]] for c, s in summary.items())

        _atomic_write(output_dir / "per_pair.csv", per_pair)
        _atomic_write(output_dir / "summary.csv", summary_csv)
        strict = {
            c: {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in s.items()}
            for c, s in summary.items()
        }
        payload = {"num_pairs": len(self.rows), "metrics": strict}  # non-finite -> null (strict JSON)
        _atomic_write(output_dir / "summary.json", lambda stream: json.dump(payload, stream, indent=2))
