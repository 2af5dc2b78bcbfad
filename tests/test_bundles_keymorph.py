"""The KeyMorph bundles end to end on tiny generated data: pretrain, train (+ resume), evaluate, inference.

Networks are shrunk through config overrides (truncated U-Net with 3 levels, 8 keypoints; 32^3 images), and the
inference runs load the reference fixture checkpoints (``conv_backbone_ckpt.pth.tar``,
``truncatedunet_backbone_ckpt.pth.tar``, K = 16) through the bundles' ``checkpoint`` option.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import fixture_path
from monai.bundle import run

from monai_ext.io.itk_fields import read_itk_affine

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {name: REPO / "bundles" / name for name in ("keymorph_foundation", "keymorph_ixi_half")}
SHAPE = (32, 32, 32)


def _blob_image(rng: np.random.Generator, shape=SHAPE) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    centre = np.array(shape) / 2 + rng.uniform(-3, 3, 3)
    image = np.exp(-(((grid - centre) / np.array([7.0, 9.0, 8.0])) ** 2).sum(-1))
    for _ in range(3):  # a few off-centre blobs: asymmetric structure
        c = rng.uniform(6, np.array(shape) - 6)
        image += 0.5 * np.exp(-((grid - c) ** 2).sum(-1) / 10.0)
    return (image + 0.05 * rng.random(shape)).astype(np.float32)


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def ixi(tmp_path_factory) -> Path:
    """IXI layout: T1 and T2 of 3 subjects, with masks and label maps (labels 0..2)."""
    root = tmp_path_factory.mktemp("ixi")
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for i in range(3):
        for mod in ("T1", "T2"):
            name = f"IXI{i:03d}-Site-{mod}"
            image = _blob_image(rng)
            image = image if mod == "T1" else image.max() - image  # a different contrast
            _save(root / mod / f"{name}.nii.gz", image, affine)
            label = (image > np.quantile(image, 0.7)).astype(np.int16) + (image > np.quantile(image, 0.9))
            _save(root / f"{mod}_seg" / f"{name}_seg.nii.gz", label, affine)
            _save(root / f"{mod}_mask" / f"{name}_mask.nii.gz", (label > 0).astype(np.int16), affine)
    return root


@pytest.fixture(scope="module")
def pair_folders(tmp_path_factory) -> Path:
    """moving/fixed folders paired by name (different native grids and orientations) with label maps."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(1)
    moving_affine = np.array([[0, -1.1, 0, 20], [1.0, 0, 0, -15], [0, 0, 0.9, -10], [0, 0, 0, 1]])
    fixed_affine = np.diag([1.0, 1.05, 1.0, 1.0])
    for name in ("s1", "s2"):
        for side, affine, shape in (("moving", moving_affine, (30, 34, 32)), ("fixed", fixed_affine, SHAPE)):
            image = _blob_image(rng, shape)
            _save(root / side / f"{name}.nii.gz", image, affine)
            label = (image > np.quantile(image, 0.6)).astype(np.int16) + (image > np.quantile(image, 0.85))
            _save(root / f"{side}_seg" / f"{name}.nii.gz", label, affine)
    return root


def _run(bundle: str, configs: list[str], **overrides) -> None:
    folder = BUNDLES[bundle]
    run(
        config_file=[str(folder / "configs" / c) for c in configs],
        meta_file=str(folder / "configs" / "metadata.json"),
        logging_file=str(folder / "configs" / "logging.conf"),
        bundle_root=str(folder),
        **overrides,
    )


def _tiny(bundle: str, tmp: Path, data: Path | None = None) -> dict:
    """Overrides shrinking a bundle to 32^3 / 8 keypoints on the CPU with outputs under ``tmp``."""
    out = {
        "device": "$torch.device('cpu')",
        "ckpt_dir": str(tmp / "models"),
        "output_dir": str(tmp / "eval"),
        "spatial_size": list(SHAPE),
        "pixdim": [1.0, 1.0, 1.0],
        "chunk_size": 4096,
    }
    if bundle == "keymorph_foundation":
        out["backbone#num_levels"] = 3
    if data is not None:
        out.update(
            {
                "data_path": str(data),
                "modalities": ["T1", "T2"],
                "num_keypoints": 8,
                "max_train_keypoints": 6,
                "pairs_per_epoch": 2,
                "val_pairs": 1,
                "val_split": "all",  # 3 subjects: the IXI test split [428, 528) is empty
                "num_workers": 0,
                "max_params": [0.05, 0.05, 0.3, 0.02],
            }
        )
    return out


def test_check_bundles_pass():
    sys.path.insert(0, str(REPO / "scripts"))
    from check_bundles import CHECKS, check_bundle

    for folder in BUNDLES.values():
        result = check_bundle(folder)
        assert all(result[c] == "ok" for c in CHECKS), result


def test_foundation_pretrain_train_resume_evaluate(ixi, tmp_path):
    tiny = _tiny("keymorph_foundation", tmp_path, ixi)
    _run("keymorph_foundation", ["train.json", "pretrain.json"], **tiny, max_epochs=1)
    (pretrained,) = (tmp_path / "models" / "pretrain").glob("*epoch=1.pt")
    saved = torch.load(pretrained, weights_only=True)
    assert bool(saved["reference"]["initialized"]) and saved["reference"]["points"].shape == (8, 3)
    assert saved["reference"]["points"].abs().max() <= 1
    # unsupervised (MSE) training initialised from the pretraining checkpoint, with validation (Dice on labels)
    _run("keymorph_foundation", ["train.json"], **tiny, max_epochs=1, pretrained=str(pretrained))
    epochs = tmp_path / "models" / "epochs"
    assert [p.name for p in epochs.glob("*.pt")] == ["checkpoint_epoch=1.pt"]
    assert (tmp_path / "models" / "model.pt").is_file()
    summary = json.loads((tmp_path / "eval" / "validation" / "summary.json").read_text())
    assert summary["num_pairs"] == 1 and 0 <= summary["metrics"]["dice"]["mean"] <= 1
    # resume: a second run with max_epochs=2 continues at epoch 2 (one more checkpoint, not a restart)
    _run("keymorph_foundation", ["train.json"], **tiny, max_epochs=2, val_interval=10)  # no validation: speed
    assert sorted(p.name for p in epochs.glob("*.pt")) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]
    resumed = torch.load(epochs / "checkpoint_epoch=2.pt", weights_only=True)
    assert resumed["trainer"]["iteration"] == 4  # 2 epochs of 2 pairs: continued, not restarted
    # evaluation of the best model on the evaluation split (with HD95); supervised training: the ixi_half test
    _run("keymorph_foundation", ["train.json", "evaluate.json"], **tiny)
    test = json.loads((tmp_path / "eval" / "test" / "summary.json").read_text())
    assert test["num_pairs"] == 1 and "hd95" in test["metrics"]


def test_ixi_half_train_mixed_modalities_consistency(ixi, tmp_path):
    tiny = _tiny("keymorph_ixi_half", tmp_path, ixi)
    _run(
        "keymorph_ixi_half",
        ["train.json"],
        **tiny,
        max_epochs=1,
        mix_modalities=True,
        supervised=True,
        consistency_weight=10.0,
        swap_hw=True,
        train_alignment="affine",
        val_interval=10,  # validation runs in the foundation test
    )
    assert (tmp_path / "models" / "epochs" / "checkpoint_epoch=1.pt").is_file()


def _read_csv(path: Path) -> np.ndarray:
    with path.open() as stream:
        rows = list(csv.DictReader(stream))
    return np.array([[float(r[k]) for k in ("x_ras", "y_ras", "z_ras", "i", "j", "k")] for r in rows])


def _check_pair_outputs(pair: Path, alignments: list[str], moving_file: Path, fixed_file: Path, k: int) -> None:
    points = {side: _read_csv(pair / f"keypoints_{side}.csv") for side in ("moving", "fixed")}
    for side, path in (("moving", moving_file), ("fixed", fixed_file)):
        affine = nib.load(str(path)).affine
        world, voxel = points[side][:, :3], points[side][:, 3:]
        assert world.shape == (k, 3)
        # the voxel columns are file voxels of that image: affine @ voxel == world
        np.testing.assert_allclose(voxel @ affine[:3, :3].T + affine[:3, 3], world, atol=1e-4)
    for alignment in alignments:
        folder = pair / alignment
        for name in ("warped_image", "warped_label", "forward_ddf", "inverse_ddf", "forward_field_itk", "jacobian"):
            assert (folder / f"{name}.nii.gz").is_file(), (folder, name)
        fixed = nib.load(str(fixed_file))
        warped = nib.load(str(folder / "warped_image.nii.gz"))
        assert warped.shape == fixed.shape and np.allclose(warped.affine, fixed.affine, atol=1e-4)
        metrics = json.loads((folder / "metrics.json").read_text())
        for key in ("mse", "dice", "hd95", "folding_fraction", "dice_before"):
            assert key in metrics, key
        assert metrics["alignment"] == alignment and metrics["mse"] >= 0
        assert (folder / "qa.png").stat().st_size > 0 and (folder / "keypoints_qa.png").stat().st_size > 0
        aligned = _read_csv(folder / "keypoints_aligned.csv")
        if alignment in ("affine", "rigid"):
            assert len(itk.transformread(str(folder / "transform_itk.tfm"))) == 1
            world = read_itk_affine(folder / "transform_itk.tfm").numpy()
            # the ITK transform maps fixed world points to moving world points: the aligned moving keypoints
            # (moving keypoints mapped into the fixed image by the inverse matrix) go back onto the moving keypoints
            mapped = aligned[:, :3] @ world[:3, :3].T + world[:3, 3]
            np.testing.assert_allclose(mapped, points["moving"][:, :3], atol=1e-3)
            if alignment == "rigid":
                linear = world[:3, :3]
                np.testing.assert_allclose(linear @ linear.T, np.eye(3), atol=1e-4)
        else:
            assert not (folder / "transform_itk.tfm").exists()
            # tps_0 interpolates: the aligned moving keypoints are the fixed keypoints
            np.testing.assert_allclose(aligned[:, :3], points["fixed"][:, :3], atol=2e-2)


def test_ixi_half_inference_pairwise_fixture_checkpoint(pair_folders, tmp_path):
    tiny = _tiny("keymorph_ixi_half", tmp_path)
    out = tmp_path / "out"
    tiny["output_dir"] = str(out)
    _run(
        "keymorph_ixi_half",
        ["inference.json"],
        **tiny,
        num_keypoints=16,
        checkpoint=str(fixture_path("keymorph", "conv_backbone_ckpt.pth.tar")),
        moving=str(pair_folders / "moving" / "s1.nii.gz"),  # folder pairing: test_keymorph_data.py::test_paired_files
        fixed=str(pair_folders / "fixed" / "s1.nii.gz"),
        moving_label=str(pair_folders / "moving_seg" / "s1.nii.gz"),
        fixed_label=str(pair_folders / "fixed_seg" / "s1.nii.gz"),
        alignments=["rigid", "tps_0"],
        qa_png=True,
        instance_optimization_steps=2,  # the detector is tuned on the pair first (KeyMorphPairLoss on "rigid")
    )
    assert sorted(p.name for p in out.iterdir()) == ["s1__s1"]
    for name in ("s1",):
        _check_pair_outputs(
            out / f"{name}__{name}", ["rigid", "tps_0"],
            pair_folders / "moving" / f"{name}.nii.gz", pair_folders / "fixed" / f"{name}.nii.gz", 16,
        )


def test_foundation_inference_groupwise_and_pairwise(pair_folders, tmp_path):
    tiny = _tiny("keymorph_foundation", tmp_path)
    checkpoint = str(fixture_path("keymorph", "truncatedunet_backbone_ckpt.pth.tar"))
    out = tmp_path / "out"
    common = {**tiny, "num_keypoints": 16, "checkpoint": checkpoint, "output_dir": str(out), "weighted": False}
    _run(
        "keymorph_foundation", ["inference.json", "groupwise.json"], **common,
        moving=str(pair_folders / "fixed"), moving_label=str(pair_folders / "fixed_seg"), alignments=["rigid", "tps_0"],
    )
    group = out / "groupwise"
    for alignment in ("rigid", "tps_0"):
        for name in ("s1", "s2"):
            warped = nib.load(str(group / alignment / f"{name}_warped.nii.gz"))
            assert warped.shape == SHAPE
            assert (group / alignment / f"{name}_warped_label.nii.gz").is_file()
            assert _read_csv(group / alignment / f"{name}_keypoints.csv").shape == (16, 6)
        metrics = json.loads((group / alignment / "metrics.json").read_text())
        assert metrics["num_images"] == 2 and 0 <= metrics["dice"] <= 1
    assert (group / "rigid" / "s1_transform_itk.tfm").is_file()
    assert not (group / "tps_0" / "s1_transform_itk.tfm").exists()  # no matrix for TPS
    # one pairwise file pair through the same bundle
    _run(
        "keymorph_foundation", ["inference.json"], **common,
        moving=str(pair_folders / "moving" / "s1.nii.gz"), fixed=str(pair_folders / "fixed" / "s2.nii.gz"),
        alignments=["affine"], outputs=["metrics", "transform_itk", "keypoints"],
    )
    pair = out / "s1__s2"
    assert sorted(p.name for p in pair.iterdir()) == ["affine", "keypoints_fixed.csv", "keypoints_moving.csv"]
    expected = ["keypoints_aligned.csv", "metrics.json", "transform_itk.tfm"]
    assert sorted(p.name for p in (pair / "affine").iterdir()) == expected


@pytest.mark.parametrize("bad", ["2d", "empty"])
def test_inference_bad_input_clear_error_no_outputs(pair_folders, tmp_path, bad):
    fixed = pair_folders / "fixed" / "s1.nii.gz"
    if bad == "2d":
        moving = _save(tmp_path / "bad.nii.gz", np.random.default_rng(0).random((32, 32)).astype(np.float32), np.eye(4))
        match = "3-D"
    else:
        moving = _save(tmp_path / "bad.nii.gz", np.zeros(SHAPE, np.float32), np.eye(4))
        match = "constant"
    out = tmp_path / "out"
    tiny = {**_tiny("keymorph_ixi_half", tmp_path), "output_dir": str(out)}
    with pytest.raises(Exception) as info:
        _run(
            "keymorph_ixi_half", ["inference.json"], **tiny, num_keypoints=16,
            checkpoint=str(fixture_path("keymorph", "conv_backbone_ckpt.pth.tar")),
            moving=str(moving),
            fixed=str(fixed),
        )
    error = info.value
    while error.__cause__ is not None:  # the bundle parser wraps the ValueError of the input check
        error = error.__cause__
    assert isinstance(error, ValueError) and match in str(error) and "bad.nii.gz" in str(error)
    assert not out.exists() or not any(out.iterdir())
