"""Model space <-> native space: MONAI preprocessing affines, DDF conversion, image loading errors."""

from __future__ import annotations

import math

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ext.data.base import fill_nan_background, image_stem
from monai_ext.io.itk_fields import write_image
from monai_ext.data.model_space import model_space_transforms
from monai_ext.io.native import ddf_model_to_native, load_image
from monai_ext.spatial.sampling import affine_to_ddf, sample, voxel_grid

NATIVE_FIXED_SHAPE = (20, 14, 12)
NATIVE_MOVING_SHAPE = (13, 18, 15)
MODEL_SHAPE = (16, 16, 16)
PIXDIM = (1.5, 1.5, 1.5)


def oblique_affine(axes: np.ndarray, spacing, angle_deg: float, shape, centre) -> np.ndarray:
    """Voxel to RAS affine: signed permutation ``axes``, voxel size, rotation about the (1, 1, 1) axis, centred grid."""
    a = math.radians(angle_deg)
    k = np.ones(3) / math.sqrt(3)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + math.sin(a) * cross + (1 - math.cos(a)) * cross @ cross  # Rodrigues
    affine = np.eye(4)
    affine[:3, :3] = rot @ axes @ np.diag(spacing)
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


# fixed stored LPI, moving stored PSR (axis 0 -> P, 1 -> S, 2 -> R); both oblique and anisotropic
NATIVE_FIXED = oblique_affine(np.diag([-1.0, -1.0, -1.0]), (1.2, 0.8, 1.5), 15.0, NATIVE_FIXED_SHAPE, (1.0, 2.0, 3.0))
NATIVE_MOVING = oblique_affine(
    np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
    (1.1, 0.9, 1.3),
    -10.0,
    NATIVE_MOVING_SHAPE,
    (2.0, 1.0, 2.0),
)
# a world (RAS mm) map from fixed points to moving points
WORLD = np.array([[0.98, -0.1, 0.05, 1.5], [0.12, 1.03, 0.0, -1.0], [-0.04, 0.02, 0.97, 0.5], [0, 0, 0, 1]])


def smooth(affine, shape) -> np.ndarray:
    grid = voxel_grid(shape, torch.float64).numpy().reshape(3, -1)
    x, y, z = (affine[:3, :3] @ grid + affine[:3, 3:]).reshape(3, *shape)
    return np.sin(0.3 * x) + np.cos(0.2 * y + 0.1 * z) + 0.05 * z


@pytest.fixture
def native_files(tmp_path):
    """Fixed / moving images and a fixed label map on their native (oblique, non-RAS) grids."""
    labels = (smooth(NATIVE_FIXED, NATIVE_FIXED_SHAPE) > 0.5).astype(np.int64) * 7 + 1
    return {
        "fixed": write_image(
            tmp_path / "fixed.nii.gz", smooth(NATIVE_FIXED, NATIVE_FIXED_SHAPE).astype(np.float32), NATIVE_FIXED
        ),
        "moving": write_image(
            tmp_path / "moving.nrrd", smooth(NATIVE_MOVING, NATIVE_MOVING_SHAPE).astype(np.float32), NATIVE_MOVING
        ),
        "label": write_image(tmp_path / "label.nii.gz", labels, NATIVE_FIXED),
    }


def preprocess(native_files, intensity="percentile"):
    transforms = model_space_transforms(
        ["fixed", "moving"], ["label"], pixdim=PIXDIM, spatial_size=MODEL_SHAPE, intensity=intensity
    )
    return transforms({k: str(v) for k, v in native_files.items()})


def test_model_space_transforms_give_ras_grid(native_files):
    out = preprocess(native_files)
    for key in ("fixed", "moving", "label"):
        assert out[key].shape == (1, *MODEL_SHAPE)
        affine = np.asarray(out[key].affine, dtype=np.float64)
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), PIXDIM, atol=1e-5)
    assert out["label"].dtype == torch.int64
    assert set(out["label"].unique().tolist()) <= {0, 1, 8}  # nearest resampling, zero padding
    assert 0.0 <= float(out["fixed"].min()) and float(out["fixed"].max()) <= 1.0
    zscore = preprocess(native_files, "zscore")["moving"]
    assert abs(float(zscore.mean())) < 1e-4 and abs(float(zscore.std()) - 1) < 1e-2


def test_model_affine_locates_model_voxels_in_native_file(native_files):
    """MetaTensor.affine after preprocessing means what ddf_model_to_native assumes: model voxel y is the
    world point M y, i.e. native voxel N^-1 M y (voxel centres), where MONAI sampled the native image."""
    out = preprocess(native_files, intensity=None)
    native = torch.from_numpy(smooth(NATIVE_FIXED, NATIVE_FIXED_SHAPE))[None, None]
    model_to_native = np.linalg.inv(NATIVE_FIXED) @ np.asarray(out["fixed"].affine, dtype=np.float64)
    coords = affine_to_ddf(torch.from_numpy(model_to_native)[None], MODEL_SHAPE) + voxel_grid(
        MODEL_SHAPE, torch.float64
    )
    inside = ((coords >= 0) & (coords <= torch.tensor(NATIVE_FIXED_SHAPE).view(1, 3, 1, 1, 1) - 1)).all(1)[0]
    assert inside.float().mean() > 0.15
    ours = sample(native, coords)[0, 0]
    np.testing.assert_allclose(out["fixed"][0].numpy()[inside.numpy()], ours.numpy()[inside.numpy()], atol=1e-4)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_ddf_model_to_native_is_exact_for_affine_maps(native_files, dtype, atol):
    """For a world affine ``T`` the model DDF ``M_m^-1 T M_f y - y`` must become ``N_m^-1 T N_f x - x``
    on native fixed voxels that land inside the model grid (multilinear interpolation of an affine field
    is exact there); the world outputs must be ``T p - p`` (RAS) and its LPS image."""
    out = preprocess(native_files)
    model_fixed, model_moving = (np.asarray(out[k].affine, dtype=np.float64) for k in ("fixed", "moving"))
    model_voxel = np.linalg.inv(model_moving) @ WORLD @ model_fixed
    ddf_model = affine_to_ddf(torch.from_numpy(model_voxel)[None], MODEL_SHAPE).to(dtype)
    args = (
        out["fixed"].affine,
        out["moving"].affine,
        NATIVE_FIXED,
        NATIVE_FIXED_SHAPE,
        torch.from_numpy(NATIVE_MOVING),
    )
    native = ddf_model_to_native(ddf_model, *args)
    assert native.shape == (1, 3, *NATIVE_FIXED_SHAPE) and native.dtype == dtype
    expected = affine_to_ddf(
        torch.from_numpy(np.linalg.inv(NATIVE_MOVING) @ WORLD @ NATIVE_FIXED)[None], NATIVE_FIXED_SHAPE
    )
    native_to_model = np.linalg.inv(model_fixed) @ NATIVE_FIXED
    coords = (
        voxel_grid(NATIVE_FIXED_SHAPE, torch.float64)
        + affine_to_ddf(torch.from_numpy(native_to_model)[None], NATIVE_FIXED_SHAPE)[0]
    )
    inside = ((coords >= 0) & (coords <= MODEL_SHAPE[0] - 1)).all(0)
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(native[0][:, inside].double(), expected[0][:, inside], atol=atol, rtol=0)

    grid = voxel_grid(NATIVE_FIXED_SHAPE, torch.float64).reshape(3, -1)
    fixed_world = torch.from_numpy(NATIVE_FIXED[:3, :3]) @ grid + torch.from_numpy(NATIVE_FIXED[:3, 3:])
    ras = (torch.from_numpy(WORLD[:3, :3]) @ fixed_world + torch.from_numpy(WORLD[:3, 3:]) - fixed_world).reshape(
        3, *NATIVE_FIXED_SHAPE
    )
    world_atol = atol * 10
    torch.testing.assert_close(
        ddf_model_to_native(ddf_model, *args, units="ras")[0][:, inside].double(),
        ras[:, inside],
        atol=world_atol,
        rtol=0,
    )
    lps = ras * torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64).view(3, 1, 1, 1)
    torch.testing.assert_close(
        ddf_model_to_native(ddf_model, *args, units="lps")[0][:, inside].double(),
        lps[:, inside],
        atol=world_atol,
        rtol=0,
    )


def test_ddf_model_to_native_batches_and_border():
    """Batched affines; outside the model grid the model DDF is border-extrapolated (a constant shift stays exact)."""
    shift = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    ddf_model = torch.cat([shift.expand(1, 3, 5, 6, 7), 2 * shift.expand(1, 3, 5, 6, 7)])
    model = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    native = torch.eye(4, dtype=torch.float64)  # 1 mm grid twice as fine as the model grid, and much larger
    out = ddf_model_to_native(ddf_model, model, model, native, (30, 4, 4), torch.stack([native, native]))
    expected = torch.cat([2 * shift, 4 * shift]).expand(2, 3, 30, 4, 4)  # model voxel shift times 2 mm per voxel
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_ddf_model_to_native_bad_input():
    ddf = torch.zeros(1, 3, 4, 4, 4)
    eye = torch.eye(4)
    with pytest.raises(ValueError, match="units"):
        ddf_model_to_native(ddf, eye, eye, eye, (4, 4, 4), eye, units="mm")
    with pytest.raises(ValueError, match="native_fixed_shape"):
        ddf_model_to_native(ddf, eye, eye, eye, (4, 4), eye)
    with pytest.raises(ValueError, match="native_moving_affine"):
        ddf_model_to_native(ddf, eye, eye, eye, (4, 4, 4), torch.eye(3))
    with pytest.raises(ValueError, match="model_fixed_affine holds 3"):
        ddf_model_to_native(ddf, eye.expand(3, 4, 4), eye, eye, (4, 4, 4), eye)
    with pytest.raises(ValueError, match="ddf_model"):
        ddf_model_to_native(torch.full((1, 3, 4, 4, 4), float("nan")), eye, eye, eye, (4, 4, 4), eye)


def test_load_image_formats_and_labels(native_files):
    fixed = load_image(native_files["fixed"])
    assert fixed.shape == (1, *NATIVE_FIXED_SHAPE) and fixed.dtype == torch.float32
    np.testing.assert_allclose(np.asarray(fixed.affine), NATIVE_FIXED, atol=1e-4)
    moving = load_image(native_files["moving"])  # NRRD
    np.testing.assert_allclose(np.asarray(moving.affine), NATIVE_MOVING, atol=1e-4)
    np.testing.assert_allclose(moving[0].numpy(), smooth(NATIVE_MOVING, NATIVE_MOVING_SHAPE), atol=1e-5)
    label = load_image(native_files["label"], label=True, reference=fixed)
    assert label.dtype == torch.int64 and set(label.unique().tolist()) == {1, 8}


def test_load_image_errors_name_the_file(tmp_path, native_files):
    with pytest.raises(FileNotFoundError, match="absent.nii.gz"):
        load_image(tmp_path / "absent.nii.gz")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b this is not an image")
    with pytest.raises(ValueError, match="cannot read image .*broken.nii.gz"):
        load_image(broken)
    flat = write_image(tmp_path / "flat.nii.gz", np.zeros((8, 9), np.float32), np.eye(3))
    with pytest.raises(ValueError, match="flat.nii.gz.*3-D image, got spatial shape \\(8, 9\\)"):
        load_image(flat)
    assert load_image(flat, spatial_dims=2).shape == (1, 8, 9)
    single = write_image(tmp_path / "slice.nii.gz", np.zeros((8, 9, 1), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="slice.nii.gz"):
        load_image(single)
    data = np.ones((6, 6, 6), np.float32)
    data[1, 2, 3] = -np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "inf.nii.gz")
    with pytest.raises(ValueError, match="inf.nii.gz: 1 voxels are infinite"):
        load_image(tmp_path / "inf.nii.gz")
    itk.imwrite(itk.image_from_array(data), str(tmp_path / "inf.mha"))  # the ITK reader path
    with pytest.raises(ValueError, match="inf.mha: 1 voxels are infinite"):
        load_image(tmp_path / "inf.mha")
    nib.save(nib.Nifti1Image(np.full((6, 6, 6), np.nan, np.float32), np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(ValueError, match="nan.nii.gz: no finite voxel: 216 of 216 voxels are NaN"):
        load_image(tmp_path / "nan.nii.gz")
    with pytest.raises(ValueError, match="nan.nii.gz: a label map must hold integer values"):
        load_image(tmp_path / "nan.nii.gz", label=True)
    nib.save(nib.Nifti1Image(np.full((6, 6, 6), 1.5, np.float32), np.eye(4)), tmp_path / "soft.nii.gz")
    with pytest.raises(ValueError, match="soft.nii.gz: a label map must hold integer values"):
        load_image(tmp_path / "soft.nii.gz", label=True)
    fixed = load_image(native_files["fixed"])
    shifted = write_image(tmp_path / "shifted.nii.gz", np.zeros(NATIVE_FIXED_SHAPE, np.uint8), NATIVE_FIXED)
    assert load_image(shifted, label=True, reference=fixed).shape == fixed.shape  # same grid passes
    moved = NATIVE_FIXED.copy()
    moved[0, 3] += 1.0
    for name, grid, shape in (("moved", moved, NATIVE_FIXED_SHAPE), ("cropped", NATIVE_FIXED, (20, 14, 11))):
        path = write_image(tmp_path / f"{name}.nii.gz", np.zeros(shape, np.uint8), grid)
        with pytest.raises(ValueError, match=f"{name}.nii.gz: grid .* does not match its image"):
            load_image(path, label=True, reference=fixed)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_nan_background_reads_as_the_lowest_value(tmp_path, suffix):
    """NaN voxels (the "no data" background of some SPM / FSL outputs) read as the image's lowest finite value, in
    the input checks and in the bundles' loading (which warns, naming the file); NIfTI (nibabel) and ITK readers."""
    data = np.random.default_rng(0).uniform(-1000, 400, (7, 8, 9)).astype(np.float32)
    data[:2] = np.nan
    data[2:, :3, :] = -1024  # a CT-like background outside the NaN slab
    path = tmp_path / f"scan{suffix}"
    if suffix == ".mha":  # ITK's array order is reversed: the same voxels on an identity grid
        itk.imwrite(itk.image_from_array(np.ascontiguousarray(data.transpose(2, 1, 0))), str(path))
    else:
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    expected = torch.as_tensor(np.where(np.isnan(data), -1024, data))[None]
    loaded = load_image(path)
    assert torch.equal(loaded.as_tensor(), expected)
    with pytest.warns(UserWarning, match=f"scan{suffix}: 144 NaN voxels \\(28.6%\\) read as background"):
        item = model_space_transforms(["image"], intensity=None)({"image": str(path)})
    ras = expected.flip(1, 2) if suffix == ".mha" else expected  # identity grid in LPS: reoriented to RAS
    assert torch.equal(item["image"].as_tensor(), ras)


def test_freesurfer_mgz_reads_like_nifti(tmp_path):
    """FreeSurfer's MGZ (ITK's reader) gives the same voxels and RAS affine as the NIfTI file of the same image, in
    the input checks and in the bundles' loading (MONAI's default readers do not read MGZ)."""
    data = np.random.default_rng(1).random((9, 7, 8)).astype(np.float32)
    affine = np.array([[0.0, 0.0, 1.2, -10.0], [-0.9, 0.0, 0.0, 20.0], [0.0, 1.1, 0.0, -5.0], [0.0, 0.0, 0.0, 1.0]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "scan.nii.gz")
    nib.save(nib.MGHImage(data, affine), tmp_path / "scan.mgz")
    nifti, mgz = load_image(tmp_path / "scan.nii.gz"), load_image(tmp_path / "scan.mgz")
    assert torch.equal(mgz.as_tensor(), nifti.as_tensor())
    np.testing.assert_allclose(np.asarray(mgz.affine), affine, atol=1e-5)
    transform = model_space_transforms(["image"], pixdim=1.5, spatial_size=(8, 8, 8), intensity=None)
    items = [transform({"image": str(tmp_path / name)})["image"] for name in ("scan.nii.gz", "scan.mgz")]
    torch.testing.assert_close(items[1].as_tensor(), items[0].as_tensor(), rtol=0, atol=1e-5)
    assert [image_stem(p) for p in ("a.nii.gz", "b.MGZ", "c.nhdr", "d.txt")] == ["a", "b", "c", "d.txt"]
    labels = (data * 3000).astype(np.int32)  # MGZ stores integers big-endian (FreeSurfer's aseg.mgz)
    nib.save(nib.MGHImage(labels, affine), tmp_path / "labels.mgz")
    read = load_image(tmp_path / "labels.mgz", label=True, reference=mgz)
    assert read.dtype == torch.int64 and torch.equal(read[0], torch.from_numpy(labels.astype(np.int64)))


def test_fill_nan_background_values():
    image = torch.tensor([[3.0, math.nan, -2.0], [math.inf, math.nan, 5.0]])
    filled, count = fill_nan_background(image)
    assert count == 2 and torch.equal(filled, torch.tensor([[3.0, -2.0, -2.0], [math.inf, -2.0, 5.0]]))
    assert torch.isnan(image).sum() == 2  # the input is not modified
    plain = torch.arange(6.0)
    assert fill_nan_background(plain) == (plain, 0) and fill_nan_background(plain)[0] is plain
    integers = torch.arange(6)
    assert fill_nan_background(integers)[0] is integers
    with pytest.raises(ValueError, match="no finite voxel: 2 of 3 voxels are NaN, the rest infinite"):
        fill_nan_background(torch.tensor([math.nan, -math.inf, math.nan]))
    with pytest.raises(ValueError, match="no finite voxel: 2 of 2 voxels are NaN$"):
        fill_nan_background(torch.tensor([math.nan, math.nan]))


def test_model_space_transforms_bad_options():
    with pytest.raises(ValueError, match="intensity"):
        model_space_transforms(["image"], intensity="minmax")
    with pytest.raises(ValueError, match="distinct"):
        model_space_transforms(["image"], ["image"])
