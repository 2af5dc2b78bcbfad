"""Property tests of the sampling core: sample / warp / compose / affine_to_ddf (voxel units, border extrapolation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_ext.spatial import sampling
from monai_ext.spatial.affine import transform_points
from monai_ext.spatial.sampling import affine_to_ddf, check_ddf, compose, sample, sample_points, voxel_grid, warp

F64 = torch.float64
SHAPES = [(7, 6), (5, 6, 4)]


def _smooth_field(shape, amplitude: float, batch: int = 1, dtype=F64) -> torch.Tensor:
    """Smooth random DDF ``(B, n, *shape)``: coarse noise upsampled (multi)linearly to ``shape``."""
    n = len(shape)
    coarse = torch.randn(batch, n, *([3] * n), dtype=dtype)
    return amplitude * F.interpolate(coarse, size=shape, mode="bilinear" if n == 2 else "trilinear", align_corners=True)


def _random_affine(n: int, batch: int = 1, strength: float = 0.1, shift: float = 1.0) -> torch.Tensor:
    matrix = torch.eye(n + 1, dtype=F64).repeat(batch, 1, 1)
    matrix[:, :n, :n] += strength * torch.randn(batch, n, n, dtype=F64)
    matrix[:, :n, n] = shift * torch.randn(batch, n, dtype=F64)
    return matrix


def _clamped_index(image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``image[b, :, clamp(coords)]`` for integer voxel coordinates ``(B, n, *out)`` (border padding by hand)."""
    n = coords.shape[1]
    sizes = image.shape[2:]
    idx = [coords[:, i].round().long().clamp(0, sizes[i] - 1) for i in range(n)]
    batch = torch.arange(image.shape[0]).view(-1, *([1] * (coords.ndim - 2))).expand_as(idx[0])
    return image.movedim(1, -1)[(batch, *idx)].movedim(-1, 1)


# ------------------------------------------------------------------------------------ exactness ---


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_identity_ddf_reproduces_image(shape, mode):
    """Zero DDF: the image back up to the rounding of grid_sample's coordinate normalisation (|image| < 5:
    atol 1e-14 in float64, 1e-6 in float32); nearest and integer labels exactly."""
    image = torch.randn(2, 3, *shape, dtype=F64)
    zero = torch.zeros(2, len(shape), *shape, dtype=F64)
    exact = mode == "nearest"
    torch.testing.assert_close(warp(image, zero, mode), image, rtol=0, atol=0 if exact else 1e-14)
    torch.testing.assert_close(
        warp(image.float(), zero.float(), mode), image.float(), rtol=0, atol=0 if exact else 1e-6
    )
    labels = torch.randint(0, 9, (2, 1, *shape))
    assert torch.equal(warp(labels, zero.float(), mode), labels)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_integer_translation_shifts_by_voxels(shape, padding):
    """Constant integer DDF t: warped(x) = image(x + t), border replicates the edge, zeros pads with 0."""
    n = len(shape)
    image = torch.randn(1, 2, *shape, dtype=F64)
    shift = torch.tensor([2, -1, 3][:n], dtype=F64)
    ddf = shift.view(1, n, *([1] * n)).expand(1, n, *shape).contiguous()
    warped = warp(image, ddf, padding=padding)
    target = voxel_grid(shape, F64)[None] + ddf
    expected = _clamped_index(image, target)
    if padding == "zeros":
        inside = torch.stack([(target[:, i] >= 0) & (target[:, i] <= shape[i] - 1) for i in range(n)]).all(0)
        expected = expected * inside[:, None]
    torch.testing.assert_close(warped, expected, rtol=0, atol=1e-12)
    # the interior written out with slices: fixed [max(0, -t), N - max(0, t)) reads moving [max(0, t), N + min(0, t))
    fixed = tuple(slice(max(0, -t), s - max(0, t)) for t, s in zip(shift.long().tolist(), shape))
    moving = tuple(slice(max(0, t), s + min(0, t)) for t, s in zip(shift.long().tolist(), shape))
    torch.testing.assert_close(warped[(..., *fixed)], image[(..., *moving)], rtol=0, atol=1e-12)


def test_linear_sampling_is_mean_of_corners():
    """SITReg's own check: on a 2x3x4 volume, (0.5, 1.5, 2.0) lies halfway between 4 voxels along axes 0 and 1 and on
    a grid plane along axis 2, so trilinear interpolation gives the mean of (0|1, 1|2, 2). For the ramp 12 i + 4 j + k
    (its values are 0..23 in C order) that is 12 * 0.5 + 4 * 1.5 + 2 = 14."""
    ramp = torch.arange(24, dtype=F64).reshape(1, 1, 2, 3, 4)
    point = torch.tensor([[[0.5, 1.5, 2.0]]], dtype=F64)
    assert sample_points(ramp, point).item() == pytest.approx(14.0, abs=1e-12)
    volume = torch.randn(1, 2, 2, 3, 4, dtype=F64)
    corners = volume[:, :, 0:2, 1:3, 2].mean(dim=(2, 3))
    torch.testing.assert_close(sample_points(volume, point)[:, 0], corners, rtol=0, atol=1e-12)
    torch.testing.assert_close(sample_points(volume.float(), point.float())[:, 0], corners.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_ddf_border_extrapolation(shape):
    """Outside the grid a DDF keeps its edge value (replicate), as SITReg evaluates deformations."""
    n = len(shape)
    ddf = _smooth_field(shape, 2.0)
    inside = torch.rand(1, n, 11, dtype=F64) * (torch.tensor(shape, dtype=F64) - 1).view(1, n, 1)
    outside, clamped = inside.clone(), inside.clone()
    outside[:, 0, :5] = -0.5 - 3 * inside[:, 0, :5]  # before the first voxel of axis 0
    clamped[:, 0, :5] = 0
    outside[:, n - 1, 5:] = shape[-1] - 0.75 + inside[:, n - 1, 5:]  # after the last voxel of the last axis
    clamped[:, n - 1, 5:] = shape[-1] - 1
    torch.testing.assert_close(sample(ddf, outside), sample(ddf, clamped), rtol=0, atol=1e-12)
    # compose sees the same extrapolation: an inner field pushing everything 10 voxels out reads outer's edge
    inner = torch.zeros(1, n, *shape, dtype=F64)
    inner[:, 0] = -10.0
    edge = ddf[:, :, :1].expand_as(ddf)
    torch.testing.assert_close(compose(ddf, inner), inner + edge, rtol=0, atol=1e-12)
    assert not torch.allclose(sample(ddf, outside, padding="zeros"), sample(ddf, clamped))


# --------------------------------------------------------------------------------------- labels ---


@pytest.mark.parametrize("shape", SHAPES)
def test_nearest_warp_keeps_integer_dtype_and_labels(shape):
    labels = torch.tensor([0, 3, 7, 250])[torch.randint(0, 4, (2, 1, *shape))]
    ddf = _smooth_field(shape, 2.0, batch=2, dtype=torch.float32)
    for dtype in (torch.int64, torch.int32, torch.uint8):
        warped = warp(labels.to(dtype), ddf, mode="nearest")
        assert warped.dtype == dtype and warped.shape == labels.shape
        assert set(warped.unique().tolist()) <= {0, 3, 7, 250}
    # it is the label of the nearest voxel of x + u(x) (border clamped)
    nearest = _clamped_index(labels, voxel_grid(shape)[None] + ddf)
    assert torch.equal(warp(labels, ddf, mode="nearest"), nearest)


@pytest.mark.parametrize("shape", SHAPES)
def test_linear_warp_of_one_hot_sums_to_one(shape):
    """Multilinear weights form a partition of unity, so warped one-hot channels stay a probability vector."""
    labels = torch.randint(0, 4, (2, *shape))
    one_hot = F.one_hot(labels, 4).movedim(-1, 1).float()
    warped = warp(one_hot, _smooth_field(shape, 3.0, batch=2, dtype=torch.float32))
    torch.testing.assert_close(warped.sum(1), torch.ones(2, *shape), rtol=0, atol=1e-5)
    assert warped.min() >= 0 and warped.max() <= 1 + 1e-6


# ---------------------------------------------------------------------------------- composition ---


@pytest.mark.parametrize("shape", SHAPES)
def test_compose_of_translations_is_exact(shape):
    """Constant fields compose to their sum (border extrapolation keeps a constant constant), and sequential
    warping by integer shifts equals one warp by the sum wherever every read stays inside the grid."""
    n = len(shape)
    t_outer, t_inner = torch.tensor([1.0, -2.0, 1.0][:n], dtype=F64), torch.tensor([0.25, 1.5, -1.0][:n], dtype=F64)
    outer = t_outer.view(1, n, *([1] * n)).expand(1, n, *shape).contiguous()
    inner = t_inner.view(1, n, *([1] * n)).expand(1, n, *shape).contiguous()
    torch.testing.assert_close(compose(outer, inner), outer + inner, rtol=0, atol=1e-12)
    image = torch.randn(1, 1, *shape, dtype=F64)
    inner_int = inner.round()
    sequential = warp(warp(image, outer), inner_int)
    direct = warp(image, compose(outer, inner_int))
    grid = voxel_grid(shape, F64)[None]
    size = torch.tensor(shape, dtype=F64).view(1, n, *([1] * n))
    first, second = grid + inner_int, grid + inner_int + outer
    valid = (((first >= 0) & (first <= size - 1)) & ((second >= 0) & (second <= size - 1))).all(1, keepdim=True)
    assert valid.any()
    torch.testing.assert_close(sequential[valid], direct[valid], rtol=0, atol=1e-12)


def _inside(points: torch.Tensor, shape) -> bool:
    """Whether voxel coordinates ``(B, n, *out)`` all lie in the grid ``shape`` (edge voxel centres included)."""
    size = torch.tensor(shape, dtype=points.dtype).view(1, -1, *([1] * (points.ndim - 2)))
    return bool(((points >= 0) & (points <= size - 1)).all())


def _inward_affine(shape) -> torch.Tensor:
    """Random voxel affine ``(1, n + 1, n + 1)`` that maps the grid ``shape`` into itself (a perturbed 0.8x zoom)."""
    n = len(shape)
    centre = (torch.tensor(shape, dtype=F64) - 1) / 2
    matrix = _random_affine(n, strength=0.03, shift=0.1)
    matrix[:, :n, :n] += -0.2 * torch.eye(n, dtype=F64)
    matrix[:, :n, n] += centre - matrix[0, :n, :n] @ centre
    return matrix


@pytest.mark.parametrize("shape", [(9, 8), (7, 8, 6)])
def test_compose_of_affine_fields_on_a_ramp_is_exact(shape):
    """Multilinear interpolation reproduces affine functions, so for affine fields and a linear image
    warp(warp(m, outer), inner) == warp(m, compose(outer, inner)) when no read leaves the grid (float64 rounding)."""
    n = len(shape)
    slopes = torch.tensor([1.0, -2.0, 0.5][:n], dtype=F64).view(n, *([1] * n))
    ramp = (voxel_grid(shape, F64) * slopes).sum(0)[None, None]
    outer, inner = affine_to_ddf(_inward_affine(shape), shape), affine_to_ddf(_inward_affine(shape), shape)
    grid = voxel_grid(shape, F64)[None]
    assert _inside(grid + outer, shape) and _inside(grid + inner, shape)
    torch.testing.assert_close(warp(ramp, compose(outer, inner)), warp(warp(ramp, outer), inner), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(24, 22), (14, 12, 10)])
def test_compose_matches_sequential_warping_for_smooth_fields(shape):
    """Smooth fields (|u| up to ~2 voxels, tapered to 0 at the border so that no read leaves the grid) on a Gaussian
    image (sigma = min(N) / 4, values in [0, 1]). Composing then warping once differs from warping twice only by the
    linear-interpolation error of the intermediate image, at most sum_i max|d_i^2 f| / 8 = n / (8 sigma^2) for the
    undeformed Gaussian, times (1 + |grad u|)^2 for the deformed one. Asserted: max < 2.5 n / (8 sigma^2)
    (measured <= 1.85x over 20 seeds), mean < 0.25 n / (8 sigma^2) (measured <= 0.12x)."""
    n = len(shape)
    grid = voxel_grid(shape, F64)
    size = torch.tensor(shape, dtype=F64).view(n, *([1] * n))
    window = torch.sin(torch.pi * grid / (size - 1)).prod(0)
    sigma = min(shape) / 4
    image = torch.exp(-((grid - (size - 1) / 2) ** 2).sum(0) / (2 * sigma**2))[None, None]
    outer, inner = (window * _smooth_field(shape, 1.0, batch=2) for _ in range(2))
    assert _inside(grid[None] + outer, shape) and _inside(grid[None] + inner, shape)
    diff = (warp(image, compose(outer, inner)) - warp(warp(image, outer), inner)).abs()
    bound = n / (8 * sigma**2)
    assert diff.max() < 2.5 * bound and diff.mean() < 0.25 * bound


# ------------------------------------------------------------------------------------ affines ---


@pytest.mark.parametrize("shape", SHAPES)
def test_affine_to_ddf_matches_pointwise_affine(shape):
    n = len(shape)
    matrix = _random_affine(n, batch=2, strength=0.15, shift=1.0)  # fixed voxel -> moving voxel
    ddf = affine_to_ddf(matrix, shape)
    points = voxel_grid(shape, F64).reshape(n, -1).T[None].expand(2, -1, -1)  # (B, P, n)
    mapped = transform_points(matrix, points)  # (B, P, n)
    torch.testing.assert_close(ddf.reshape(2, n, -1).transpose(1, 2), mapped - points, rtol=0, atol=1e-12)
    for extra in (0, 2):  # a moving image of the fixed grid's size (MONAI Warp path) or of another size
        image = torch.randn(2, 2, *[s + extra for s in shape], dtype=F64)
        pointwise = sample_points(image, mapped).transpose(1, 2).reshape(2, 2, *shape)
        torch.testing.assert_close(warp(image, ddf), pointwise, rtol=0, atol=1e-12)


# --------------------------------------------------------------------- shapes and broadcasting ---


def test_sample_points_and_other_output_shapes():
    volume = torch.randn(2, 3, 5, 6, 7, dtype=F64)
    points = torch.rand(2, 9, 3, dtype=F64) * 4
    values = sample_points(volume, points)
    assert values.shape == (2, 9, 3)
    torch.testing.assert_close(sample(volume, points.transpose(1, 2)), values.transpose(1, 2))
    # a grid of another size: the half-voxel grid of a (5, 6, 7) volume, then its even entries are the volume
    fine = voxel_grid((9, 11, 13), F64)[None] / 2
    upsampled = sample(volume, fine.expand(2, -1, -1, -1, -1))
    assert upsampled.shape == (2, 3, 9, 11, 13)
    torch.testing.assert_close(upsampled[:, :, ::2, ::2, ::2], volume, rtol=0, atol=1e-12)
    torch.testing.assert_close(upsampled[:, :, 1, ::2, ::2], volume[:, :, :2].mean(2), rtol=0, atol=1e-12)
    # a 2-D coordinate array of points (B, n, 4, 2)
    assert sample(volume, points[:, :8].transpose(1, 2).reshape(2, 3, 4, 2)).shape == (2, 3, 4, 2)


def test_batch_one_broadcasts():
    volume = torch.randn(1, 2, 5, 6, dtype=F64)
    coords = torch.rand(3, 2, 4, dtype=F64) * 4
    out = sample(volume, coords)
    assert out.shape == (3, 2, 4)
    for b in range(3):
        torch.testing.assert_close(out[b : b + 1], sample(volume, coords[b : b + 1]))
    volumes = torch.randn(3, 2, 5, 6, dtype=F64)
    out = sample(volumes, coords[:1])
    for b in range(3):
        torch.testing.assert_close(out[b : b + 1], sample(volumes[b : b + 1], coords[:1]))
    # warp: one moving image, a batch of fields (and the reverse)
    ddf = _smooth_field((5, 6), 1.0, batch=3)
    warped = warp(volume, ddf)
    torch.testing.assert_close(warped, warp(volume.expand(3, -1, -1, -1), ddf))
    torch.testing.assert_close(warp(volumes, ddf[:1]), warp(volumes, ddf[:1].expand(3, -1, -1, -1)))


def test_warp_between_grids_of_different_sizes():
    """Moving and fixed grids may differ: the DDF lives on the fixed grid and points into moving voxels."""
    moving = torch.randn(1, 1, 8, 9, dtype=F64)
    ddf = torch.zeros(1, 2, 4, 3, dtype=F64)
    ddf[:, 0] = 2.0  # fixed voxel (i, j) reads moving (i + 2, j)
    torch.testing.assert_close(warp(moving, ddf), moving[:, :, 2:6, 0:3], rtol=0, atol=1e-12)


def test_sample_is_differentiable_with_finite_difference_gradients():
    volume = torch.randn(1, 2, 4, 5, 3, dtype=F64, requires_grad=True)
    coords = (torch.rand(1, 3, 6, dtype=F64) * 2 + 0.25).requires_grad_()  # away from integer kinks
    assert torch.autograd.gradcheck(lambda v, c: sample(v, c), (volume, coords))
    ddf = (_smooth_field((4, 5), 0.4) + 0.3).requires_grad_()
    image = torch.randn(1, 1, 4, 5, dtype=F64)
    assert torch.autograd.gradcheck(lambda u: warp(image, u), (ddf,))


# --------------------------------------------------------------------------------------- errors ---


def test_errors_are_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="non-finite"):
        check_ddf(torch.tensor(float("nan")).expand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="ddf contains non-finite"):
        warp(torch.zeros(1, 1, 4, 4), torch.full((1, 2, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="inner contains non-finite"):
        compose(torch.zeros(1, 2, 4, 4), torch.full((1, 2, 4, 4), float("inf")))
    with pytest.raises(ValueError, match=r"ddf must have shape \(B, n, \*spatial\)"):
        warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))  # 2 channels for a 3-D field
    with pytest.raises(ValueError, match="ddf must have shape"):
        warp(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))  # 1-D
    with pytest.raises(ValueError, match="same number of spatial dims"):
        warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="outer must have shape"):
        compose(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="coords must be"):
        sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match="volume must be"):
        sample(torch.zeros(1, 4, 4), torch.zeros(1, 1, 5))
    with pytest.raises(ValueError, match="mode must be"):
        sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 5), mode="cubic")
    with pytest.raises(ValueError, match="batch sizes of volume"):
        sample(torch.zeros(2, 1, 4, 4), torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="points must be"):
        sample_points(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="matrix must be"):
        affine_to_ddf(torch.eye(4)[None], (4, 4))
    with pytest.raises(TypeError, match="ddf must be a torch.Tensor"):
        check_ddf([[0.0]])


def test_threaded_point_chunks_equal_single_thread_sampling():
    """A single 3-D volume is sampled in per-thread chunks of points; every value must equal the 1-thread result."""
    threads = torch.get_num_threads()
    volume = torch.rand(1, 2, 40, 40, 44, dtype=torch.float64)
    coords = voxel_grid((40, 40, 44), torch.float64)[None] + 3 * torch.randn(1, 3, 40, 40, 44, dtype=torch.float64)
    try:
        torch.set_num_threads(1)
        single = sample(volume, coords)
        torch.set_num_threads(4)  # 70400 points, at least 2^15 points per chunk: the chunked path with 2 chunks
        assert sampling._point_chunks(volume, 1, coords[0, 0].numel()) == 2
        chunked = sample(volume, coords)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, chunked)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape,threads", [((23, 18, 21), 1), ((23, 18, 21), 3), ((17, 19), 2)])
def test_displacement_accumulate_and_blocks_equal_the_plain_expression(monkeypatch, shape, dtype, threads):
    """sample(v, x, displacement=d, accumulate=a) is a + sample(v, x + d) bit for bit, for point blocks of every
    size (several blocks, thread chunks, a last block that does not split evenly), batch broadcasting included.
    With the grid implied (x None) the normalised grid is formed in another order of operations: equal up to
    rounding, and bit-identical whatever the blocks."""
    n = len(shape)
    generator = torch.Generator().manual_seed(3)
    volume = torch.randn(2, 3, *shape, generator=generator, dtype=dtype)
    grid = voxel_grid(shape, dtype)[None]
    disp = 3 * torch.randn(2, n, *shape, generator=generator, dtype=dtype)
    addend = torch.randn(2, 3, *shape, generator=generator, dtype=dtype)
    expected = addend + F.grid_sample(
        volume.permute(0, 1, *range(n + 1, 1, -1)),
        ((grid + disp) / torch.tensor([(s - 1) / 2 for s in shape], dtype=dtype).view(1, n, *[1] * n) - 1)
        .movedim(1, -1)
        .reshape(2, -1, *[1] * (n - 1), n),
        padding_mode="border",
        align_corners=True,
    ).reshape(2, 3, *shape)
    implied = sample(volume, None, displacement=disp, accumulate=addend)
    torch.testing.assert_close(implied, expected, rtol=0, atol=2e-5 if dtype == torch.float32 else 1e-12)
    old_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        monkeypatch.setattr(sampling, "_MIN_POINTS_PER_THREAD", 7)
        for block in (1 << 22, 6 * 1000 + 6, 6 * 1001):  # one block; many blocks; blocks not a multiple of threads
            monkeypatch.setattr(sampling, "_BLOCK_ELEMENTS", block)
            assert torch.equal(sample(volume, grid, displacement=disp, accumulate=addend), expected)
            assert torch.equal(sample(volume, None, displacement=disp, accumulate=addend), implied)
            assert torch.equal(sample(volume, grid + disp) + addend, expected)
            single = sample(volume[:1], grid, displacement=disp[:1], accumulate=addend[:1])
            assert torch.equal(single, expected[:1])  # batch 1: the threaded chunks of points
    finally:
        torch.set_num_threads(old_threads)


def test_out_may_be_the_displacement_or_accumulated_field(monkeypatch):
    """out= writes in place block by block: composing a field in its own memory (out = displacement = accumulate,
    as a chain of DDFs does) gives the out-of-place result; out= is refused where it cannot be honoured."""
    monkeypatch.setattr(sampling, "_BLOCK_ELEMENTS", 6 * 500)  # many blocks: later ones read after earlier writes
    shape = (12, 11, 10)
    grid = voxel_grid(shape, F64)[None]
    outer, inner = _smooth_field(shape, 2.0), _smooth_field(shape, 2.0)
    expected = inner + sample(outer, grid + inner)
    result = inner.clone()
    returned = sample(outer, grid, displacement=result, accumulate=result, out=result)
    assert returned is result and torch.equal(result, expected)
    assert torch.allclose(result, compose(outer, inner), atol=1e-12)
    with pytest.raises(ValueError, match="out must not share memory with the sampled volume"):
        sample(outer, grid, displacement=inner, out=outer)
    with pytest.raises(ValueError, match="out must be a contiguous torch.float64 tensor of shape"):
        sample(outer, grid, out=torch.empty(1, 3, 12, 11, dtype=F64))
    with pytest.raises(ValueError, match="out= is not supported with autograd"):
        sample(outer, grid, displacement=inner.clone().requires_grad_(), out=torch.empty_like(inner))
    with pytest.raises(ValueError, match="displacement .* and coords .* differ in shape"):
        sample(outer, grid, displacement=inner[..., :5])
    with pytest.raises(ValueError, match="coords=None needs a displacement"):
        sample(outer, None)
    in_place = inner.clone()  # the implied grid, in place
    implied = sample(outer, None, displacement=inner, accumulate=inner)
    assert torch.equal(sample(outer, None, displacement=in_place, accumulate=in_place, out=in_place), implied)
    assert torch.allclose(implied, expected, rtol=0, atol=1e-12)


def test_displacement_and_accumulate_are_differentiable():
    volume = torch.randn(1, 2, 4, 5, 3, dtype=F64, requires_grad=True)
    coords = torch.rand(1, 3, 6, dtype=F64) * 2 + 0.25
    disp = (torch.rand(1, 3, 6, dtype=F64) * 0.5).requires_grad_()
    addend = torch.randn(1, 2, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, d, a: sample(v, coords, displacement=d, accumulate=a), (volume, disp, addend)
    )
    field = (torch.rand(1, 3, 4, 5, 3, dtype=F64) * 0.6 + 0.2).requires_grad_()  # implied grid: kinks avoided
    assert torch.autograd.gradcheck(lambda v, d: sample(v, None, displacement=d), (volume, field))


def test_itk_padding_half_voxel_band():
    """padding="itk": border-replicated inside [-0.5, size - 0.5) on every axis, 0 beyond (ITK / ANTs resampling)."""
    volume = torch.arange(4 * 3 * 2, dtype=torch.float64).reshape(1, 1, 4, 3, 2)
    points = torch.tensor(
        [[-0.4, 1.0, 0.5], [-0.5, 1.0, 0.5], [-0.6, 1.0, 0.5], [3.4, 2.0, 1.0], [3.5, 2.0, 1.0], [1.5, 2.49, -0.5]],
        dtype=torch.float64,
    )
    out = sample(volume, points.T[None], padding="itk")[0, 0]
    border = sample(volume, points.T[None], padding="border")[0, 0]
    inside = torch.tensor([True, True, False, True, False, True])
    assert torch.equal(out[inside], border[inside]) and torch.all(out[~inside] == 0)
    assert torch.all(border[~inside] != 0)  # the band matters: border padding would give non-zero values there
    # warp uses the same rule
    ddf = torch.full((1, 3, 4, 3, 2), -0.7, dtype=torch.float64)
    warped = warp(volume, ddf, padding="itk")
    assert torch.all(warped[0, 0, 0] == 0) and torch.all(warped[0, 0, 1:, 1:, 1:] != 0)
    with pytest.raises(ValueError, match="padding must be one of"):
        sample(volume, points.T[None], padding="reflect")


@pytest.mark.parametrize("shape, factor", [((9, 8, 7), 2), ((10, 12, 8), 2), ((9, 10, 11), 4), ((7, 9), 2)])
def test_upsample_and_downsample_ddf_share_the_left_edge_grid(shape, factor):
    """Coarse voxel j sits at factor * j + (factor - 1) / 2: upsampling is multilinear sampling there (border),
    scaled by factor; a displacement that is affine in the position survives down- and upsampling exactly."""
    from monai_ext.spatial.sampling import downsample_ddf, upsample_ddf

    coarse = [-(-s // factor) for s in shape]
    ddf = torch.randn(2, len(shape), *coarse, dtype=torch.float64, generator=torch.Generator().manual_seed(factor))
    points = voxel_grid(shape, torch.float64)[None].add_(0.5).div_(factor).sub_(0.5)
    torch.testing.assert_close(upsample_ddf(ddf, factor, shape), sample(ddf, points) * factor, rtol=0, atol=1e-12)
    full = [factor * c for c in coarse]  # whole blocks: the block mean of an affine field is its value at the centre
    linear = 0.3 * voxel_grid(full, torch.float64)[None] + 1.5
    assert downsample_ddf(linear, factor).shape[2:] == tuple(coarse)
    interior = (..., *(slice(factor, -factor) for _ in shape))
    torch.testing.assert_close(upsample_ddf(downsample_ddf(linear, factor), factor, full)[interior], linear[interior])
