"""SITReg's LUMIR fine-tuning with the group (cycle) consistency loss (spec 3.5, 4).

Processes are grouped in triplets (ranks ``3g, 3g + 1, 3g + 2``, one :func:`triplet_group` each). Every
step, the 3 ranks of a group load the **same** triplet of distinct images ``(I_1, I_2, I_3)``
(:class:`TripletDataset`, no ``DistributedSampler``), rank ``r`` of the group registers the pair
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
:class:`TripletDataset` with ``{"image": path, "mask": path}`` cases and a MONAI loading transform.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from monai.engines.utils import IterationEvents
from monai.transforms import apply_transform
from monai.utils import CommonKeys as Keys
from torch.utils.data import Dataset

from monai_ext.engines.registration import to_device, forward_and_inverse
from monai_ext.losses.consistency import LUMIR_CONSISTENCY_SCHEDULE, GroupConsistencyLoss, consistency_weight

__all__ = ["triplet_group", "TripletDataset", "ConsistencyTrainIteration"]


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


class TripletDataset(Dataset):
    """Map-style dataset of ``steps_per_epoch`` triplets of distinct cases, drawn uniformly with replacement.

    Each epoch draws ``steps_per_epoch * num_groups`` indices uniformly from the ``n (n - 1) (n - 2)`` ordered
    triplets (SITReg's ``VolumetricRegistrationTrainingDatasetWithReplacement``, ``randint`` over
    ``perm(n, 3)``) with a ``torch.Generator`` seeded by ``seed + epoch``, so every process computes the same
    draws; triplet group ``g`` takes draws ``g, g + num_groups, ...``. Item ``i`` is
    ``{f"{key}_{j}": data[case_j][key]}`` for ``j`` = 1, 2, 3 and every key (then ``transform``).

    Args:
        data: the cases, dicts such as ``{"image": path, "mask": path}``; at least 3.
        steps_per_epoch: items per epoch (per triplet group).
        transform: callable (e.g. a MONAI ``Compose``) applied to each item (loads the images).
        seed: seed of the draws.
        num_groups, group_index: number of triplet groups (world size / 3) and this process's group
            (rank // 3).

    Call :meth:`set_epoch` before each epoch (``monai_ext.data.pairs.PairEpochHandler`` does it).
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        steps_per_epoch: int,
        transform: Callable | None = None,
        seed: int = 123456789,
        num_groups: int = 1,
        group_index: int = 0,
    ) -> None:
        self.data = list(data)
        if len(self.data) < 3:
            raise ValueError(f"data must hold at least 3 cases, got {len(self.data)}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        if num_groups < 1 or not 0 <= group_index < num_groups:
            raise ValueError(f"group_index must be in [0, num_groups), got {group_index} and {num_groups}")
        self.steps_per_epoch = int(steps_per_epoch)
        self.transform = transform
        self.seed = int(seed)
        self.num_groups = int(num_groups)
        self.group_index = int(group_index)
        self.epoch = 0
        self._draws: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the triplets of ``epoch`` (0-based)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self._draws = int(epoch), None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def triplet_indices(self, index: int) -> tuple[int, int, int]:
        """Case indices ``(i_1, i_2, i_3)``, pairwise distinct, of item ``index`` in the current epoch."""
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"index {index} out of range for {self.steps_per_epoch} steps per epoch")
        n = len(self.data)
        if self._draws is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            size = (self.steps_per_epoch * self.num_groups,)
            self._draws = torch.randint(math.perm(n, 3), size, generator=generator)
        first, rest = divmod(int(self._draws[index * self.num_groups + self.group_index]), (n - 1) * (n - 2))
        second, third = divmod(rest, n - 2)  # ranks among the cases left after removing the earlier ones
        second += second >= first
        for taken in sorted((first, second)):
            third += third >= taken
        return first, second, third

    def __getitem__(self, index: int) -> Any:
        cases = enumerate(self.triplet_indices(index), 1)
        item = {f"{key}_{j}": value for j, case in cases for key, value in self.data[case].items()}
        return apply_transform(self.transform, item) if self.transform is not None else item


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
        if not isinstance(terms, Mapping):
            terms = {Keys.LOSS: terms}
        if Keys.LOSS not in terms:
            raise ValueError(f"the loss function must return a dict with key 'loss', got keys {sorted(terms)}")
        consistency = self.consistency_loss(forward_ddf, inverse_ddf, masks)
        weight = consistency_weight(self.fractional_epoch(engine), self.schedule)
        loss = terms[Keys.LOSS].mean() + weight * consistency
        engine.state.output.update({k: v.detach() for k, v in terms.items() if k != Keys.LOSS})
        engine.state.output.update({"consistency": consistency.detach(), "consistency_weight": weight, Keys.LOSS: loss})
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
