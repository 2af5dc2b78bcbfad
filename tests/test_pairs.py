"""Pair sampling: permutation cycles over all ordered pairs, epoch continuation, intra-case pairs, listed pairs and
merged extra items."""

from __future__ import annotations

import itertools

import pytest
import torch

from monai_ext.data.pairs import PairEpochHandler, RegistrationPairDataset


def _cases(n):
    return [{"image": f"img{i}.nii.gz", "label": f"seg{i}.nii.gz", "name": f"case{i}"} for i in range(n)]


def _stream(dataset, epochs):
    out = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        out += [dataset.pair_indices(k) for k in range(len(dataset))]
    return out


def test_each_cycle_is_a_permutation_of_all_ordered_distinct_pairs():
    n = 5
    dataset = RegistrationPairDataset(_cases(n), seed=7)
    assert len(dataset) == n * (n - 1)
    everything = set(itertools.permutations(range(n), 2))  # ordered pairs, i != j
    stream = _stream(dataset, epochs=3)
    cycles = [stream[c * 20 : (c + 1) * 20] for c in range(3)]
    for cycle in cycles:
        assert set(cycle) == everything and len(cycle) == len(everything)  # exactly once per cycle
    assert cycles[0] != cycles[1]  # a fresh permutation for every cycle


def test_epochs_continue_through_the_cycle_and_match_the_seeded_permutations():
    """pairs_per_epoch = 7 with 12 pairs: epoch e covers stream positions 7e..7e+6 of the concatenated
    permutations torch.randperm(12, generator) drawn in order from a generator seeded with the seed."""
    n, seed = 4, 123456789
    dataset = RegistrationPairDataset(_cases(n), pairs_per_epoch=7)  # default seed is SITReg's
    generator = torch.Generator().manual_seed(seed)
    expected_flat = torch.cat([torch.randperm(12, generator=generator) for _ in range(3)]).tolist()
    # pair index p <-> (moving, fixed): moving = p // (n - 1), fixed = the (p % (n - 1))-th other case
    expected = []
    for p in expected_flat:
        moving, rest = divmod(p, n - 1)
        expected.append((moving, [c for c in range(n) if c != moving][rest]))
    assert _stream(dataset, epochs=5) == expected[:35]
    # random access: an epoch reached directly gives the same pairs as walking there
    other = RegistrationPairDataset(_cases(n), pairs_per_epoch=7)
    other.set_epoch(4)
    assert [other.pair_indices(k) for k in range(7)] == expected[28:35]


def test_items_hold_moving_and_fixed_keys_and_never_the_same_case():
    dataset = RegistrationPairDataset(_cases(3), transform=lambda d: {**d, "seen": True})
    for k in range(len(dataset)):
        item = dataset[k]
        assert item["seen"] and item["moving_name"] != item["fixed_name"]
        i, j = dataset.pair_indices(k)
        assert item["moving_image"] == f"img{i}.nii.gz" and item["fixed_label"] == f"seg{j}.nii.gz"


def test_intra_case_pairs_in_fixed_order():
    cases = [{"image": [f"c{i}_0000", f"c{i}_0001"], "mask": [f"m{i}_0", f"m{i}_1"], "name": f"c{i}"} for i in range(3)]
    dataset = RegistrationPairDataset(cases, pairing="intra", pairs_per_epoch=2)
    assert len(dataset) == 2
    names = [dataset[k]["moving_name"] for k in range(2)]
    dataset.set_epoch(1)
    names += [dataset[k]["moving_name"] for k in range(2)]
    assert names == ["c0", "c1", "c2", "c0"]  # fixed order, continuing across epochs
    item = dataset[0]
    assert item["moving_image"] == "c2_0000" and item["fixed_image"] == "c2_0001"
    assert item["moving_mask"] == "m2_0" and item["fixed_name"] == "c2"


def _listed(n):
    return [{"moving_image": f"m{k}", "fixed_image": f"f{k}", "moving_name": f"pair{k}"} for k in range(n)]


def test_listed_pairs_are_used_as_given_in_seeded_permutation_cycles():
    """pairing="listed": item k of epoch e is data[perm[(5e + k) % 8]] of the permutations torch.randperm(8)
    drawn in order from a generator seeded with the seed, the dicts' keys unchanged."""
    pairs, seed = _listed(8), 3
    dataset = RegistrationPairDataset(pairs, pairs_per_epoch=5, seed=seed, pairing="listed")
    generator = torch.Generator().manual_seed(seed)
    expected = torch.cat([torch.randperm(8, generator=generator) for _ in range(5)]).tolist()
    stream = _stream(dataset, epochs=8)
    assert [moving for moving, _ in stream] == expected[:40] and all(m == f for m, f in stream)
    for cycle in range(5):
        assert sorted(expected[cycle * 8 : (cycle + 1) * 8]) == list(range(8))  # every pair once per cycle
    dataset.set_epoch(2)
    assert dataset[1] == pairs[expected[11]] and dataset[1] is not pairs[expected[11]]  # a copy, keys as listed
    fresh = RegistrationPairDataset(pairs, pairs_per_epoch=5, seed=seed, pairing="listed")
    fresh.set_epoch(6)  # resumed directly at a later epoch
    assert [fresh.pair_indices(k) for k in range(5)] == stream[30:35]
    assert len(RegistrationPairDataset(pairs, pairing="listed")) == 8  # default: one cycle


@pytest.mark.parametrize("pairing", ["inter", "listed"])
def test_extras_are_merged_under_the_prefix_in_their_own_cycles(pairing):
    data = _cases(3) if pairing == "inter" else _listed(6)
    extras = [{"image_1": f"a{k}", "image_2": f"b{k}"} for k in range(4)]
    plain = RegistrationPairDataset(data, pairs_per_epoch=6, seed=5, pairing=pairing)
    dataset = RegistrationPairDataset(data, pairs_per_epoch=6, seed=5, pairing=pairing, extras=extras)
    stream = []
    for epoch in range(2):  # 12 items = 3 cycles of the 4 extras
        dataset.set_epoch(epoch)
        plain.set_epoch(epoch)
        for k in range(6):
            item, extra = dataset[k], dataset.extra_index(k)
            assert item["consistency_image_1"] == f"a{extra}" and item["consistency_image_2"] == f"b{extra}"
            assert {key: item[key] for key in plain[k]} == plain[k]  # the pairs do not depend on the extras
            stream.append(extra)
    for cycle in range(3):
        assert sorted(stream[cycle * 4 : (cycle + 1) * 4]) == [0, 1, 2, 3]
    other = RegistrationPairDataset(data, pairs_per_epoch=6, seed=5, pairing=pairing, extras=extras, extras_prefix="x_")
    other.set_epoch(1)
    assert [other.extra_index(k) for k in range(6)] == stream[6:]  # resumable, the same for the same seed
    assert other[0]["x_image_1"] == f"a{stream[6]}" and plain.extra_index(0) is None


def test_extra_keys_must_not_overwrite_the_pair():
    dataset = RegistrationPairDataset(_listed(2), pairing="listed", extras=[{"image": "x"}], extras_prefix="moving_")
    with pytest.raises(KeyError, match="overwrite"):
        dataset[0]


def test_epoch_handler_follows_engine_epoch():
    dataset = RegistrationPairDataset(_cases(3))
    engine = type("Engine", (), {})()
    engine.state = type("State", (), {"epoch": 4})()
    PairEpochHandler(dataset)(engine)
    assert dataset.epoch == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": _cases(1)}, "at least 2 cases"),
        ({"data": _cases(3), "pairing": "both"}, "pairing"),
        ({"data": _cases(3), "pairs_per_epoch": 0}, "pairs_per_epoch"),
        ({"data": [{"image": ["a", "a"]}], "pairing": "intra"}, "itself"),
        ({"data": [{"image": ["a", "b", "c"]}], "pairing": "intra"}, "2 items"),
        ({"data": [], "pairing": "listed"}, "at least 1 pair"),
        ({"data": _cases(3), "extras": []}, "extras"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegistrationPairDataset(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        RegistrationPairDataset(_cases(3))[6]
