"""World space in the brain bundle: storage orientation does not matter, a world shift is recovered in mm."""

from __future__ import annotations

import warnings
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import EnsureChannelFirstd, LoadImaged

from monai_ext.cli import register
from monai_ext.demo import write_demo_pair
from monai_ext.data.model_space import ForegroundCentredGridd, model_space_transforms


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory) -> dict[str, Path]:
    return write_demo_pair(tmp_path_factory.mktemp("demo") / "data")


def _flipped_copy(path: Path, target: Path, axes: tuple[int, ...]) -> Path:
    """The same image stored with the given array axes reversed (affine adjusted: identical world content)."""
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    affine = image.affine.copy()
    for axis in axes:
        data = np.flip(data, axis)
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1, data.shape[axis] - 1
        affine = affine @ flip
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(target))
    return target


def _model_space(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    data = EnsureChannelFirstd("image")(LoadImaged("image", image_only=True)({"image": str(path)}))
    out = ForegroundCentredGridd(["image"], pixdim=2.0, spatial_size=(88, 104, 88))(data)["image"]
    return out.as_tensor(), np.asarray(out.affine)


def test_model_grid_does_not_depend_on_storage_orientation(demo_pair, tmp_path):
    original, affine = _model_space(demo_pair["fixed_image"])
    for axes in ((0,), (0, 1, 2)):  # LIA stored as RIA, and as RSP
        copy = _flipped_copy(demo_pair["fixed_image"], tmp_path / f"flip{len(axes)}.nii.gz", axes)
        flipped, flipped_affine = _model_space(copy)
        np.testing.assert_allclose(flipped_affine, affine, atol=1e-6)
        assert float((flipped - original).abs().max()) < 1e-4
    # RAS, 2 mm, and the grid centre on the foreground centroid (world)
    np.testing.assert_allclose(affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    mask = np.asarray(nib.load(str(demo_pair["fixed_label"])).dataobj) > 0
    source = nib.load(str(demo_pair["fixed_image"])).affine
    centroid = (source @ np.append(np.argwhere(mask).mean(0), 1))[:3]
    centre = (affine @ np.array([43.5, 51.5, 43.5, 1.0]))[:3]
    assert np.abs(centre - centroid).max() < 2.0  # foreground threshold vs label mask: within a voxel


def test_world_shift_is_recovered_in_mm(demo_pair, tmp_path):
    """The same brain stored 6 mm right, 4 mm posterior and 2 mm up: the model sees the same images (SITReg
    returns the identity for identical inputs) and the written ITK field is the shift, in LPS mm, everywhere."""
    shift = np.array([6.0, -4.0, 2.0])
    image = nib.load(str(demo_pair["fixed_image"]))
    affine = image.affine.copy()
    affine[:3, 3] += shift
    moving = tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), str(moving))
    rows = register("sitreg_brain", str(moving), str(demo_pair["fixed_image"]), str(tmp_path / "out"))
    folder = Path(rows[0]["output"])
    field = itk.array_from_image(itk.imread(str(folder / "forward_field_itk.nii.gz")))  # (Z, Y, X, 3), LPS mm
    inside = np.asarray(image.dataobj).transpose(2, 1, 0) > 0.05
    lps = shift * np.array([-1.0, -1.0, 1.0])
    # the two model-space images agree to float rounding (two resamplings on grids shifted by the same amount),
    # so the trained network returns the identity up to a few hundredths of a millimetre, and the field refinement
    # (on by default) keeps it: local NCC with its eps term is not exactly stationary at the identity in
    # near-empty windows, which moves a few dim voxels at the brain's edge by up to a few tenths of a millimetre
    error = np.abs(field[inside] - lps)
    np.testing.assert_allclose(field[inside].mean(0), lps, atol=5e-3)
    assert np.quantile(error, 0.999) < 0.05 and error.max() < 0.3, (np.quantile(error, 0.999), error.max())
    warped = np.asarray(nib.load(str(folder / "warped_image.nii.gz")).dataobj)
    difference = np.abs(warped - np.asarray(image.dataobj))[np.asarray(image.dataobj) > 0.05]
    assert np.quantile(difference, 0.999) < 1e-2 and difference.max() < 0.03, (np.quantile(difference, 0.999), difference.max())


def test_partial_field_of_view_warns(demo_pair, tmp_path):
    """min_extent_mm: a 3-slice slab of the demo brain (6 mm thick along A after the LIA storage) is reported with
    its world extent; the whole brain, any storage orientation, is not; the check needs the foreground centring."""
    data = EnsureChannelFirstd("image")(LoadImaged("image", image_only=True)({"image": str(demo_pair["fixed_image"])}))
    grids = ForegroundCentredGridd(["image"], pixdim=2.0, spatial_size=(88, 104, 88), min_extent_mm=80)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grids(dict(data))
        flipped = _flipped_copy(demo_pair["fixed_image"], tmp_path / "flipped.nii.gz", (0, 1, 2))
        grids(EnsureChannelFirstd("image")(LoadImaged("image", image_only=True)({"image": str(flipped)})))
    image = nib.load(str(demo_pair["fixed_image"]))
    slab = np.asarray(image.dataobj)[:, :, 40:43]
    affine = image.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 40], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(slab, affine), str(tmp_path / "slab.nii.gz"))
    data = EnsureChannelFirstd("image")(LoadImaged("image", image_only=True)({"image": str(tmp_path / "slab.nii.gz")}))
    with pytest.warns(UserWarning, match=r"slab.nii.gz: its foreground spans only \d+ x 6 x \d+ mm .* under 80 mm"):
        grids(data)
    with pytest.raises(ValueError, match="min_extent_mm needs centre='foreground'"):
        model_space_transforms(["image"], pixdim=2.0, spatial_size=(88, 104, 88), min_extent_mm=80)


def test_whole_head_sized_foreground_warns(demo_pair, tmp_path):
    """max_foreground_ml: the foreground's world volume (voxel count x voxel volume) is checked, so the demo brain
    (about 1.1 L) stays silent at 2 mm and stored with every other slice (2 x 2 x 4 mm), and warns, with its volume,
    when its voxels are declared 1.4 times larger (a head-sized 3 L), as a whole-head image would."""
    grids = ForegroundCentredGridd(["image"], pixdim=2.0, spatial_size=(88, 104, 88), max_foreground_ml=2000)
    image = nib.load(str(demo_pair["fixed_image"]))
    data = np.asarray(image.dataobj)

    def load(array, affine, name):
        nib.save(nib.Nifti1Image(array, affine), str(tmp_path / name))
        return EnsureChannelFirstd("image")(LoadImaged("image", image_only=True)({"image": str(tmp_path / name)}))

    thinned = image.affine @ np.diag([1.0, 1.0, 2.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grids(load(data, image.affine, "brain.nii.gz"))
        grids(load(data[:, :, ::2], thinned, "thinned.nii.gz"))
    large = image.affine @ np.diag([1.4, 1.4, 1.4, 1.0])
    with pytest.warns(UserWarning, match=r"large.nii.gz: its foreground is 2\.[89] L, more than a skull-stripped brain"):
        grids(load(data, large, "large.nii.gz"))
    with pytest.raises(ValueError, match="max_foreground_ml needs centre='foreground'"):
        model_space_transforms(["image"], pixdim=2.0, spatial_size=(88, 104, 88), max_foreground_ml=2000)
