"""Brain pairs synthesised from real label maps (the shipped 2 mm demo maps stand in for the training maps)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ext.data.synthbrain import (
    BRAIN_LABELS,
    HEMISPHERE_PAIRS,
    OTHER_BRAIN_LABELS,
    SynthBrainPairDataset,
    grid_affine,
    held_out_pairs,
    label_map_files,
    load_brain_label_map,
    mirror_label_map,
    normalize_intensity,
    random_spatial_transform,
    rotation_about_axis,
    sample_label_map,
    structure_labels,
    synthesis_index,
    synthesize_contrast,
)
from monai_ext.demo import DEMO_DATA

MAPS = sorted(str(p) for p in DEMO_DATA.glob("training_seg_*_2mm.nii.gz"))
SHAPE = (40, 48, 40)  # 4 mm grid: small and fast


def test_synthesis_index_keeps_brain_labels_only():
    labels = np.array([0, 2, 41, 24, 165, 507, 60, 85, 3])
    index = synthesis_index(labels)
    kept = (*BRAIN_LABELS, *OTHER_BRAIN_LABELS)
    assert [kept[i - 1] if i else 0 for i in index] == [0, 2, 41, 0, 0, 0, 60, 85, 3]
    # structure indices: BRAIN_LABELS position + 1, everything else (other intracranial labels) background
    assert structure_labels(torch.from_numpy(index)).tolist() == [0, 1, 18, 0, 0, 0, 31, 0, 2]


def test_label_map_is_reoriented_exactly_and_cropped():
    source = nib.load(MAPS[0])
    original = np.asarray(source.dataobj)
    brain = load_brain_label_map(MAPS[0])
    # RAS voxel order: the affine is diagonal and positive
    assert np.allclose(brain.affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    # every voxel keeps its label at the same world position
    voxels = np.argwhere(brain.index.numpy() > 0)[::97]
    world = brain.affine @ np.c_[voxels, np.ones(len(voxels))].T
    back = np.rint(np.linalg.inv(source.affine) @ world).astype(int)[:3].T
    kept = np.array((0, *BRAIN_LABELS, *OTHER_BRAIN_LABELS))
    assert np.array_equal(kept[brain.index.numpy()[tuple(voxels.T)]], original[tuple(back.T)])
    mask = original > 0
    assert int((brain.index > 0).sum()) == int(mask.sum())
    centroid = (source.affine @ np.append(np.argwhere(mask).mean(0), 1))[:3]
    np.testing.assert_allclose(brain.centroid, centroid, atol=1e-6)


def test_identity_sampling_on_the_maps_own_grid_preserves_labels():
    brain = load_brain_label_map(MAPS[1])
    shape = tuple(brain.index.shape)
    assert torch.equal(sample_label_map(brain, shape, brain.affine), brain.index)


def test_known_translation_is_a_voxel_shift():
    brain = load_brain_label_map(MAPS[0])
    shape = tuple(brain.index.shape)
    transform = np.eye(4)
    transform[:3, 3] = [4.0, 0.0, -2.0]  # two voxels along R, one along -S
    shifted = sample_label_map(brain, shape, brain.affine, transform)
    assert torch.equal(shifted[:-2, :, 1:], brain.index[2:, :, :-1])


def test_random_transform_bounds():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        matrix = random_spatial_transform(generator, rotation=10, scaling=0.1, shear=0.0, translation=5)
        linear = matrix[:3, :3]
        singular = np.linalg.svd(linear, compute_uv=False)
        assert singular.max() <= 1.1 + 1e-9 and singular.min() >= 1 / 1.1 - 1e-9
        assert np.abs(matrix[:3, 3]).max() <= 5
        assert np.linalg.det(linear) > 0


def test_contrast_synthesis_range_background_and_determinism():
    brain = load_brain_label_map(MAPS[0])
    index = brain.index
    for t1_like in (False, True):
        a = synthesize_contrast(index, torch.Generator().manual_seed(3), t1_like)
        b = synthesize_contrast(index, torch.Generator().manual_seed(3), t1_like)
        c = synthesize_contrast(index, torch.Generator().manual_seed(4), t1_like)
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.dtype == torch.float32 and a.shape == index.shape
        assert float(a.min()) >= 0 and float(a.max()) <= 1
        assert torch.all(a[index == 0] == 0)
        assert float((a[index > 0] == 1).float().mean()) < 0.02  # only the top 0.5 % saturates
    t1 = synthesize_contrast(index, torch.Generator().manual_seed(0), t1_like=True)
    white, grey = BRAIN_LABELS.index(2) + 1, BRAIN_LABELS.index(3) + 1
    ventricle = BRAIN_LABELS.index(4) + 1
    assert t1[index == white].median() > t1[index == grey].median() > t1[index == ventricle].median()


def test_normalize_intensity():
    image = torch.tensor([0.0, -1.0, 2.0, 4.0, 6.0, 8.0])
    out = normalize_intensity(image, percentile=100)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0]))
    assert torch.equal(normalize_intensity(torch.zeros(4)), torch.zeros(4))


def test_pair_dataset_items_are_reproducible_and_consistent():
    dataset = SynthBrainPairDataset(MAPS, shape=SHAPE, spacing=4.0, pairs_per_epoch=3, seed=7)
    item = dataset[1]
    again = dataset[1]
    assert all(torch.equal(item[k], again[k]) for k in item)
    assert not torch.equal(item["moving_image"], dataset[2]["moving_image"])
    dataset.set_epoch(1)
    assert not torch.equal(item["moving_image"], dataset[1]["moving_image"])
    for side in ("moving", "fixed"):
        image, label = item[f"{side}_image"], item[f"{side}_label"]
        assert image.shape == label.shape == (1, *SHAPE)
        assert label.dtype == torch.int64 and 0 <= int(label.min()) and int(label.max()) <= len(BRAIN_LABELS)
        # inside the brain structures only noise can push a voxel to 0
        assert float((image[label > 0] > 0).float().mean()) > 0.99
        assert len(label.unique()) > 20
    with pytest.raises(IndexError):
        dataset[3]


def test_held_out_pairs_and_splits(tmp_path):
    pairs = held_out_pairs(MAPS, SHAPE, 4.0, contrasts=("t1", "random"))
    assert len(pairs) == 4
    assert [p["moving_name"] for p in pairs] == ["training_seg_09_2mm_t1", "training_seg_10_2mm_t1"] + [
        "training_seg_09_2mm_random",
        "training_seg_10_2mm_random",
    ]
    # both directions of a contrast share the label maps, swapped
    assert torch.equal(pairs[0]["moving_label"], pairs[1]["fixed_label"])
    again = held_out_pairs(MAPS, SHAPE, 4.0, contrasts=("t1", "random"))
    assert torch.equal(pairs[3]["fixed_image"], again[3]["fixed_image"])
    for name in ("training_seg_01.nii.gz", "training_seg_09.nii.gz", "training_seg_10.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.split("/")[-1] for p in label_map_files(tmp_path, "train")] == ["training_seg_01.nii.gz"]
    assert [p.split("/")[-1] for p in label_map_files(tmp_path, "validate")] == [
        "training_seg_09.nii.gz",
        "training_seg_10.nii.gz",
    ]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        label_map_files(tmp_path / "missing", "train")


def test_rotation_about_axis_is_a_proper_rotation_by_the_angle():
    axis = np.array([1.0, -2.0, 0.5])
    rotation = rotation_about_axis(axis, 70.0)
    r = rotation[:3, :3]
    assert np.allclose(r @ r.T, np.eye(3)) and np.isclose(np.linalg.det(r), 1.0)
    assert np.allclose(r @ axis, axis) and np.allclose(rotation[:3, 3], 0)  # the axis is fixed
    ortho = np.cross(axis, [0.0, 0.0, 1.0])
    cosine = (r @ ortho) @ ortho / (ortho @ ortho)
    assert np.isclose(np.degrees(np.arccos(cosine)), 70.0)
    assert np.allclose(rotation_about_axis([0, 0, 1], 90.0)[:3, :3] @ [1, 0, 0], [0, 1, 0])  # right-handed
    with pytest.raises(ValueError, match="non-zero"):
        rotation_about_axis([0, 0, 0], 10.0)


def test_held_out_pairs_rotate_the_moving_anatomy_only():
    plain = held_out_pairs(MAPS, SHAPE, 4.0, contrasts=("t1",))
    rotated = held_out_pairs(MAPS, SHAPE, 4.0, contrasts=("t1",), rotations=(0.0, 90.0))
    assert [p["rotation"] for p in rotated] == [0.0, 90.0, 0.0, 90.0]
    assert rotated[1]["moving_name"] == "training_seg_09_2mm_t1_rot90"
    assert torch.equal(rotated[0]["moving_image"], plain[0]["moving_image"])  # angle 0: the plain pair
    assert torch.equal(rotated[1]["fixed_label"], plain[0]["fixed_label"])  # the fixed image is never rotated
    moved, still = rotated[1]["moving_label"], plain[0]["moving_label"]
    # the same anatomy, rotated about its centroid: structure volumes kept, positions changed
    assert abs(int((moved > 0).sum()) - int((still > 0).sum())) < 0.05 * int((still > 0).sum())
    assert float(((moved > 0) == (still > 0)).float().mean()) < 0.95


def test_grid_affine_centre():
    affine = grid_affine((4, 6, 8), 2.0, (10.0, -5.0, 3.0))
    np.testing.assert_allclose(affine @ np.array([1.5, 2.5, 3.5, 1.0]), [10.0, -5.0, 3.0, 1.0])


def test_mirrored_brain_swaps_the_hemispheres_in_place():
    """The mirror image of a map: each left structure lies where the right one was, reflected through the array's
    L->R axis (and vice versa), midline structures are reflected only, the centroid mirrors about the grid
    centre along x, and mirroring twice gives the map back."""
    label_map = load_brain_label_map(MAPS[0])
    mirrored = mirror_label_map(label_map)
    assert torch.equal(mirror_label_map(mirrored).index, label_map.index)
    np.testing.assert_array_equal(mirrored.affine, label_map.affine)
    synth = BRAIN_LABELS + OTHER_BRAIN_LABELS
    position = {label: k for k, label in enumerate(synth, start=1)}
    reflected = label_map.index.flip(0)
    for left, right in HEMISPHERE_PAIRS:
        assert torch.equal(mirrored.index == position[right], reflected == position[left])
        assert torch.equal(mirrored.index == position[left], reflected == position[right])
    brainstem = position[16]
    assert torch.equal(mirrored.index == brainstem, reflected == brainstem)
    centre_x = (label_map.affine @ np.array([(label_map.index.shape[0] - 1) / 2, 0, 0, 1.0]))[0]
    assert mirrored.centroid[0] == pytest.approx(2 * centre_x - label_map.centroid[0], abs=1e-6)
    np.testing.assert_allclose(mirrored.centroid[1:], label_map.centroid[1:], atol=1e-6)
    # every left structure has a right partner among the kept labels
    assert {label for pair in HEMISPHERE_PAIRS for label in pair} <= set(synth)


def test_pair_dataset_with_mirror_draws_from_twice_the_maps():
    plain = SynthBrainPairDataset(MAPS, shape=SHAPE, spacing=4.0, pairs_per_epoch=2, seed=3)
    mirrored = SynthBrainPairDataset(MAPS, shape=SHAPE, spacing=4.0, pairs_per_epoch=2, seed=3, mirror=True)
    assert len(mirrored.maps) == 2 * len(plain.maps)
    assert [m.name for m in mirrored.maps[len(MAPS):]] == [f"{m.name} (mirrored)" for m in plain.maps]
    item = mirrored[0]
    assert item["moving_image"].shape == (1, *SHAPE) and len(item["fixed_label"].unique()) > 20
