"""ITK / ANTs outputs: geometry, displacement fields and affine files against ITK's own resampling.

The test images are oblique (rotated), anisotropic and stored in non-RAS orientations (fixed LPI,
moving PSR), on grids of different shapes, so any slip between RAS and LPS, between array and ITK axis
order, or in the direction of a transform shows up as a large intensity difference.
"""

from __future__ import annotations

import math

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ext.io import itk_fields
from monai_ext.io.itk_fields import (
    affine_from_itk,
    ddf_to_itk_displacement,
    read_displacement_field,
    read_itk_affine,
    write_displacement_field,
    write_image,
    write_itk_affine,
)
from monai_ext.io.native import load_image
from monai_ext.spatial.sampling import affine_to_ddf, voxel_grid, warp

FIXED_SHAPE = (14, 12, 10)
MOVING_SHAPE = (17, 15, 20)
RELATIVE_TOLERANCE = 1e-4  # of the moving image's intensity range, on voxels mapped inside the moving grid


def rotation(angles_deg) -> np.ndarray:
    """Rotation ``Rz @ Ry @ Rx`` (degrees)."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def grid_affine(axes: np.ndarray, spacing, angles, shape, centre) -> np.ndarray:
    """Voxel to RAS affine: signed permutation ``axes`` (orientation), voxel size, rotation, centred at ``centre``."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(angles) @ axes @ np.diag(spacing)
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


LPI = np.diag([-1.0, -1.0, -1.0])
PSR = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # axis 0 -> P, axis 1 -> S, axis 2 -> R
FIXED_AFFINE = grid_affine(LPI, (1.2, 0.8, 1.5), (12.0, -8.0, 20.0), FIXED_SHAPE, (3.0, -10.0, 25.0))
MOVING_AFFINE = grid_affine(PSR, (1.1, 1.3, 0.9), (-15.0, 10.0, 5.0), MOVING_SHAPE, (4.0, -9.0, 24.0))


def world_points(affine: np.ndarray, shape) -> np.ndarray:
    """RAS mm of every voxel centre, ``(3, *shape)``."""
    grid = voxel_grid(shape, torch.float64).numpy().reshape(3, -1)
    return (affine[:3, :3] @ grid + affine[:3, 3:]).reshape(3, *shape)


def smooth_image(affine: np.ndarray, shape) -> torch.Tensor:
    """A smooth, non-symmetric intensity pattern of world position, ``(1, 1, *shape)`` float32."""
    x, y, z = world_points(affine, shape)
    values = np.sin(0.31 * x + 0.2) + np.cos(0.23 * y - 0.1 * z) + 0.02 * z + 0.5 * np.sin(0.17 * (x + y))
    return torch.from_numpy(values).float()[None, None]


def native_ddf() -> torch.Tensor:
    """Smooth native voxel DDF ``(1, 3, *FIXED_SHAPE)`` float64: the world map ``p -> p + w(p)`` in voxels.

    ``u(x) = N_m^-1 (p + w(p)) - x`` with ``p = N_f x`` and ``w`` a few-mm sinusoidal displacement (RAS).
    """
    p = world_points(FIXED_AFFINE, FIXED_SHAPE)
    w = np.stack([2.0 * np.sin(0.2 * p[1]), 1.5 * np.cos(0.15 * p[2] + p[0] * 0.05), 1.0 * np.sin(0.1 * p[0])])
    q = (p + w).reshape(3, -1)
    moving_voxels = np.linalg.solve(MOVING_AFFINE[:3, :3], q - MOVING_AFFINE[:3, 3:]).reshape(3, *FIXED_SHAPE)
    return torch.from_numpy(moving_voxels)[None] - voxel_grid(FIXED_SHAPE, torch.float64)[None]


def inside_moving(ddf: torch.Tensor, margin: float = 0.0) -> np.ndarray:
    """Fixed voxels whose mapped moving voxel lies inside the moving grid (by ``margin`` voxels)."""
    coords = (voxel_grid(FIXED_SHAPE, ddf.dtype)[None] + ddf)[0]
    upper = torch.tensor(MOVING_SHAPE, dtype=ddf.dtype).view(3, 1, 1, 1) - 1 - margin
    return ((coords >= margin) & (coords <= upper)).all(0).numpy()


def itk_resample(moving_path, fixed_path, transform) -> np.ndarray:
    """ITK's own resampling of the moving file onto the fixed file's grid (linear), in our array axis order."""
    moving, fixed = itk.imread(str(moving_path)), itk.imread(str(fixed_path))
    out = itk.resample_image_filter(
        moving,
        transform=transform,
        use_reference_image=True,
        reference_image=fixed,
        interpolator=itk.LinearInterpolateImageFunction.New(moving),
    )
    return itk.array_from_image(out).transpose(2, 1, 0)


def write_pair(tmp_path):
    moving = smooth_image(MOVING_AFFINE, MOVING_SHAPE)
    fixed_path = write_image(tmp_path / "fixed.nii.gz", smooth_image(FIXED_AFFINE, FIXED_SHAPE), FIXED_AFFINE)
    moving_path = write_image(tmp_path / "moving.nii.gz", moving, MOVING_AFFINE)
    return moving, fixed_path, moving_path


def test_test_geometry_is_oblique_anisotropic_non_ras():
    assert nib.aff2axcodes(FIXED_AFFINE) == ("L", "P", "I")
    assert nib.aff2axcodes(MOVING_AFFINE) == ("P", "S", "R")
    for affine in (FIXED_AFFINE, MOVING_AFFINE):
        assert np.abs(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))).max() > 0.1  # off-axis: oblique


def test_write_image_geometry_matches_nibabel_monai_and_itk(tmp_path):
    image = smooth_image(FIXED_AFFINE, FIXED_SHAPE)
    path = write_image(tmp_path / "image.nii.gz", image, torch.from_numpy(FIXED_AFFINE))
    np.testing.assert_allclose(nib.load(path).affine, FIXED_AFFINE, atol=1e-4)  # nibabel reads RAS directly
    np.testing.assert_allclose(nib.load(path).get_fdata(), image[0, 0].numpy(), atol=1e-6)
    loaded = load_image(path)
    np.testing.assert_allclose(np.asarray(loaded.affine), FIXED_AFFINE, atol=1e-4)
    np.testing.assert_allclose(loaded.numpy(), image[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(affine_from_itk(itk.imread(str(path))).numpy(), FIXED_AFFINE, atol=1e-4)
    # ITK's physical point of voxel (i, j, k) is the LPS image of the affine's RAS point
    index = (3, 5, 7)
    point = itk.imread(str(path)).TransformIndexToPhysicalPoint(index)
    ras = FIXED_AFFINE @ np.array([*index, 1.0])
    np.testing.assert_allclose(np.array(point), ras[:3] * [-1, -1, 1], atol=1e-4)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_image_keeps_integer_labels(tmp_path, suffix):
    labels = torch.randint(0, 40, (1, 1, *FIXED_SHAPE), dtype=torch.int64)
    path = write_image(tmp_path / f"labels{suffix}", labels, FIXED_AFFINE)
    itk_image = itk.imread(str(path))
    assert np.dtype(itk.array_from_image(itk_image).dtype) == np.int32  # int64 is stored as int32
    loaded = load_image(path, label=True)
    assert loaded.dtype == torch.int64
    assert torch.equal(loaded.as_tensor(), labels[0])


def test_displacement_file_holds_lps_mm_vectors_with_vector_intent(tmp_path):
    ddf = native_ddf()
    path = write_displacement_field(tmp_path / "warp.nii.gz", ddf, FIXED_AFFINE, MOVING_AFFINE)
    stored = nib.load(path)
    assert stored.shape == (*FIXED_SHAPE, 1, 3)
    assert stored.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(stored.affine, FIXED_AFFINE, atol=1e-4)
    # by hand: moving world point of x + u(x) minus fixed world point of x, then RAS -> LPS (negate x, y)
    moving_points = np.einsum(
        "ij,j...->i...", MOVING_AFFINE[:3, :3], (voxel_grid(FIXED_SHAPE, torch.float64)[None] + ddf)[0].numpy()
    )
    moving_points += MOVING_AFFINE[:3, 3].reshape(3, 1, 1, 1)
    expected = (moving_points - world_points(FIXED_AFFINE, FIXED_SHAPE)) * np.array([-1, -1, 1]).reshape(3, 1, 1, 1)
    np.testing.assert_allclose(np.moveaxis(stored.get_fdata()[..., 0, :], -1, 0), expected, atol=1e-5)


def test_displacement_field_read_back(tmp_path):
    ddf = native_ddf()
    path = write_displacement_field(tmp_path / "warp.nrrd", ddf, FIXED_AFFINE, MOVING_AFFINE)
    back, affine = read_displacement_field(path, MOVING_AFFINE)
    np.testing.assert_allclose(affine.numpy(), FIXED_AFFINE, atol=1e-4)
    torch.testing.assert_close(back, ddf.float(), atol=1e-4, rtol=0)  # float32 storage of mm vectors


def _double_field(path, ras: bool = False):
    """The file's field as ``itk.Image[itk.Vector[itk.D, 3], 3]`` (what ``DisplacementFieldTransform[D, 3]`` takes).

    ``ras=True`` negates the x and y components (a field wrongly left in RAS), for a negative control.
    """
    field = itk.imread(str(path))
    array = np.ascontiguousarray(itk.array_from_image(field), dtype=np.float64)
    if ras:
        array[..., :2] *= -1
    image = itk.PyBuffer[itk.Image[itk.Vector[itk.D, 3], 3]].GetImageViewFromArray(array, True)
    image.SetOrigin(field.GetOrigin())
    image.SetSpacing(field.GetSpacing())
    image.SetDirection(field.GetDirection())
    return image, array  # keep the buffer alive with the view


def test_itk_displacement_field_transform_matches_our_warp(tmp_path):
    """Required round trip: our ``warp`` vs ITK ``DisplacementFieldTransform`` + ``ResampleImageFilter``."""
    ddf = native_ddf()
    moving, fixed_path, moving_path = write_pair(tmp_path)
    ours = warp(moving.double(), ddf)[0, 0].numpy()
    field_path = write_displacement_field(tmp_path / "warp.nii.gz", ddf, FIXED_AFFINE, MOVING_AFFINE)
    field, _buffer = _double_field(field_path)
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(field)
    theirs = itk_resample(moving_path, fixed_path, transform)
    inside = inside_moving(ddf)
    assert inside.mean() > 0.5  # most of the field maps into the moving image
    scale = float(moving.max() - moving.min())
    error = np.abs(ours - theirs)[inside].max() / scale
    assert error < RELATIVE_TOLERANCE, error
    # the check has teeth: the same vectors left in RAS (x, y not negated) resample elsewhere
    field, _buffer = _double_field(field_path, ras=True)
    transform.SetDisplacementField(field)
    wrong = itk_resample(moving_path, fixed_path, transform)
    assert np.abs(ours - wrong)[inside].max() / scale > 0.05


def test_ants_applies_our_displacement_field_like_our_warp(tmp_path):
    """ANTs (antspyx's ``apply_transforms``, as ``antsApplyTransforms -t warp.nii.gz``) reads the written field as
    ITK does: the oblique, anisotropic, non-RAS pair resamples as our ``warp`` does."""
    import ants  # antspyx: a dev dependency (not one of the package)

    ddf = native_ddf()
    moving, fixed_path, moving_path = write_pair(tmp_path)
    ours = warp(moving.double(), ddf)[0, 0].numpy()
    field_path = write_displacement_field(tmp_path / "warp.nii.gz", ddf, FIXED_AFFINE, MOVING_AFFINE)
    fixed, moving_image = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    theirs = ants.apply_transforms(fixed, moving_image, transformlist=[str(field_path)], interpolator="linear").numpy()
    inside = inside_moving(ddf)
    assert inside.mean() > 0.5 and theirs.shape == ours.shape  # antspyx arrays are in the file's (our) axis order
    scale = float(moving.max() - moving.min())
    error = np.abs(ours - theirs)[inside].max() / scale
    assert error < RELATIVE_TOLERANCE, error


@pytest.mark.parametrize("suffix", [".tfm", ".mat", ".h5"])
def test_itk_affine_file_matches_affine_to_ddf(tmp_path, suffix):
    """An affine written in world RAS (``.tfm``) or voxel (``.mat``) form and applied by ITK equals our warp."""
    world = np.eye(4)
    world[:3, :3] = rotation((6.0, -4.0, 9.0)) @ np.diag([1.05, 0.95, 1.02])
    world[:3, 3] = (2.0, -1.5, 1.0)  # fixed RAS point -> moving RAS point
    voxel = np.linalg.inv(MOVING_AFFINE) @ world @ FIXED_AFFINE  # fixed voxel -> moving voxel
    ddf = affine_to_ddf(torch.from_numpy(voxel)[None], FIXED_SHAPE)
    moving, fixed_path, moving_path = write_pair(tmp_path)
    ours = warp(moving.double(), ddf)[0, 0].numpy()
    path = tmp_path / f"affine{suffix}"
    if suffix == ".tfm":
        write_itk_affine(path, torch.from_numpy(world))
    else:
        write_itk_affine(path, voxel, FIXED_AFFINE, MOVING_AFFINE)
    np.testing.assert_allclose(read_itk_affine(path).numpy(), world, atol=1e-9)
    transform = itk.transformread(str(path))[0]
    theirs = itk_resample(moving_path, fixed_path, transform)
    inside = inside_moving(ddf)
    assert inside.mean() > 0.5
    error = np.abs(ours - theirs)[inside].max() / float(moving.max() - moving.min())
    assert error < RELATIVE_TOLERANCE, error
    # ITK's convention: the transform maps fixed physical points (LPS) to moving physical points
    fixed_ras = FIXED_AFFINE @ np.array([2.0, 3.0, 4.0, 1.0])
    mapped = np.array(transform.TransformPoint((fixed_ras[:3] * [-1, -1, 1]).tolist()))
    np.testing.assert_allclose(mapped * [-1, -1, 1], (world @ fixed_ras)[:3], atol=1e-9)


def test_two_dimensional_field_and_image(tmp_path):
    affine = np.array([[0.0, -0.9, 5.0], [1.1, 0.0, -3.0], [0.0, 0.0, 1.0]])
    ddf = torch.randn(1, 2, 6, 7) * 0.5
    back, fixed = read_displacement_field(write_displacement_field(tmp_path / "w2.nii.gz", ddf, affine))
    np.testing.assert_allclose(fixed.numpy(), affine, atol=1e-5)
    torch.testing.assert_close(back, ddf, atol=1e-5, rtol=0)
    write_itk_affine(tmp_path / "a2.tfm", torch.eye(3, dtype=torch.float64) + 0.01)
    assert read_itk_affine(tmp_path / "a2.tfm").shape == (3, 3)


# ------------------------------------------------------------------ bad input, no partial outputs


def test_bad_inputs_raise_clear_errors(tmp_path):
    ddf = native_ddf()
    sheared = FIXED_AFFINE.copy()
    sheared[0, 1] += 0.5
    with pytest.raises(ValueError, match="shear"):
        ddf_to_itk_displacement(ddf, sheared)
    with pytest.raises(ValueError, match="non-finite"):
        write_displacement_field(
            tmp_path / "nan.nii.gz", ddf.clone().index_fill_(2, torch.tensor([0]), float("nan")), FIXED_AFFINE
        )
    with pytest.raises(ValueError, match="one field"):
        ddf_to_itk_displacement(ddf.expand(2, -1, -1, -1, -1), FIXED_AFFINE)
    with pytest.raises(ValueError, match="moving_affine"):
        ddf_to_itk_displacement(ddf, FIXED_AFFINE, np.eye(3))
    with pytest.raises(ValueError, match="must end with"):
        write_itk_affine(tmp_path / "affine.xyz", np.eye(4))
    with pytest.raises(ValueError, match="both fixed_affine and moving_affine"):
        write_itk_affine(tmp_path / "affine.tfm", np.eye(4), fixed_affine=FIXED_AFFINE)
    with pytest.raises(ValueError, match="non-integer"):
        write_image(tmp_path / "labels.nii.gz", torch.full((1, 1, 4, 4, 4), 0.5), np.eye(4), dtype=np.int16)
    with pytest.raises(ValueError, match="do not fit"):
        write_image(tmp_path / "labels.nii.gz", torch.full((4, 4, 4), 300), np.eye(4), dtype=np.uint8)
    with pytest.raises(ValueError, match="spatial dims"):
        write_image(tmp_path / "two.nii.gz", torch.zeros(2, 4, 4, 4), np.eye(4))
    with pytest.raises(FileNotFoundError):
        read_displacement_field(tmp_path / "missing.nii.gz")
    garbage = tmp_path / "garbage.tfm"
    garbage.write_text("not a transform")
    with pytest.raises(ValueError, match="garbage.tfm"):
        read_itk_affine(garbage)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.tfm"]  # nothing written by the failures


def test_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    destination = tmp_path / "warped.nii.gz"

    def broken_imwrite(image, filename, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(itk_fields.itk, "imwrite", broken_imwrite)
    with pytest.raises(RuntimeError, match="disk full"):
        write_image(destination, torch.zeros(4, 4, 4), np.eye(4))
    with pytest.raises(RuntimeError, match="disk full"):
        write_displacement_field(tmp_path / "warp.nii.gz", torch.zeros(1, 3, 4, 4, 4), np.eye(4))
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a temporary file
    monkeypatch.undo()
    write_image(destination, torch.ones(4, 4, 4), np.eye(4))
    monkeypatch.setattr(itk_fields.itk, "imwrite", broken_imwrite)
    with pytest.raises(RuntimeError):
        write_image(destination, torch.zeros(4, 4, 4), np.eye(4))
    monkeypatch.undo()
    assert nib.load(destination).get_fdata().min() == 1.0  # the earlier complete file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["warped.nii.gz"]
