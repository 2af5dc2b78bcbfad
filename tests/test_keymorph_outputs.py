"""KeyMorph inference outputs: keypoint coordinates, world-space transforms, input checks, weight loading."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import fixture_path
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator

from monai_ext.data.keymorph import keymorph_transforms
from monai_ext.io.itk_fields import read_itk_affine
from monai_ext.checkpoints import load_keymorph_checkpoint, load_keymorph_weights
from monai_ext.engines.keymorph import KeyMorphInferenceIteration
from monai_ext.io.keymorph_outputs import KeyMorphWriter, check_input_images
from monai_ext.networks.keymorph import KeyMorph, normalized_to_voxels
from monai_ext.networks.keypoints import ConvKeypointNet


def test_normalized_to_voxels_conventions():
    """align_corners=True: -1 -> 0, 1 -> N - 1; False: -1 -> -0.5, 1 -> N - 0.5 (voxel edges), by definition."""
    points = torch.tensor([[-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]])
    shape = (5, 9, 11)
    torch.testing.assert_close(normalized_to_voxels(points, shape), torch.tensor([[0.0, 4.0, 10.0], [4.0, 0.0, 5.0]]))
    torch.testing.assert_close(
        normalized_to_voxels(points, shape, align_corners=False), torch.tensor([[-0.5, 4.0, 10.5], [4.5, -0.5, 5.0]])
    )


def _image(shape=(32, 32, 32)) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    image = np.exp(-(((grid - [14, 17, 15]) / [6.0, 8.0, 7.0]) ** 2).sum(-1))
    image += 0.6 * np.exp(-((grid - [22, 10, 20]) ** 2).sum(-1) / 12.0)
    return image.astype(np.float32)


def _read(path) -> np.ndarray:
    with open(path) as stream:
        rows = list(csv.DictReader(stream))
    return np.array([[float(r[k]) for k in ("x_ras", "y_ras", "z_ras", "i", "j", "k")] for r in rows])


def test_translated_copy_gives_world_translation(tmp_path):
    """The same voxels saved with two origins: identical model-space keypoints, so every alignment is the identity in
    model voxels and the world transform (fixed -> moving points) is the pure translation between the origins."""
    shift = np.array([7.0, -3.0, 5.0])
    fixed_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    moving_affine = fixed_affine.copy()
    moving_affine[:3, 3] = shift
    image, label = _image(), (_image() > 0.4).astype(np.int16)
    paths = {}
    for side, affine in (("moving", moving_affine), ("fixed", fixed_affine)):
        paths[f"{side}_image"] = str(tmp_path / f"{side}.nii.gz")
        paths[f"{side}_label"] = str(tmp_path / f"{side}_seg.nii.gz")
        nib.save(nib.Nifti1Image(image, affine), paths[f"{side}_image"])
        nib.save(nib.Nifti1Image(label, affine), paths[f"{side}_label"])
    pairs = check_input_images([paths])
    network = load_keymorph_weights(
        KeyMorph(ConvKeypointNet(num_keypoints=16)), fixture_path("keymorph", "conv_backbone_ckpt.pth.tar")
    )
    transform = keymorph_transforms(["moving_image", "fixed_image"], ["moving_label", "fixed_label"], spatial_size=None)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(pairs, transform), batch_size=1),
        network=network,
        iteration_update=KeyMorphInferenceIteration(["affine", "rigid", "tps_0"]),
    )
    outputs = ["metrics", "transform_itk", "keypoints", "warped_image"]
    KeyMorphWriter(tmp_path / "out", outputs=outputs).attach(evaluator)
    evaluator.run()
    pair = tmp_path / "out" / "moving__fixed"
    moving_points, fixed_points = _read(pair / "keypoints_moving.csv"), _read(pair / "keypoints_fixed.csv")
    # same file voxels, world coordinates shifted by the origin difference (1e-4 mm: float32 keypoints)
    np.testing.assert_allclose(moving_points[:, 3:], fixed_points[:, 3:], atol=1e-4)
    np.testing.assert_allclose(moving_points[:, :3] - fixed_points[:, :3], np.tile(shift, (16, 1)), atol=1e-4)
    expected = np.eye(4)
    expected[:3, 3] = shift
    for alignment in ("affine", "rigid"):
        world = read_itk_affine(pair / alignment / "transform_itk.tfm").numpy()
        np.testing.assert_allclose(world, expected, atol=1e-3)
    for alignment in ("affine", "rigid", "tps_0"):
        metrics = json.loads((pair / alignment / "metrics.json").read_text())
        assert metrics["mse"] < 1e-8 and metrics["dice"] == pytest.approx(1.0)
        assert metrics["folding_fraction"] == 0.0
        # identity in model space: the warped image equals the fixed image on the fixed grid (trilinear, exact)
        warped = nib.load(str(pair / alignment / "warped_image.nii.gz")).get_fdata()
        np.testing.assert_allclose(warped, image, atol=1e-4)
        aligned = _read(pair / alignment / "keypoints_aligned.csv")
        np.testing.assert_allclose(aligned[:, :3], fixed_points[:, :3], atol=1e-3)


def test_check_input_images_errors(tmp_path):
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(_image(), np.eye(4)), str(good))
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 3.0, np.float32), np.eye(4)), str(flat))
    two_d = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(8, 8).astype(np.float32), np.eye(4)), str(two_d))
    offgrid = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 31), np.int16), np.eye(4)), str(offgrid))
    with pytest.raises(ValueError, match="constant"):
        check_input_images([{"moving_image": str(flat), "fixed_image": str(good)}])
    with pytest.raises(ValueError, match="3-D"):
        check_input_images([{"moving_image": str(good), "fixed_image": str(two_d)}])
    with pytest.raises(ValueError, match="does not match"):
        check_input_images(images=[{"image": str(good), "label": str(offgrid)}, {"image": str(good)}])
    with pytest.raises(ValueError, match="at least 2"):
        check_input_images(images=[{"image": str(good)}])
    with pytest.raises(FileNotFoundError):
        check_input_images([{"moving_image": str(tmp_path / "none.nii.gz"), "fixed_image": str(good)}])


def test_load_keymorph_weights(tmp_path):
    official = fixture_path("keymorph", "conv_backbone_ckpt.pth.tar")
    model = load_keymorph_weights(KeyMorph(ConvKeypointNet(num_keypoints=16)), official)
    reference = load_keymorph_checkpoint(official)
    for (name, value), (_, expected) in zip(model.backbone.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    saved = tmp_path / "model.pt"
    torch.save({"model": model.state_dict()}, saved)
    fresh = load_keymorph_weights(KeyMorph(ConvKeypointNet(num_keypoints=16)), saved)
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert load_keymorph_weights(fresh, "") is fresh
    with pytest.raises(FileNotFoundError):
        load_keymorph_weights(fresh, tmp_path / "missing.pt")


def test_groupwise_dice_is_the_mean_pairwise_dice_over_present_labels():
    from monai_ext.io.keymorph_outputs import _pairwise_dice

    a, b, c = (torch.zeros(1, 4, 4, 4) for _ in range(3))
    a[0, :2], b[0, :1] = 1, 1  # label 1: 32 and 16 voxels, 16 shared -> Dice 2/3
    c[0, :2], c[0, 3] = 1, 2  # label 2 only in c: Dice 0 in the pairs with c
    expected = [2 / 3, (1.0 + 0.0) / 2, (2 / 3 + 0.0) / 2]  # (a, b), (a, c), (b, c): means over present labels
    assert _pairwise_dice([a, b, c]) == pytest.approx(sum(expected) / 3)
    assert math.isnan(_pairwise_dice([torch.zeros(1, 2, 2, 2)] * 2))
