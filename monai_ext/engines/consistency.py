"""SITReg's LUMIR fine-tuning with the group (cycle) consistency loss (Honkamaa & Marttinen, MELBA 2024).

Processes are grouped in triplets (ranks ``3g, 3g + 1, 3g + 2``, one :func:`triplet_group` each). Every
step, the 3 ranks of a group load the **same** triplet of distinct images ``(I_1, I_2, I_3)``
(:class:`monai_ext.data.pairs.TripletDataset`, no ``DistributedSampler``), rank ``r`` of the group registers the pair
(moving ``I_{r+1}``, fixed ``I_{(r+1) mod 3 + 1}``) and minimises::

    L = pairwise(moving, fixed)                    # engine.loss_function, e.g. SymmetricRegistrationLoss
      + w_c(epoch + step / steps_per_epoch) * consistency(all 6 DDFs of the triplet)

with the network wrapped in ``DistributedDataParallel`` (:class:`~monai_ext.losses.consistency.GroupConsistencyLoss`
explains why its gradient is scaled by 3). As in :mod:`monai_ext.engines.registration`, the step is a
``SupervisedTrainer`` ``iteration_update``::

    "trainer": {"_target_": "SupervisedTrainer", "network": "@ddp_network", "loss_function": "@loss", ...,
                "iteration_update": {"_target_": "monai_ext.engines.consistency.ConsistencyTrainIteration"}}

Batches are dicts with ``image_1``, ``image_2``, ``image_3`` ``(B, C, *spatial)`` and optionally the body
masks ``mask_1``, ``mask_2``, ``mask_3`` ``(B, 1, *spatial)`` (LUMIR: intensity > 0), e.g. from
:class:`monai_ext.data.pairs.TripletDataset` with ``{"image": path, "mask": path}`` cases and a MONAI loading transform.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.distributed as dist
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from monai_ext.engines.registration import as_loss_terms, backward_and_step, forward_and_inverse, to_device
from monai_ext.losses.consistency import LUMIR_CONSISTENCY_SCHEDULE, GroupConsistencyLoss, consistency_weight

__all__ = ["triplet_group", "ConsistencyTrainIteration"]


def triplet_group() -> dist.ProcessGroup:
    """Split the world into consecutive rank triplets; return the process group of this rank's triplet.

    Collective: every rank must call it (in the same order relative to other ``new_group`` calls). Raises
    ``RuntimeError`` if ``torch.distributed`` is not initialised and ``ValueError`` unless the world size is a
    positive multiple of 3.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("triplet_group needs torch.distributed to be initialised (init_process_group)")
    world = dist.get_world_size()
    if world % 3 != 0:
        raise ValueError(f"group consistency training needs a multiple of 3 processes, got world size {world}")
    groups = [dist.new_group(ranks=[3 * g, 3 * g + 1, 3 * g + 2]) for g in range(world // 3)]
    return groups[dist.get_rank() // 3]


class ConsistencyTrainIteration:
    """``iteration_update`` for ``SupervisedTrainer``: one group-consistency fine-tuning step of this rank.

    With ``r`` the rank inside its triplet group, registers ``(moving, fixed) = (image_{r+1}, image_{(r+1)%3+1})``
    by :func:`~monai_ext.engines.registration.forward_and_inverse` on ``engine.network`` (normally
    ``DistributedDataParallel``-wrapped), evaluates ``engine.loss_function(moving, fixed, forward_ddf,
    inverse_ddf, moving_mask=..., fixed_mask=...)`` (a dict with ``"loss"`` or a scalar; SITReg's LUMIR
    fine-tune: LNCC(11) + grad + 1e-5 NDV, half per direction, via
    ``monai_ext.losses.symmetric.SymmetricRegistrationLoss``) and adds ``w_c(t) * consistency`` where
    ``t = (engine.state.epoch - 1) + step / epoch_length`` (``step`` = 1 .. ``epoch_length`` within the epoch, as
    the reference counts it) and ``w_c`` = :func:`~monai_ext.losses.consistency.consistency_weight`.
    Then backpropagates and steps ``engine.optimizer``, firing MONAI's iteration events like
    :class:`~monai_ext.engines.registration.RegistrationTrainIteration`.

    ``engine.state.output``: ``moving_image``, ``fixed_image``, ``forward_ddf`` (also ``pred``), ``inverse_ddf``,
    the detached pairwise terms, ``consistency``, ``consistency_weight`` and ``loss`` (the total).

    Args:
        schedule: consistency weight per epoch (SITReg: 31 zeros then 40).
        voxel_size: relative voxel size of the images (world frame of the consistency loss); ``None`` = isotropic.
        consistency_loss: a :class:`~monai_ext.losses.consistency.GroupConsistencyLoss`; default one on
            :func:`triplet_group`, created at the first step (a collective call on every rank).
        image_keys, mask_keys: batch keys of the triplet's images and body masks (missing masks = no mask).
    """

    def __init__(
        self,
        schedule: Sequence[float] = LUMIR_CONSISTENCY_SCHEDULE,
        voxel_size: Sequence[float] | None = None,
        consistency_loss: GroupConsistencyLoss | None = None,
        image_keys: Sequence[str] = ("image_1", "image_2", "image_3"),
        mask_keys: Sequence[str] = ("mask_1", "mask_2", "mask_3"),
    ) -> None:
        if len(image_keys) != 3 or len(mask_keys) != 3:
            raise ValueError(f"image_keys and mask_keys must hold 3 keys each, got {image_keys} and {mask_keys}")
        consistency_weight(0.0, schedule)  # validates the schedule
        self.schedule = tuple(float(w) for w in schedule)
        self.voxel_size = voxel_size
        self.consistency_loss = consistency_loss
        self.keys = tuple(image_keys) + tuple(mask_keys)

    def fractional_epoch(self, engine: Any) -> float:
        """``(epoch - 1) + step / epoch_length`` from the engine's 1-based ``epoch`` and global ``iteration``."""
        length = engine.state.epoch_length
        return engine.state.epoch - 1 + ((engine.state.iteration - 1) % length + 1) / length

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("batchdata must not be None")
        if getattr(engine, "amp", False) or getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("ConsistencyTrainIteration supports neither amp nor accumulation_steps > 1")
        tensors = to_device(engine, batchdata, self.keys)
        images, masks = tensors[:3], tensors[3:]
        if any(image is None for image in images):
            raise ValueError(f"batch must contain {self.keys[:3]}, got keys {sorted(batchdata)}")
        if self.consistency_loss is None:
            self.consistency_loss = GroupConsistencyLoss(triplet_group(), self.voxel_size)
        rank = self.consistency_loss.group_rank
        moving, fixed = images[rank], images[(rank + 1) % 3]
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        forward_ddf, inverse_ddf = forward_and_inverse(engine.network, moving, fixed)
        engine.state.output = {
            "moving_image": moving,
            "fixed_image": fixed,
            "forward_ddf": forward_ddf,
            "inverse_ddf": inverse_ddf,
            Keys.PRED: forward_ddf,
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = engine.loss_function(
            moving, fixed, forward_ddf, inverse_ddf, moving_mask=masks[rank], fixed_mask=masks[(rank + 1) % 3]
        )
        terms = as_loss_terms(terms)
        consistency = self.consistency_loss(forward_ddf, inverse_ddf, masks)
        weight = consistency_weight(self.fractional_epoch(engine), self.schedule)
        engine.state.output["consistency_weight"] = weight
        terms["consistency"] = consistency
        backward_and_step(engine, terms, loss=terms[Keys.LOSS].mean() + weight * consistency)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
