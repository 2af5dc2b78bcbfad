"""Registration iterations with MONAI's stock SupervisedTrainer / SupervisedEvaluator, and the metrics handler.

A tiny stand-in network (one conv layer -> DDF, inverse = -DDF) and a simple symmetric MSE loss keep the
tests independent of the SITReg network and the project losses.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointLoader, CheckpointSaver, from_engine
from torch import nn

from monai_ext.data.oasis import oasis_cases, oasis_pairs, oasis_transforms
from monai_ext.data.pairs import PairEpochHandler, RegistrationPairDataset
from monai_ext.data.synthesis import make_synthetic_pair, write_synthetic_oasis
from monai_ext.engines.registration import RegistrationEvalIteration, RegistrationTrainIteration
from monai_ext.metrics.overlap import RegistrationMetrics
from monai_ext.spatial.sampling import warp

SHAPE = (12, 12, 12)


class TinyNet(nn.Module):
    """cat(moving, fixed) (B, 2, *spatial) -> DDF (B, 3, *spatial); forward_and_inverse returns (ddf, -ddf)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward_and_inverse(self, moving, fixed):
        ddf = self(torch.cat([moving, fixed], 1))
        return ddf, -ddf


class SymmetricMSE(nn.Module):
    """MSE of both warped images + 0.01 x squared DDF; returns the terms dict like SymmetricRegistrationLoss."""

    def forward(self, moving, fixed, forward_ddf, inverse_ddf, moving_mask=None, fixed_mask=None):
        similarity = (warp(moving, forward_ddf) - fixed).square().mean() + (
            warp(fixed, inverse_ddf) - moving
        ).square().mean()
        regularization = 0.01 * forward_ddf.square().mean()
        return {"loss": similarity + regularization, "similarity": similarity, "regularization": regularization}


class Oracle(nn.Module):
    """Tensor-in/tensor-out network returning a fixed DDF (no forward_and_inverse: the two-pass route is used)."""

    def __init__(self, ddf: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("ddf", ddf)

    def forward(self, x):
        return self.ddf.expand(x.shape[0], *self.ddf.shape[1:])


@pytest.fixture(scope="module")
def oasis_dir(tmp_path_factory):
    return write_synthetic_oasis(tmp_path_factory.mktemp("oasis"), num_subjects=3, shape=SHAPE, max_displacement=2.5)


def _trainer(dataset, network, max_epochs, handlers=()):
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=DataLoader(dataset, batch_size=2),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=0.01),
        loss_function=SymmetricMSE(),
        iteration_update=RegistrationTrainIteration(),
        train_handlers=[PairEpochHandler(dataset), *handlers],
    )


def test_training_decreases_loss_and_resumes(oasis_dir, tmp_path):
    cases = oasis_cases(oasis_dir, "all")
    dataset = RegistrationPairDataset(cases, transform=oasis_transforms(crop=None))  # 6 ordered pairs per epoch
    network = TinyNet()
    trainer = _trainer(dataset, network, max_epochs=6)
    # checkpoint every epoch with optimizer and engine state, as the bundles configure it
    save_dict = {"network": network, "optimizer": trainer.optimizer, "trainer": trainer}
    CheckpointSaver(str(tmp_path), save_dict, save_interval=1, n_saved=None, epoch_level=True).attach(trainer)
    losses, terms = [], []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(from_engine(["loss"], first=True)(e.state.output))
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: terms.append(sorted(e.state.output[0])))
    trainer.run()
    assert len(losses) == 18 and all(math.isfinite(v) for v in losses)
    per_epoch = np.array(losses).reshape(6, 3).mean(1)  # every epoch sees all 6 ordered pairs
    assert np.all(np.diff(per_epoch) < 0) and per_epoch[-1] < 0.85 * per_epoch[0], per_epoch
    assert {"similarity", "regularization", "forward_ddf", "inverse_ddf", "loss"} <= set(terms[0])
    assert dataset.epoch == 5  # PairEpochHandler: 0-based epoch of the last (6th) epoch

    # resume from the epoch-3 checkpoint: epochs 4..6 run again with the pairs of those epochs
    resumed = TinyNet()
    fresh = RegistrationPairDataset(cases, transform=oasis_transforms(crop=None))
    ckpt = next(tmp_path.glob("*epoch=3.pt"))
    trainer2 = _trainer(fresh, resumed, max_epochs=6)
    CheckpointLoader(str(ckpt), {"network": resumed, "optimizer": trainer2.optimizer, "trainer": trainer2}).attach(
        trainer2
    )
    seen = []
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append((e.state.epoch, fresh.epoch)))
    trainer2.run()
    assert seen == [(4, 3), (5, 4), (6, 5)]


def test_evaluator_metrics_oracle_and_files(tmp_path):
    """An oracle network returning the known DDF of a synthetic pair: Dice 1, HD95 0 in both directions."""
    pair = make_synthetic_pair(SHAPE, seed=3, max_displacement=1.5)
    # forward = true DDF; the two-pass route calls the oracle for (fixed, moving) too, giving the same DDF as
    # "inverse": only the forward-direction numbers are exact, the inverse ones are checked for presence.
    network = Oracle(pair["ddf"][None])
    moving_affine, fixed_affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])), torch.eye(4)
    data = [
        {
            "moving_image": MetaTensor(pair["moving_image"], affine=moving_affine),
            "fixed_image": MetaTensor(pair["fixed_image"], affine=fixed_affine),
            "moving_label": pair["moving_label"],
            "fixed_label": pair["fixed_label"],
            "moving_name": "a",
            "fixed_name": "b",
        }
    ]
    metrics = RegistrationMetrics(output_dir=tmp_path / "eval")
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=1),
        network=network,
        iteration_update=RegistrationEvalIteration(),
        key_val_metric={"val_mean_dice": metrics},
    )
    evaluator.run()
    state = evaluator.state.metrics
    output = evaluator.state.output[0]  # decollated: outputs on the fixed grid carry the fixed affine
    for key, affine in [
        ("forward_ddf", fixed_affine),
        ("moving_image_warped", fixed_affine),
        ("moving_label_warped", fixed_affine),
        ("inverse_ddf", moving_affine),
        ("fixed_image_warped", moving_affine),
        ("fixed_label_warped", moving_affine),
    ]:
        assert torch.equal(output[key].affine, affine.double()), key
    assert state["val_mean_dice"] == pytest.approx(1.0, abs=1e-12)
    assert state["val_hd95"] == pytest.approx(0.0, abs=1e-12)
    assert evaluator.state.best_metric == pytest.approx(1.0)
    assert state["val_folding_fraction"] == 0.0 and math.isfinite(state["val_sdlogj"]) and state["val_ndv"] == 0.0
    assert {"val_dice_inverse", "val_hd95_inverse", "val_ic_mse", "val_ic_max"} <= set(state)
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_pair.csv")))
    assert len(rows) == 1 and rows[0]["moving_name"] == "a" and rows[0]["fixed_name"] == "b"
    labels = sorted(int(v) for v in torch.unique(pair["fixed_label"]) if v != 0)
    assert all(float(rows[0][f"dice_label_{v}"]) == 1.0 for v in labels)
    summary = json.load(open(tmp_path / "eval" / "summary.json"))
    assert summary["num_pairs"] == 1 and summary["metrics"]["dice"]["mean"] == pytest.approx(1.0)
    assert (tmp_path / "eval" / "summary.csv").read_text().startswith("metric,mean,std,count")


def test_metrics_match_hand_computed_dice_and_inverse_consistency(oasis_dir, tmp_path):
    """Identity network on real pairs: per-label Dice = 2|A&B|/(|A|+|B|) computed with numpy; IC error of
    (u, -u) with u = 0 is 0; labels absent from both maps are NaN and ignored in the mean."""
    pairs = oasis_pairs(oasis_dir, "all")
    network = TinyNet()  # zero weights: DDF = 0 in both directions
    labels = [1, 2, 3, 4, 5, 6, 99]  # 99 never occurs
    metrics = RegistrationMetrics(labels=labels, hd95=False, output_dir=tmp_path)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(pairs, transform=oasis_transforms(crop=None)), batch_size=2),
        network=network,
        iteration_update=RegistrationEvalIteration(),
        key_val_metric={"val_mean_dice": metrics},
    )
    evaluator.run()
    transform = oasis_transforms(crop=None)
    expected = []
    for pair in pairs:
        item = transform(pair)
        a, b = item["moving_label"].numpy(), item["fixed_label"].numpy()
        expected.append(
            np.mean([2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in labels[:-1]])
        )
    assert len(metrics.rows) == 3
    for row, value in zip(metrics.rows, expected):
        assert row["dice"] == pytest.approx(value, abs=1e-6)  # MONAI's compute_dice works in float32
        assert row["dice_inverse"] == pytest.approx(value, abs=1e-6)  # Dice is symmetric for u = 0
        assert math.isnan(row["dice_label_99"])
        assert row["ic_mse"] == 0.0 and row["ic_max"] == 0.0
        assert "hd95" not in row and row["folding_fraction"] == 0.0
    assert evaluator.state.metrics["val_mean_dice"] == pytest.approx(np.mean(expected), abs=1e-6)


def test_iteration_errors_name_the_problem():
    engine = type("E", (), {})()
    engine.amp, engine.accumulation_steps = True, 1
    with pytest.raises(ValueError, match="amp"):
        RegistrationTrainIteration()(engine, {"moving_image": torch.zeros(1, 1, 4, 4, 4)})
    with pytest.raises(ValueError, match="labels"):
        RegistrationMetrics(labels=[0, 1])


def test_bundle_style_config_with_project_loss(oasis_dir, tmp_path):
    """The pieces referenced by ``_target_`` from a train.json-like config: SupervisedTrainer with the
    project's SymmetricRegistrationLoss, pair dataset + epoch handler, validation with the metrics as key
    metric (best checkpoint ``model.pt``) and an every-epoch checkpoint holding optimizer and engine state
    (attached in ``run`` to avoid a trainer <-> handler reference cycle)."""
    from monai.bundle import ConfigParser

    transform = {"_target_": "monai_ext.data.oasis.oasis_transforms", "crop": None}
    config = {
        "device": "$torch.device('cpu')",
        "dataset_dir": str(oasis_dir),
        "output_dir": str(tmp_path),
        "network_def": {"_target_": "test_registration_engine.TinyNet"},
        "network": "$@network_def.to(@device)",
        "loss": {
            "_target_": "monai_ext.losses.symmetric.SymmetricRegistrationLoss",
            "similarity": {"_target_": "torch.nn.MSELoss"},
            "regularizers": {"grad": [{"_target_": "monai_ext.losses.regularization.GradientDeformationLoss"}, 0.01]},
        },
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.01},
        "train": {
            "dataset": {
                "_target_": "monai_ext.data.pairs.RegistrationPairDataset",
                "data": {
                    "_target_": "monai_ext.data.oasis.oasis_cases",
                    "dataset_dir": "@dataset_dir",
                    "division": "all",
                },
                "transform": transform,
                "pairs_per_epoch": 4,
            },
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 2},
            "handlers": [
                {"_target_": "monai_ext.data.pairs.PairEpochHandler", "dataset": "@train#dataset"},
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "interval": 1},
                {
                    "_target_": "StatsHandler",
                    "tag_name": "train_loss",
                    "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
                },
            ],
            "trainer": {
                "_target_": "SupervisedTrainer",
                "device": "@device",
                "max_epochs": 2,
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "optimizer": "@optimizer",
                "loss_function": "@loss",
                "iteration_update": {"_target_": "monai_ext.engines.registration.RegistrationTrainIteration"},
                "train_handlers": "@train#handlers",
            },
            "checkpoint": {
                "_target_": "CheckpointSaver",
                "save_dir": "$@output_dir + '/checkpoints'",
                "save_dict": {"network": "@network", "optimizer": "@optimizer", "trainer": "@train#trainer"},
                "save_interval": 1,
                "n_saved": 1,
            },
        },
        "validate": {
            "dataset": {
                "_target_": "Dataset",
                "data": {
                    "_target_": "monai_ext.data.oasis.oasis_pairs",
                    "dataset_dir": "@dataset_dir",
                    "division": "all",
                },
                "transform": transform,
            },
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1},
            "handlers": [
                {
                    "_target_": "CheckpointSaver",
                    "save_dir": "@output_dir",
                    "save_dict": {"model": "@network"},
                    "save_key_metric": True,
                    "key_metric_filename": "model.pt",
                },
            ],
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@validate#dataloader",
                "network": "@network",
                "iteration_update": {"_target_": "monai_ext.engines.registration.RegistrationEvalIteration"},
                "key_val_metric": {
                    "val_mean_dice": {
                        "_target_": "monai_ext.metrics.overlap.RegistrationMetrics",
                        "output_dir": "$@output_dir + '/metrics'",
                    }
                },
                "val_handlers": "@validate#handlers",
            },
        },
        "run": ["$@train#checkpoint.attach(@train#trainer)", "$@train#trainer.run()"],
    }
    parser = ConfigParser(config)
    parser.get_parsed_content("run")
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert trainer.state.epoch == 2 and math.isfinite(float(trainer.state.output[0]["loss"]))
    assert "forward_similarity" in trainer.state.output[0]
    assert 0 < evaluator.state.metrics["val_mean_dice"] <= 1 and evaluator.state.best_metric_epoch in (1, 2)
    assert (tmp_path / "model.pt").is_file()
    checkpoint = torch.load(next((tmp_path / "checkpoints").glob("*.pt")), weights_only=False)
    assert {"network", "optimizer", "trainer"} <= set(checkpoint) and checkpoint["trainer"][
        "iteration"
    ] == 4  # 2 epochs x 2 batches
    rows = list(csv.DictReader(open(tmp_path / "metrics" / "per_pair.csv")))
    assert len(rows) == 3 and rows[0]["moving_name"] == "OASIS_OAS1_0001_MR1"
