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

from monai_ext.data.lpba40 import LPBA40_DIVISIONS
from monai_ext.data.lung250m import LUNG250M_DIVISIONS
from monai_ext.metrics.landmarks import LandmarkTRE

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"

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
    "sitreg_lpba40": (write_lpba40, {"crop": [[1, 1], [1, 1], [0, 1]]}),
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


# fewer evaluation cases than the real splits keep the test short (the dataset modules read these tables)
SMALL_SPLITS = {
    "sitreg_lpba40": (LPBA40_DIVISIONS, {"validate": ["S14", "S16"], "test": ["S11", "S12"]}),
    "sitreg_lung250m_4b": (LUNG250M_DIVISIONS, {"validate": ["case_054", "case_055"], "test": ["case_104"]}),
}


@pytest.mark.parametrize("bundle", list(TASKS))
def test_train_evaluate_infer(bundle, tmp_path, monkeypatch):
    writer, extra = TASKS[bundle]
    if bundle in SMALL_SPLITS:
        table, splits = SMALL_SPLITS[bundle]
        for division, names in splits.items():
            monkeypatch.setitem(table, division, names)
    root = tmp_path / "bundle"
    override = {**TINY, **extra, "dataset_dir": str(writer(tmp_path / "data")), "bundle_root": str(root)}
    train_only = {k: v for k, v in override.items() if k not in ("division",)}

    _run(bundle, ["train.json"], **train_only)
    checkpoint = torch.load(root / "models/epochs/checkpoint_epoch=1.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == checkpoint["trainer"]["epoch_length"] >= 1  # one epoch
    assert (root / "models/model.pt").is_file()  # the best validation model
    validation = _summary(root / "eval/validation/summary.json")
    assert validation["folding_fraction"]["count"] >= 1 and math.isfinite(validation["ic_max"]["mean"])
    if bundle in ("sitreg_lung250m_4b", "sitreg_nlst"):
        _check_landmark_validation(bundle, Path(override["dataset_dir"]), root)

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


def _hand_initial_tre(bundle: str, data: Path) -> list[float]:
    """Per validation pair, the mean landmark distance before registration computed from the files: NLST
    keypoints as stored, times 1.5 mm; Lung250M-4B voxels (the -0.5 shift and the crop / pad offset cancel)."""
    if bundle == "sitreg_nlst":
        listing = json.loads((data / "NLST/NLST_dataset.json").read_text())["registration_val"]
        names = ["_".join(Path(e["fixed"]).name.split("_")[:2]) for e in listing]
        points = [[np.loadtxt(data / f"NLST/keypointsTr/{n}_000{i}.csv", delimiter=",") for i in (0, 1)] for n in names]
        return [float(np.linalg.norm(1.5 * (b - a), axis=1).mean()) for a, b in points]
    table = torch.load(data / "lms_validation.pth", weights_only=False)
    rows = [table[str(int(n[-3:]))].numpy() for n in LUNG250M_DIVISIONS["validate"]]
    return [float(np.linalg.norm(r[:, 3:] - r[:, :3], axis=1).mean()) for r in rows]


def _check_landmark_validation(bundle: str, data: Path, root: Path) -> None:
    """The bundle's TRE validation: ``tre_initial`` per pair equals the hand computation, TREs are finite,
    and the lung-mask Dice is reported next to it."""
    expected = _hand_initial_tre(bundle, data)
    tre = json.loads((root / "eval/validation/tre.json").read_text())
    assert tre["num_pairs"] == len(expected)
    assert [row["tre_initial"] for row in tre["per_pair"]] == pytest.approx(expected, rel=1e-5)
    assert all(math.isfinite(row["tre"]) and math.isfinite(row["tre_inverse"]) for row in tre["per_pair"])
    assert _summary(root / "eval/validation/summary.json")["dice"]["count"] == len(expected)


def test_landmark_tre_hand_derived_with_downsampling():
    """A constant coarse DDF ``c`` on a 2x-pooled grid moves every full-resolution point by ``2 c``.

    Fixed landmarks ``q``, moving ``p = q + 2 c`` -> forward TRE 0; the inverse DDF ``-c`` maps ``p`` back to
    ``q`` -> 0; the initial TRE is ``|2 c| * spacing``. A landmark outside the full-resolution grid (4 x 4 x 4)
    is dropped."""
    c = torch.tensor([0.25, -0.5, 0.125], dtype=torch.float64)
    forward = c.view(3, 1, 1, 1).expand(3, 2, 2, 2)
    q = torch.tensor([[1.0, 1.5, 2.0], [2.5, 2.0, 0.5], [2.0, 2.0, 1.0]], dtype=torch.float64)
    p = q + 2 * c
    outside = torch.tensor([[5.0, 1.0, 1.0]], dtype=torch.float64)
    metric = LandmarkTRE(downsample=2, spacing=[1.5, 1.5, 1.5])
    output = {"forward_ddf": forward[None], "inverse_ddf": -forward[None]}
    batch = {"moving_landmarks": torch.cat([p, outside])[None], "fixed_landmarks": torch.cat([q, outside])[None]}
    metric.update((output, batch))
    (row,) = metric.rows
    assert row["num_landmarks"] == 3  # the last one is dropped
    assert row["tre"] == pytest.approx(0.0, abs=1e-12) and row["tre_inverse"] == pytest.approx(0.0, abs=1e-12)
    assert row["tre_initial"] == pytest.approx(1.5 * 2 * float(c.norm()), rel=1e-12)
    # without a displacement the forward TRE is the initial one
    metric.update(({"forward_ddf": torch.zeros(1, 3, 2, 2, 2, dtype=torch.float64)}, batch))
    assert metric.rows[1]["tre"] == pytest.approx(metric.rows[1]["tre_initial"], rel=1e-12)
    assert math.isnan(metric.rows[1]["tre_inverse"])
    assert metric.compute() == pytest.approx(row["tre_initial"] / 2, rel=1e-12)
    with pytest.raises(ValueError, match="moving_landmarks"):
        metric.update((output, {"moving_landmarks": q[None, :, :2], "fixed_landmarks": q[None, :, :2]}))
    with pytest.raises(ValueError, match="downsample"):
        LandmarkTRE(downsample=0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_lumir_group_consistency_finetune_three_gloo_processes(tmp_path):
    """Pre-train 1 epoch (single process), then fine-tune 1 epoch under torchrun with 3 gloo processes.

    The fine-tune starts from the pre-training's newest epoch checkpoint (network only: the optimizer is new,
    ``load_optimizer_state`` false) at epoch ``finetune_start_epoch`` = 1 and writes its own checkpoints; after
    2 Adam steps of lr 1e-4 every weight is within 2e-4 + tolerance of the pre-trained one (Adam's step is at
    most ~lr per parameter), and the saved optimizer has the configured lr."""
    data = write_lumir(tmp_path / "data", train=4)
    root = tmp_path / "bundle"
    common = {**TINY, "dataset_dir": str(data), "bundle_root": str(root)}
    _run("sitreg_lumir", ["train.json"], **common, batch_size=2)
    pretrained = torch.load(root / "models/epochs/checkpoint_epoch=1.pt", weights_only=True)["network"]

    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({
        **common, "finetune_start_epoch": 1, "max_epochs": 2, "triplets_per_epoch": 2,
        "consistency_schedule": [0.0, 0.0, 3.0],
    }))  # fmt: skip
    configs = [str(BUNDLES / "sitreg_lumir/configs" / c) for c in
               ("train.json", "multi_gpu_train.json", "finetune_group_consistency.json")] + [str(overrides)]  # fmt: skip
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", f"--master_port={_free_port()}",
        "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
        "--logging_file", str(BUNDLES / "sitreg_lumir/configs/logging.conf"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    checkpoint = torch.load(root / "models/group_consistency/checkpoint_epoch=2.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 2 * 2  # resumed at epoch 1 of 2 steps, then one epoch
    assert [g["lr"] for g in checkpoint["optimizer"]["param_groups"]] == [1e-4]
    differences = [float((checkpoint["network"][k] - v).abs().max()) for k, v in pretrained.items()]
    assert 0 < max(differences) < 2e-4 * 1.05
