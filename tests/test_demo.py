"""The embedded demo: shipped label maps, the demo pair, the demo mixin config, and the real registration."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from monai_ext.data.synthbrain import BRAIN_LABELS, OTHER_BRAIN_LABELS
from monai_ext.demo import DEMO_DATA, DEMO_FILES, bundle_command, demo, demo_pairs, prepare

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "sitreg_brain" / "configs"


def test_shipped_label_maps_are_small_licensed_2mm_brains():
    maps = sorted(DEMO_DATA.glob("*_2mm.nii.gz"))
    assert [m.name for m in maps] == ["training_seg_09_2mm.nii.gz", "training_seg_10_2mm.nii.gz"]
    assert sum(m.stat().st_size for m in maps) < 1_000_000
    assert "Apache License" in (DEMO_DATA / "LICENSE.txt").read_text()
    for path in maps:
        image = nib.load(str(path))
        np.testing.assert_allclose(np.linalg.norm(image.affine[:3, :3], axis=0), [2.0, 2.0, 2.0])
        values = set(np.unique(np.asarray(image.dataobj)).tolist())
        assert values <= {0, *BRAIN_LABELS, *OTHER_BRAIN_LABELS} and len(values & set(BRAIN_LABELS)) >= 28


def test_demo_pair_files(tmp_path):
    command = prepare(str(tmp_path), seed=1)
    data = tmp_path / "data"
    assert sorted(p.name for p in data.iterdir()) == sorted(DEMO_FILES.values())
    images = {key: nib.load(str(data / name)) for key, name in DEMO_FILES.items()}
    for side in ("moving", "fixed"):
        image, label = images[f"{side}_image"], images[f"{side}_label"]
        np.testing.assert_allclose(image.affine, label.affine)
        voxels, labels = np.asarray(image.dataobj), np.asarray(label.dataobj)
        assert voxels.dtype == np.float32 and 0 <= voxels.min() and voxels.max() <= 1
        assert np.all(voxels[labels == 0] == 0)
        white, grey = labels == 2, labels == 3  # T1-like: white matter brighter than cortex
        assert np.median(voxels[white]) > np.median(voxels[grey])
    assert not np.array_equal(images["moving_label"].affine, images["fixed_label"].affine)  # two subjects
    assert command == bundle_command(str(tmp_path))


def test_demo_config_resolves_the_demo_pair(tmp_path):
    """``inference.json`` + ``demo.json`` (the ``monai.bundle run`` form) point at the generated files."""
    prepare(str(tmp_path))
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "demo.json")])
    parser["demo_dir"] = str(tmp_path)
    assert parser.get_parsed_content("pairs") == demo_pairs(tmp_path)
    assert parser.get_parsed_content("output_dir") == str(tmp_path) + "/registration"
    assert parser.get_parsed_content("load_pretrained") is True
    assert parser.get_parsed_content("instance_optimization_steps") == 0
    assert parser.get_parsed_content("field_refinement_steps") > 0  # the default: network pass + field refinement
    command = bundle_command("demo_out")
    assert "'bundles/sitreg_brain/configs/inference.json','bundles/sitreg_brain/configs/demo.json'" in command
    with pytest.raises(FileNotFoundError, match="python -m monai_ext.demo --out"):
        demo_pairs(tmp_path / "empty")


def test_demo_registers_the_held_out_brains_with_the_shipped_model(tmp_path, capsys):
    row = demo(str(tmp_path))
    stdout = capsys.readouterr().out
    folder = Path(row["output"])
    assert folder == tmp_path / "registration" / "moving__fixed"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert f"{metrics['dice_before']:.3f} -> {metrics['dice']:.3f}" in stdout
    assert metrics["num_labels"] >= 28
    # the trained model registers two different real brains: a large, unmistakable gain, without folding
    assert row["dice"] > row["dice_before"] + 0.1, (row["dice_before"], row["dice"])
    assert row["folding_fraction"] == 0
    assert (folder / "qa.png").stat().st_size > 0
    warped = nib.load(str(folder / "warped_label.nii.gz"))
    fixed = nib.load(str(tmp_path / "data" / "fixed_label.nii.gz"))
    assert warped.shape == fixed.shape and np.allclose(warped.affine, fixed.affine)  # the fixed native grid
    # the default field refinement is a clear gain over the network's pass alone on this pair (native-grid Dice)
    network_only = demo(str(tmp_path / "network_only"), field_refinement_steps=0)
    assert network_only["dice_before"] == pytest.approx(row["dice_before"])
    assert row["dice"] > network_only["dice"] + 0.03, (network_only["dice"], row["dice"])
