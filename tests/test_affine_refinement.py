"""Mutual-information refinement of an affine (``monai_ext.engines.affine_refinement``) and its finer grids.

Property tests on a real brain (the embedded held-out label map at 2 mm, rendered with two unrelated random
intensity tables, so the pair differs in contrast as two MR sequences do): a known world affine is recovered from a
start several millimetres off, on the network's coarse grids or through finer ``refine_grids``; zero steps and a
fixed seed are exact.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_ext.data.model_space import REFINE_SUFFIX, model_space_transforms
from monai_ext.data.synthbrain import rotation_about_axis
from monai_ext.demo import DEMO_DATA
from monai_ext.engines.affine_refinement import refine_affine, refine_keymorph_result
from monai_ext.spatial.coordinates import invert_homogeneous

KEYS = ["moving_image", "fixed_image"]


def _rendered(label: np.ndarray, affine: np.ndarray, seed: int) -> MetaTensor:
    """The label map with a random intensity per label (0 stays 0) as a channel-first ``MetaTensor``."""
    table = np.random.default_rng(seed).uniform(0.2, 1.0, int(label.max()) + 1)
    table[0] = 0.0
    return MetaTensor(torch.as_tensor(table[label], dtype=torch.float32)[None], affine=torch.as_tensor(affine))


@pytest.fixture(scope="module")
def brain_pair():
    """``(grids, true)``: model-space grids (4 mm, 48^3) and 2 mm refinement copies of one brain seen twice, the
    moving copy placed in its world by ``true`` (fixed world RAS mm -> moving world RAS mm: 8 degrees, 3 mm, 4 %)."""
    image = nib.load(str(DEMO_DATA / "training_seg_10_2mm.nii.gz"))
    label = np.asarray(image.dataobj).astype(np.int64)
    true = np.eye(4)
    true[:3, :3] = rotation_about_axis((0.3, -0.5, 0.8), 8.0)[:3, :3] * 1.04
    true[:3, 3] = (3.0, -2.0, 1.5)
    data = {"fixed_image": _rendered(label, image.affine, 1), "moving_image": _rendered(label, true @ image.affine, 2)}
    transform = model_space_transforms(
        KEYS, pixdim=[4.0] * 3, spatial_size=(48, 48, 48), intensity="foreground_percentile", centre="foreground",
        load=False, refine_pixdim=2.0,
    )  # fmt: skip
    return transform(data), torch.as_tensor(true)


def _world(grids, voxel_map: torch.Tensor, suffix: str = "") -> torch.Tensor:
    """A fixed voxel -> moving voxel map of the grids ``<key><suffix>`` as a world map (fixed -> moving RAS mm)."""
    moving, fixed = (torch.as_tensor(grids[key + suffix].affine, dtype=torch.float64) for key in KEYS)
    return moving @ voxel_map.double() @ invert_homogeneous(fixed)


def _voxel(grids, world: torch.Tensor, suffix: str = "") -> torch.Tensor:
    moving, fixed = (torch.as_tensor(grids[key + suffix].affine, dtype=torch.float64) for key in KEYS)
    return invert_homogeneous(moving) @ world @ fixed


def _error_mm(world: torch.Tensor, true: torch.Tensor, grids) -> float:
    """Mean distance (mm) between the two maps' images of the fixed brain's voxels (every 4th, 2 mm grid)."""
    fixed = grids["fixed_image" + REFINE_SUFFIX]
    index = torch.nonzero(fixed[0] > 0.05)[::4].double()
    points = torch.as_tensor(fixed.affine, dtype=torch.float64) @ torch.cat([index.T, torch.ones(1, len(index))])
    return float(((world - true.double()) @ points)[:3].norm(dim=0).mean())


def test_refinement_grids_share_centre_and_extent_with_the_model_grid(brain_pair):
    grids, _ = brain_pair
    for key in KEYS:
        coarse, fine = grids[key], grids[key + REFINE_SUFFIX]
        assert coarse.shape == (1, 48, 48, 48) and fine.shape == (1, 96, 96, 96)
        centre = [torch.as_tensor(x.affine, dtype=torch.float64) @ torch.tensor([*c, 1.0], dtype=torch.float64)
                  for x, c in ((coarse, [23.5] * 3), (fine, [47.5] * 3))]  # fmt: skip
        torch.testing.assert_close(centre[0], centre[1], atol=1e-6, rtol=0)
        assert 0.99 < float(fine.max()) <= 1.0 + 1e-6  # scaled like the model grid (foreground percentile)


def test_recovers_a_known_affine_across_contrasts_on_the_model_grid(brain_pair):
    grids, true = brain_pair
    start = _voxel(grids, torch.eye(4, dtype=torch.float64))[None]  # the grids' centres matched, nothing else
    moving, fixed = (grids[key].as_tensor()[None] for key in KEYS)
    refined = refine_affine(moving, fixed, start, steps=(30, 30), factors=(2, 1), learning_rate=0.02)
    before, after = _error_mm(_world(grids, start[0]), true, grids), _error_mm(_world(grids, refined[0]), true, grids)
    assert before > 5.0 and after < 1.0, (before, after)


def test_refinement_on_finer_grids_converts_between_grids_and_is_more_precise(brain_pair):
    grids, true = brain_pair
    start = _voxel(grids, torch.eye(4, dtype=torch.float64))[None]
    result = {"inverse_matrix_voxel": start.float(), "points_moving": torch.zeros(1, 3, 3)}
    moving, fixed = (grids[key][None] for key in KEYS)
    fine = tuple(grids[key + REFINE_SUFFIX][None] for key in KEYS)
    refined = refine_keymorph_result(result, moving, fixed, (25, 25, 25), refine_grids=fine)["inverse_matrix_voxel"]
    assert refined.dtype == torch.float32 and refined.shape == (1, 4, 4)
    assert _error_mm(_world(grids, refined[0]), true, grids) < 0.5  # on the 4 mm grids alone: about 0.3-0.5 mm
    # zero steps: the round trip coarse -> fine -> coarse grid is exact
    same = refine_keymorph_result(result, moving, fixed, (0, 0, 0), refine_grids=fine)["inverse_matrix_voxel"]
    torch.testing.assert_close(same, start.float(), atol=1e-5, rtol=0)


def test_fixed_seed_is_deterministic_and_zero_steps_return_the_input(brain_pair):
    grids, _ = brain_pair
    moving, fixed = (grids[key].as_tensor()[None] for key in KEYS)
    start = torch.eye(4)[None]
    first, second = (refine_affine(moving, fixed, start, steps=(3, 3), factors=(2, 1), seed=5) for _ in range(2))
    assert torch.equal(first, second) and not torch.equal(first, start)
    assert refine_affine(moving, fixed, start, steps=(0, 0), factors=(2, 1)) is start


def test_bad_inputs_raise_clear_errors(brain_pair):
    grids, _ = brain_pair
    moving, fixed = (grids[key].as_tensor()[None] for key in KEYS)
    with pytest.raises(ValueError, match="moving must be"):
        refine_affine(moving[0], fixed, torch.eye(4)[None])
    with pytest.raises(ValueError, match="matrix must be"):
        refine_affine(moving, fixed, torch.eye(4))
    with pytest.raises(ValueError, match="one length"):
        refine_affine(moving, fixed, torch.eye(4)[None], steps=(1, 1), factors=(1,))
    with pytest.raises(ValueError, match="factors"):
        refine_affine(moving, fixed, torch.eye(4)[None], steps=(1,), factors=(0,))
    result = {"inverse_matrix_voxel": torch.eye(4)[None], "points_moving": torch.zeros(1, 3, 3)}
    with pytest.raises(TypeError, match="MetaTensor"):
        refine_keymorph_result(result, moving, fixed, (1,), refine_grids=(moving, fixed))
    with pytest.raises(ValueError, match="refine_pixdim"):
        model_space_transforms(KEYS, pixdim=[4.0] * 3, spatial_size=(8, 8, 8), refine_pixdim=2.0)
