"""The SITReg task bundles (raw OASIS, LPBA40, Lung250M-4B, NLST, LUMIR + its group-consistency fine-tune).

Every bundle's train / evaluate / inference configs run end to end on tiny fake data in the dataset's own
layout (``tests/fake_datasets.py``) with a tiny 3-level network (the bundles' own networks are checked by
``scripts/check_bundles.py``); the LUMIR fine-tune runs under ``torchrun`` with 3 gloo processes.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import write_lpba40, write_lumir, write_lung250m, write_nlst, write_oasis_raw
from monai.bundle import run

from monai_ext.engines.landmarks import LandmarkTRE

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
sys.path.insert(0, str(REPO / "scripts"))
from check_bundles import CHECKS, check_bundle  # noqa: E402

TINY = {
    "network_def#features": [4, 8, 8],
    "network_def#feature_convolutions": [1, 1, 1],
    "network_def#deformation_features": [4, 4, 4],
    "network_def#deformation_convolutions": [1, 1, 1],
    "num_workers": 0,
    "max_epochs": 1,
    "pairs_per_epoch": 2,
}
# bundle -> (fake data writer, overrides of train / evaluate / inference)
TASKS = {
    "sitreg_oasis_raw": (
        lambda root: write_oasis_raw(root, num_subjects=4),
        {
            "divisions": {"train": [0, 2], "validate": [2, 4], "test": [2, 4]},
            "network_def#deformation_features": [4, 4, None],  # a feature-only coarsest level, as the real config
            "network_def#deformation_convolutions": [1, 1, None],
            "input_shape": [12, 12, 12],
        },
    ),
    "sitreg_lpba40": (write_lpba40, {"crop": [[1, 1], [1, 1], [0, 1]], "eval_division": "validate", "division": "validate"}),
    "sitreg_lung250m_4b": (write_lung250m, {"crop_or_pad_to": [16, 12, 16]}),
    "sitreg_nlst": (write_nlst, {}),
    "sitreg_lumir": (write_lumir, {"batch_size": 2}),
}


def _run(bundle: str, configs: list[str], **override) -> None:
    folder = BUNDLES / bundle / "configs"
    run(
        run_id="run",
        init_id="initialize",
        config_file=[str(folder / c) for c in configs],
        meta_file=str(folder / "metadata.json"),
        logging_file=str(folder / "logging.conf"),
        **override,
    )


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())["metrics"]


@pytest.mark.parametrize("bundle", list(TASKS))
def test_train_evaluate_infer(bundle, tmp_path):
    writer, extra = TASKS[bundle]
    root = tmp_path / "bundle"
    override = {**TINY, **extra, "dataset_dir": str(writer(tmp_path / "data")), "bundle_root": str(root)}
    train_only = {k: v for k, v in override.items() if k not in ("division",)}

    _run(bundle, ["train.json"], **train_only)
    checkpoint = torch.load(root / "models/epochs/checkpoint_epoch=1.pt", weights_only=True)
    assert checkpoint["trainer"]["epoch"] == 1 and checkpoint["trainer"]["iteration"] >= 1
    assert (root / "models/model.pt").is_file()  # the best validation model
    validation = _summary(root / "eval/validation/summary.json")
    assert validation["folding_fraction"]["count"] >= 1 and math.isfinite(validation["ic_max"]["mean"])

    _run(bundle, ["train.json", "evaluate.json"], **train_only)
    division = override.get("eval_division", json.loads((BUNDLES / bundle / "configs/evaluate.json").read_text())["eval_division"])
    evaluation = _summary(root / "eval" / division / "summary.json")
    assert evaluation["ic_mse"]["count"] >= 1

    infer = {k: v for k, v in override.items() if k not in ("max_epochs", "pairs_per_epoch", "eval_division", "batch_size")}
    _run(bundle, ["inference.json"], **infer, outputs=["forward_ddf", "inverse_ddf", "warped_image", "metrics"])
    pairs = sorted(p for p in (root / "inference").iterdir() if not p.name.startswith("."))
    assert pairs, "inference wrote no pair folder"
    for pair in pairs:
        assert {"forward_ddf.nii.gz", "inverse_ddf.nii.gz", "warped_image.nii.gz", "metrics.json"} <= {
            f.name for f in pair.iterdir()
        }


@pytest.mark.parametrize("bundle", ["sitreg_lung250m_4b", "sitreg_nlst"])
def test_landmark_validation_matches_hand_computed_initial_tre(bundle, tmp_path):
    """``tre_initial`` (no registration) of the bundle's validation equals the mean landmark distance computed
    here from the files (NLST: keypoints used as stored, times 1.5 mm; Lung250M-4B: the -0.5 voxel shift and the
    crop / pad offset cancel in a difference)."""
    writer, extra = TASKS[bundle]
    data = writer(tmp_path / "data")
    root = tmp_path / "bundle"
    _run(bundle, ["train.json"], **TINY, **extra, dataset_dir=str(data), bundle_root=str(root), val_interval=1)
    rows = json.loads((root / "eval/validation/summary.json").read_text())
    assert rows["metrics"]["dice"]["count"] >= 1  # lung-mask Dice next to the TRE
    if bundle == "sitreg_nlst":
        listing = json.loads((data / "NLST/NLST_dataset.json").read_text())["registration_val"]
        names = ["_".join(Path(e["fixed"]).name.split("_")[:2]) for e in listing]
        distances = [
            np.linalg.norm(
                1.5 * (np.loadtxt(data / f"NLST/keypointsTr/{n}_0001.csv", delimiter=",")
                       - np.loadtxt(data / f"NLST/keypointsTr/{n}_0000.csv", delimiter=",")), axis=1
            ).mean()
            for n in names
        ]  # fmt: skip
    else:
        table = torch.load(data / "lms_validation.pth", weights_only=False)
        from monai_ext.data.lung250m import LUNG250M_DIVISIONS

        distances = [
            float((table[str(int(n[-3:]))][:, 3:] - table[str(int(n[-3:]))][:, :3]).norm(dim=1).mean())
            for n in LUNG250M_DIVISIONS["validate"]
        ]
    tre = json.loads((root / "eval/validation/tre.json").read_text())
    assert tre["num_pairs"] == len(distances)
    assert [row["tre_initial"] for row in tre["per_pair"]] == pytest.approx(distances, rel=1e-5)
    assert all(math.isfinite(row["tre"]) and math.isfinite(row["tre_inverse"]) for row in tre["per_pair"])
