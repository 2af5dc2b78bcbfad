"""Pair sampling for pairwise registration training.

:class:`RegistrationPairDataset` serves every pairwise training of the package; its ``pairing`` says where
the pairs come from:

* inter-subject (``pairing="inter"``, SITReg): all ``n (n - 1)`` ordered pairs ``(i, j), i != j`` of ``n``
  cases are visited in random permutations drawn one after another from a ``torch.Generator`` seeded with
  ``seed``; an epoch takes the next ``pairs_per_epoch`` pairs of that endless stream, so consecutive epochs
  continue through the current permutation before a new one starts (SITReg's
  ``VolumetricRegistrationTrainingDataset``);
* listed (``pairing="listed"``, KeyMorph): ready pair dicts (e.g. modality pairs, or the rows of a pair list),
  visited through the same kind of permutation stream over the ``P`` listed pairs;
* intra-case (``pairing="intra"``, lung datasets): each case holds two images of one subject (e.g.
  inhale / exhale); its pair is (image 0 = moving, image 1 = fixed), visited in the fixed case order.

Optionally every item also carries one item of a second list (``extras``, e.g. KeyMorph's same-subject
two-modality images for the keypoint-consistency step), drawn from a permutation stream of its own and merged
under prefixed keys.

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

__all__ = ["PAIRINGS", "RegistrationPairDataset", "TripletDataset", "PairEpochHandler"]

#: the ``pairing`` modes of :class:`RegistrationPairDataset`
PAIRINGS = ("inter", "intra", "listed")


class _PermutationStream:
    """Endless stream of random permutations of ``range(size)``, drawn in order from one ``torch.Generator``
    seeded with ``seed``: ``stream[position]`` is entry ``position % size`` of permutation ``position // size``.
    Permutations are drawn on first use and kept, so any position can be read in any order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self._generator = torch.Generator().manual_seed(seed)
        self._permutations: list[torch.Tensor] = []

    def __getitem__(self, position: int) -> int:
        cycle, offset = divmod(position, self.size)
        while len(self._permutations) <= cycle:
            self._permutations.append(torch.randperm(self.size, generator=self._generator))
        return int(self._permutations[cycle][offset])


class RegistrationPairDataset(Dataset):
    """Map-style dataset of ``pairs_per_epoch`` (moving, fixed) pair dicts for the current epoch.

    Item ``index`` of epoch ``e`` is position ``e * pairs_per_epoch + index`` of the pairing's order (module
    docstring): a cycle visits every pair exactly once, epochs continue the cycle, and :meth:`set_epoch` reaches
    any epoch directly (a resumed run gets the pairs it would have had), deterministically for a given ``seed``.

    Items (before ``transform``) are dicts of the entries of ``data`` (typically file paths and names):

    * ``"inter"``: pair ``(i, j)`` is ``{"moving_<key>": data[i][key], "fixed_<key>": data[j][key]}`` for every
      key of the cases;
    * ``"intra"``: ``{"moving_<key>": value[0], "fixed_<key>": value[1]}`` for every two-element value of the
      case, ``{"moving_<key>": value, "fixed_<key>": value}`` for the others (a case name);
    * ``"listed"``: a shallow copy of the pair dict, keys as they are (e.g. ``moving_image``, ``fixed_image``,
      ``moving_label``, ...).

    With ``extras``, item ``index`` also holds ``{f"{extras_prefix}{key}": value}`` for every entry of
    ``extras[k]``, ``k`` read at the same position of a second permutation stream over the extras (seeded with
    ``seed + 1``), so every extra item is used once per cycle of the extras; an extra key that is also a key of
    the pair raises ``KeyError``. ``transform`` (e.g. a MONAI ``Compose`` loading the images as channel-first
    ``(C, H, W, D)`` arrays) is applied to the merged dict.

    Args:
        data: ``pairing="inter"``: the cases, dicts such as ``{"image": path, "label": path, "name": str}``
            (at least 2). ``"intra"``: dicts whose values are two-element sequences (image 0, image 1), e.g.
            ``{"image": [inhale, exhale], "mask": [...]}``, scalar values (a case name) going to both sides (at
            least 1). ``"listed"``: pair dicts with prefixed keys, e.g. ``{"moving_image": path,
            "fixed_image": path, "moving_name": str, "fixed_name": str}`` (at least 1).
        transform: callable applied to every item dict (loads both images).
        pairs_per_epoch: items per epoch; default one full cycle (``n (n - 1)`` for ``"inter"``, ``len(data)``
            otherwise).
        seed: seed of the permutation streams (SITReg uses 123456789); ``"intra"`` order does not depend on it.
        pairing: one of :data:`PAIRINGS`, ``"inter"``, ``"intra"`` or ``"listed"``.
        extras: optional non-empty sequence of dicts, one of which is merged into every item, e.g. KeyMorph's
            same-subject items ``{"image_1": path, "image_2": path, "modality_1": str, "modality_2": str,
            "subject": str}``.
        extras_prefix: prefix of the merged extra keys (``"consistency_"``: ``consistency_image_1``, ...).

    Raises:
        ValueError: an unknown ``pairing``, too few entries in ``data``, an empty ``extras``, a non-positive
            ``pairs_per_epoch`` or a malformed intra-case entry.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable | None = None,
        pairs_per_epoch: int | None = None,
        seed: int = 123456789,
        pairing: str = "inter",
        extras: Sequence[Mapping[str, Any]] | None = None,
        extras_prefix: str = "consistency_",
    ) -> None:
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        self.data = list(data)
        n = len(self.data)
        if pairing == "inter" and n < 2:
            raise ValueError(f"data must hold at least 2 cases for inter-subject pairs, got {n}")
        if n < 1:
            raise ValueError(f"data must hold at least 1 {'pair' if pairing == 'listed' else 'case'}")
        if pairing == "intra":
            for case in self.data:
                self._intra_pair(case)  # validates every case up front
        self.pairing = pairing
        self.num_pairs = n * (n - 1) if pairing == "inter" else n
        self.pairs_per_epoch = self.num_pairs if pairs_per_epoch is None else int(pairs_per_epoch)
        if self.pairs_per_epoch < 1:
            raise ValueError(f"pairs_per_epoch must be positive, got {pairs_per_epoch}")
        self.extras = None if extras is None else list(extras)
        if self.extras is not None and not self.extras:
            raise ValueError("extras must be None or non-empty")
        self.extras_prefix = extras_prefix
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self._order = _PermutationStream(self.num_pairs, self.seed)
        self._extras_order = None if self.extras is None else _PermutationStream(len(self.extras), self.seed + 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the pairs of ``epoch`` (0-based)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.pairs_per_epoch

    def _position(self, index: int) -> int:
        if not 0 <= index < self.pairs_per_epoch:
            raise IndexError(f"index {index} out of range for {self.pairs_per_epoch} pairs per epoch")
        return self.epoch * self.pairs_per_epoch + index

    def pair_indices(self, index: int) -> tuple[int, int]:
        """Indices into ``data`` ``(moving, fixed)`` of item ``index`` in the current epoch; ``"intra"`` and
        ``"listed"`` give ``(k, k)``, ``k`` the entry holding both sides."""
        position = self._position(index)
        if self.pairing == "intra":
            case = position % self.num_pairs
            return case, case
        pair = self._order[position]
        if self.pairing == "listed":
            return pair, pair
        n = len(self.data)
        moving, rest = divmod(pair, n - 1)  # the n - 1 partners of `moving`, skipping itself
        return moving, rest + (rest >= moving)

    def extra_index(self, index: int) -> int | None:
        """Index into ``extras`` of the extra item merged into item ``index`` of the current epoch (``None``
        without ``extras``)."""
        position = self._position(index)
        return None if self._extras_order is None else self._extras_order[position]

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
        if self.pairing == "listed":
            item = dict(self.data[moving])
        elif self.pairing == "intra":
            item = self._intra_pair(self.data[moving])
        else:
            item = {f"moving_{k}": v for k, v in self.data[moving].items()}
            item.update({f"fixed_{k}": v for k, v in self.data[fixed].items()})
        extra = self.extra_index(index)
        if extra is not None:
            merged = {f"{self.extras_prefix}{k}": v for k, v in self.extras[extra].items()}
            clash = sorted(item.keys() & merged.keys())
            if clash:
                raise KeyError(f"extra keys {clash} (prefix {self.extras_prefix!r}) would overwrite the pair's keys")
            item.update(merged)
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

    Attach it to the trainer (in a bundle: an entry of ``train#handlers``) so that the pairs (and the extra
    items) continue through their permutation streams across epochs and after resuming from a checkpoint. The
    data loader's iterator is created after ``EPOCH_STARTED``, so worker processes see the new epoch.

    Args:
        dataset: any dataset with ``set_epoch(epoch)``: :class:`RegistrationPairDataset` (every pairing),
            :class:`TripletDataset`.
    """

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "set_epoch"):
            raise ValueError(f"dataset must provide set_epoch(epoch), got {type(dataset).__name__}")
        self.dataset = dataset

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        self.dataset.set_epoch(engine.state.epoch - 1)
