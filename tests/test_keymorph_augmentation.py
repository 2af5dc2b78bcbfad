"""KeyMorph affine augmentation: parity with ``fixtures/keymorph/augmentation.npz`` and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_npz
from keymorph_reference import voxel_to_norm
from monai.data import MetaTensor

from monai_ext.data.keymorph_augmentation import (
    KeyMorphAffined,
    RandKeyMorphAffined,
    apply_keymorph_affine,
    augmentation_ramp,
    fixed_keymorph_affine,
    keymorph_affine_ddf,
    keymorph_affine_matrix,
    random_keymorph_affine,
    random_keymorph_parameters,
    rotation_augmentation_params,
)
from monai_ext.networks.keypoints import CenterOfMass
from monai_ext.spatial.sampling import voxel_grid

# Tolerances: the fixture README (section 5) puts the float32 noise floor of affine grids at ~3e-7; the matrices
# are products of four float32 matrices (measured <= 1.2e-7), grids derived from our voxel DDF (<= 6e-7) and
# trilinear images (<= 8e-7). Nearest-neighbour one-hot maps must agree exactly (no ties occur).
MATRIX_ATOL, GRID_ATOL, IMAGE_ATOL = 1e-6, 3e-6, 5e-6


def _t(data, key):
    return torch.from_numpy(data[key])


def _reference_grid(ddf: torch.Tensor) -> torch.Tensor:
    """Our voxel DDF -> the reference's sampling grid: normalised align_corners=False, (x, y, z) order."""
    shape = ddf.shape[2:]
    voxels = (voxel_grid(shape, ddf.dtype)[None] + ddf).movedim(1, -1)
    return voxel_to_norm(voxels, torch.tensor(shape, dtype=ddf.dtype)).flip(-1)


def _check_warps(data, prefix, matrix):
    out = apply_keymorph_affine(matrix, image=_t(data, "img"), label=_t(data, "seg_onehot"), reference_grid=True)
    torch.testing.assert_close(_reference_grid(out["ddf"]), _t(data, f"{prefix}/grid"), atol=GRID_ATOL, rtol=0)
    torch.testing.assert_close(out["image"], _t(data, f"{prefix}/img"), atol=IMAGE_ATOL, rtol=0)
    torch.testing.assert_close(out["label"], _t(data, f"{prefix}/seg_onehot"), atol=0, rtol=0)


@pytest.mark.parametrize("prefix", ["rot0", "rot45"])
def test_fixed_augmentations_match_reference(prefix):
    data = load_npz("keymorph", "augmentation.npz")
    matrix = fixed_keymorph_affine(data[f"{prefix}/params"].tolist())
    torch.testing.assert_close(matrix, _t(data, f"{prefix}/matrix"), atol=MATRIX_ATOL, rtol=0)
    _check_warps(data, prefix, matrix)


def test_random_augmentation_matches_reference():
    data = load_npz("keymorph", "augmentation.npz")
    params = {k: _t(data, f"random/{k}") for k in ("scale", "offset", "theta", "shear")}
    matrix = keymorph_affine_matrix(**params)
    torch.testing.assert_close(matrix, _t(data, "random/matrix"), atol=MATRIX_ATOL, rtol=0)
    _check_warps(data, "random", matrix)
    moved = apply_keymorph_affine(matrix, points=_t(data, "random/points"))["points"]
    torch.testing.assert_close(moved, _t(data, "random/points_deformed"), atol=1e-6, rtol=0)
    # an integer label map warped by nearest neighbour gives the same one-hot map (and keeps its dtype)
    seg = apply_keymorph_affine(matrix, label=_t(data, "seg"), reference_grid=True)["label"]
    assert seg.dtype == torch.int64
    assert torch.equal(F.one_hot(seg[:, 0], 5).permute(0, 4, 1, 2, 3).float(), _t(data, "random/seg_onehot"))
    assert torch.equal(F.one_hot(_t(data, "seg")[:, 0], 5).permute(0, 4, 1, 2, 3).float(), _t(data, "seg_onehot"))


def test_dictionary_transform_matches_reference():
    data = load_npz("keymorph", "augmentation.npz")
    transform = KeyMorphAffined(
        ["img", "seg"], "rot45", mode=["linear", "nearest"], matrix_key="m", reference_grid=True
    )
    out = transform({"img": _t(data, "img")[0], "seg": _t(data, "seg_onehot")[0]})
    torch.testing.assert_close(out["img"], _t(data, "rot45/img")[0], atol=IMAGE_ATOL, rtol=0)
    torch.testing.assert_close(out["seg"], _t(data, "rot45/seg_onehot")[0], atol=0, rtol=0)
    torch.testing.assert_close(out["m"], _t(data, "rot45/matrix")[0], atol=MATRIX_ATOL, rtol=0)


def test_identity_parameters_give_identity():
    matrix = keymorph_affine_matrix(torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 6))
    assert torch.equal(matrix, torch.eye(4).expand(2, 4, 4))
    assert torch.equal(fixed_keymorph_affine((0, 0, 0, 0), spatial_dims=2), torch.eye(3)[None])
    image = torch.rand(1, 2, 7, 8, 9)
    label = torch.randint(0, 4, (1, 1, 7, 8, 9))
    points = torch.rand(1, 5, 3) * 2 - 1
    out = apply_keymorph_affine(torch.eye(4)[None], image, label, points)
    # consistent convention: the identity reproduces everything exactly (up to float32 grid rounding)
    torch.testing.assert_close(out["image"], image, atol=1e-6, rtol=0)
    assert torch.equal(out["label"], label)
    assert torch.equal(out["points"], points)
    # the reference's mixed convention zooms by N / (N - 1) instead: voxel i is read at i N / (N - 1) - 0.5
    ddf = keymorph_affine_ddf(torch.eye(4)[None], (7, 8, 9), reference_grid=True)
    expected = voxel_grid((7, 8, 9)) * torch.tensor([7 / 6, 8 / 7, 9 / 8]).view(3, 1, 1, 1) - 0.5
    torch.testing.assert_close(voxel_grid((7, 8, 9))[None] + ddf, expected[None], atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_on_all_axes_is_an_exact_voxel_permutation():
    """rot90: R1, R2, R3 at 90 degrees are [[1,0,0],[0,0,-1],[0,1,0]], [[0,0,1],[0,1,0],[-1,0,0]],
    [[0,-1,0],[1,0,0],[0,0,1]]; multiplying by hand, R = R3 R2 R1 = [[0,0,1],[0,1,0],[-1,0,0]]. The output reads
    the input at R^T p' = (-p'_2, p'_1, p'_0), i.e. out[i, j, k] = in[N-1-k, j, i] on a cube."""
    matrix = fixed_keymorph_affine(rotation_augmentation_params("rot90"))
    expected = torch.tensor([[0.0, 0, 1, 0], [0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]])
    torch.testing.assert_close(matrix[0], expected, atol=1e-7, rtol=0)
    image = torch.rand(1, 1, 6, 6, 6)
    out = apply_keymorph_affine(matrix, image=image)["image"]
    torch.testing.assert_close(out[0, 0], image[0, 0].flip(0).permute(2, 1, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("degrees", [45, 135])
def test_rotation_preset_is_the_same_angle_on_every_axis(degrees):
    a = math.radians(degrees)
    assert rotation_augmentation_params(f"rot{degrees}") == (0.0, 0.0, a, 0.0)
    matrix = fixed_keymorph_affine((0, 0, a, 0), dtype=torch.float64)
    ones, zeros = torch.ones(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)

    def single(axis):
        theta = zeros.clone()
        theta[0, axis] = a
        return keymorph_affine_matrix(ones, zeros, theta, torch.zeros(1, 6, dtype=torch.float64))

    torch.testing.assert_close(matrix, single(2) @ single(1) @ single(0), atol=1e-12, rtol=0)
    rotation = matrix[0, :3, :3]
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert abs(torch.linalg.det(rotation).item() - 1) < 1e-12


def test_recipe_order_z_s_t_r():
    """M = Z S T R: translation is applied after the rotation and then scaled, shear last (fixture-independent)."""
    theta = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    scale = torch.tensor([[1.1, 0.9, 1.2]], dtype=torch.float64)
    offset = torch.tensor([[0.1, -0.2, 0.05]], dtype=torch.float64)
    shear = torch.tensor([[0.01, 0.02, 0.03, 0.04, 0.05, 0.06]], dtype=torch.float64)
    ones, zeros = torch.ones(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    r = keymorph_affine_matrix(ones, zeros, theta, torch.zeros(1, 6, dtype=torch.float64))
    m = keymorph_affine_matrix(scale, offset, theta, shear)
    p = torch.tensor([[[0.2, -0.4, 0.7]]], dtype=torch.float64)
    rotated = p @ r[0, :3, :3].T
    z = torch.eye(3, dtype=torch.float64)
    z[[0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]] = shear[0]
    expected = ((rotated + offset) * scale) @ z.T
    torch.testing.assert_close(apply_keymorph_affine(m, points=p)["points"], expected, atol=1e-12, rtol=0)


def _blob(center_voxel, shape=(28, 30, 32), sigma=2.0):
    grid = voxel_grid(shape, torch.float64)
    d2 = ((grid - torch.tensor(center_voxel, dtype=torch.float64).view(3, 1, 1, 1)) ** 2).sum(0)
    return torch.exp(-d2 / (2 * sigma**2))[None, None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_points_move_with_the_image(seed):
    """The centre of mass of a blob image moves exactly like its centre point (consistent convention)."""
    generator = torch.Generator().manual_seed(seed)
    matrix = random_keymorph_affine((0.1, 0.1, 0.6, 0.05), generator=generator, dtype=torch.float64)
    shape = (28, 30, 32)
    center = torch.tensor([13.0, 15.5, 14.0], dtype=torch.float64)
    image = _blob(center.tolist(), shape)
    point = (2 * center / (torch.tensor(shape, dtype=torch.float64) - 1) - 1)[None, None]
    out = apply_keymorph_affine(matrix, image=image, points=point)
    com = CenterOfMass("ij", eps=0.0)(out["image"])
    # the blob (sigma 2 voxels) stays far from the border; trilinear resampling moves its CoM by <= 3e-4
    # (measured); the reference's N / (N - 1) zoom would add 3e-3 - 4e-3 for these seeds, so 1e-3 separates them
    torch.testing.assert_close(com, out["points"], atol=1e-3, rtol=0)


def test_random_draws_bounds_sharing_and_reproducibility():
    maxima = (0.2, 0.3, 1.0, 0.1)
    params = random_keymorph_parameters(maxima, 0.5, torch.Generator().manual_seed(0), batch_size=64, shared=False)
    bounds = {"scale": (0.9, 1.1), "offset": (-0.15, 0.15), "theta": (-0.5, 0.5), "shear": (-0.05, 0.05)}
    for key, (low, high) in bounds.items():
        assert params[key].min() >= low and params[key].max() <= high
        assert params[key].std(0).min() > 0  # per-item draws differ
    assert params["shear"].shape == (64, 6) and params["theta"].shape == (64, 3)
    shared = random_keymorph_affine(maxima, generator=torch.Generator().manual_seed(0), batch_size=3)
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[1], shared[2])
    again = random_keymorph_affine(maxima, generator=torch.Generator().manual_seed(0), batch_size=3)
    assert torch.equal(shared, again)
    assert torch.equal(random_keymorph_affine(maxima, scale_params=0.0), torch.eye(4)[None])
    two_d = random_keymorph_parameters(maxima, spatial_dims=2)
    assert two_d["theta"].shape == (1, 1) and two_d["shear"].shape == (1, 2)


def test_ramp():
    assert augmentation_ramp(1, 1000) == 1 / 1000
    assert augmentation_ramp(500, 1000) == 0.5
    assert augmentation_ramp(5000, 1000) == 1.0
    assert augmentation_ramp(3, -1) == 1.0


def test_2d_rotation():
    """2-D: a quarter turn maps axis 0 onto axis 1: R [1, 0] = [cos, sin] = [0, 1]."""
    matrix = fixed_keymorph_affine((0, 0, math.pi / 2, 0), spatial_dims=2, dtype=torch.float64)
    moved = apply_keymorph_affine(matrix, points=torch.tensor([[[1.0, 0.0]]], dtype=torch.float64))["points"]
    torch.testing.assert_close(moved, torch.tensor([[[0.0, 1.0]]], dtype=torch.float64), atol=1e-12, rtol=0)
    image = torch.rand(1, 1, 9, 9)
    out = apply_keymorph_affine(matrix.float(), image=image)["image"]
    # out(p') = in(R^T p') with R^T p' = (p'_1, -p'_0): out[i, j] = in[j, N-1-i]
    torch.testing.assert_close(out[0, 0], image[0, 0].flip(1).T, atol=1e-5, rtol=0)


def test_random_dictionary_transform_is_consistent_and_reproducible():
    image = MetaTensor(torch.rand(1, 10, 11, 12), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    label = torch.randint(0, 3, (1, 10, 11, 12))
    points = np.random.default_rng(0).uniform(-0.8, 0.8, (5, 3)).astype(np.float32)
    transform = RandKeyMorphAffined(
        ["image", "label"], (0.1, 0.1, 0.5, 0.05), mode=["linear", "nearest"], point_keys="points", matrix_key="matrix"
    )
    transform.set_random_state(7)
    out = transform({"image": image, "label": label, "points": points})
    transform.set_random_state(7)
    again = transform({"image": image, "label": label, "points": points})
    assert torch.equal(out["image"], again["image"]) and torch.equal(out["matrix"], again["matrix"])
    assert not torch.allclose(out["matrix"], torch.eye(4))
    expected = apply_keymorph_affine(
        out["matrix"][None].double(),
        image.as_tensor()[None].double(),
        label[None],
        torch.from_numpy(points)[None].double(),
    )
    torch.testing.assert_close(out["image"].as_tensor(), expected["image"][0].float(), atol=1e-5, rtol=0)
    assert isinstance(out["image"], MetaTensor) and torch.equal(out["image"].affine, image.affine)
    assert torch.equal(out["label"], expected["label"][0]) and out["label"].dtype == label.dtype
    assert isinstance(out["points"], np.ndarray)
    np.testing.assert_allclose(out["points"], expected["points"][0].numpy(), atol=1e-6)
    skip = RandKeyMorphAffined("image", prob=0.0)
    assert skip({"image": image})["image"] is image


def test_bad_inputs():
    with pytest.raises(ValueError, match="scale"):
        keymorph_affine_matrix(torch.ones(1, 4), torch.zeros(1, 4), torch.zeros(1, 3), torch.zeros(1, 6))
    with pytest.raises(ValueError, match="shear"):
        keymorph_affine_matrix(torch.ones(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="theta"):
        keymorph_affine_matrix(torch.ones(1, 3), torch.zeros(1, 3), torch.full((1, 3), math.nan), torch.zeros(1, 6))
    with pytest.raises(ValueError, match="max_params"):
        random_keymorph_affine((0.1, -0.1, 0, 0))
    with pytest.raises(ValueError, match="max_params"):
        random_keymorph_affine((0.1, 0.1, 0))
    with pytest.raises(ValueError, match="rot"):
        rotation_augmentation_params("rotate45")
    with pytest.raises(ValueError, match="matrix"):
        keymorph_affine_ddf(torch.eye(3)[None], (4, 5, 6))
    with pytest.raises(ValueError, match="spatial shape"):
        apply_keymorph_affine(torch.eye(4)[None], torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5))
    with pytest.raises(ValueError, match="mode"):
        KeyMorphAffined("image", mode="cubic")
