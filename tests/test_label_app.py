"""Atlas-based label propagation (monai_ext.label_app): the MONAI Label use of a registration bundle.

monailabel is not installed in the test environment (scripts/check_monailabel.sh serves the app from a side
virtual environment on a real server and compares its answer with propagate_atlas), so the transforms are
tested directly: with networks whose DDF is known (derivation in each test), with the sitreg_oasis network_def,
and the infer task's own pre/post transforms and run_inferer with MONAI Label's network loading stubbed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor

from monai_ext.data.synthesis import random_label_map, synthesize_image
from monai_ext.label_app.atlas import AtlasPropagationd, RestoreOriginalGridd, atlas_preprocessing, propagate_atlas
from monai_ext.networks.sitreg import SITReg


class ConstantShift(torch.nn.Module):
    """DDF = +s voxels along axis 0 everywhere (fixed voxel x reads the atlas at x + s)."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ddf = torch.zeros(x.shape[0], x.ndim - 2, *x.shape[2:], dtype=x.dtype)
        ddf[:, 0] = self.shift
        return ddf + 0 * self.weight


def _atlas(shape=(12, 10, 8)):
    label = random_label_map(shape, 4, seed=3)[None]
    image = synthesize_image(label[0], seed=3)[None]
    return image, label


def test_shift_moves_labels_by_hand_derivation():
    image, label = _atlas()
    user = MetaTensor(torch.rand_like(image), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    out = AtlasPropagationd(ConstantShift(2), image, label, ddf_key="ddf")({"image": user})
    pred = out["pred"]
    assert pred.dtype == torch.int64 and pred.shape == label.shape
    # pred(x) = label(x + 2 along axis 0) inside, border replication for the last 2 rows
    assert torch.equal(pred[:, :-2], label[:, 2:])
    assert torch.equal(pred[:, -2:], label[:, -1:].expand(-1, 2, -1, -1))
    assert isinstance(pred, MetaTensor) and torch.equal(pred.affine, user.affine)  # on the user's grid
    assert torch.equal(out["ddf"][0], torch.full(label.shape[1:], 2.0)) and out["image"] is user


def test_zero_shift_returns_atlas_labels():
    image, label = _atlas()
    pred = AtlasPropagationd(ConstantShift(0), image, label)({"image": image.clone()})["pred"]
    assert torch.equal(pred, label)


def test_with_sitreg_network_labels_stay_atlas_labels():
    image, label = _atlas((16, 16, 16))
    network = SITReg(3, 1, features=[4, 4], feature_convolutions=[1, 1], deformation_features=[4, 4],
                     deformation_convolutions=[1, 1], groups=2).eval()  # fmt: skip
    pred = AtlasPropagationd(network, image, label)({"image": torch.roll(image, 1, dims=1)})["pred"]
    assert pred.shape == label.shape and set(pred.unique().tolist()) <= set(label.unique().tolist())


def test_bad_inputs():
    image, label = _atlas()
    with pytest.raises(ValueError, match="atlas_label"):
        AtlasPropagationd(ConstantShift(0), image, label[:, :-1])
    with pytest.raises(ValueError, match="integer"):
        AtlasPropagationd(ConstantShift(0), image, label.float() + 0.5)
    transform = AtlasPropagationd(ConstantShift(0), image, label)
    with pytest.raises(ValueError, match="atlas image's shape"):
        transform({"image": image[:, :-1]})


def _write_nifti(array, path):
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([1.5, 1.5, 1.5, 1.0])), str(path))
    return path


TINY_SITREG = {
    "network_def#features": [4, 4],
    "network_def#feature_convolutions": [1, 1],
    "network_def#deformation_features": [4, 4],
    "network_def#deformation_convolutions": [1, 1],
}


def test_bundle_pipeline_without_server(tmp_path):
    """What the infer task runs, minus MONAI Label: preprocessing of a request image of another grid, the
    sitreg_oasis network_def with saved weights, propagation, labels on the bundle grid."""
    import numpy as np
    from monai.transforms import Compose

    from monai_ext.label_app.atlas import atlas_preprocessing, bundle_network, load_atlas

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "sitreg_oasis"
    network = bundle_network(bundle, weights=None, **TINY_SITREG)
    weights = tmp_path / "bundle" / "models" / "model.pt"
    weights.parent.mkdir(parents=True)
    torch.save({"model": network.state_dict()}, weights)
    (tmp_path / "bundle" / "configs").mkdir()
    (tmp_path / "bundle" / "configs" / "inference.json").write_text((bundle / "configs" / "inference.json").read_text())
    loaded = bundle_network(tmp_path / "bundle", **TINY_SITREG)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)

    image, label = _atlas((20, 20, 20))
    atlas_image, atlas_label = load_atlas(
        _write_nifti(image[0].numpy() * 300.0, tmp_path / "atlas.nii.gz"),
        _write_nifti(label[0].numpy().astype(np.int16), tmp_path / "atlas_seg.nii.gz"),
        (16, 16, 16),
    )
    assert atlas_image.shape == atlas_label.shape == (1, 16, 16, 16)
    assert 0.0 <= atlas_image.min() and atlas_image.max() <= 1.0
    assert set(atlas_label.unique().tolist()) <= set(label.unique().tolist())
    request = _write_nifti(torch.roll(image, 2, dims=2)[0].numpy() * 50.0, tmp_path / "request.nii.gz")
    data = Compose(atlas_preprocessing((16, 16, 16)))({"image": str(request)})
    assert data["image"].shape == (1, 16, 16, 16)
    assert 0.0 <= float(data["image"].min()) and float(data["image"].max()) <= 1.0
    pred = AtlasPropagationd(loaded, atlas_image, atlas_label)(data)["pred"]
    assert pred.shape == (1, 16, 16, 16) and pred.dtype == torch.int64
    assert set(pred.unique().tolist()) <= set(atlas_label.unique().tolist())



# --- restoring the label map onto the request image's own grid -------------------------------------------------

#: an LIA-like storage with unequal voxel sizes and an offset (voxel -> RAS mm)
NATIVE_AFFINE = [[-1.3, 0.0, 0.0, 40.0], [0.0, 0.0, 1.1, -30.0], [0.0, -1.7, 0.0, 20.0], [0.0, 0.0, 0.0, 1.0]]


def _write(array, path, affine=NATIVE_AFFINE):
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=float)), str(path))
    return str(path)


def _world_nearest(code, model_affine, native_affine, native_shape):
    """Hand derivation: each native voxel centre -> world (native affine) -> model voxel (inverse model
    affine), rounded; the code there, or 0 where the nearest model voxel lies outside the model grid."""
    import numpy as np

    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in native_shape], indexing="ij"), -1).reshape(-1, 3)
    points = np.c_[ijk, np.ones(len(ijk))] @ (np.linalg.inv(model_affine) @ native_affine).T
    model = points[:, :3]
    assert np.abs(np.abs(model - np.floor(model)) - 0.5).min() > 1e-6  # no rounding ties: the derivation is unique
    nearest = np.rint(model).astype(int)
    inside = np.all((nearest >= 0) & (nearest < np.array(code.shape)), axis=1)
    expected = np.zeros(len(ijk), dtype=np.int64)
    expected[inside] = code[tuple(nearest[inside].T)]
    return expected.reshape(native_shape), inside


@pytest.mark.parametrize("pixdim", [None, 2.0])
def test_restore_is_world_nearest_neighbour_on_the_native_grid(tmp_path, pixdim):
    """A label map of distinct codes on the model grid (array resize, or a 2 mm world-space grid smaller than the
    image) comes back on the file's own shape and affine, each voxel holding the code of the model voxel nearest
    to its centre in world mm (0 where that voxel is off the model grid)."""
    import nibabel as nib
    import numpy as np
    from monai.transforms import Compose

    native_shape, model_shape = ((12, 10, 8), (17, 15, 13)) if pixdim is None else ((24, 20, 18), (9, 8, 7))
    label = random_label_map(native_shape, 4, seed=1)
    path = _write(synthesize_image(label, seed=1).numpy().astype(np.float32) * 100.0, tmp_path / "request.nii.gz")
    data = Compose(atlas_preprocessing(model_shape, pixdim=pixdim))({"image": path})
    image = data["image"]
    assert image.shape == (1, *model_shape)
    code = torch.arange(1, 1 + image[0].numel()).reshape(1, *model_shape)
    data["pred"] = MetaTensor(code, meta=dict(image.meta))  # as AtlasPropagationd hands it on
    restored = RestoreOriginalGridd(keys="pred", ref_key="image")(data)["pred"]

    native_affine = nib.load(path).affine
    expected, inside = _world_nearest(code[0].numpy(), image.affine.numpy(), native_affine, native_shape)
    assert isinstance(restored, MetaTensor) and restored.dtype == torch.int64
    assert restored.shape == (1, *native_shape)
    np.testing.assert_allclose(restored.affine.numpy(), native_affine, atol=1e-6)
    np.testing.assert_array_equal(restored[0].numpy(), expected)
    if pixdim is None:
        assert inside.all()  # the resize keeps the field of view
    else:
        assert 0 < inside.sum() < inside.size  # the 18 x 16 x 14 mm grid covers part of the image only


def test_restore_needs_load_metadata():
    label = MetaTensor(torch.zeros(1, 4, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="original_affine"):
        RestoreOriginalGridd(keys="pred")({"pred": label, "image": torch.zeros(1, 4, 4, 4)})
    image = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"original_affine": torch.eye(4), "spatial_shape": (4, 4, 4)})
    with pytest.raises(ValueError, match="MetaTensor"):
        RestoreOriginalGridd(keys="pred")({"pred": torch.zeros(1, 4, 4, 4), "image": image})


@pytest.mark.parametrize("shift", [0, 3])
def test_propagate_atlas_on_the_native_grid_by_hand(tmp_path, shift):
    """Atlas = the request file itself, model grid 3x the file's (18 x 15 x 12 for 6 x 5 x 4): the atlas label map
    on the model grid is label[floor(j / 3)] (nearest resize) and native voxel i sits at model voxel 3i + 1.
    Shift 0 returns the file's labels; shift +3 model voxels along axis 0 reads model voxel 3i + 4, i.e.
    label[i + 1], and the last row (3i + 4 > 17) the border, label[5]."""
    import nibabel as nib
    import numpy as np

    from monai_ext.label_app.atlas import load_atlas

    label = random_label_map((6, 5, 4), 5, sigma=1.0, seed=2)
    label_path = _write(label.numpy().astype(np.int16), tmp_path / "label.nii.gz")
    image_path = _write(synthesize_image(label, seed=2).numpy().astype(np.float32), tmp_path / "image.nii.gz")
    atlas_image, atlas_label = load_atlas(image_path, label_path, (18, 15, 12))
    pred = propagate_atlas(ConstantShift(shift), atlas_image, atlas_label, image_path, (18, 15, 12))
    expected = label if shift == 0 else torch.cat([label[1:], label[-1:]], dim=0)
    assert pred.dtype == torch.int64 and pred.shape == (1, 6, 5, 4)
    assert torch.equal(pred[0], expected)
    np.testing.assert_allclose(pred.affine.numpy(), nib.load(image_path).affine, atol=1e-6)


def test_native_atlas_label_is_sampled_once_on_the_request_grid(tmp_path):
    """Atlas = the request file (LIA-like storage, 1.1-1.7 mm voxels), model grid of 2 mm voxels, zero DDF: every
    native voxel maps to itself through world -> model grid -> world, so the native path returns the file's labels
    voxel for voxel; the model-grid path (labels nearest-resampled to 2 mm and back) loses thin parts."""
    import numpy as np

    from monai_ext.io.native import load_image
    from monai_ext.label_app.atlas import load_atlas

    label = random_label_map((20, 18, 16), 6, sigma=1.0, seed=6)
    label_path = _write(label.numpy().astype(np.int16), tmp_path / "label.nii.gz")
    image_path = _write(synthesize_image(label, seed=6).numpy().astype(np.float32), tmp_path / "image.nii.gz")
    spatial_size = (16, 16, 16)  # 32 mm: covers the 22-31 mm extents of the file
    atlas_image, atlas_label = load_atlas(image_path, label_path, spatial_size, pixdim=2.0)
    native = load_image(label_path, label=True)
    pred = propagate_atlas(ConstantShift(0), atlas_image, atlas_label, image_path, spatial_size, 2.0, native)
    assert pred.dtype == torch.int64 and pred.shape == (1, 20, 18, 16)
    assert torch.equal(pred[0].as_tensor(), label.long())
    np.testing.assert_allclose(pred.affine.numpy(), np.asarray(NATIVE_AFFINE), atol=1e-6)
    round_trip = propagate_atlas(ConstantShift(0), atlas_image, atlas_label, image_path, spatial_size, 2.0)
    assert not torch.equal(round_trip[0].as_tensor(), label.long())  # what the native sampling avoids


def test_refinement_refines_the_networks_fields_and_checks_its_settings():
    """refinement_steps > 0: the DDF used is refine_fields' forward field for the network's forward / inverse pair
    (by hand here); bad settings are refused with the refinement's own InputError."""
    from monai_ext.engines.field_refinement import refine_fields
    from monai_ext.errors import InputError

    image, label = _atlas((16, 12, 14))
    user = torch.roll(image, 1, dims=1)
    network = ConstantShift(1)
    out = AtlasPropagationd(network, image, label, ddf_key="ddf", refinement_steps=2, refinement_lr=0.2)({"image": user})
    forward = network(torch.cat([image, user])[None])
    inverse = network(torch.cat([user, image])[None])
    expected, _ = refine_fields(image[None], user[None], forward, inverse, steps=2, learning_rate=0.2)
    assert torch.equal(out["ddf"], expected[0]) and not torch.equal(expected, forward)
    with pytest.raises(InputError, match="field refinement steps must be a non-negative integer"):
        AtlasPropagationd(network, image, label, refinement_steps=-1)
    with pytest.raises(InputError, match="learning_rate must be positive"):
        AtlasPropagationd(network, image, label, refinement_steps=1, refinement_lr=0.0)
    with pytest.raises(ValueError, match="native_atlas_label needs MetaTensors"):
        AtlasPropagationd(network, image, label, native_atlas_label=label)


class _StubNetworkTask:
    """The infer task without MONAI Label: its own pre_transforms, run_inferer and post_transforms, with
    BasicInferTask's network loading (``_get_network``) replaced by the given network."""

    @staticmethod
    def make(network, atlas_image, atlas_label, spatial_size, pixdim, native_atlas_label, refinement):
        from monai_ext.label_app.infer import AtlasPropagationInferTask

        task = AtlasPropagationInferTask.__new__(AtlasPropagationInferTask)  # no monailabel: skip BasicInferTask
        task.input_key, task.output_label_key = "image", "pred"
        task.spatial_size, task.pixdim = tuple(spatial_size), pixdim
        task.atlas_image, task.atlas_label = atlas_image, atlas_label
        task.native_atlas_label, task.refinement = native_atlas_label, refinement
        task._get_network = lambda device, data: network
        return task


@pytest.mark.parametrize("pixdim", [None, 2.0])
def test_infer_task_transforms_return_the_propagation_for_the_writer(tmp_path, pixdim):
    """What MONAI Label runs (pre_transforms -> run_inferer -> post_transforms) gives propagate_atlas's label map
    as the writer wants it: (D, H, W) int32 (ITK has no int64 images), the request file's shape and affine."""
    import nibabel as nib
    import numpy as np
    from monai.transforms import Compose

    from monai_ext.io.native import load_image
    from monai_ext.label_app.atlas import load_atlas

    atlas_label = random_label_map((20, 18, 16), 5, seed=4)
    label_path = _write(atlas_label.numpy().astype(np.int16), tmp_path / "atlas_label.nii.gz")
    atlas_path = _write(synthesize_image(atlas_label, seed=4).numpy().astype(np.float32), tmp_path / "atlas.nii.gz")
    request_label = torch.roll(random_label_map((22, 17, 15), 5, seed=5), 1, dims=0)
    request = _write(synthesize_image(request_label, seed=5).numpy().astype(np.float32) * 7.0, tmp_path / "r.nii.gz")
    spatial_size = (16, 16, 16)
    atlas = load_atlas(atlas_path, label_path, spatial_size, pixdim)
    network = SITReg(3, 1, features=[4, 4], feature_convolutions=[1, 1], deformation_features=[4, 4],
                     deformation_convolutions=[1, 1], groups=2).eval()  # fmt: skip
    native = load_image(label_path, label=True)
    refinement = {"refinement_steps": 1, "refinement_lr": 0.15}
    task = _StubNetworkTask.make(network, *atlas, spatial_size, pixdim, native, refinement)

    data = Compose(task.pre_transforms())({"image": request})
    data = task.run_inferer(data, device="cpu")
    out = Compose(task.post_transforms())(data)["pred"]

    expected = propagate_atlas(network, *atlas, request, spatial_size, pixdim, native, **refinement)
    assert isinstance(out, MetaTensor) and out.dtype == torch.int32 and out.shape == (22, 17, 15)
    assert torch.equal(out.as_tensor().long(), expected[0].as_tensor())
    np.testing.assert_allclose(out.affine.numpy(), nib.load(request).affine, atol=1e-6)
    assert set(out.unique().tolist()) <= set(atlas[1].unique().tolist())


def test_label_app_imports_nothing_needing_torchvision():
    """The app imports only MONAI Label's task and app base classes (monailabel.transform.post, for one, imports
    torchvision; a torchvision build that does not match torch makes POST /infer fail)."""
    import re

    allowed = {
        "monailabel.tasks.infer.basic_infer",
        "monailabel.interfaces.tasks.infer_v2",
        "monailabel.interfaces.app",
    }
    folder = Path(__file__).resolve().parents[1] / "monai_ext" / "label_app"
    named = set()
    for source in folder.glob("*.py"):
        text = source.read_text()
        # modules named by optional_import("...") and by import statements
        named |= set(re.findall(r"optional_import\(\s*[\"']((?:monailabel|torchvision)(?:\.\w+)*)[\"']", text))
        named |= set(re.findall(r"^\s*(?:from|import)\s+((?:monailabel|torchvision)(?:\.\w+)*)", text, flags=re.M))
    assert named and named <= allowed, sorted(named - allowed)
