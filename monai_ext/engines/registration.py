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
                  "key_val_metric": {"val_mean_dice": {"_target_": "monai_ext.metrics.overlap.RegistrationMetrics",
                                                       "output_dir": "@output_dir"}}}

Batches are dicts with ``moving_image`` / ``fixed_image`` ``(B, C, *spatial)`` (and optionally
``moving_label`` / ``fixed_label`` integer maps ``(B, 1, *spatial)``, masks, ``moving_name`` /
``fixed_name``). ``forward_ddf`` ``(B, n, *spatial)`` lives on the fixed grid and warps the moving image
onto it (``moving(x + forward_ddf(x))``); ``inverse_ddf`` lives on the moving grid and warps the fixed
image onto the moving one. DDFs are in voxel units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from monai_ext.errors import InputError
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
    "lower_is_better",
    "pooled_onehot",
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
    if moving.shape != fixed.shape:  # an input error: a pair of another size than the bundle's dataset
        raise InputError(
            f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} images must have the same shape: a bundle "
            "that registers in voxel space (its dataset's images share one grid) needs both images on one grid "
            "after its preprocessing; resample the moving image onto the fixed image's grid first, or use a bundle "
            "that resamples in world space (sitreg_brain, sitreg_brain_raw, the KeyMorph bundles)"
        )
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


def _forward_completed(
    engine: Any,
    keys: Sequence[str],
    moving: torch.Tensor,
    fixed: torch.Tensor,
    forward_ddf: torch.Tensor,
    inverse_ddf: torch.Tensor,
) -> None:
    """Publish a training step's forward results in ``engine.state.output`` (images under ``keys``, both DDFs,
    ``pred`` = forward DDF) and fire ``FORWARD_COMPLETED``, as MONAI's own iteration does."""
    engine.state.output = {
        keys[0]: moving,
        keys[1]: fixed,
        "forward_ddf": forward_ddf,
        "inverse_ddf": inverse_ddf,
        Keys.PRED: forward_ddf,
    }
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)


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
        ignore_masks: pass no masks to the loss, whatever the mask keys (a bundle's ``ignore_mask`` setting:
            the loss over the whole image).
    """

    def __init__(
        self,
        moving_key: str = "moving_image",
        fixed_key: str = "fixed_image",
        moving_mask_key: str | None = None,
        fixed_mask_key: str | None = None,
        ignore_masks: bool = False,
    ) -> None:
        if ignore_masks:
            moving_mask_key = fixed_mask_key = None
        self.keys = (moving_key, fixed_key, moving_mask_key, fixed_mask_key)

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        if getattr(engine, "amp", False) or getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("RegistrationTrainIteration supports neither amp nor accumulation_steps > 1")
        moving, fixed, moving_mask, fixed_mask = pair_from_batch(engine, batchdata, self.keys)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        forward_ddf, inverse_ddf = forward_and_inverse(engine.network, moving, fixed)
        _forward_completed(engine, self.keys[:2], moving, fixed, forward_ddf, inverse_ddf)
        terms = engine.loss_function(
            moving, fixed, forward_ddf, inverse_ddf, moving_mask=moving_mask, fixed_mask=fixed_mask
        )
        backward_and_step(engine, as_loss_terms(terms))
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` of a ``SupervisedEvaluator`` whose key metric is an error (e.g. landmark TRE in mm):
    ``current`` is the new best when it is lower than ``best`` or when there is no best yet (MONAI starts
    ``best`` at ``-1``; an error is never negative)."""
    return best < 0 or current < best


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
                block.register_forward_hook(lambda module, inputs, output: pre_tanh.extend(output))
                for block in network.deformation_blocks.values()
            ]
        try:
            forward_ddf, inverse_ddf = network.forward_and_inverse(moving, fixed, full_resolution=False)
        finally:
            for hook in hooks:
                hook.remove()
        _forward_completed(engine, self.keys[:2], moving, fixed, forward_ddf, inverse_ddf)
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
    :class:`monai_ext.metrics.overlap.RegistrationMetrics`) see them.
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
