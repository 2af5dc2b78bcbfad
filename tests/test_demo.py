"""The embedded demo: synthetic data files, the demo mixin config, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from monai_ext.demo import DEMO_FILES, bundle_command, demo, demo_affine, demo_pairs, prepare
from monai_ext.spatial.sampling import warp

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "sitreg_oasis" / "configs"


def test_demo_data_and_affine(tmp_path):
    command = prepare(str(tmp_path), shape=(16, 20, 24), seed=1)
    data = tmp_path / "data"
    assert sorted(p.name for p in data.iterdir()) == sorted(DEMO_FILES.values())
    affine = demo_affine((16, 20, 24))
    # derivation: voxel (15, 19, 23) / 2 is the centre, mapped to (10, -20, 15) mm; x is flipped
    np.testing.assert_allclose(affine[:3, :3], np.diag([-2.5, 2.5, 3.0]))
    np.testing.assert_allclose(affine @ np.array([7.5, 9.5, 11.5, 1.0]), [10.0, -20.0, 15.0, 1.0])
    images = {key: nib.load(str(data / name)) for key, name in DEMO_FILES.items()}
    for image in images.values():
        np.testing.assert_allclose(image.affine, affine)
    moving_label = np.asarray(images["moving_label"].dataobj)
    fixed_label = np.asarray(images["fixed_label"].dataobj)
    assert moving_label.dtype == np.int16 and set(np.unique(moving_label)) <= set(range(13))
    # the stored field really maps the fixed grid into the moving image: it warps the moving labels onto the fixed
    ddf = torch.from_numpy(np.asarray(images["true_forward_ddf"].dataobj)).movedim(-1, 0)[None]
    warped = warp(torch.from_numpy(moving_label.astype(np.int64))[None, None], ddf, mode="nearest")[0, 0]
    assert torch.equal(warped, torch.from_numpy(fixed_label.astype(np.int64)))
    assert not np.array_equal(moving_label, fixed_label)
    assert command == bundle_command(str(tmp_path))


def test_demo_config_resolves_the_demo_pair(tmp_path):
    """``inference.json`` + ``demo.json`` (the ``monai.bundle run`` form) point at the generated files."""
    prepare(str(tmp_path), shape=(16, 16, 16))
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "demo.json")])
    parser["demo_dir"] = str(tmp_path)
    assert parser.get_parsed_content("pairs") == demo_pairs(tmp_path)
    assert parser.get_parsed_content("output_dir") == str(tmp_path) + "/registration"
    assert parser.get_parsed_content("load_pretrained") is False
    assert parser.get_parsed_content("instance_optimization_steps") > 0
    assert parser.get_parsed_content("crop") is None
    command = bundle_command("demo_out")
    assert "--demo_dir demo_out" in command
    assert "'bundles/sitreg_oasis/configs/inference.json','bundles/sitreg_oasis/configs/demo.json'" in command
    with pytest.raises(FileNotFoundError, match="python -m monai_ext.demo --out"):
        demo_pairs(tmp_path / "empty")


def test_demo_end_to_end_tiny(tmp_path, capsys):
    row = demo(str(tmp_path), shape=(16, 16, 16), steps=2)
    stdout = capsys.readouterr().out
    assert "no trained weights" in stdout and "2 Adam steps" in stdout and "instance optimisation" in stdout
    folder = Path(row["output"])
    assert folder == tmp_path / "registration" / "moving__fixed"
    assert (folder / "qa.png").stat().st_size > 0
    metrics = json.loads((folder / "metrics.json").read_text())
    assert f"Dice before {metrics['dice_before']:.3f} -> after {metrics['dice']:.3f}" in stdout
    assert 0 < row["dice_before"] < 1 and 0 < row["dice"] <= 1
    assert row["folding_fraction"] == metrics["folding_fraction"]
    assert row["ddf_error_before"] > 0 and np.isfinite(row["ddf_error_after"])
