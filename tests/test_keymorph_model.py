"""KeyMorph model: aligners, pairwise registration, groupwise registration; parity with the reference fixtures.

Parity (``fixtures/keymorph``, float32; README section 5 noise floors in brackets), from the stored keypoints:
matrices atol 1e-6 [6.6e-8], affine / rigid grids and ``points_a`` 2e-6 [3.2e-7], TPS grids 1e-4 [1.7e-5],
TPS ``points_a`` 1e-5 (cond 321), warped images 1e-5 (TPS 1e-4), warped one-hot maps 1e-3 (README: sharp label
edges amplify grid noise). End to end through the conv checkpoint (keypoints differ by ~4e-6): keypoints 1e-5,
grids 1e-5 (TPS 1e-4), warped images 1e-4. Metrics from the stored arrays: rtol 1e-6 (MSE, Dice, Hausdorff),
Jacobian 1e-4. Property tests run in float64 with atol 1e-9 unless stated.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from conftest import fixture_path, load_npz
from keymorph_reference import as_tensors, norm_to_voxel, reference_warp
from monai.losses import DiceLoss
from monai.metrics import compute_dice, compute_hausdorff_distance
from torch import nn

from monai_ext.metrics.deformation import folding_fraction, jacobian_determinant
from monai_ext.networks.keymorph import (
    GroupwiseRegistration,
    KeyMorph,
    fit_keypoint_transform,
    groupwise_keypoints,
    parse_alignment,
    tps_lambda,
)
from monai_ext.checkpoints import load_keymorph_checkpoint
from monai_ext.networks.keypoints import CenterOfMass, KeypointDetector, power_weights
from monai_ext.spatial.affine import fit_affine, transform_points
from monai_ext.spatial.coordinates import voxel_to_normalized
from monai_ext.spatial.sampling import affine_to_ddf, voxel_grid, warp
from monai_ext.spatial.tps import fit_tps

F64 = torch.float64
ALIGNMENTS = ("affine", "tps_0", "rigid")
GRID_ATOL = {"affine": 2e-6, "rigid": 2e-6, "tps_0": 1e-4}
POINTS_ATOL = {"affine": 2e-6, "rigid": 2e-6, "tps_0": 1e-5}
IMAGE_ATOL = {"affine": 1e-5, "rigid": 1e-5, "tps_0": 1e-4}


def full_forward() -> dict[str, torch.Tensor]:
    return as_tensors(load_npz("keymorph", "full_forward.npz"))


def conv_model(**kwargs) -> KeyMorph:
    backbone = load_keymorph_checkpoint(fixture_path("keymorph", "conv_backbone_ckpt.pth.tar"))
    return KeyMorph(backbone, reference_grid=True, **kwargs).eval()


def reference_rotation_reflects(fixed: np.ndarray, moving: np.ndarray) -> bool:
    """Whether the reference rigid fit (fixed -> moving, ``R = V U^T`` of ``H = Q_f Q_m^T``) hits its
    reflection branch (``det R < 0``), where its fix (flipping the last *row* of ``V``, not the last column)
    departs from standard Kabsch."""
    u, _, vt = np.linalg.svd((fixed - fixed.mean(0)).T @ (moving - moving.mean(0)))
    return np.linalg.det(vt.T @ u.T) < 0


def voxel_ddf_from_reference_grid(grid: torch.Tensor) -> torch.Tensor:
    """The reference's (x, y, z) grid read with align_corners=False, as a voxel DDF (B, 3, *spatial)."""
    shape = grid.shape[1:-1]
    voxels = norm_to_voxel(grid.flip(-1).double(), torch.tensor(shape, dtype=F64))
    return voxels.movedim(-1, 1) - voxel_grid(shape, F64)[None]


def reference_jacobian_determinant(grid: np.ndarray) -> np.ndarray:
    """The reference's ``_jacobian_determinant`` on its normalized (x, y, z) grid (B = 1; README 4.7): channel c
    of the permuted grid correlated with [-0.5, 0, 0.5] along array axis a gives G[a, c] (zero padding), J = I + G,
    2-voxel crop, det in float64."""
    g = np.moveaxis(grid[0], -1, 0)
    derivatives = []
    for axis in range(3):
        padded = np.pad(g, [(0, 0)] + [(1, 1) if a == axis else (0, 0) for a in range(3)])
        size = g.shape[1 + axis]
        ahead, behind = np.take(padded, range(2, size + 2), 1 + axis), np.take(padded, range(size), 1 + axis)
        derivatives.append(0.5 * ahead - 0.5 * behind)
    jacobian = np.stack(derivatives).astype(np.float64) + np.eye(3)[:, :, None, None, None]
    return np.linalg.det(np.moveaxis(jacobian[:, :, 2:-2, 2:-2, 2:-2], (0, 1), (-2, -1)))


# --------------------------------------------------------------------------------------------- alignment names


def test_parse_alignment_and_lambda_sampling():
    assert parse_alignment("affine") == ("affine", None) and parse_alignment("rigid") == ("rigid", None)
    assert parse_alignment("tps_0") == ("tps", 0.0) and parse_alignment("tps_0.1") == ("tps", 0.1)
    assert parse_alignment("tps_loguniform") == ("tps", "loguniform")
    for bad in ("tps_", "tps_abc", "tps_-1", "tps_nan", "spline", 3):
        with pytest.raises(ValueError, match="alignment"):
            parse_alignment(bad)
    torch.testing.assert_close(tps_lambda("tps_0.5", 3), torch.full((3,), 0.5))
    generator = torch.Generator().manual_seed(0)
    uniform = tps_lambda("tps_uniform", 2000, max_lambda=4.0, generator=generator)
    loguniform = tps_lambda("tps_loguniform", 2000, max_lambda=4.0, generator=generator, dtype=F64)
    lognormal = tps_lambda("tps_lognormal", 2000, generator=generator, dtype=F64)
    assert 0 <= uniform.min() and uniform.max() <= 4.0 and abs(uniform.mean().item() - 2.0) < 0.15
    assert 1e-6 <= loguniform.min() and loguniform.max() <= 4.0
    # log-uniform: log(lambda) uniform on [log 1e-6, log 4], mean (log 1e-6 + log 4) / 2
    assert abs(loguniform.log().mean().item() - (math.log(1e-6) + math.log(4.0)) / 2) < 0.5
    assert abs(lognormal.log().mean().item()) < 0.1 and abs(lognormal.log().std().item() - 1) < 0.1  # N(0, 1)
    with pytest.raises(ValueError, match="not a TPS"):
        tps_lambda("affine", 1)


# --------------------------------------------------------------------------------------------- full_forward parity


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_full_forward_aligners_from_stored_keypoints(alignment):
    """The stored keypoints through our aligners with the reference grid convention: grid, points_a, matrix,
    lambda, img_a and seg_a (warped with our voxel DDF, i.e. ``monai_ext.spatial.sampling.warp``)."""
    ref = full_forward()
    fixed, moving = ref["points_f"], ref["points_m"]
    if alignment == "rigid":  # no reflection here, so standard Kabsch is the reference's fit
        assert not reference_rotation_reflects(fixed[0].double().numpy(), moving[0].double().numpy())
    transform = fit_keypoint_transform(fixed, moving, alignment)
    shape = ref["img_f"].shape[2:]
    grid = transform.sampling_grid(shape).flip(-1)
    torch.testing.assert_close(grid, ref[f"{alignment}/grid"], rtol=0, atol=GRID_ATOL[alignment])
    points_a = transform.moving_to_fixed(moving)
    torch.testing.assert_close(points_a, ref[f"{alignment}/points_a"], rtol=0, atol=POINTS_ATOL[alignment])
    if alignment == "tps_0":
        torch.testing.assert_close(transform.lmbda, ref["tps_0/tps_lmbda"], rtol=0, atol=0)
        torch.testing.assert_close(points_a, fixed, rtol=0, atol=1e-5)  # lambda = 0 interpolates
    else:
        torch.testing.assert_close(transform.matrix, ref[f"{alignment}/matrix"], rtol=0, atol=1e-6)
    ddf = transform.ddf(shape, reference_grid=True)
    if transform.matrix is not None:
        _, inverse_voxel = transform.voxel_matrices(shape, reference_grid=True)
        torch.testing.assert_close(affine_to_ddf(inverse_voxel, shape), ddf, rtol=0, atol=1e-4)
    torch.testing.assert_close(warp(ref["img_m"], ddf), ref[f"{alignment}/img_a"], rtol=0, atol=IMAGE_ATOL[alignment])
    torch.testing.assert_close(warp(ref["seg_m_onehot"], ddf), ref[f"{alignment}/seg_a"], rtol=0, atol=1e-3)
    # the fixture's own warp of our grid agrees with our DDF warp (same sampling positions)
    torch.testing.assert_close(reference_warp(ref["img_m"], grid), warp(ref["img_m"], ddf), rtol=0, atol=1e-5)


def test_full_forward_power_weighted_variants():
    """``power/*``: weights from the heatmap masses; affine and tps_0 match; rigid and tps_0.1 differ by the
    documented reference quirks (w^2-weighted Kabsch covariance; weighted TPS collapsing to the unweighted affine
    fit for lambda > 0), which are asserted as relations."""
    ref = full_forward()
    backbone = load_npz("keymorph", "conv_backbone.npz")
    heatmaps = {key: torch.from_numpy(backbone[key]) for key in ("heatmaps_f", "heatmaps_m")}
    com = CenterOfMass(return_mass=True)
    (points_f, mass_f), (points_m, mass_m) = com(heatmaps["heatmaps_f"]), com(heatmaps["heatmaps_m"])
    torch.testing.assert_close(points_f, ref["points_f"], rtol=0, atol=1e-6)
    torch.testing.assert_close(points_m, ref["points_m"], rtol=0, atol=1e-6)
    weights = power_weights(mass_f, mass_m)
    torch.testing.assert_close(weights, ref["power/points_weights"], rtol=0, atol=1e-6)
    fixed, moving, w = ref["points_f"], ref["points_m"], ref["power/points_weights"]

    affine = fit_keypoint_transform(fixed, moving, "affine", w)
    torch.testing.assert_close(affine.matrix, ref["power/affine/matrix"], rtol=0, atol=1e-6)
    torch.testing.assert_close(affine.moving_to_fixed(moving), ref["power/affine/points_a"], rtol=0, atol=2e-6)
    tps_0 = fit_keypoint_transform(fixed, moving, "tps_0", w)
    torch.testing.assert_close(tps_0.moving_to_fixed(moving), ref["power/tps_0/points_a"], rtol=0, atol=1e-5)

    # rigid: the reference rotation is the Kabsch rotation of sum_k w_k^2 q_f q_m^T around the w-centroids
    p, q, wn = (x[0].double().numpy() for x in (fixed, moving, w))
    cp, cq = wn @ p, wn @ q
    u, _, vt = np.linalg.svd(((p - cp) * wn[:, None] ** 2).T @ (q - cq))
    rotation = vt.T @ u.T
    assert np.linalg.det(rotation) > 0  # no reflection branch
    quirk = np.eye(4)
    quirk[:3, :3], quirk[:3, 3] = rotation, cq - rotation @ cp
    np.testing.assert_allclose(np.linalg.inv(quirk), ref["power/rigid/matrix"][0], atol=1e-5)
    np.testing.assert_allclose(transform_points(torch.from_numpy(np.linalg.inv(quirk))[None], moving.double()).numpy(),
                               ref["power/rigid/points_a"], atol=1e-5)
    ours = fit_keypoint_transform(fixed.double(), moving.double(), "rigid", w.double())
    residual = lambda m: (w.double() * (transform_points(m, fixed.double()) - moving.double()).square().sum(-1)).sum()
    assert residual(ours.inverse_matrix) < residual(torch.from_numpy(quirk)[None])  # ours is the weighted optimum
    assert (ours.matrix.float() - ref["power/rigid/matrix"]).abs().max() > 1e-3  # the deviation is visible

    # tps_0.1: the reference equals the unweighted least-squares affine moving -> fixed (README 4.6: 6.7e-6)
    unweighted = transform_points(fit_affine(moving, fixed), moving)
    torch.testing.assert_close(ref["power/tps_0.1/points_a"], unweighted, rtol=0, atol=1e-5)
    tps = fit_keypoint_transform(fixed, moving, "tps_0.1", w)
    torch.testing.assert_close(tps.theta, fit_tps(moving, fixed, 0.1, w), rtol=0, atol=0)  # lambda / w_k per point
    assert (tps.moving_to_fixed(moving) - ref["power/tps_0.1/points_a"]).abs().max() > 1e-2


def test_full_forward_end_to_end_with_conv_checkpoint():
    ref = full_forward()
    model = conv_model()
    with torch.no_grad():
        result = model.register(ref["img_m"], ref["img_f"], ALIGNMENTS)
        ddf = model(torch.cat([ref["img_m"], ref["img_f"]], dim=1))
    for alignment, out in result.items():
        torch.testing.assert_close(out["points_fixed"], ref["points_f"], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["points_moving"], ref["points_m"], rtol=0, atol=1e-5)
        grid_atol = 1e-4 if alignment == "tps_0" else 1e-5
        torch.testing.assert_close(out["grid"], ref[f"{alignment}/grid"], rtol=0, atol=grid_atol)
        torch.testing.assert_close(out["points_aligned"], ref[f"{alignment}/points_a"], rtol=0, atol=2e-5)
        if "matrix" in out:
            torch.testing.assert_close(out["matrix"], ref[f"{alignment}/matrix"], rtol=0, atol=2e-5)
        torch.testing.assert_close(warp(ref["img_m"], out["ddf"]), ref[f"{alignment}/img_a"], rtol=0, atol=1e-4)
        torch.testing.assert_close(warp(ref["seg_m_onehot"], out["ddf"]), ref[f"{alignment}/seg_a"], rtol=0, atol=1e-3)
    torch.testing.assert_close(ddf, result["affine"]["ddf"], rtol=0, atol=0)  # forward = the default alignment

    weighted = conv_model(weighted=True)
    with torch.no_grad():
        result = weighted.register(ref["img_m"], ref["img_f"], ("affine", "tps_0"))
    torch.testing.assert_close(result["affine"]["weights"], ref["power/points_weights"], rtol=0, atol=1e-6)
    torch.testing.assert_close(result["affine"]["matrix"], ref["power/affine/matrix"], rtol=0, atol=2e-5)
    torch.testing.assert_close(result["tps_0"]["points_aligned"], ref["power/tps_0/points_a"], rtol=0, atol=2e-5)


# --------------------------------------------------------------------------------------------- groupwise parity


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_groupwise_from_stored_keypoints(alignment):
    ref = as_tensors(load_npz("keymorph", "groupwise.npz"))
    points = ref["grouppoints_m"]
    for n in range(points.shape[0]):  # standard Kabsch = reference rigid as long as nothing reflects
        assert not reference_rotation_reflects(
            ref[f"{alignment}/template"][0].double().numpy(), points[n].double().numpy()
        )
    result = groupwise_keypoints(points, alignment, num_iterations=5)
    torch.testing.assert_close(result["means"], ref[f"{alignment}/means_per_iter"], rtol=0, atol=1e-5)
    torch.testing.assert_close(result["template"][None], ref[f"{alignment}/template"], rtol=0, atol=1e-5)
    torch.testing.assert_close(result["points_aligned"], ref[f"{alignment}/grouppoints_a"], rtol=0, atol=1e-5)

    shape = tuple(ref["imgs"].shape[2:])
    group = GroupwiseRegistration(
        alignment,
        points,
        ref[f"{alignment}/grouppoints_a"],
        ref[f"{alignment}/means_per_iter"],
        ref[f"{alignment}/template"][0],
        [shape] * points.shape[0],
        reference_grid=True,
        chunk_size=5000,
    )
    for n, ddf in enumerate(group.ddfs()):
        grid = group.transform(n).sampling_grid(shape).flip(-1)
        torch.testing.assert_close(grid, ref[f"{alignment}/grids"][n : n + 1], rtol=0, atol=GRID_ATOL[alignment])
        expected = reference_warp(ref["imgs"][n : n + 1], ref[f"{alignment}/grids"][n : n + 1])
        torch.testing.assert_close(warp(ref["imgs"][n : n + 1], ddf), expected, rtol=0, atol=IMAGE_ATOL[alignment])


def test_groupwise_end_to_end_keypoints_with_conv_checkpoint():
    ref = as_tensors(load_npz("keymorph", "groupwise.npz"))
    images = (image for image in ref["imgs"].split(1))  # a lazy iterable, one volume at a time
    result = conv_model().groupwise_register(images, "affine", num_iterations=5)
    torch.testing.assert_close(result.points, ref["grouppoints_m"], rtol=0, atol=1e-5)
    torch.testing.assert_close(result.template[None], ref["affine/template"], rtol=0, atol=2e-5)
    torch.testing.assert_close(result.points_aligned, ref["affine/grouppoints_a"], rtol=0, atol=2e-5)
    assert result.spatial_shapes == [tuple(ref["imgs"].shape[2:])] * 4


# --------------------------------------------------------------------------------------------- metrics.npz


@pytest.mark.parametrize("alignment", ALIGNMENTS + ("unregistered",))
def test_metrics_parity(alignment):
    """Metrics of the stored ``full_forward`` arrays. Equal by definition: MSE, soft Dice loss (MONAI ``DiceLoss``
    with squared prediction and smoothing 1), Hausdorff (MONAI with the reference's background channel and
    spacing (1.25, 1.25, 10)). Hard Dice: MONAI's 2|A n B| / (|A| + |B|) vs the reference's smoothed
    (2|A n B| + 1) / (|A| + |B| + 1) (absent labels score 1 there and are skipped by MONAI); fast_dice is MONAI's
    per-label Dice averaged over the labels present in either map."""
    ref, metrics = full_forward(), load_npz("keymorph", "metrics.npz")
    registered = alignment != "unregistered"
    image = ref[f"{alignment}/img_a"] if registered else ref["img_m"]
    seg = ref[f"{alignment}/seg_a"] if registered else ref["seg_m_onehot"]
    target = ref["seg_f_onehot"]
    for name in ("seg_f", "seg_m"):  # the reference's one-hot: max label + 1 channels, label 3 absent
        one_hot = nn.functional.one_hot(ref[name][:, 0], 5).movedim(-1, 1).float()
        torch.testing.assert_close(one_hot, ref[f"{name}_onehot"], rtol=0, atol=0)
    np.testing.assert_allclose((image - ref["img_f"]).square().mean().item(), metrics[f"{alignment}/mse"], rtol=1e-6)
    soft_loss = DiceLoss(smooth_nr=1.0, smooth_dr=1.0, squared_pred=True)(seg, target).item()
    np.testing.assert_allclose(1 - soft_loss, metrics[f"{alignment}/softdice"], rtol=1e-6)
    hausdorff = compute_hausdorff_distance(
        (seg[:, :1] != 0).float(), (target[:, :1] != 0).float(), include_background=True, spacing=(1.25, 1.25, 10.0)
    )
    np.testing.assert_allclose(hausdorff.item(), metrics[f"{alignment}/hausd"], rtol=1e-6)

    hard = nn.functional.one_hot(seg.argmax(1), seg.shape[1]).movedim(-1, 1).float()
    monai_dice = compute_dice(hard, target, include_background=True, ignore_empty=False)[0].double()
    overlap = (hard * target).flatten(2).sum(-1)[0].double()
    total = (hard + target).flatten(2).sum(-1)[0].double()
    present = total > 0
    torch.testing.assert_close(monai_dice[present], 2 * overlap[present] / total[present])  # MONAI = plain Dice
    smoothed = (2 * overlap + 1) / (total + 1)  # reference, absent labels -> 1
    np.testing.assert_allclose(smoothed[1:].mean().item(), metrics[f"{alignment}/harddice"], rtol=1e-6)
    if not registered:
        return
    assert not present[3] and smoothed[3] == 1  # label 3 is absent from both maps
    np.testing.assert_allclose(smoothed[1:].numpy(), metrics[f"{alignment}/harddiceroi"], rtol=1e-6)
    np.testing.assert_allclose(smoothed.mean().item(), metrics[f"{alignment}/harddice_incl_background"], rtol=1e-6)
    np.testing.assert_allclose(soft_loss, metrics[f"{alignment}/softdiceloss"], rtol=1e-6)
    np.testing.assert_allclose(monai_dice[present].mean().item(), metrics[f"{alignment}/fast_dice"], rtol=1e-6)


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_metrics_jacobian_quirk(alignment):
    """Quirk 12: the reference's determinant is det(I + G) of the *normalized absolute grid* (G ~ 2/N, channel
    order reversed w.r.t. the derivative axes), ~1 whatever the deformation. Reproduced exactly from the stored
    grid, and from our voxel DDF (converted to that grid) to 1e-4; our own metric (voxel Jacobian of x + ddf) is
    the actual volume change: for affine / rigid the constant det of the voxel matrix. Neither folds here."""
    ref, metrics = full_forward(), load_npz("keymorph", "metrics.npz")
    jacdet = reference_jacobian_determinant(ref[f"{alignment}/grid"].numpy())
    np.testing.assert_allclose(jacdet, metrics[f"{alignment}/jacdet"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(jacdet.std(), metrics[f"{alignment}/jdstd"], rtol=1e-4)
    assert metrics[f"{alignment}/jdlessthan0"] == (jacdet <= 0).sum() == 0
    assert metrics[f"{alignment}/jdlessthan0_fraction"] == (jacdet <= 0).mean()
    assert metrics[f"{alignment}/jdlessthan0_as_written_by_pairwise_eval"] == metrics[f"{alignment}/jdstd"]

    transform = fit_keypoint_transform(ref["points_f"], ref["points_m"], alignment)
    shape = ref["img_f"].shape[2:]
    ddf = transform.ddf(shape, reference_grid=True)
    size = torch.tensor(shape, dtype=F64)
    grid = 2 * (voxel_grid(shape, F64)[None] + ddf.double() + 0.5).movedim(1, -1) / size - 1  # align_corners=False
    np.testing.assert_allclose(reference_jacobian_determinant(grid.flip(-1).numpy()), jacdet, rtol=0, atol=1e-4)
    ours = jacobian_determinant(ddf.double())
    if alignment == "tps_0":  # exact interpolation of noisy keypoints folds: the reference metric cannot see it
        assert folding_fraction(ddf.double()).item() > 0.1
    else:
        assert folding_fraction(ddf.double()).item() == 0
    if transform.matrix is not None:
        _, inverse_voxel = transform.voxel_matrices(shape, reference_grid=True)
        volume_change = torch.linalg.det(inverse_voxel[0, :3, :3].double())
        torch.testing.assert_close(ours, volume_change.expand_as(ours), rtol=0, atol=1e-4)
        stored_ddf = voxel_ddf_from_reference_grid(ref[f"{alignment}/grid"])
        torch.testing.assert_close(stored_ddf, ddf.double(), rtol=0, atol=1e-4)
        assert abs(volume_change.item() - jacdet.mean()) > 1e-2  # the two definitions measure different things


# --------------------------------------------------------------------------------------------- properties


def random_points(batch: int, k: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, k, 3, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def smooth_image(shape, seed: int) -> torch.Tensor:
    noise = torch.rand(1, 1, *shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return nn.functional.avg_pool3d(noise, 3, 1, 1, count_include_pad=False)


@pytest.mark.parametrize("alignment", ["affine", "rigid", "tps_0", "tps_1"])
def test_identical_keypoints_give_the_identity(alignment):
    """Consistent convention: zero DDF and the image reproduced exactly. Reference convention: fixed voxel x
    reads moving voxel x N / (N - 1) - 0.5 (p = -1 + 2x / (N - 1), v = (p + 1) N / 2 - 0.5), the documented zoom."""
    points, shape = random_points(2, 8, 1), (9, 10, 11)
    transform = fit_keypoint_transform(points, points, alignment)
    ddf = transform.ddf(shape)
    torch.testing.assert_close(ddf, torch.zeros_like(ddf), rtol=0, atol=1e-9)
    image = smooth_image(shape, 2).expand(2, -1, -1, -1, -1)
    torch.testing.assert_close(warp(image, ddf), image, rtol=0, atol=1e-9)
    size = torch.tensor(shape, dtype=F64).view(1, 3, 1, 1, 1)
    grid = voxel_grid(shape, F64)[None]
    zoom = grid * size / (size - 1) - 0.5 - grid
    torch.testing.assert_close(transform.ddf(shape, reference_grid=True), zoom.expand_as(ddf))


def test_known_affine_is_recovered_and_the_image_reproduced():
    """moving(y) = fixed(B y) with B a voxel-grid-preserving map (a 90-degree rotation of a cube plus an integer
    shift), moving keypoints = A fixed keypoints exactly (A = B^-1 in normalized coordinates): the voxel matrix
    is A's, the DDF is affine_to_ddf(A) and warping the moving image reproduces the fixed one exactly; a TPS
    reproduces the same affine map (a TPS reproduces any affine map of its control points exactly)."""
    n = 12
    shape = (n, n, n)
    fixed_image = smooth_image(shape, 3)
    moving_image = fixed_image.transpose(3, 4).flip(3).roll(2, dims=2)  # moving[i, j, k] = fixed[i - 2, k, n-1-j]
    # moving voxel (i, j, k) -> fixed voxel (i - 2, k, n - 1 - j): B; the fixed -> moving map is A = B^-1
    b_voxel = torch.tensor([[1, 0, 0, -2], [0, 0, 1, 0], [0, -1, 0, n - 1], [0, 0, 0, 1]], dtype=F64)
    a_voxel = torch.linalg.inv(b_voxel)[None]
    to_norm = voxel_to_normalized(shape, True, F64)
    a_norm = to_norm @ a_voxel @ torch.linalg.inv(to_norm)
    points_f = random_points(1, 10, 4)
    points_m = transform_points(a_norm, points_f)
    interior = (slice(None), slice(None), slice(0, n - 2))  # fixed voxels reading the rolled (wrapped) slab excluded
    for alignment in ("affine", "rigid", "tps_0", "tps_1"):
        transform = fit_keypoint_transform(points_f, points_m, alignment)
        ddf = transform.ddf(shape)
        torch.testing.assert_close(ddf, affine_to_ddf(a_voxel, shape), rtol=0, atol=1e-8)
        torch.testing.assert_close(warp(moving_image, ddf)[interior], fixed_image[interior], rtol=0, atol=1e-9)
        if transform.matrix is not None:
            matrix_voxel, inverse_voxel = transform.voxel_matrices(shape)
            torch.testing.assert_close(inverse_voxel, a_voxel, rtol=0, atol=1e-9)
            torch.testing.assert_close(matrix_voxel, b_voxel[None], rtol=0, atol=1e-9)
        torch.testing.assert_close(transform.moving_to_fixed(points_m), points_f, rtol=0, atol=1e-8)


def test_tps_0_maps_fixed_keypoints_exactly_onto_moving_keypoints():
    """Keypoints at voxel centres: the DDF at those voxels is exactly moving voxel - fixed voxel."""
    shape = (11, 12, 13)
    generator = torch.Generator().manual_seed(5)
    voxels_f = torch.stack([torch.randperm(s, generator=generator)[:8] for s in shape], -1).to(F64)[None]
    voxels_m = voxels_f + torch.randn(1, 8, 3, dtype=F64, generator=generator)
    to_norm = voxel_to_normalized(shape, True, F64)[None]
    points_f, points_m = transform_points(to_norm, voxels_f), transform_points(to_norm, voxels_m)
    transform = fit_keypoint_transform(points_f, points_m, "tps_0")
    torch.testing.assert_close(transform.fixed_to_moving(points_f), points_m, rtol=0, atol=1e-9)
    torch.testing.assert_close(transform.moving_to_fixed(points_m), points_f, rtol=0, atol=1e-9)
    ddf = transform.ddf(shape, chunk_size=100)
    index = voxels_f[0].long()
    at_keypoints = ddf[0, :, index[:, 0], index[:, 1], index[:, 2]].T
    torch.testing.assert_close(at_keypoints, (voxels_m - voxels_f)[0], rtol=0, atol=1e-8)


def test_different_moving_and_fixed_grids():
    """Same normalized box: fixed voxel x of N is moving voxel 2x of 2N - 1 (consistent convention) and
    (2x) * (2N - 1) / (2N - 2) - 0.5 in the reference's (v = (p + 1) N_m / 2 - 0.5 with p = -1 + 2x / (N - 1))."""
    points, fixed_shape = random_points(1, 8, 9), (5, 6, 7)
    moving_shape = tuple(2 * s - 1 for s in fixed_shape)
    grid = voxel_grid(fixed_shape, F64)[None]
    for alignment in ("affine", "tps_0"):
        transform = fit_keypoint_transform(points, points, alignment)
        torch.testing.assert_close(transform.ddf(fixed_shape, moving_shape), grid, rtol=0, atol=1e-9)
        size = torch.tensor(moving_shape, dtype=F64).view(1, 3, 1, 1, 1)
        expected = 2 * grid * size / (size - 1) - 0.5 - grid
        torch.testing.assert_close(transform.ddf(fixed_shape, moving_shape, True), expected, rtol=0, atol=1e-9)


def test_training_gradients_reach_the_backbone():
    """Unsupervised training step (MSE after warping) with a random TPS lambda: finite, non-zero gradients."""
    backbone = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.Softplus())
    model = KeyMorph(backbone, "tps_loguniform", max_train_keypoints=5).train()
    fixed, moving = smooth_image((12, 12, 12), 10).float(), smooth_image((12, 12, 12), 11).float()
    ddf = model(torch.cat([moving, fixed], dim=1))
    (warp(moving, ddf) - fixed).square().mean().backward()
    grads = [p.grad for p in backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and grads[0].abs().sum() > 0


BLOBS = torch.tensor([[4, 4, 4], [4, 12, 6], [12, 5, 5], [6, 6, 13], [11, 12, 12], [8, 9, 4]])


def blob_image(offset=(0, 0, 0), size: int = 20, dtype=F64) -> torch.Tensor:
    """(1, 6, size^3): channel k holds a 2x2x2 cube of ones at BLOBS[k] + offset (compact support, so that an
    integer translation moves its centre of mass exactly)."""
    image = torch.zeros(1, len(BLOBS), size, size, size, dtype=dtype)
    for k, (i, j, l) in enumerate((BLOBS + torch.tensor(offset)).tolist()):
        image[0, k, i : i + 2, j : j + 2, l : l + 2] = 1
    return image


@pytest.mark.parametrize("alignment", ["affine", "rigid", "tps_0"])
def test_forward_ddf_warps_moving_onto_fixed(alignment):
    """Identity backbone (the image channels are the heatmaps): a translation by t voxels moves every keypoint by
    t exactly, the DDF is the constant t (warp reads moving(x + t) = fixed(x)) and warps moving onto fixed."""
    offset = (2, -1, 3)
    fixed, moving = blob_image(), blob_image(offset)
    model = KeyMorph(nn.Identity(), alignment).eval()
    ddf = model(torch.cat([moving, fixed], dim=1))
    expected = torch.tensor(offset, dtype=F64).view(1, 3, 1, 1, 1).expand_as(ddf)
    torch.testing.assert_close(ddf, expected, rtol=0, atol=1e-8)
    torch.testing.assert_close(warp(moving, ddf), fixed, rtol=0, atol=1e-8)


def test_register_outputs_and_batches():
    """Batch of 2 equals the two single registrations; the voxel matrix drives the DDF; weights sum to 1."""
    fixed = torch.cat([blob_image(), blob_image((1, 0, 0))])
    moving = torch.cat([blob_image((2, -1, 3)), blob_image((0, 2, -2))])
    model = KeyMorph(KeypointDetector(nn.Identity()), weighted=True).eval()
    batch = model.register(moving, fixed, ("affine", "rigid", "tps_0.5"))
    for b in range(2):
        single = model.register(moving[b : b + 1], fixed[b : b + 1], ("affine", "rigid", "tps_0.5"))
        for name, out in single.items():
            assert set(out) == set(batch[name])
            for key, value in out.items():
                torch.testing.assert_close(batch[name][key][b : b + 1], value, rtol=0, atol=1e-9)
    affine = batch["affine"]
    torch.testing.assert_close(affine["weights"].sum(1), torch.ones(2, dtype=F64))
    ddf_of_matrix = affine_to_ddf(affine["inverse_matrix_voxel"], (20, 20, 20))
    torch.testing.assert_close(ddf_of_matrix, affine["ddf"], rtol=0, atol=1e-9)
    product = affine["matrix_voxel"] @ affine["inverse_matrix_voxel"]
    torch.testing.assert_close(product, torch.eye(4, dtype=F64).expand(2, 4, 4))
    # grid: normalized moving coordinates (x, y, z), read with align_corners=True in the consistent convention
    sampled = nn.functional.grid_sample(moving, affine["grid"], padding_mode="border", align_corners=True)
    torch.testing.assert_close(sampled, warp(moving, affine["ddf"]), rtol=0, atol=1e-9)
    assert batch["tps_0.5"]["lmbda"].tolist() == [0.5, 0.5]


def test_training_subsamples_tps_keypoints():
    model = KeyMorph(nn.Identity(), "tps_0", max_train_keypoints=5).train()
    out = model.register(blob_image((2, -1, 3)), blob_image())["tps_0"]
    assert out["points_fixed"].shape == (1, 5, 3) and out["theta"].shape == (1, 9, 3)
    expected = torch.tensor([2.0, -1.0, 3.0], dtype=F64).view(1, 3, 1, 1, 1).expand_as(out["ddf"])
    torch.testing.assert_close(out["ddf"], expected)
    assert model.eval().register(blob_image(), blob_image())["tps_0"]["points_fixed"].shape == (1, 6, 3)
    with pytest.raises(ValueError, match="exactly one alignment"):
        model.train().register(blob_image(), blob_image(), ("affine", "tps_0"))


# --------------------------------------------------------------------------------------------- groupwise properties


@pytest.mark.parametrize("alignment", ["affine", "tps_0"])
def test_groupwise_of_affine_copies_has_a_consistent_template(alignment):
    """G_i = A_i P exactly: mean_i A_i P is itself an affine image of P, so the first iteration maps every set onto
    it and it stays the template; every image's transform maps the template back onto its own keypoints."""
    generator = torch.Generator().manual_seed(6)
    base = random_points(1, 10, 7)[0]
    matrices = torch.eye(4, dtype=F64).repeat(5, 1, 1)
    matrices[:, :3] += 0.15 * torch.randn(5, 3, 4, dtype=F64, generator=generator)
    points = transform_points(matrices, base.expand(5, -1, -1))
    result = groupwise_keypoints(points, alignment, num_iterations=3)
    expected = points.mean(0)
    for mean in result["means"]:
        torch.testing.assert_close(mean, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(result["points_aligned"], expected.expand(5, -1, -1), rtol=0, atol=1e-9)
    group = GroupwiseRegistration(
        alignment, points, result["points_aligned"], result["means"], result["template"], [(6, 6, 6)] * 5
    )
    for i in range(5):
        template_in_image = group.transform(i).fixed_to_moving(result["template"][None])
        torch.testing.assert_close(template_in_image, points[i : i + 1], rtol=0, atol=1e-9)


def test_groupwise_images_land_in_a_common_space():
    """Translated copies (offsets with zero mean) of one blob image: the template is the base keypoint set and
    every image warped by its DDF is exactly the base image."""
    offsets = [(0, 0, 0), (2, 0, -2), (-2, 2, 0), (0, -2, 2)]
    images = torch.cat([blob_image(offset) for offset in offsets])
    model = KeyMorph(nn.Identity(), "rigid").eval()
    result = model.groupwise_register(images)
    base_points = model.keypoints(blob_image())[0][0]
    torch.testing.assert_close(result.template, base_points, rtol=0, atol=1e-9)
    for image, ddf in zip(images.split(1), result.ddfs()):
        torch.testing.assert_close(warp(image, ddf), blob_image(), rtol=0, atol=1e-7)


def test_groupwise_memory_generator_of_50_images():
    """N = 50 volumes from a counting generator: each volume's keypoints are computed right after it is produced
    (one at a time), the result holds keypoints only, and the DDFs come lazily one by one."""
    produced, detected = [0], []

    def volumes():
        for i in range(50):
            produced[0] += 1
            yield {"image": blob_image((i % 3 - 1, (i // 3) % 3 - 1, 0), dtype=torch.float32)}

    class CountingIdentity(nn.Module):
        def forward(self, image):
            detected.append(produced[0])
            return image

    result = KeyMorph(CountingIdentity(), "affine").eval().groupwise_register(volumes(), num_iterations=2)
    assert detected == list(range(1, 51))  # the generator was never run ahead of the detector
    assert len(result) == 50 and result.points.shape == (50, 6, 3)
    stored = [value for value in vars(result).values() if isinstance(value, torch.Tensor)]
    assert max(t.numel() for t in stored) == 50 * 6 * 3  # no volume, grid or DDF is kept
    ddfs = result.ddfs()
    assert inspect.isgenerator(ddfs)
    first = next(ddfs)
    assert first.shape == (1, 3, 20, 20, 20) and torch.isfinite(first).all()
    assert sum(1 for _ in ddfs) == 49


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_errors_are_clear_and_never_nan():
    model = conv_model()
    with pytest.raises(ValueError, match="3 spatial dims"):
        model.register(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="must agree"):
        model.register(torch.rand(1, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="non-finite"):
        model.register(torch.full((1, 1, 32, 32, 32), float("nan")), torch.rand(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="even channel count"):
        model(torch.rand(1, 3, 32, 32, 32))
    with pytest.raises(ValueError, match="alignment"):
        model.register(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32), "bspline")

    points = random_points(1, 6, 8)
    with pytest.raises(ValueError, match="at least 4"):
        fit_keypoint_transform(points[:, :3], points[:, :3], "affine")
    with pytest.raises(ValueError, match="at least 5"):
        fit_keypoint_transform(points[:, :4], points[:, :4], "tps_0")
    collinear = torch.linspace(-1, 1, 6, dtype=F64)[None, :, None] * torch.tensor([1.0, 0.5, -0.3], dtype=F64)
    for alignment in ("affine", "rigid", "tps_0"):
        with pytest.raises(ValueError, match="degenerate"):
            fit_keypoint_transform(collinear, collinear + 0.1, alignment)
    with pytest.raises(ValueError, match="N >= 2"):
        groupwise_keypoints(points, "affine")

    # an empty image (all heatmaps zero): a clear error, never NaN; a few empty heatmaps follow the reference's
    # corner fallback (-1) and can make the keypoints degenerate, which the fit reports
    identity = KeyMorph(nn.Identity(), "affine").eval()
    empty = torch.zeros(1, 6, 20, 20, 20)
    for alignment in ("affine", "rigid", "tps_0"):
        with pytest.raises(ValueError, match="moving: every heatmap is empty"):
            identity.register(empty, blob_image(dtype=torch.float32), alignment)
    with pytest.raises(ValueError, match="fixed: every heatmap is empty"):
        KeyMorph(nn.Identity(), weighted=True).eval().register(blob_image(dtype=torch.float32), empty)
    partly_empty = blob_image(dtype=torch.float32)
    partly_empty[:, 1:] = 0  # one blob and five corner points: two distinct points
    points, _ = identity.keypoints(partly_empty)
    assert (points[0, 1:] == -1).all() and torch.isfinite(points).all()
    for alignment in ("affine", "rigid", "tps_0"):
        with pytest.raises(ValueError, match="degenerate"):
            identity.register(partly_empty, blob_image(dtype=torch.float32), alignment)
    with pytest.raises(ValueError, match="channels without positive values"):
        KeyMorph(KeypointDetector(nn.Identity(), empty="raise")).eval().register(partly_empty, partly_empty)
