"""The KeyMorph brain affine bundle: pretraining + Dice training configs (tiny, resumable), shipped weights, and
the shipped model's affine alignment of the held-out demo brains under large rotations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_brain_training
from monai.bundle import ConfigParser

from monai_ext.data.synthbrain import BRAIN_LABELS, held_out_pairs
from monai_ext.demo import DEMO_DATA
from monai_ext.engines.affine_refinement import refine_keymorph_result
from monai_ext.metrics.overlap import label_overlap
from monai_ext.spatial.sampling import warp

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "keymorph_brain_affine"
CONFIGS = BUNDLE / "configs"
MAPS = sorted(DEMO_DATA.glob("training_seg_*_2mm.nii.gz"))
NUM_STRUCTURES = len(BRAIN_LABELS)


def _run(bundle_root: Path, label_folder: Path, files: list[str], **override) -> ConfigParser:
    small = {"shape": [24, 24, 24], "spacing": 9.0, "backbone#f_maps": 4, "val_rotations": [0.0, 90.0]}
    return run_brain_training([CONFIGS / f for f in files], bundle_root, label_folder, {**small, **override})


def test_pretrain_then_train_validates_and_resumes(tmp_path, label_folder):
    pretrain = _run(tmp_path, label_folder, ["train.json", "pretrain.json"], pretrain_epochs=1)
    assert pretrain.get_parsed_content("pretrain#trainer").state.iteration == 2
    assert pretrain.get_parsed_content("num_keypoints") == len(BRAIN_LABELS)  # one keypoint per structure
    checkpoint = tmp_path / "models" / "pretrain" / "checkpoint_epoch=1.pt"
    assert set(torch.load(checkpoint, weights_only=True)) == {"network", "optimizer", "trainer"}

    train = _run(tmp_path, label_folder, ["train.json"], max_epochs=1, pretrained=str(checkpoint))
    trainer = train.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and trainer.state.iteration == 2
    summary = json.loads((tmp_path / "eval" / "validation" / "summary.json").read_text())
    assert summary["metrics"]["dice"]["count"] == 8  # 09 <-> 10, two contrasts, rotated by 0 and 90 degrees
    assert (tmp_path / "models" / "model.pt").is_file()
    resumed = _run(tmp_path, label_folder, ["train.json"], max_epochs=2, pretrained=str(checkpoint))
    assert resumed.get_parsed_content("train#trainer").state.iteration == 4  # continued, not restarted


def _shipped_network() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", weights_only=True), strict=True)
    return network.eval()


def test_shipped_weights_match_their_hash_and_the_network():
    entries = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    entry = next(e for e in entries if e["path"] == "models/model.pt")
    weights = BUNDLE / "models" / "model.pt"
    assert entry["hash_type"] == "sha256" and entry["url"] == ""
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == entry["hash_val"]
    assert weights.stat().st_size < 20_000_000
    _shipped_network()
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert 0.3 < meta["eval_metrics"]["mean_dice"] < 1


def test_shipped_model_aligns_held_out_brains_rotated_by_up_to_90_degrees():
    """Real assertion on the shipped model as users run it (keypoint fit + refinement): the demo brains (never
    trained on) rotated about random axes are aligned clearly better than identity, at 90 degrees about as well
    as at 0 degrees."""
    network = _shipped_network()
    steps = ConfigParser.load_config_file(str(CONFIGS / "inference.json"))["refine_steps"]
    pairs = held_out_pairs([str(m) for m in MAPS], (56, 56, 56), 4.0, contrasts=("t1",), rotations=(0.0, 90.0))
    labels = range(1, NUM_STRUCTURES + 1)
    dice: dict[float, list[float]] = {0.0: [], 90.0: []}
    before = []
    for pair in pairs:
        moving, fixed = pair["moving_image"][None], pair["fixed_image"][None]
        with torch.no_grad():
            result = network.register(moving, fixed, "affine")["affine"]
        ddf = refine_keymorph_result(result, moving, fixed, steps)["ddf"]
        warped = warp(pair["moving_label"][None], ddf, mode="nearest", padding="zeros")
        dice[pair["rotation"]].append(label_overlap(warped, pair["fixed_label"][None], labels)["dice"])
        if pair["rotation"] == 90.0:
            before.append(label_overlap(pair["moving_label"][None], pair["fixed_label"][None], labels)["dice"])
    mean = {angle: sum(values) / len(values) for angle, values in dice.items()}
    assert mean[90.0] > sum(before) / len(before) + 0.25, (mean, before)
    assert mean[90.0] > mean[0.0] - 0.1, mean
