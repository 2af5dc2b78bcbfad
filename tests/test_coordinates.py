"""Coordinate frames: voxel, centred normalised (SITReg), normalised (KeyMorph), physical RAS / LPS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_npz

from monai_ext.spatial.affine import transform_points as _transform_points
from monai_ext.spatial.coordinates import (
    centered_normalized_spacing,
    change_frames,
    ddf_voxel_to_world,
    ddf_world_to_voxel,
    downsampled_voxel_to_voxel,
    invert_homogeneous,
    ras_to_lps,
    voxel_to_centered_normalized,
    voxel_to_normalized,
    voxel_to_world,
)
from monai_ext.spatial.sampling import affine_to_ddf, sample, voxel_grid

F64 = torch.float64


def transform_points(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``affine.transform_points`` also for a single ``(n + 1, n + 1)`` matrix."""
    return _transform_points(matrix if matrix.ndim == 3 else matrix[None], points)


def _oblique_affine(scale=(1.3, 0.7, 2.5), angles=(0.3, -0.5, 0.8), origin=(12.0, -40.0, 7.5)) -> torch.Tensor:
    """A voxel -> RAS mm affine that is oblique, anisotropic and not RAS-oriented (an axis flip and a permutation)."""
    a, b, c = angles
    rx = torch.tensor([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]], dtype=F64)
    ry = torch.tensor([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]], dtype=F64)
    rz = torch.tensor([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]], dtype=F64)
    flip_permute = torch.tensor([[0, 0, -1], [1, 0, 0], [0, 1, 0]], dtype=F64)  # e.g. an LIP / sagittal-stored volume
    affine = torch.eye(4, dtype=F64)
    affine[:3, :3] = rz @ ry @ rx @ flip_permute @ torch.diag(torch.tensor(scale, dtype=F64))
    affine[:3, 3] = torch.tensor(origin, dtype=F64)
    return affine


def _random_affine(n: int, batch: int = 1, strength: float = 0.2, shift: float = 1.0) -> torch.Tensor:
    matrix = torch.eye(n + 1, dtype=F64).repeat(batch, 1, 1)
    matrix[:, :n, :n] += strength * torch.randn(batch, n, n, dtype=F64)
    matrix[:, :n, n] = shift * torch.randn(batch, n, dtype=F64)
    return matrix


# ------------------------------------------------------------------ centred normalised (SITReg) ---


@pytest.mark.parametrize(
    "shape, voxel_size",
    [((4, 6), (2.0, 1.0)), ((8, 5, 6), None), ((10, 12, 7), (1.0, 0.5, 3.0)), ((9, 4, 5), (0.8, 0.8, 0.8))],
)
def test_largest_fov_axis_spans_unit_interval_at_edges(shape, voxel_size):
    n = len(shape)
    size = voxel_size or (1.0,) * n
    m = int(np.argmax([s * v for s, v in zip(shape, size)]))
    to_cn = voxel_to_centered_normalized(shape, voxel_size, dtype=F64)
    # first and last voxel edges along every axis
    edges = torch.stack([torch.full((n,), -0.5, dtype=F64), torch.tensor(shape, dtype=F64) - 0.5])[None]
    lo, hi = transform_points(to_cn, edges)[0]
    assert lo[m].item() == pytest.approx(-1.0, abs=1e-12) and hi[m].item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(lo, -hi, rtol=0, atol=1e-12)  # centred on the origin
    assert (hi <= 1 + 1e-12).all()
    # spacing keeps the physical aspect ratio: h_d / h_e = s_d / s_e
    h = torch.tensor(centered_normalized_spacing(shape, voxel_size), dtype=F64)
    torch.testing.assert_close(h / h[m], torch.tensor(size, dtype=F64) / size[m])
    torch.testing.assert_close(to_cn.diagonal()[:n], h)


def test_centered_normalized_hand_example():
    # shape (4, 6), voxel (2, 1): FOVs 8 > 6, so m = 0 and h = (2/4 * 1, 2/4 * 1/2) = (0.5, 0.25);
    # x_d = (i_d - (N_d - 1)/2) h_d gives voxel (0, 0) -> (-0.75, -0.625) and (3, 5) -> (0.75, 0.625).
    assert centered_normalized_spacing((4, 6), (2.0, 1.0)) == (0.5, 0.25)
    points = torch.tensor([[[0.0, 0.0], [3.0, 5.0]]], dtype=F64)
    expected = torch.tensor([[[-0.75, -0.625], [0.75, 0.625]]], dtype=F64)
    torch.testing.assert_close(
        transform_points(voxel_to_centered_normalized((4, 6), (2.0, 1.0), F64), points), expected
    )


def test_centered_normalized_depends_only_on_relative_voxel_size():
    a = voxel_to_centered_normalized((10, 12, 7), (1.0, 0.5, 3.0), F64)
    b = voxel_to_centered_normalized((10, 12, 7), (1.75, 0.875, 5.25), F64)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    torch.testing.assert_close(
        voxel_to_centered_normalized((5, 7), None, F64), voxel_to_centered_normalized((5, 7), (1.5, 1.5), F64)
    )


@pytest.mark.parametrize("level", [1, 2])
def test_feature_level_voxel_centres(level):
    """SITReg feature level k: coarse voxel j sits at full-res 2^k j + (2^k - 1)/2, the mean of the voxels it pools."""
    f = 2**level
    shape = (8, 12, 4)
    coarse = tuple(s // f for s in shape)
    to_full = downsampled_voxel_to_voxel(f, 3, F64)
    centres = transform_points(to_full, voxel_grid(coarse, F64).reshape(3, -1).T[None])
    pooled = F.avg_pool3d(voxel_grid(shape, F64)[None], f).reshape(3, -1).T[None]
    torch.testing.assert_close(centres, pooled, rtol=0, atol=1e-12)
    # level k = 1: coarse voxel j is centred at full-resolution coordinate 2 j + 0.5
    if level == 1:
        torch.testing.assert_close(to_full[:3, 3], torch.full((3,), 0.5, dtype=F64))
    # in centred normalised coordinates: spacing multiplied by 2^k, left edge of the first voxel shared
    full = voxel_to_centered_normalized(shape, (1.0, 0.5, 2.0), F64)
    level_to_cn = full @ to_full
    torch.testing.assert_close(level_to_cn.diagonal()[:3], f * full.diagonal()[:3])
    edge = torch.full((1, 1, 3), -0.5, dtype=F64)
    torch.testing.assert_close(transform_points(level_to_cn, edge), transform_points(full, edge), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- normalised (KeyMorph) ---


@pytest.mark.parametrize("align_corners", [True, False])
def test_voxel_to_normalized_matches_grid_sample(align_corners):
    """Sampling the index ramp with grid_sample at the normalised position of voxel v (reversed axes) returns v."""
    shape = (5, 6, 7)
    ramps = voxel_grid(shape, F64)[None]  # channel i = index along axis i
    voxels = torch.tensor([[[0.0, 0.0, 0.0], [4.0, 5.0, 6.0], [1.25, 3.5, 2.75], [2.0, 0.5, 6.0]]], dtype=F64)
    normalized = transform_points(voxel_to_normalized(shape, align_corners, F64), voxels)
    grid = normalized.flip(-1).reshape(1, -1, 1, 1, 3)
    read = F.grid_sample(ramps, grid, align_corners=align_corners, padding_mode="border").reshape(3, -1).T[None]
    torch.testing.assert_close(read, voxels, rtol=0, atol=1e-12)
    # the ends: voxel centres at +-1 (True) or voxel edges at +-1 (False)
    half = 0.0 if align_corners else 0.5
    ends = torch.tensor([[[-half] * 3, [s - 1.0 + half for s in shape]]], dtype=F64)
    torch.testing.assert_close(
        transform_points(voxel_to_normalized(shape, align_corners, F64), ends)[0],
        torch.tensor([[-1.0] * 3, [1.0] * 3], dtype=F64),
    )


def test_keymorph_convention_mismatch_is_a_zoom():
    """KeyMorph builds grids with align_corners=True positions but samples with False: voxel i reads i N/(N-1) - 0.5."""
    shape = (20, 22, 24)
    mismatch = invert_homogeneous(voxel_to_normalized(shape, False, F64)) @ voxel_to_normalized(shape, True, F64)
    n = torch.tensor(shape, dtype=F64)
    torch.testing.assert_close(mismatch.diagonal()[:3], n / (n - 1))
    torch.testing.assert_close(mismatch[:3, 3], torch.full((3,), -0.5, dtype=F64))


def test_com_layer_points_are_align_corners_true_normalized():
    """com_layer.npz: the ReLU centre of mass in voxel units, mapped with voxel_to_normalized(align_corners=True), is
    the reference's points_ij; points_xy is the same in reversed (x, y, z) order."""
    data = load_npz("keymorph", "com_layer.npz")
    heat = torch.from_numpy(data["heatmaps"]).to(F64).relu()  # (B, K, D, H, W)
    points_ij, points_xy = torch.from_numpy(data["points_ij"]), torch.from_numpy(data["points_xy"])
    shape = heat.shape[2:]
    centre = []
    for axis in range(3):
        mass = heat.sum(dim=[2 + a for a in range(3) if a != axis])  # (B, K, N_axis)
        index = torch.arange(shape[axis], dtype=F64)
        centre.append((mass * index).sum(-1) / (mass.sum(-1) + 1e-8))
    centre = torch.stack(centre, dim=-1).reshape(-1, 1, 3)  # (B*K, 1, 3) voxel coordinates
    expected = transform_points(voxel_to_normalized(shape, True, F64), centre).reshape(points_ij.shape)
    torch.testing.assert_close(points_ij.to(F64), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(points_xy, points_ij.flip(-1), rtol=0, atol=0)
    # the single positive voxel (channel 2) is recovered exactly: (1, 2, 3) in sample 0, the far corner in sample 1
    voxels = transform_points(invert_homogeneous(voxel_to_normalized(shape, True, F64)), points_ij[:, 2:3].to(F64))
    torch.testing.assert_close(
        voxels[:, 0], torch.tensor([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]], dtype=F64), rtol=0, atol=1e-5
    )


def test_realworld_grids_points_and_warp_from_voxel_to_world_matrices():
    """realworld.npz: the reference's mm-space affine / rigid grids, mapped points and warped image, rebuilt from
    aff_f / aff_m (voxel -> mm) and the KeyMorph normalisations: grid = N_m^F aff_m^-1 A^-1 aff_f (N_f^F)^-1 N_f^T,
    where N^T / N^F are voxel -> normalised with align_corners True / False and A^-1 the fixed -> moving mm fit."""
    data = load_npz("keymorph", "realworld.npz")
    shape_f, shape_m = tuple(data["shape_f"].tolist()), tuple(data["shape_m"].tolist())
    aff_f, aff_m = (voxel_to_world(torch.from_numpy(data[k]).to(F64)) for k in ("aff_f", "aff_m"))
    norm_f, norm_m = voxel_to_normalized(shape_f, False, F64), voxel_to_normalized(shape_m, False, F64)
    img_m = torch.from_numpy(data["img_m"])
    assert img_m.shape[2:] == shape_m
    base = voxel_grid(shape_f, F64).reshape(3, -1).T[None]  # fixed voxels (1, P, 3)
    keymorph_base = invert_homogeneous(norm_f) @ voxel_to_normalized(shape_f, True, F64)  # the convention mismatch
    for name in ("affine", "rigid"):
        fixed_to_moving_mm = torch.from_numpy(data[f"{name}/inverse_transform_matrix"]).to(F64)
        # fixed voxel -> fixed mm -> moving mm -> moving voxel, as one voxel -> voxel matrix
        voxel_map = change_frames(fixed_to_moving_mm, invert_homogeneous(aff_f), invert_homogeneous(aff_m))
        moving_voxels = transform_points(voxel_map @ keymorph_base, base)
        grid = transform_points(norm_m, moving_voxels).flip(-1).reshape(1, *shape_f, 3)
        torch.testing.assert_close(grid, torch.from_numpy(data[f"{name}/grid"]).to(F64), rtol=0, atol=2e-6)
        warped = sample(img_m.to(F64), moving_voxels.transpose(1, 2).reshape(1, 3, *shape_f))
        torch.testing.assert_close(warped, torch.from_numpy(data[f"{name}/warped"]).to(F64), rtol=0, atol=2e-6)
        # moving keypoints: normalised -> moving mm -> (transform_matrix) fixed mm -> fixed normalised
        moving_to_fixed_mm = torch.from_numpy(data[f"{name}/transform_matrix"]).to(F64)
        to_fixed = change_frames(
            moving_to_fixed_mm, norm_m @ invert_homogeneous(aff_m), norm_f @ invert_homogeneous(aff_f)
        )
        points_a = transform_points(to_fixed, torch.from_numpy(data["points_m"]).to(F64))
        torch.testing.assert_close(points_a, torch.from_numpy(data[f"{name}/points_a"]).to(F64), rtol=0, atol=2e-6)
        # keypoints to mm the same way as the reference: the least-squares fits map centroid to centroid (residuals
        # sum to 0, both fits) and the affine residuals are orthogonal to the fixed mm coordinates (normal equations)
        fixed_mm = transform_points(aff_f @ invert_homogeneous(norm_f), torch.from_numpy(data["points_f"]).to(F64))
        moving_mm = transform_points(aff_m @ invert_homogeneous(norm_m), torch.from_numpy(data["points_m"]).to(F64))
        residual = transform_points(fixed_to_moving_mm, fixed_mm) - moving_mm  # (1, K, 3), about 1.4 mm each
        torch.testing.assert_close(residual.sum(1), torch.zeros(1, 3, dtype=F64), rtol=0, atol=1e-4)
        if name == "affine":
            normal = residual.transpose(1, 2) @ fixed_mm  # (1, 3, 3), terms up to ~1.4 mm * 10 mm * 16
            torch.testing.assert_close(normal, torch.zeros_like(normal), rtol=0, atol=1e-3)


def test_invert_homogeneous_matches_inverse_and_is_differentiable():
    matrix = _random_affine(3, batch=2, strength=0.3, shift=4.0)
    inverse = invert_homogeneous(matrix)
    torch.testing.assert_close(inverse, torch.linalg.inv(matrix), rtol=0, atol=1e-12)
    assert torch.equal(inverse[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64).expand(2, 4))
    assert torch.autograd.gradcheck(lambda m: invert_homogeneous(m)[:, :3], (matrix.requires_grad_(),))


# ----------------------------------------------------------------------------- physical RAS / LPS ---


def test_ras_to_lps_and_voxel_to_world():
    affine = _oblique_affine()
    lps = voxel_to_world(affine, lps=True)
    torch.testing.assert_close(ras_to_lps(3, F64) @ ras_to_lps(3, F64), torch.eye(4, dtype=F64))
    voxels = 10 * torch.rand(1, 7, 3, dtype=F64)
    ras_points = transform_points(voxel_to_world(affine), voxels)
    torch.testing.assert_close(transform_points(lps, voxels), ras_points * torch.tensor([-1.0, -1.0, 1.0], dtype=F64))
    torch.testing.assert_close(voxel_to_world(affine.numpy()), affine)  # numpy affines (nibabel) are accepted
    torch.testing.assert_close(ras_to_lps(2, F64), torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=F64)))
    batched = voxel_to_world(torch.stack([affine, 2 * affine]), lps=True)
    torch.testing.assert_close(batched[0], lps)


@pytest.mark.parametrize("lps", [False, True])
def test_point_round_trips_voxel_centred_world(lps):
    shape, voxel_size = (20, 14, 9), (1.3, 0.7, 2.5)
    to_world = voxel_to_world(_oblique_affine(voxel_size), lps=lps)
    to_cn = voxel_to_centered_normalized(shape, voxel_size, F64)
    voxels = torch.rand(2, 11, 3, dtype=F64) * torch.tensor(shape, dtype=F64)
    world = transform_points(to_world, voxels)
    cn = transform_points(to_cn, voxels)
    torch.testing.assert_close(transform_points(invert_homogeneous(to_world), world), voxels, rtol=0, atol=1e-12)
    torch.testing.assert_close(transform_points(invert_homogeneous(to_cn), cn), voxels, rtol=0, atol=1e-12)
    # centred normalised -> world directly; distances are physical up to the frame's single scale factor
    cn_to_world = to_world @ invert_homogeneous(to_cn)
    torch.testing.assert_close(transform_points(cn_to_world, cn), world, rtol=0, atol=1e-10)
    scale = (
        max(s * v for s, v in zip(shape, voxel_size)) / 2
    )  # mm per unit: half the largest FOV (rotations keep lengths)
    torch.testing.assert_close((world[:, 0] - world[:, 1]).norm(dim=-1), scale * (cn[:, 0] - cn[:, 1]).norm(dim=-1))


def test_change_frames_round_trip_and_consistency():
    fixed_to_world = voxel_to_world(_oblique_affine(), lps=True)
    moving_to_world = voxel_to_world(_oblique_affine((0.9, 1.1, 1.6), (-0.2, 0.1, 2.0), (3.0, 5.0, -8.0)), lps=True)
    voxel_map = _random_affine(3, batch=2, shift=3.0)  # fixed voxel -> moving voxel
    world_map = change_frames(voxel_map, fixed_to_world, moving_to_world)  # fixed world -> moving world
    back = change_frames(world_map, invert_homogeneous(fixed_to_world), invert_homogeneous(moving_to_world))
    torch.testing.assert_close(back, voxel_map, rtol=0, atol=1e-12)
    voxels = 10 * torch.rand(2, 6, 3, dtype=F64)
    torch.testing.assert_close(
        transform_points(world_map, transform_points(fixed_to_world, voxels)),
        transform_points(moving_to_world, transform_points(voxel_map, voxels)),
    )
    # one frame for both ends is the similarity transform C M C^-1
    same = change_frames(voxel_map, fixed_to_world)
    torch.testing.assert_close(same, fixed_to_world @ voxel_map @ torch.linalg.inv(fixed_to_world))


# -------------------------------------------------------------------------------------------- DDFs ---


@pytest.mark.parametrize("shape", [(6, 5, 7), (9, 8)])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_ddf_round_trip(shape, dtype, atol):
    n = len(shape)
    if n == 3:
        fixed, moving = voxel_to_world(_oblique_affine(), lps=True), voxel_to_world(_oblique_affine((2.0, 1.0, 1.0)))
    else:
        fixed = voxel_to_centered_normalized(shape, (1.0, 2.0), F64)
        moving = torch.stack([_random_affine(2)[0], _random_affine(2)[0]])  # batched frames
    ddf = 2 * torch.randn(2, n, *shape, dtype=dtype)
    world = ddf_voxel_to_world(ddf, fixed, moving)
    assert world.shape == ddf.shape and world.dtype == dtype
    torch.testing.assert_close(ddf_world_to_voxel(world, fixed, moving), ddf, rtol=0, atol=atol)
    torch.testing.assert_close(ddf_world_to_voxel(ddf_voxel_to_world(ddf, fixed), fixed), ddf, rtol=0, atol=atol)


def test_world_ddf_of_a_known_affine_relation():
    """The moving scene is the fixed one moved by a known affine S (moving world -> fixed world, mm LPS), so the
    registration DDF pulls fixed world points p back to T p with T = S^-1 (built as a voxel -> voxel matrix between
    two oblique grids), and its world displacement must be T p - p."""
    fixed_shape = (7, 6, 5)
    fixed_to_world = voxel_to_world(_oblique_affine(), lps=True)
    moving_to_world = voxel_to_world(_oblique_affine((0.9, 1.1, 1.6), (-0.2, 0.1, 2.0), (3.0, 5.0, -8.0)), lps=True)
    moving_to_fixed_world = _random_affine(3, strength=0.1, shift=5.0)  # S
    world_map = invert_homogeneous(moving_to_fixed_world)  # T: fixed world -> moving world
    voxel_map = invert_homogeneous(moving_to_world) @ world_map @ fixed_to_world
    ddf = affine_to_ddf(voxel_map, fixed_shape)
    torch.testing.assert_close(change_frames(voxel_map, fixed_to_world, moving_to_world), world_map)
    world = ddf_voxel_to_world(ddf, fixed_to_world, moving_to_world)
    points = transform_points(fixed_to_world, voxel_grid(fixed_shape, F64).reshape(3, -1).T[None])  # (1, P, 3)
    expected = (transform_points(world_map, points) - points).transpose(1, 2).reshape(1, 3, *fixed_shape)
    torch.testing.assert_close(world, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(ddf_world_to_voxel(expected, fixed_to_world, moving_to_world), ddf, rtol=0, atol=1e-10)


def test_world_ddf_same_grid_and_lps():
    """One grid: the world displacement is the voxel displacement times the affine's linear part (no translation);
    LPS displacements are RAS ones with x and y negated."""
    affine = _oblique_affine()
    ddf = torch.randn(1, 3, 4, 5, 6, dtype=F64)
    ras = ddf_voxel_to_world(ddf, voxel_to_world(affine))
    torch.testing.assert_close(ras, torch.einsum("ij,bj...->bi...", affine[:3, :3], ddf))
    lps = ddf_voxel_to_world(ddf, voxel_to_world(affine, lps=True))
    torch.testing.assert_close(lps, ras * torch.tensor([-1.0, -1.0, 1.0], dtype=F64).view(1, 3, 1, 1, 1))
    # zero voxel DDF between two different grids: the world offset between corresponding voxels
    other = affine.clone()
    other[:3, 3] += torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    offset = ddf_voxel_to_world(torch.zeros_like(ddf), voxel_to_world(affine), voxel_to_world(other))
    torch.testing.assert_close(offset, torch.tensor([1.0, -2.0, 3.0], dtype=F64).view(1, 3, 1, 1, 1).expand_as(ddf))


# ------------------------------------------------------------------------------------------ errors ---


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="spatial_shape"):
        voxel_to_centered_normalized((4,))
    with pytest.raises(ValueError, match="voxel_size"):
        centered_normalized_spacing((4, 5), (1.0, -1.0))
    with pytest.raises(ValueError, match="voxel_size"):
        centered_normalized_spacing((4, 5), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="factor"):
        downsampled_voxel_to_voxel(0, 3)
    with pytest.raises(ValueError, match="affine"):
        voxel_to_world(torch.eye(5))
    with pytest.raises(ValueError, match="non-finite"):
        voxel_to_world(torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match="singular"):
        invert_homogeneous(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="input_to_new"):
        change_frames(torch.eye(4), torch.eye(3))
    with pytest.raises(ValueError, match="fixed_to_world"):
        ddf_voxel_to_world(torch.zeros(1, 3, 4, 4, 4), torch.eye(3))
    with pytest.raises(ValueError, match="moving_to_world"):
        ddf_world_to_voxel(torch.zeros(1, 3, 4, 4, 4), torch.eye(4), torch.eye(4).repeat(1, 1, 1)[:, :3])
    with pytest.raises(ValueError, match="do not broadcast"):
        ddf_voxel_to_world(torch.zeros(2, 3, 4, 4, 4), torch.eye(4).repeat(3, 1, 1))
    with pytest.raises(ValueError, match="non-finite"):
        ddf_voxel_to_world(torch.full((1, 3, 4, 4, 4), float("inf")), torch.eye(4))
