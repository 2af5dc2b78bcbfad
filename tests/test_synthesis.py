"""Synthetic brain-like data: determinism, label/intensity structure, known deformation, OASIS layout."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ext.data.oasis import oasis_cases
from monai_ext.data.synthesis import (
    image_from_label_map,
    make_synthetic_pair,
    random_ddf,
    random_label_map,
    synthesize_image,
    write_synthetic_oasis,
)
from monai_ext.metrics.deformation import folding_fraction
from monai_ext.spatial.sampling import voxel_grid, warp


def test_label_map_is_deterministic_and_inside_an_ellipsoid():
    shape = (20, 24, 16)
    labels = random_label_map(shape, num_labels=5, seed=3)
    assert torch.equal(labels, random_label_map(shape, num_labels=5, seed=3))
    assert not torch.equal(labels, random_label_map(shape, num_labels=5, seed=4))
    assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == {0, 1, 2, 3, 4, 5}
    centre = torch.tensor([(s - 1) / 2 for s in shape]).view(3, 1, 1, 1)
    radii = torch.tensor([0.42 * s for s in shape]).view(3, 1, 1, 1)
    outside = (((voxel_grid(shape) - centre) / radii) ** 2).sum(0) > 1
    assert torch.all(labels[outside] == 0) and torch.all(labels[~outside] > 0)


def test_image_has_one_intensity_per_label_before_blur_and_noise():
    labels = random_label_map((16, 16), num_labels=4, seed=1)
    clean = synthesize_image(labels, seed=2, blur_sigma=0, noise_std=0)
    for value in labels.unique():
        region = clean[labels == value]
        assert torch.all(region == region[0])  # constant per label
        assert (region[0] == 0) if value == 0 else (0.2 <= region[0] <= 1)
    noisy = synthesize_image(labels, seed=2)
    assert noisy.min() >= 0 and noisy.max() <= 1 and not torch.equal(noisy, clean)
    # same seed -> same contrast, another noise_seed -> other noise only
    other = synthesize_image(labels, seed=2, blur_sigma=0, noise_seed=9)
    assert (other - clean).abs().max() < 0.15


def test_random_ddf_scale_and_no_folding():
    ddf = random_ddf((24, 20, 16), max_displacement=2.5, seed=5)
    assert ddf.shape == (3, 24, 20, 16)
    assert ddf.abs().max() == pytest.approx(2.5, rel=1e-6)
    assert float(folding_fraction(ddf[None].double())[0]) == 0.0


def test_pair_is_related_by_the_known_ddf():
    pair = make_synthetic_pair((16, 16, 16), seed=2, max_displacement=1.5)
    assert pair["moving_image"].shape == (1, 16, 16, 16) and pair["ddf"].shape == (3, 16, 16, 16)
    assert torch.equal(pair["fixed_image"], warp(pair["moving_image"][None], pair["ddf"][None])[0])
    assert torch.equal(pair["fixed_label"], warp(pair["moving_label"][None], pair["ddf"][None], mode="nearest")[0])
    assert not torch.equal(pair["fixed_label"], pair["moving_label"])


def test_write_synthetic_oasis_layout(tmp_path):
    root = write_synthetic_oasis(tmp_path, num_subjects=3, shape=(10, 12, 8), num_labels=4)
    cases = oasis_cases(root, "all")
    assert [c["name"] for c in cases] == ["OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1", "OASIS_OAS1_0003_MR1"]
    images = [np.asarray(nib.load(c["image"]).dataobj) for c in cases]
    labels = [np.asarray(nib.load(c["label"]).dataobj) for c in cases]
    assert images[0].dtype == np.float32 and labels[0].dtype == np.int16 and images[0].shape == (10, 12, 8)
    assert not np.array_equal(labels[0], labels[1])  # each subject has its own deformation
    # shared contrast: a label's mean intensity agrees between subjects (blur/noise aside)
    for value in (1, 2):
        means = [img[lab == value].mean() for img, lab in zip(images, labels) if (lab == value).sum() > 20]
        assert np.ptp(means) < 0.1


def test_image_from_real_label_map(tmp_path):
    labels = np.zeros((8, 8, 8), dtype=np.int16)
    labels[2:6, 2:6, 2:6] = 41
    labels[3:5, 3:5, 3:5] = 2
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(path))
    image, label = image_from_label_map(path, seed=0, blur_sigma=0, noise_std=0)
    assert image.shape == (1, 8, 8, 8) and torch.equal(label[0], torch.from_numpy(labels.astype(np.int64)))
    assert image[0][labels == 0].max() == 0 and len(image[0][labels > 0].unique()) == 2


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        random_label_map((3, 8, 8))
    with pytest.raises(ValueError, match="label_map"):
        synthesize_image(torch.zeros(4, 4, 4))
