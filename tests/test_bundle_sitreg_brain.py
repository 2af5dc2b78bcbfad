"""The SITReg brain bundle: label-driven training step, train.json (tiny, resumable), shipped weights, demo."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from ignite.engine import Events
from conftest import run_brain_training
from monai.bundle import ConfigParser
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.losses import DiceLoss

from monai_ext.data.synthbrain import BRAIN_LABELS, SynthBrainPairDataset
from monai_ext.demo import DEMO_DATA
from monai_ext.engines.registration import LabelRegistrationTrainIteration, pooled_onehot
from monai_ext.losses.regularization import GradientDeformationLoss
from monai_ext.losses.symmetric import SymmetricRegistrationLoss
from monai_ext.networks.sitreg import SITReg

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sitreg_brain"
MAPS = sorted(DEMO_DATA.glob("training_seg_*_2mm.nii.gz"))
NUM_CLASSES = len(BRAIN_LABELS) + 1


def test_pooled_onehot_equals_pooling_the_full_onehot():
    label = torch.randint(0, 5, (2, 1, 9, 6, 7))
    onehot = torch.nn.functional.one_hot(label[:, 0], 5).movedim(-1, 1).float()
    expected = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(onehot, (0, 1, 0, 0, 0, 1)), 2)
    assert torch.equal(pooled_onehot(label, 5, (5, 3, 4)), expected)
    assert torch.equal(pooled_onehot(label, 5, (9, 6, 7)), onehot)
    assert torch.allclose(pooled_onehot(label, 5, (3, 2, 2)).sum(1)[:, :-1, :-1, :-1], torch.ones(2, 2, 1, 1))
    with pytest.raises(ValueError, match="not a ceil-halving"):
        pooled_onehot(label, 5, (4, 3, 4))


def _small_network() -> SITReg:
    return SITReg(
        3,
        features=(4, 8, 8, 8),
        feature_convolutions=(1, 1, 1, 1),
        deformation_features=(None, 8, 8, 8),
        deformation_convolutions=(None, 1, 1, 1),
        transformation_downsampling_factor=2,
    )


def test_label_driven_training_lowers_the_dice_loss_of_a_pair():
    torch.manual_seed(0)
    dataset = SynthBrainPairDataset([str(m) for m in MAPS], shape=(32, 40, 32), spacing=5.0, pairs_per_epoch=1, seed=3)
    network = _small_network()
    loss = SymmetricRegistrationLoss(DiceLoss(include_background=False), {"grad": (GradientDeformationLoss(), 0.1)})
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=25,
        train_data_loader=DataLoader([dataset[0]], batch_size=1),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 3e-3),
        loss_function=loss,
        iteration_update=LabelRegistrationTrainIteration(NUM_CLASSES),
    )
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(float(engine.state.output[0]["loss"])))
    trainer.run()
    assert trainer.state.output[0]["forward_ddf"].shape == (3, 16, 20, 16)  # the transformation grid
    assert losses[-1] < losses[0] - 0.03, losses


def test_label_iteration_rejects_bad_labels():
    network = _small_network()
    iteration = LabelRegistrationTrainIteration(NUM_CLASSES)

    class Engine:
        pass

    engine = Engine()
    engine.network, engine.optim_set_to_none, engine.non_blocking = network, True, False
    engine.optimizer = torch.optim.Adam(network.parameters())
    engine.loss_function = SymmetricRegistrationLoss(DiceLoss(include_background=False))
    engine.state = Engine()
    engine.state.device = torch.device("cpu")
    engine.fire_event = lambda event: None
    image = torch.rand(1, 1, 16, 16, 16)
    batch = {"moving_image": image, "fixed_image": image, "moving_label": torch.full((1, 1, 16, 16, 16), 40)}
    batch["fixed_label"] = batch["moving_label"]
    with pytest.raises(ValueError, match="values must lie in 0..31"):
        iteration(engine, batch)
    batch["moving_label"] = torch.zeros((1, 1, 16, 16, 16), dtype=torch.int64)
    del batch["fixed_label"]
    with pytest.raises(ValueError, match="label map 'fixed_label'"):
        iteration(engine, batch)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        LabelRegistrationTrainIteration(1)
    with pytest.raises(ValueError, match="saturation_weight must be >= 0"):
        LabelRegistrationTrainIteration(NUM_CLASSES, saturation_weight=-1)


def test_saturation_penalty_is_the_mean_squared_pre_tanh_of_every_block():
    torch.manual_seed(1)
    network = _small_network()
    dataset = SynthBrainPairDataset([str(m) for m in MAPS], shape=(32, 40, 32), spacing=5.0, pairs_per_epoch=1)
    batch = {key: value[None] for key, value in dataset[0].items()}
    captured = []
    for block in network.deformation_blocks.values():
        block.register_forward_hook(lambda module, inputs, output: captured.extend(o.detach() for o in output))
    weight = 0.5

    class Engine:
        pass

    engine = Engine()
    engine.network, engine.optim_set_to_none, engine.non_blocking = network, True, False
    engine.optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    engine.loss_function = SymmetricRegistrationLoss(DiceLoss(include_background=False))
    engine.state = Engine()
    engine.state.device = torch.device("cpu")
    engine.fire_event = lambda event: None
    output = LabelRegistrationTrainIteration(NUM_CLASSES, saturation_weight=weight)(engine, batch)
    assert len(captured) == 2 * len(network.deformation_blocks)  # both directions of every level
    expected = torch.stack([c.square().mean() for c in captured]).mean()
    assert torch.allclose(output["saturation"], expected)
    dice = 0.5 * (output["forward_similarity"] + output["inverse_similarity"])
    assert torch.allclose(output["loss"], dice + weight * expected)
    # the hooks are removed after the step: a plain forward adds nothing
    count = len(captured)
    with torch.no_grad():
        network.forward_and_inverse(batch["moving_image"], batch["fixed_image"])
    assert len(captured) == 2 * count


def _train(bundle_root: Path, label_folder: Path, max_epochs: int) -> ConfigParser:
    small = {
        "shape": [24, 32, 24],
        "spacing": 6.0,
        "max_epochs": max_epochs,
        "network_def#features": [4, 8, 8, 8, 8],
        "network_def#deformation_features": [None, 8, 8, 8, 8],
    }
    return run_brain_training([BUNDLE / "configs" / "train.json"], bundle_root, label_folder, small)


def test_train_config_trains_validates_and_resumes(tmp_path, label_folder):
    parser = _train(tmp_path, label_folder, max_epochs=1)
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and trainer.state.iteration == 2
    summary = json.loads((tmp_path / "eval" / "validation" / "summary.json").read_text())
    assert summary["metrics"]["dice"]["count"] == 4  # 09 <-> 10 in both directions, T1-like and random contrast
    assert (tmp_path / "models" / "model.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "models" / "epochs").iterdir()) == ["checkpoint_epoch=1.pt"]
    resumed = _train(tmp_path, label_folder, max_epochs=2).get_parsed_content("train#trainer")
    assert resumed.state.epoch == 2 and resumed.state.iteration == 4  # continued, not restarted


def test_shipped_weights_match_their_hash_and_the_network():
    entries = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    entry = next(e for e in entries if e["path"] == "models/model.pt")
    weights = BUNDLE / "models" / "model.pt"
    assert entry["hash_type"] == "sha256" and entry["url"] == ""  # shipped in the bundle, checked by hash
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == entry["hash_val"]
    assert weights.stat().st_size < 20_000_000
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert 0.4 < meta["eval_metrics"]["mean_dice"] < 1


def test_mixed_precision_is_off_by_default_and_close_to_float32_with_the_shipped_weights():
    """``mixed_precision`` (the CLI's ``--mixed_precision``) reaches the network; off by default. With the shipped
    weights on a smooth random pair, bfloat16 convolutions move the fields by well under a voxel."""
    fields = {}
    for mixed in (False, True):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "inference.json"))
        if mixed:
            parser["mixed_precision"] = True
        network = parser.get_parsed_content("network_def")
        assert network.mixed_precision is mixed
        network.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", weights_only=True))
        generator = torch.Generator().manual_seed(0)
        smooth = torch.nn.functional.avg_pool3d(torch.rand(2, 1, 48, 56, 48, generator=generator), 7, 1, 3)
        with torch.no_grad():
            fields[mixed] = network.eval().forward_and_inverse(smooth[:1], smooth[1:])
    for f32, bf16 in zip(fields[False], fields[True]):
        assert float((f32 - bf16).abs().max()) < 0.5
        assert not torch.equal(f32, bf16)  # the flag changed the arithmetic
