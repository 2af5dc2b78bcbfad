"""Pure helpers of scripts/benchmark_affine.py on tiny synthetic label volumes (no ANTs, no ../shared)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ext.data.synthbrain import BrainLabelMap, grid_affine

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_affine.py"
_spec = importlib.util.spec_from_file_location("benchmark_affine", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _blobs(shape=(20, 22, 18)) -> np.ndarray:
    """Three boxes of labels 1, 2, 3 at asymmetric places (no symmetry hides a wrong rotation or flip)."""
    label = np.zeros(shape, np.uint8)
    label[3:9, 4:12, 5:10] = 1
    label[11:16, 6:9, 3:13] = 2
    label[6:13, 14:19, 9:15] = 3
    return label


def test_pair_key_and_resolve_name():
    assert bench.pair_key("training_seg_09", "training_seg_10", "t1", 90) == "training_seg_09__training_seg_10_t1_rot90"
    assert bench.pair_key("a", "b", "random", 0.0) == "a__b_random_rot0"
    names = ["training_seg_09", "training_seg_10"]
    assert bench.resolve_name("09", names) == "training_seg_09"
    assert bench.resolve_name("training_seg_10", names) == "training_seg_10"
    with pytest.raises(SystemExit):
        bench.resolve_name("seg", names)


def test_moving_geometry_shares_axis_scaling_and_shift_across_angles():
    draws = {a: bench.moving_geometry(torch.Generator().manual_seed(3), a, 10.0, 0.05) for a in (0.0, 30.0, 90.0)}
    scales = np.diag(draws[0.0][0])[:3]
    assert np.allclose(draws[0.0][0][:3, :3], np.diag(scales)) and np.all(np.abs(np.log(scales)) <= math.log(1.05))
    for angle, (transform, shift) in draws.items():
        assert np.allclose(shift, draws[0.0][1]) and np.linalg.norm(shift) <= 10.0
        rotation = transform[:3, :3] @ np.diag(1 / scales)  # R = T S^-1
        assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        assert bench.rotation_angle(rotation) == pytest.approx(angle, abs=1e-6)
    transform, _ = bench.moving_geometry(torch.Generator().manual_seed(3), 60.0, 0.0, 0.0)
    assert bench.rotation_angle(transform) == pytest.approx(60.0)


def test_lps_to_ras():
    lps = np.eye(4)
    lps[:3, 3] = [1.0, 2.0, 3.0]
    assert np.allclose(bench.lps_to_ras(lps)[:3, 3], [-1.0, -2.0, 3.0])
    m = np.random.default_rng(0).normal(size=(4, 4))
    m[3] = [0, 0, 0, 1]
    assert np.allclose(bench.lps_to_ras(bench.lps_to_ras(m)), m)


def test_resample_labels_identity_and_shift():
    label = _blobs()
    affine = grid_affine(label.shape, 2.0, (5.0, -3.0, 1.0))
    assert np.array_equal(bench.resample_labels(label, affine, label.shape, affine, np.eye(4)), label)
    shift = np.eye(4)
    shift[:3, 3] = [4.0, 0.0, 0.0]  # fixed point x -> moving point x + 4 mm = 2 voxels along i
    out = bench.resample_labels(label, affine, label.shape, affine, shift)
    assert np.array_equal(out[:-2], label[2:]) and not out[-2:].any()


def test_dice_centroids_and_error():
    label = _blobs()
    affine = grid_affine(label.shape, 2.0, (0.0, 0.0, 0.0))
    labels = bench.common_labels(label, label, range(1, 32))
    assert labels == [1, 2, 3]
    assert bench.mean_dice(label, label, labels) == 1.0
    assert bench.mean_dice(np.zeros_like(label), label, labels) == 0.0
    assert math.isnan(bench.mean_dice(label, label, []))
    centroids = bench.label_centroids(label, affine, labels)
    assert np.allclose(centroids[1], affine[:3, :3] @ [5.5, 7.5, 7.0] + affine[:3, 3])
    shift = np.eye(4)
    shift[:3, 3] = [3.0, 4.0, 0.0]
    moved = {k: v + [3.0, 4.0, 0.0] for k, v in centroids.items()}
    assert bench.centroid_error(centroids, moved, shift) == pytest.approx(0.0, abs=1e-9)
    assert bench.centroid_error(centroids, moved, np.eye(4)) == pytest.approx(5.0)
    assert math.isnan(bench.centroid_error(centroids, {}, np.eye(4)))


def test_write_pair_and_true_transform_scores_perfectly(tmp_path, monkeypatch):
    """A same-subject pair rendered with rotation, scaling and shift: the true world map fixed -> moving
    (``x -> c + T^-1 (x - c) + shift``) gives Dice ~1 and centroid error ~0; identity does not."""
    monkeypatch.setattr(bench, "SHAPE", (24, 24, 24))
    index = np.zeros((40, 40, 40), np.uint8)
    index[12:20, 14:26, 10:18] = 1  # structure 1 = BRAIN_LABELS[0] (synthesis index 1)
    index[22:30, 10:16, 18:30] = 2
    index[14:24, 24:32, 22:28] = 5
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-20.0, -20.0, -20.0]
    inside = np.argwhere(index > 0)
    centre = (affine @ np.append(inside.mean(0), 1.0))[:3]
    label_map = BrainLabelMap(torch.from_numpy(index), affine, centre, "toy.nii.gz")
    files = bench.write_pair(tmp_path / "pair", label_map, label_map, "t1", 60.0, (1, 2), 8.0, 0.05)
    assert all(p.is_file() for p in files.values())
    transform, shift = bench.moving_geometry(torch.Generator().manual_seed(2), 60.0, 8.0, 0.05)
    moving_affine = nib.load(str(files["moving_label"])).affine
    assert np.allclose(moving_affine, grid_affine((24,) * 3, 2.0, centre) + np.pad(shift[:, None], ((0, 1), (3, 0))))
    truth = np.eye(4)
    truth[:3, :3] = np.linalg.inv(transform[:3, :3])
    truth[:3, 3] = centre - truth[:3, :3] @ centre + shift
    good = bench.affine_metrics(files, truth, 0.0)
    assert good["dice"] > 0.85 and good["centroid_mm"] < 1.0
    assert good["rotation_deg"] == pytest.approx(60.0, abs=2.0)
    bad = bench.affine_metrics(files, np.eye(4), 0.0)
    assert bad["dice"] < good["dice"] - 0.2 and bad["centroid_mm"] > 5.0


def test_table_and_targets():
    def rows(dice0, dice90):
        return {
            "a__b_t1_rot0": {"dice": dice0, "centroid_mm": 2.0, "seconds": 1.0},
            "a__b_t1_rot90": {"dice": dice90, "centroid_mm": 4.0, "seconds": 3.0},
        }

    results = {"ours": {"rows": rows(0.70, 0.69), "peak_rss_gb": 1.5}, "ants_affine": {"rows": rows(0.705, 0.3)}}
    table = bench.format_table(results, ["ours", "ants_affine", "identity"], [0, 90])
    lines = table.splitlines()
    assert lines[0] == "| method | 0 deg Dice / mm | 90 deg Dice / mm | s/pair | peak RSS GB |"
    assert lines[2] == "| ours | 0.700 / 2.0 | 0.690 / 4.0 | 2.0 | 1.50 |"
    assert lines[3].startswith("| ants_affine | 0.705 / 2.0 | 0.300 / 4.0 | 2.0 | n/a")
    assert lines[4] == "| identity | n/a / n/a | n/a / n/a | n/a | n/a |"
    assert "| 0.700 | 0.690 |" in bench.format_table(results, ["ours"], [0, 90], centroid=False)
    target1, target2 = bench.check_targets(results, [0, 90])
    assert target1.startswith("target 1 [PASS]") and "0 deg -0.005" in target1
    assert target2.startswith("target 2 [PASS]") and "-0.010" in target2
    results["ours"]["rows"] = rows(0.68, 0.60)
    target1, target2 = bench.check_targets(results, [0, 90])
    assert target1.startswith("target 1 [FAIL]") and target2.startswith("target 2 [FAIL]")
    assert all("[n/a]" in line for line in bench.check_targets({}, [0, 90]))
    pipeline = {"ours_pipeline": {"rows": rows(0.55, 0.55)}, "ants_affine_sitreg": {"rows": rows(0.555, 0.05)}}
    line = bench.check_pipeline_target(pipeline, [0, 90])
    assert line.startswith("pipeline target [PASS]") and "0 deg -0.005" in line and "90 deg +0.500" in line
    pipeline["ours_pipeline"]["rows"] = rows(0.53, 0.55)
    assert bench.check_pipeline_target(pipeline, [0, 90]).startswith("pipeline target [FAIL]")
    assert "[n/a]" in bench.check_pipeline_target({}, [0, 90])
