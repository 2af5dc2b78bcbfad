"""KeyMorph data: IXI / CSV layouts, modality pairing (never an image with itself), same-subject pairs."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ext.data.keymorph import (
    csv_pairs,
    csv_subjects,
    ixi_subjects,
    keymorph_pairs,
    keymorph_transforms,
    modality_pairs,
    paired_files,
    same_subject_pairs,
    subject_id,
)
from monai_ext.data.pairs import RegistrationPairDataset


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def _ixi(root: Path, n: int, modalities=("T1", "T2", "PD")) -> Path:
    for mod in modalities:
        for i in range(n):
            name = f"IXI{i:03d}-Guys-{mod}"
            _touch(root / mod / f"{name}.nii.gz")
            _touch(root / f"{mod}_mask" / f"{name}_mask.nii.gz")
            _touch(root / f"{mod}_seg" / f"{name}_seg.nii.gz")
    return root


def test_ixi_split_sorted_and_extras(tmp_path):
    root = _ixi(tmp_path, 3)
    (root / "T1" / "notes.txt").write_text("ignored")
    subjects = ixi_subjects(root, split="all", masks=True, labels=True)
    assert sorted(subjects) == ["PD", "T1", "T2"]
    names = [s["name"] for s in subjects["T1"]]
    assert names == sorted(names) == [f"IXI{i:03d}-Guys-T1" for i in range(3)]
    first = subjects["T2"][0]
    assert first["mask"].endswith("T2_mask/IXI000-Guys-T2_mask.nii.gz")
    assert first["label"].endswith("T2_seg/IXI000-Guys-T2_seg.nii.gz")
    assert first["subject"] == "IXI000-Guys" and first["modality"] == "T2"
    # 3 files: train is [0, 428) -> all three, test [428, 528) -> none
    assert len(ixi_subjects(root, ("T1",), "train")["T1"]) == 3
    with pytest.raises(ValueError, match="no images"):
        ixi_subjects(root, ("T1",), "test")
    with pytest.raises(FileNotFoundError, match="modality folder"):
        ixi_subjects(root, ("FLAIR",))
    (root / "PD_seg" / "IXI001-Guys-PD_seg.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="label"):
        ixi_subjects(root, ("PD",), labels=True)


def test_ixi_train_test_boundaries(tmp_path):
    root = tmp_path / "ixi"
    for i in range(530):
        _touch(root / "T1" / f"s{i:04d}.nii.gz")
    train, test = ixi_subjects(root, ("T1",), "train")["T1"], ixi_subjects(root, ("T1",), "test")["T1"]
    assert (len(train), len(test)) == (428, 100)
    assert train[-1]["name"] == "s0427" and test[0]["name"] == "s0428" and test[-1]["name"] == "s0527"


def test_within_modality_pairs_exclude_self(tmp_path):
    subjects = ixi_subjects(_ixi(tmp_path, 3), split="all", labels=True)
    pairs = modality_pairs(subjects)
    # n (n - 1) ordered pairs per modality: 3 * 2 * 3 modalities (the reference's product would add 9 self-pairs)
    assert len(pairs) == 18
    assert all(p["moving_image"] != p["fixed_image"] for p in pairs)
    assert all(p["moving_modality"] == p["fixed_modality"] for p in pairs)
    assert len({(p["moving_image"], p["fixed_image"]) for p in pairs}) == 18
    assert all("moving_label" in p and "fixed_label" in p for p in pairs)


def test_mixed_modality_pairs(tmp_path):
    subjects = ixi_subjects(_ixi(tmp_path, 2), ("T1", "T2"), split="all")
    pairs = modality_pairs(subjects, mix_modalities=True)
    # ordered modality pairs (T1,T2), (T2,T1): 2 * 2 images each, same-subject cross-modality pairs included
    assert len(pairs) == 8
    assert all(p["moving_modality"] != p["fixed_modality"] for p in pairs)
    with pytest.raises(ValueError, match="across distinct modalities"):
        modality_pairs({"T1": subjects["T1"]}, mix_modalities=True)
    with pytest.raises(ValueError, match="within a modality"):
        modality_pairs({"T1": subjects["T1"][:1]})


def test_same_subject_pairs(tmp_path):
    subjects = ixi_subjects(_ixi(tmp_path, 2), split="all")
    subjects["PD"] = subjects["PD"][:1]  # subject 1 has no PD
    items = same_subject_pairs(subjects)
    # subject 0: (PD,T1), (PD,T2), (T1,T2); subject 1: (T1,T2)
    assert [(i["subject"], i["modality_1"], i["modality_2"]) for i in items] == [
        ("IXI000-Guys", "PD", "T1"),
        ("IXI000-Guys", "PD", "T2"),
        ("IXI000-Guys", "T1", "T2"),
        ("IXI001-Guys", "T1", "T2"),
    ]
    assert all(Path(i["image_1"]).name.startswith(i["subject"]) for i in items)
    with pytest.raises(ValueError, match="two modalities"):
        same_subject_pairs({"T1": subjects["T1"]})
    assert subject_id("IXI002-HH-1234_t2", "T2") == "IXI002-HH-1234"


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_subjects_option2(tmp_path):
    rows = [
        {"img_path": "a_T1.nii.gz", "modality": "T1", "seg_path": "a_seg.nii.gz", "mask_path": "None", "train": "True"},
        {"img_path": "b_T1.nii.gz", "modality": "T1", "seg_path": "None", "mask_path": "", "train": "True"},
        {"img_path": "a_T2.nii.gz", "modality": "T2", "seg_path": "None", "mask_path": "None", "train": "True"},
        {"img_path": "c_T1.nii.gz", "modality": "T1", "seg_path": "None", "mask_path": "None", "train": "False"},
    ]
    path = _write_csv(tmp_path / "subjects.csv", rows)
    train = csv_subjects(path, "train")
    assert [s["name"] for s in train["T1"]] == ["a_T1", "b_T1"]
    assert train["T1"][0]["label"] == str(tmp_path / "a_seg.nii.gz") and "label" not in train["T1"][1]
    assert "mask" not in train["T1"][0]
    assert [s["name"] for s in csv_subjects(path, "test")["T1"]] == ["c_T1"]
    assert len(modality_pairs(train)) == 2  # (a, b), (b, a) in T1; T2 has one image
    assert len(keymorph_pairs("csv", path, "train", mix_modalities=True)) == 4  # a/b_T1 <-> a_T2, both directions
    assert len(same_subject_pairs(train)) == 1  # subject "a" in T1 and T2


def test_csv_pairs_option1(tmp_path):
    rows = [
        {"fixed_img_path": "f.nii.gz", "moving_img_path": "m.nii.gz", "fixed_seg_path": "fs.nii.gz",
         "moving_seg_path": "ms.nii.gz", "fixed_mask_path": "None", "moving_mask_path": "None", "train": "true"},
        {"fixed_img_path": "g.nii.gz", "moving_img_path": "m.nii.gz", "fixed_seg_path": "None",
         "moving_seg_path": "None", "fixed_mask_path": "None", "moving_mask_path": "None", "train": "false"},
    ]
    path = _write_csv(tmp_path / "pairs.csv", rows)
    (pair,) = csv_pairs(path, "train")
    assert pair["moving_image"] == str(tmp_path / "m.nii.gz") and pair["fixed_image"] == str(tmp_path / "f.nii.gz")
    assert pair["moving_label"] == str(tmp_path / "ms.nii.gz") and "moving_mask" not in pair
    assert len(csv_pairs(path, "all")) == 2
    rows[0]["moving_img_path"] = "f.nii.gz"
    with pytest.raises(ValueError, match="paired with itself"):
        csv_pairs(_write_csv(tmp_path / "bad.csv", rows), "train")
    with pytest.raises(ValueError, match="lacks the column"):
        csv_subjects(path)


def test_pair_dataset_epochs_and_consistency(tmp_path):
    """KeyMorph's training dataset: listed modality pairs, each with a same-subject consistency item merged."""
    subjects = ixi_subjects(_ixi(tmp_path, 3), ("T1", "T2"), split="all")
    pairs = modality_pairs(subjects)  # 2 modalities x 3 x 2 ordered pairs = 12
    consistency = same_subject_pairs(subjects)

    def make():
        return RegistrationPairDataset(pairs, pairs_per_epoch=5, seed=1, pairing="listed", extras=consistency)

    dataset = make()
    assert len(dataset) == 5
    epoch0 = [dataset[i] for i in range(5)]
    assert [dataset[i] for i in range(5)] == epoch0  # reproducible
    chosen = {(p["moving_image"], p["fixed_image"]) for p in epoch0}
    assert len(chosen) == 5  # a permutation: no repeats within an epoch of <= P items
    for item in epoch0:
        assert item["consistency_modality_1"] != item["consistency_modality_2"]
        first, second = (Path(item[f"consistency_image_{i}"]).name.split("-T")[0] for i in (1, 2))
        assert first == second  # the same subject
        assert {k: item[k] for k in pairs[0]} in pairs  # the pair's own keys are kept as listed
    dataset.set_epoch(1)
    assert [dataset[i] for i in range(5)] != epoch0
    with pytest.raises(IndexError):
        dataset[5]
    # every pair once per cycle of 12 items (epochs 0..11 of 5 items = 5 cycles), across epoch boundaries
    stream = []
    for epoch in range(12):
        dataset.set_epoch(epoch)
        stream += [(item["moving_image"], item["fixed_image"]) for item in (dataset[i] for i in range(5))]
    everything = {(p["moving_image"], p["fixed_image"]) for p in pairs}
    for cycle in range(5):
        assert sorted(stream[cycle * 12 : (cycle + 1) * 12]) == sorted(everything)
    # resumable: a fresh dataset set to an epoch gives that epoch's items, and the same seed the same stream
    resumed = make()
    resumed.set_epoch(7)
    dataset.set_epoch(7)
    assert [resumed[i] for i in range(5)] == [dataset[i] for i in range(5)]


def test_paired_files(tmp_path):
    for folder in ("mov", "fix", "mov_seg", "fix_seg"):
        for name in ("a.nii.gz", "b.nii.gz"):
            _touch(tmp_path / folder / name)
    _touch(tmp_path / "mov" / "only_moving.nii.gz")
    pairs = paired_files(tmp_path / "mov", tmp_path / "fix", tmp_path / "mov_seg", tmp_path / "fix_seg")
    assert [(p["moving_name"], p["fixed_name"]) for p in pairs] == [("a", "a"), ("b", "b")]
    assert pairs[1]["fixed_label"] == str(tmp_path / "fix_seg" / "b.nii.gz")
    (single,) = paired_files(tmp_path / "mov" / "a.nii.gz", tmp_path / "fix" / "b.nii.gz")
    assert single["moving_name"] == "a" and single["fixed_name"] == "b"
    with pytest.raises(ValueError, match="itself"):
        paired_files(tmp_path / "mov", tmp_path / "mov")
    with pytest.raises(ValueError, match="itself"):
        paired_files(tmp_path / "mov" / "a.nii.gz", tmp_path / "mov" / "a.nii.gz")
    with pytest.raises(ValueError, match="both be files"):
        paired_files(tmp_path / "mov", tmp_path / "fix" / "a.nii.gz")
    with pytest.raises(FileNotFoundError):
        paired_files(tmp_path / "nope", tmp_path / "fix")


def test_transforms_swap_hw_keeps_world_geometry(tmp_path):
    """``swap_hw`` swaps the last two array axes (the released IXI models' permute) and keeps the affine right."""
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32) * 100
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "img.nii.gz"))
    plain = keymorph_transforms(["image"], pixdim=None, spatial_size=None)({"image": str(tmp_path / "img.nii.gz")})
    swapped = keymorph_transforms(["image"], pixdim=None, spatial_size=None, swap_hw=True)(
        {"image": str(tmp_path / "img.nii.gz")}
    )
    x, y = plain["image"], swapped["image"]
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # min-max
    torch.testing.assert_close(y.as_tensor(), x.as_tensor().transpose(-1, -2))
    # voxel (i, j, k) of plain and (i, k, j) of swapped are the same world point
    v = torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=torch.float64)
    w = v[[0, 2, 1, 3]]
    torch.testing.assert_close(torch.as_tensor(x.affine).double() @ v, torch.as_tensor(y.affine).double() @ w)
