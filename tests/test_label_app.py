"""Atlas-based label propagation (monai_ext.label_app): the MONAI Label use of a registration bundle.

monailabel does not import in this environment (its inference tasks import torchvision, whose PyPI build does
not match the CPU torch 2.13 here), so the
propagation transform is tested directly, with networks whose DDF is known (derivation in each test), and
with the sitreg_oasis network_def."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor

from monai_ext.data.synthesis import random_label_map, synthesize_image
from monai_ext.label_app.atlas import AtlasPropagationd
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

