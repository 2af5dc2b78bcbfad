"""SITReg's random affine augmentation: parameter distributions, the matrix, resampling, FOV mask and points."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from monai.data import MetaTensor

from monai_ext.data.affine_augmentation import RandSITRegAffined, resample_world_affine

# SITReg's standard deviations: log-scales, log-shears, rotations, translations
STDS_3D = [0.05] * 3 + [0.025] * 3 + [math.radians(5.0)] * 3 + [0.025] * 3


def test_parameter_distributions_and_probability():
    """10000 draws: applied fraction 0.9 +- 0.015 (standard error 0.003); over the ~9000 applied draws every
    component has |mean| < 4 sigma / sqrt(n), std within 5 % of SITReg's value (standard error of a sample
    std is sigma / sqrt(2 n) ~ 0.75 %) and |correlation| < 0.05 between components (standard error 0.011)."""
    transform = RandSITRegAffined(keys="image")
    transform.set_random_state(seed=0)
    draws = [transform.sample_parameters(3) for _ in range(10000)]
    applied = np.stack([d for d in draws if d is not None])
    assert abs(len(applied) / len(draws) - 0.9) < 0.015
    stds = np.asarray(STDS_3D)
    n = len(applied)
    assert applied.shape[1] == 12
    np.testing.assert_array_less(np.abs(applied.mean(0)), 4 * stds / math.sqrt(n))
    np.testing.assert_allclose(applied.std(0), stds, rtol=0.05)
    correlation = np.corrcoef(applied.T) - np.eye(12)
    assert np.abs(correlation).max() < 0.05


def test_2d_parameters_and_custom_stds():
    transform = RandSITRegAffined(keys="image", prob=1.0, translation_std=0.1, rotation_std=10.0,
                                  log_scale_std=0.2, log_shear_std=0.0)
    transform.set_random_state(seed=1)
    applied = np.stack([transform.sample_parameters(2) for _ in range(4000)])
    assert applied.shape == (4000, 6)
    np.testing.assert_allclose(applied.std(0), [0.2, 0.2, 0.0, math.radians(10.0), 0.1, 0.1], rtol=0.06, atol=0)


def test_matrix_is_scale_shear_times_rotation_times_translation():
    """The written matrix equals embed(expm(Sym) expm(Skew)) T of the drawn parameters (scipy's expm)."""
    transform = RandSITRegAffined(keys="image", prob=1.0)
    transform.set_random_state(seed=3)
    out = transform({"image": torch.rand(1, 5, 6, 7)})
    transform.set_random_state(seed=3)
    p = transform.sample_parameters(3)
    sym = np.diag(p[:3])
    sym[0, 1], sym[0, 2], sym[1, 2] = p[3:6]
    sym = sym + np.triu(sym, 1).T
    skew = np.zeros((3, 3))
    skew[0, 1], skew[0, 2], skew[1, 2] = p[6:9]
    skew = skew - skew.T
    linear = scipy.linalg.expm(sym) @ scipy.linalg.expm(skew)
    expected = np.eye(4)
    expected[:3, :3] = linear
    translation = np.eye(4)
    translation[:3, 3] = p[9:]
    np.testing.assert_allclose(out["image_aug_matrix"].numpy(), expected @ translation, rtol=0, atol=1e-12)


def test_identity_cases_leave_image_unchanged():
    image = torch.rand(1, 6, 5, 4)
    never = RandSITRegAffined(keys="image", prob=0.0)({"image": image})
    zero = RandSITRegAffined(keys="image", prob=1.0, translation_std=0, rotation_std=0, log_scale_std=0,
                             log_shear_std=0)({"image": image})
    for out in (never, zero):
        torch.testing.assert_close(out["image"], image, rtol=0, atol=1e-6)
        assert torch.equal(out["image_aug_matrix"], torch.eye(4, dtype=torch.float64))
        assert out["image_fov_mask"].shape == (1, 6, 5, 4) and bool((out["image_fov_mask"] == 1).all())


def test_one_voxel_translation_by_hand():
    """Largest axis 6 voxels -> world voxel spacing h = 2 / 6. M x = x + h e_0 reads I at i + 1: J[i] = I[i + 1],
    the last slice reads outside the grid (border value I[5], FOV mask 0)."""
    image = MetaTensor(torch.rand(2, 6, 5, 4), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[0, 3] = 2.0 / 6
    out, fov = resample_world_affine(image, matrix)
    torch.testing.assert_close(out[:, :-1].as_tensor(), image[:, 1:].as_tensor(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, -1].as_tensor(), image[:, -1].as_tensor(), rtol=0, atol=1e-6)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, image.affine)
    assert fov.shape == (1, 6, 5, 4) and bool((fov[:, :-1] == 1).all()) and bool((fov[:, -1] == 0).all())
    # anisotropic voxels: axis 1 has the largest field of view (5 * 3 > 6 * 1), h_0 = (2 / 5) * (1 / 3)
    aniso = matrix.clone()
    aniso[0, 3] = 2.0 / 5 / 3
    out, _ = resample_world_affine(image, aniso, voxel_size=(1.0, 3.0, 1.0))
    torch.testing.assert_close(out[:, :-1].as_tensor(), image[:, 1:].as_tensor(), rtol=0, atol=1e-6)


def _blob(shape, centre, sigma):
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    return torch.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * sigma**2))[None]


def _centroid(image):
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in image.shape[1:]], indexing="ij")
    weights = image[0].double()
    return torch.stack([(g * weights).sum() / weights.sum() for g in grids])


@pytest.mark.parametrize("shape, centre", [((26, 24, 22), (12.3, 10.8, 11.5)), ((40, 36), (18.4, 17.2))])
def test_points_follow_the_warped_image(shape, centre):
    """A Gaussian blob at voxel p: after I(M x) its intensity centroid sits at W^-1 M^-1 W p, where the
    transformed landmark is written (centroids of affinely mapped densities map exactly; discretisation of a
    sigma = 2 blob well inside the grid keeps the error below 0.02 voxel). Larger-than-default stds make the
    motion several voxels."""
    transform = RandSITRegAffined(
        keys=["moving_image", "fixed_image"], mask_keys=["moving_mask", None],
        point_keys=["moving_points", "fixed_points"], prob=1.0, translation_std=0.1, rotation_std=10.0,
    )
    transform.set_random_state(seed=5)
    image = _blob(shape, centre, 2.0).float()
    points = torch.tensor([centre], dtype=torch.float32)
    mask = torch.ones_like(image)
    out = transform({"moving_image": image, "fixed_image": image.clone(), "moving_mask": mask,
                     "moving_points": points, "fixed_points": points.clone()})
    for side in ("moving", "fixed"):
        moved = out[f"{side}_points"][0].double()
        assert (moved - points[0].double()).norm() > 0.5  # the augmentation really moved it
        torch.testing.assert_close(_centroid(out[f"{side}_image"]), moved, rtol=0, atol=0.02)
    assert not torch.allclose(out["moving_image_aug_matrix"], out["fixed_image_aug_matrix"])
    torch.testing.assert_close(out["moving_mask"], out["moving_image_fov_mask"])  # all-ones mask -> the FOV mask
    assert 0 < float(out["moving_mask"].mean()) < 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="prob"):
        RandSITRegAffined(keys="image", prob=1.5)
    with pytest.raises(ValueError, match="rotation_std"):
        RandSITRegAffined(keys="image", rotation_std=-1.0)
    with pytest.raises(ValueError, match="mask_keys"):
        RandSITRegAffined(keys=["a", "b"], mask_keys=["m"])
    with pytest.raises(ValueError, match="world_matrix"):
        resample_world_affine(torch.rand(1, 4, 4, 4), torch.eye(3))
