"""Pair sampling for pairwise registration training.

Inter-subject (``pairing="inter"``): all ``n (n - 1)`` ordered pairs ``(i, j), i != j`` of ``n`` cases
are visited in random permutations drawn one after another from a ``torch.Generator`` seeded with
``seed``; an epoch takes the next ``pairs_per_epoch`` pairs of that endless stream, so consecutive
epochs continue through the current permutation before a new one starts (SITReg's
``VolumetricRegistrationTrainingDataset``).

Intra-case (``pairing="intra"``, lung datasets): each case holds two images of one subject (e.g.
inhale / exhale); its pair is (image 0 = moving, image 1 = fixed), visited in the fixed case order.

Triplets (:class:`TripletDataset`, SITReg's group-consistency fine-tuning): triplets of distinct cases
drawn uniformly with replacement, the same on every process of a triplet group.

The epoch must be known when the items are loaded: call :meth:`RegistrationPairDataset.set_epoch` or
attach :class:`PairEpochHandler` to the trainer (it uses ``engine.state.epoch``, so a resumed run
continues with the right pairs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import apply_transform
from torch.utils.data import Dataset

__all__ = ["RegistrationPairDataset", "TripletDataset", "PairEpochHandler"]


class RegistrationPairDataset(Dataset):
    """Map-style dataset of ``pairs_per_epoch`` (moving, fixed) pair dicts for the current epoch.

    Args:
        data: the cases. ``pairing="inter"``: dicts such as ``{"image": path, "label": path, "name": str}``;
            item ``(i, j)`` is ``{"moving_<key>": data[i][key], "fixed_<key>": data[j][key]}`` for every key.
            ``pairing="intra"``: dicts whose values are two-element sequences (image 0, image 1), e.g.
            ``{"image": [inhale, exhale], "mask": [...]}``; scalar values (a case name) go to both sides.
        transform: callable (e.g. a MONAI ``Compose``) applied to every pair dict (loads both images).
        pairs_per_epoch: items per epoch; default one full cycle (``n (n - 1)`` or ``n`` cases).
        seed: seed of the permutation stream (SITReg uses 123456789).
        pairing: ``"inter"`` or ``"intra"``.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable | None = None,
        pairs_per_epoch: int | None = None,
        seed: int = 123456789,
        pairing: str = "inter",
    ) -> None:
        if pairing not in ("inter", "intra"):
            raise ValueError(f"pairing must be 'inter' or 'intra', got {pairing!r}")
        self.data = list(data)
        n = len(self.data)
        if pairing == "inter" and n < 2:
            raise ValueError(f"data must hold at least 2 cases for inter-subject pairs, got {n}")
        if pairing == "intra":
            if n < 1:
                raise ValueError("data must hold at least 1 case")
            for case in self.data:
                self._intra_pair(case)  # validates every case up front
        self.pairing = pairing
        self.num_pairs = n * (n - 1) if pairing == "inter" else n
        self.pairs_per_epoch = self.num_pairs if pairs_per_epoch is None else int(pairs_per_epoch)
        if self.pairs_per_epoch < 1:
            raise ValueError(f"pairs_per_epoch must be positive, got {pairs_per_epoch}")
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self._generator = torch.Generator().manual_seed(self.seed)
        self._permutations: list[torch.Tensor] = []

    def set_epoch(self, epoch: int) -> None:
        """Select the pairs of ``epoch`` (0-based)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.pairs_per_epoch

    def pair_indices(self, index: int) -> tuple[int, int]:
        """Case indices ``(moving, fixed)`` of item ``index`` in the current epoch (``moving == fixed`` for intra)."""
        if not 0 <= index < self.pairs_per_epoch:
            raise IndexError(f"index {index} out of range for {self.pairs_per_epoch} pairs per epoch")
        position = self.epoch * self.pairs_per_epoch + index
        if self.pairing == "intra":
            case = position % self.num_pairs
            return case, case
        cycle, offset = divmod(position, self.num_pairs)
        while len(self._permutations) <= cycle:  # permutations are drawn in order from one generator
            self._permutations.append(torch.randperm(self.num_pairs, generator=self._generator))
        pair = int(self._permutations[cycle][offset])
        n = len(self.data)
        moving, rest = divmod(pair, n - 1)  # the n - 1 partners of `moving`, skipping itself
        return moving, rest + (rest >= moving)

    def _intra_pair(self, case: Mapping[str, Any]) -> dict[str, Any]:
        item: dict[str, Any] = {}
        for key, value in case.items():
            if isinstance(value, (list, tuple)):
                if len(value) != 2:
                    raise ValueError(f"intra-case entry {key!r} must hold 2 items (image 0, image 1), got {len(value)}")
                if key == "image" and value[0] == value[1]:
                    raise ValueError(f"intra-case pair would register {value[0]!r} with itself")
                item[f"moving_{key}"], item[f"fixed_{key}"] = value
            else:
                item[f"moving_{key}"] = item[f"fixed_{key}"] = value
        return item

    def __getitem__(self, index: int) -> Any:
        moving, fixed = self.pair_indices(index)
        if self.pairing == "intra":
            item = self._intra_pair(self.data[moving])
        else:
            item = {f"moving_{k}": v for k, v in self.data[moving].items()}
            item.update({f"fixed_{k}": v for k, v in self.data[fixed].items()})
        return apply_transform(self.transform, item) if self.transform is not None else item


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


class PairEpochHandler:
    """Ignite handler: before each epoch, ``dataset.set_epoch(engine.state.epoch - 1)``.

    Attach it to the trainer (in a bundle: an entry of ``train#handlers``) so that the pairs continue
    through the permutation stream across epochs and after resuming from a checkpoint. The data
    loader's iterator is created after ``EPOCH_STARTED``, so worker processes see the new epoch.
    """

    def __init__(self, dataset: RegistrationPairDataset) -> None:
        if not hasattr(dataset, "set_epoch"):
            raise ValueError(f"dataset must provide set_epoch(epoch), got {type(dataset).__name__}")
        self.dataset = dataset

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        self.dataset.set_epoch(engine.state.epoch - 1)
