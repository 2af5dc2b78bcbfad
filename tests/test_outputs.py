"""RegistrationWriter: per-pair outputs on the native grids, through a real SupervisedEvaluator.

Set-up (derivable by hand): fixed and moving NIfTI files with different, rotated (axes swapped and flipped),
anisotropic affines and shapes are reoriented to RAS (``Orientationd``) and cropped (``SpatialCropd``, different
crops) to one model grid; MONAI keeps the file's affine and shape in ``meta["original_affine"]`` /
``meta["spatial_shape"]``. A known world map, the translation
``p -> p + t`` (RAS mm) from fixed points to moving points, gives the model DDFs exactly
(``M_m^-1 T M_f``, an affine voxel map). The expected native outputs follow from the file affines alone:
forward voxel DDF ``N_m^-1 T N_f x - x``, inverse ``N_f^-1 T^-1 N_m z - z``, ITK field ``t`` in LPS
(``(-t_x, -t_y, t_z)``) everywhere, Jacobian 1 (a translation keeps volumes). Model DDFs are affine, so their
multilinear interpolation is exact inside the model grid; outside it (the cropped-away native voxels) the
writer extrapolates with the border value, so exact comparisons are made on the native voxels the model grid covers.
"""

from __future__ import annotations

import json
import os

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose, EnsureTyped, LoadImaged, Orientationd, SpatialCropd

from monai_ext.engines.registration import RegistrationEvalIteration
from monai_ext.io.itk_fields import read_displacement_field
from monai_ext.metrics.deformation import inverse_consistency_error
from monai_ext.io.outputs import OUTPUTS, RegistrationWriter, check_pair_files, pair_folder_name
from monai_ext.spatial.sampling import affine_to_ddf

FIXED_AFFINE = np.array([[0, -1.5, 0, 10], [1.2, 0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]], dtype=np.float64)
MOVING_AFFINE = np.array([[0, -1.25, 0, 8], [1.0, 0, 0, -4], [0, 0, 1.75, 1], [0, 0, 0, 1]], dtype=np.float64)
FIXED_SHAPE, MOVING_SHAPE = (14, 12, 10), (16, 12, 12)
# crops of the RAS-reoriented volumes: fixed (12, 14, 10) and moving (12, 16, 12) -> (12, 10, 8)
FIXED_CROP = [slice(0, 12), slice(2, 12), slice(1, 9)]
MOVING_CROP = [slice(0, 12), slice(3, 13), slice(2, 10)]
SHIFT = np.array([1.0, -0.5, 0.8])  # t, RAS mm, fixed point -> moving point
LABELS = (1, 2, 3)


def _translation(t: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = t
    return matrix


def _linear_image(shape, slope=(0.5, -0.25, 0.75), offset=10.0) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return (np.tensordot(np.asarray(slope), grid, axes=1) + offset).astype(np.float32)


def _labels(shape) -> np.ndarray:
    index = np.indices(shape)
    return (1 + (index[0] * 3 // shape[0]) % 3 * (index[1] > 1)).astype(np.int16) * (index[2] > 0)


class _KnownNetwork(torch.nn.Module):
    """forward_and_inverse returning fixed DDFs (a stand-in for a trained network)."""

    def __init__(self, forward_ddf: torch.Tensor, inverse_ddf: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("forward_ddf", forward_ddf)
        self.register_buffer("inverse_ddf", inverse_ddf)

    def forward_and_inverse(self, moving, fixed):
        return self.forward_ddf.clone(), self.inverse_ddf.clone()


@pytest.fixture()
def pair(tmp_path):
    files = {}
    for side, affine, shape in (("fixed", FIXED_AFFINE, FIXED_SHAPE), ("moving", MOVING_AFFINE, MOVING_SHAPE)):
        files[f"{side}_image"] = tmp_path / f"{side}_img.nii.gz"
        files[f"{side}_label"] = tmp_path / f"{side}_seg.nii.gz"
        nib.save(nib.Nifti1Image(_linear_image(shape), affine), str(files[f"{side}_image"]))
        nib.save(nib.Nifti1Image(_labels(shape), affine), str(files[f"{side}_label"]))
    # the affines as stored (NIfTI keeps float32), which is what the outputs must reproduce
    native = {side: nib.load(str(files[f"{side}_image"])).affine for side in ("fixed", "moving")}
    preprocessed = _transform()({k: str(v) for k, v in files.items()})
    model = {side: preprocessed[f"{side}_image"].affine.numpy() for side in ("fixed", "moving")}
    to_moving = np.linalg.inv(model["moving"]) @ _translation(SHIFT) @ model["fixed"]
    shape = tuple(preprocessed["fixed_image"].shape[1:])
    assert shape == tuple(preprocessed["moving_image"].shape[1:]) == (12, 10, 8)
    forward = affine_to_ddf(torch.from_numpy(to_moving)[None], shape).float()
    inverse = affine_to_ddf(torch.from_numpy(np.linalg.inv(to_moving))[None], shape).float()
    return {
        "files": {k: str(v) for k, v in files.items()},
        "native": native,
        "model": model,
        "model_labels": {side: preprocessed[f"{side}_label"][0].numpy() for side in ("fixed", "moving")},
        "network": _KnownNetwork(forward, inverse),
    }


def _transform() -> Compose:
    keys = ["moving_image", "fixed_image", "moving_label", "fixed_label"]
    return Compose(
        [
            LoadImaged(keys=keys, ensure_channel_first=True, image_only=True),
            Orientationd(keys=keys, axcodes="RAS", labels=None),
            SpatialCropd(keys=["fixed_image", "fixed_label"], roi_slices=FIXED_CROP),
            SpatialCropd(keys=["moving_image", "moving_label"], roi_slices=MOVING_CROP),
            EnsureTyped(keys=["moving_image", "fixed_image"], dtype=torch.float32),
            EnsureTyped(keys=["moving_label", "fixed_label"], dtype=torch.int64),
        ]
    )


def _run(pair, output_dir, outputs=OUTPUTS, decollate=True, data=None, overwrite=False):
    data = data or [{**pair["files"], "moving_name": "mov", "fixed_name": "fix"}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(data, _transform()), batch_size=1),
        network=pair["network"],
        iteration_update=RegistrationEvalIteration(),
        decollate=decollate,
    )
    writer = RegistrationWriter(output_dir, outputs=outputs, overwrite=overwrite)
    writer.attach(evaluator)
    evaluator.run()
    return writer


def _native_voxels(shape):
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=-1)


def _covered(native_affine, model_affine, native_shape, margin=0):
    """Native voxels whose model-grid position lies inside the model grid (by ``margin`` voxels)."""
    to_model = np.linalg.inv(model_affine) @ native_affine
    y = _native_voxels(native_shape) @ to_model[:3, :3].T + to_model[:3, 3]
    return np.all((y >= margin - 1e-6) & (y <= np.array([12, 10, 8]) - 1 - margin + 1e-6), axis=-1)


def test_outputs_on_native_grids_match_the_known_transformation(pair, tmp_path):
    writer = _run(pair, tmp_path / "out")
    folder = tmp_path / "out" / "mov__fix"
    assert writer.written == [folder]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{n}.nii.gz" for n in OUTPUTS if n not in ("metrics", "qa")] + ["metrics.json", "qa.png"]
    )
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no staging leftovers
    fixed_native, moving_native = pair["native"]["fixed"], pair["native"]["moving"]
    voxel_map = np.linalg.inv(moving_native) @ _translation(SHIFT) @ fixed_native
    x = _native_voxels(FIXED_SHAPE)
    expected = x @ voxel_map[:3, :3].T + voxel_map[:3, 3] - x  # (*fixed_shape, 3)
    inside = _covered(fixed_native, pair["model"]["fixed"], FIXED_SHAPE)
    assert 0 < inside.sum() < np.prod(FIXED_SHAPE)

    ddf_file = nib.load(str(folder / "forward_ddf.nii.gz"))
    assert ddf_file.shape == (*FIXED_SHAPE, 3)
    np.testing.assert_allclose(ddf_file.affine, fixed_native, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ddf_file.dataobj)[inside], expected[inside], atol=1e-4)

    # ITK field: read back with ITK, LPS vector = (-t_x, -t_y, t_z) at every voxel of the cropped region
    field = itk.imread(str(folder / "forward_field_itk.nii.gz"))
    vectors = itk.array_from_image(field).transpose(2, 1, 0, 3)  # ITK (z, y, x, c) -> our axis order
    np.testing.assert_allclose(vectors[inside], np.broadcast_to(SHIFT * [-1, -1, 1], vectors[inside].shape), atol=1e-4)
    ddf, affine = read_displacement_field(folder / "forward_field_itk.nii.gz", moving_affine=moving_native)
    np.testing.assert_allclose(affine.numpy(), fixed_native, atol=1e-5)
    np.testing.assert_allclose(ddf[0].permute(1, 2, 3, 0).numpy()[inside], expected[inside], atol=1e-4)

    # inverse: on the native moving grid, moving voxel -> fixed voxel
    inverse_map = np.linalg.inv(voxel_map)
    z = _native_voxels(MOVING_SHAPE)
    expected_inverse = z @ inverse_map[:3, :3].T + inverse_map[:3, 3] - z
    inverse_file = nib.load(str(folder / "inverse_ddf.nii.gz"))
    assert inverse_file.shape == (*MOVING_SHAPE, 3)
    np.testing.assert_allclose(inverse_file.affine, moving_native, atol=1e-6)
    moving_inside = _covered(moving_native, pair["model"]["moving"], MOVING_SHAPE)
    np.testing.assert_allclose(
        np.asarray(inverse_file.dataobj)[moving_inside], expected_inverse[moving_inside], atol=1e-4
    )
    inverse_field = itk.array_from_image(itk.imread(str(folder / "inverse_field_itk.nii.gz"))).transpose(2, 1, 0, 3)
    np.testing.assert_allclose(
        inverse_field[moving_inside],
        np.broadcast_to(-SHIFT * [-1, -1, 1], inverse_field[moving_inside].shape),
        atol=1e-4,
    )

    # warped native moving image: linear intensity a.z + b is reproduced exactly where x + u(x) is inside the moving grid
    warped = nib.load(str(folder / "warped_image.nii.gz"))
    assert warped.shape == FIXED_SHAPE
    np.testing.assert_allclose(warped.affine, fixed_native, atol=1e-6)
    mapped = x + expected
    valid = inside & np.all((mapped >= 0) & (mapped <= np.array(MOVING_SHAPE) - 1), axis=-1)
    truth = mapped @ np.array([0.5, -0.25, 0.75]) + 10.0
    assert valid.sum() > 100
    np.testing.assert_allclose(np.asarray(warped.dataobj)[valid], truth[valid], atol=1e-3)

    label = nib.load(str(folder / "warped_label.nii.gz"))
    assert np.issubdtype(label.get_data_dtype(), np.integer) and label.shape == FIXED_SHAPE
    moving_labels = _labels(MOVING_SHAPE)
    clear = valid & np.all(np.abs(mapped - np.floor(mapped) - 0.5) > 1e-3, axis=-1)  # no nearest-neighbour ties
    assert clear.sum() > 100
    nearest = np.rint(mapped[clear]).astype(int)
    np.testing.assert_array_equal(np.asarray(label.dataobj)[clear], moving_labels[tuple(nearest.T)])

    jacobian = nib.load(str(folder / "jacobian.nii.gz"))
    assert jacobian.shape == FIXED_SHAPE
    interior = _covered(fixed_native, pair["model"]["fixed"], FIXED_SHAPE, margin=1)  # central differences inside
    np.testing.assert_allclose(np.asarray(jacobian.dataobj)[interior], 1.0, atol=1e-4)

    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["moving_name"] == "mov" and metrics["fixed_name"] == "fix"
    assert {"dice_before", "dice", "dice_inverse", "folding_fraction", "sdlogj", "ndv", "ic_mse", "ic_max"} <= set(
        metrics
    )
    assert metrics["folding_fraction"] == 0.0 and 0 <= metrics["dice"] <= 1
    network = pair["network"]
    consistency = inverse_consistency_error(network.forward_ddf.double(), network.inverse_ddf.double())
    assert metrics["ic_mse"] == pytest.approx(float(consistency["mse"][0]), rel=1e-9)
    # Dice by hand on the native grids (the label files themselves, as a user's tools score them): after = the
    # written warped_label against the fixed label file; before = the moving label file resampled (nearest) onto
    # the fixed grid through world coordinates
    def dice(a, b):
        return np.nanmean([2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in LABELS])

    fixed_labels = np.asarray(nib.load(pair["files"]["fixed_label"]).dataobj)
    assert metrics["dice"] == pytest.approx(dice(np.asarray(label.dataobj), fixed_labels), abs=1e-6)
    world_identity = np.linalg.inv(moving_native) @ fixed_native
    index = np.rint(x @ world_identity[:3, :3].T + world_identity[:3, 3]).astype(int)
    within = np.all((index >= 0) & (index < np.array(MOVING_SHAPE)), axis=-1)
    as_lying = np.zeros(FIXED_SHAPE, dtype=moving_labels.dtype)
    as_lying[within] = moving_labels[tuple(index[within].T)]
    assert metrics["dice_before"] == pytest.approx(dice(as_lying, fixed_labels), abs=1e-6)
    assert metrics["num_labels"] == len(LABELS)
    assert (folder / "qa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batched_output_writes_the_same_files_and_a_subset_of_outputs(pair, tmp_path):
    _run(pair, tmp_path / "a", outputs=["forward_ddf", "metrics"], decollate=False)
    _run(pair, tmp_path / "b", outputs=["forward_ddf", "metrics"], decollate=True)
    for root in ("a", "b"):
        assert sorted(p.name for p in (tmp_path / root / "mov__fix").iterdir()) == [
            "forward_ddf.nii.gz",
            "metrics.json",
        ]
    a = np.asarray(nib.load(str(tmp_path / "a" / "mov__fix" / "forward_ddf.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "b" / "mov__fix" / "forward_ddf.nii.gz")).dataobj)
    np.testing.assert_array_equal(a, b)


def test_names_default_to_file_stems(pair, tmp_path):
    _run(pair, tmp_path / "out", outputs=["metrics"], data=[pair["files"]])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["moving_img__fixed_img"]
    assert pair_folder_name({"moving_name": "a/b c", "fixed_name": "x"}) == "a_b_c__x"
    same = {k: MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": f"/d/{s}/img.nii.gz"}) for k, s in
            (("moving_image", "s1"), ("fixed_image", "s2"))}  # fmt: skip
    assert pair_folder_name(same) == "s1_img__s2_img"  # equal stems: prefixed with the parent folder
    assert pair_folder_name({}, 3) == "moving3__fixed3"


def _plain_item(pair) -> dict:
    """One decollated pair of plain tensors (no file metadata)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "moving_image": torch.rand(1, 12, 10, 8, generator=generator),
        "fixed_image": torch.rand(1, 12, 10, 8, generator=generator),
        "forward_ddf": pair["network"].forward_ddf[0],
        "inverse_ddf": pair["network"].inverse_ddf[0],
    }


def test_plain_tensors_are_written_in_model_space_with_an_identity_affine(pair, tmp_path):
    writer = RegistrationWriter(tmp_path, outputs=["warped_image", "warped_label", "forward_ddf", "jacobian"])
    folder = writer.write_pair(_plain_item(pair))
    assert folder.name == "moving0__fixed0"
    assert sorted(p.name for p in folder.iterdir()) == ["forward_ddf.nii.gz", "jacobian.nii.gz", "warped_image.nii.gz"]
    ddf = nib.load(str(folder / "forward_ddf.nii.gz"))
    np.testing.assert_allclose(ddf.affine, np.eye(4))
    np.testing.assert_allclose(np.asarray(ddf.dataobj), pair["network"].forward_ddf[0].permute(1, 2, 3, 0), atol=1e-5)


def test_the_same_names_twice_in_one_run_keep_both(pair, tmp_path):
    data = [{**pair["files"], "moving_name": "mov", "fixed_name": "fix"}] * 2
    writer = _run(pair, tmp_path / "out", outputs=["metrics"], data=data)
    assert [p.name for p in writer.written] == ["mov__fix", "mov__fix_1"]
    writer.reset()  # a new run (Events.STARTED) refuses the folders of an earlier run ...
    with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
        writer.write_pair({**_plain_item(pair), "moving_name": "mov", "fixed_name": "fix"})
    writer.overwrite = True  # ... or writes into them instead of adding more
    writer.write_pair({**_plain_item(pair), "moving_name": "mov", "fixed_name": "fix"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mov__fix", "mov__fix_1"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_output_modes_follow_the_umask(pair, tmp_path, umask):
    previous = os.umask(umask)
    try:
        _run(pair, tmp_path / "out", outputs=["metrics", "forward_ddf"])
    finally:
        os.umask(previous)
    folder = tmp_path / "out" / "mov__fix"
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    for file in folder.iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file.name


def test_overwrite_replaces_only_the_package_files(pair, tmp_path):
    _run(pair, tmp_path / "out", outputs=["metrics", "forward_ddf"])
    folder = tmp_path / "out" / "mov__fix"
    (folder / "notes.txt").write_text("mine")
    (folder / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already exists"):
        _run(pair, tmp_path / "out", outputs=["metrics"])
    assert (folder / "metrics.json").read_text() == "{}"  # refused before anything was written
    _run(pair, tmp_path / "out", outputs=["metrics"], overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["forward_ddf.nii.gz", "metrics.json", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert "dice" in json.loads((folder / "metrics.json").read_text())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mov__fix"]  # no staging folder left


def test_a_failing_pair_leaves_nothing_and_keeps_an_earlier_complete_folder(pair, tmp_path, monkeypatch):
    import monai_ext.io.outputs as outputs

    _run(pair, tmp_path / "out", outputs=["forward_ddf", "qa"])
    folder = tmp_path / "out" / "mov__fix"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(outputs, "qa_figure", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _run(pair, tmp_path / "out", outputs=["forward_ddf", "qa"], overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mov__fix"]  # no staging folder left
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(RuntimeError, match="disk full"):
        _run(pair, tmp_path / "new", outputs=["forward_ddf", "qa"])
    assert list((tmp_path / "new").iterdir()) == []


def test_bad_arguments_and_pair_files(pair, tmp_path):
    with pytest.raises(ValueError, match="outputs"):
        RegistrationWriter(tmp_path, outputs=["warped"])
    with pytest.raises(FileNotFoundError, match=r"pairs\[0\]\['fixed_image'\].*missing.nii.gz"):
        check_pair_files([{**pair["files"], "fixed_image": str(tmp_path / "missing.nii.gz")}])
    with pytest.raises(ValueError, match="lacks"):
        check_pair_files([{"moving_image": pair["files"]["moving_image"]}])
    with pytest.raises(ValueError, match="all of"):
        check_pair_files([{k: v for k, v in pair["files"].items() if k != "fixed_label"}])
    assert check_pair_files([pair["files"]]) == [pair["files"]]
