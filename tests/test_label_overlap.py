"""Dice of label maps from voxel counts (:func:`monai_ext.metrics.overlap.label_overlap`) against MONAI's one-hot
``compute_dice``, by hand on tiny maps, and its edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from monai.metrics import compute_dice

from monai_ext.metrics.overlap import label_overlap, pair_metrics


def _monai_dice(warped: torch.Tensor, target: torch.Tensor, labels: list[int]) -> torch.Tensor:
    values = torch.tensor(labels).view(1, -1, 1, 1, 1)
    return compute_dice((warped == values).float(), (target == values).float(), ignore_empty=False)[0].double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_equals_monai_on_random_maps(seed, monkeypatch):
    """Arbitrary label values (negative, large FreeSurfer-like, a label in one map only, one in neither, listed
    out of order); several counting blocks; per-label and mean Dice equal MONAI's (NaN where absent from both)."""
    import monai_ext.metrics.overlap as overlap

    generator = torch.Generator().manual_seed(seed)
    palette = torch.tensor([0, -3, 2, 17, 2035, 41])
    warped = palette[torch.randint(0, 6, (1, 1, 9, 10, 11), generator=generator)].float()
    target = palette[torch.randint(0, 5, (1, 1, 9, 10, 11), generator=generator)].float()  # never 41
    labels = [2035, 41, -3, 17, 2, 99]  # 41: warped only; 99: in neither
    row = label_overlap(warped, target, labels)
    expected = _monai_dice(warped, target, labels)
    for label, value in zip(labels, expected):
        if label == 99:
            assert math.isnan(row["dice_label_99"])
        else:
            assert row[f"dice_label_{label}"] == pytest.approx(float(value), abs=1e-6)
    assert row["dice_label_41"] == 0.0
    assert row["dice"] == pytest.approx(float(expected[:-1].mean()), abs=1e-6)
    monkeypatch.setattr(overlap, "_COUNT_BLOCK", 7)  # many blocks, the last one partial
    small_blocks = label_overlap(warped, target, labels)
    assert small_blocks.keys() == row.keys()
    assert all(small_blocks[k] == row[k] or (math.isnan(row[k]) and math.isnan(small_blocks[k])) for k in row)


def test_dice_by_hand_and_edge_cases():
    warped = torch.tensor([1, 1, 2, 0, 3, 3.0]).view(1, 1, 1, 2, 3)
    target = torch.tensor([1, 2, 2, 0, 0, 3.0]).view(1, 1, 1, 2, 3)
    row = label_overlap(warped, target, [1, 2, 3], suffix="_x")
    # label 1: 2*1/(2+1); label 2: 2*1/(1+2); label 3: 2*1/(2+1)
    assert row == {"dice_x": pytest.approx(2 / 3)}
    assert label_overlap(warped, target, [])["dice"] != label_overlap(warped, target, [])["dice"]  # NaN, no labels
    with pytest.raises(ValueError, match="differ in shape"):
        label_overlap(warped, target[..., :2], [1])


def test_pair_metrics_dice_before_and_after():
    """pair_metrics reads labels from the evaluation output: identical maps give Dice 1 after, the count-based
    Dice before."""
    fixed = torch.zeros(1, 4, 4, 4)
    fixed[0, :2] = 1
    fixed[0, 2:, :2] = 2  # label 1: 32 voxels, label 2: 16
    moving = torch.zeros(1, 4, 4, 4)
    moving[0, 1:3] = 1  # label 1: 32 voxels, 16 shared with the fixed map
    moving[0, 3, :1] = 2  # label 2: 4 voxels, all shared
    item = {
        "forward_ddf": torch.zeros(3, 4, 4, 4),
        "moving_label": moving,
        "fixed_label": fixed,
        "moving_label_warped": fixed,
        "fixed_label_warped": moving,
    }
    row = pair_metrics(item)
    assert row["dice"] == 1.0 and row["dice_inverse"] == 1.0
    assert row["dice_before"] == pytest.approx((2 * 16 / 64 + 2 * 4 / 20) / 2)
