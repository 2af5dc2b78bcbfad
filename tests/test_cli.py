"""``python -m monai_ext register``: pairing by name, bad-input errors (exit 2, nothing written), a tiny real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_ext.cli import InputError, bundle_path, main, pair_files
from synthetic_pair import test_affine as demo_affine
from synthetic_pair import TINY_SITREG, write_synthetic_pair

REPO = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 16)
# a 2-level SITReg with 8 channels and one instance-optimisation step: seconds per pair on a CPU
TINY = ["--load_pretrained", "False", *TINY_SITREG]


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array, demo_affine(array.shape[:3]) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic_pair(tmp_path_factory.mktemp("pair"), SHAPE, seed=3)


def test_bundle_path_by_name_or_folder():
    assert bundle_path("sitreg_oasis") == (REPO / "bundles" / "sitreg_oasis").resolve()
    assert bundle_path(REPO / "bundles" / "sitreg_oasis") == (REPO / "bundles" / "sitreg_oasis").resolve()
    with pytest.raises(InputError, match="not found.*sitreg_oasis"):
        bundle_path("no_such_bundle")


def test_folders_are_paired_by_name(tmp_path):
    names = ("a.nii.gz", "b.nii", "c.mha")
    _touch(*(tmp_path / d / n for d in ("mov", "fix", "movlab", "fixlab") for n in names))
    _touch(tmp_path / "mov" / "notes.txt", tmp_path / "fix" / ".hidden.nii.gz")  # ignored: no image / hidden
    pairs = pair_files(tmp_path / "mov", tmp_path / "fix", tmp_path / "movlab", tmp_path / "fixlab")
    assert [Path(p["moving_image"]).name for p in pairs] == list(names)
    for pair in pairs:
        name = Path(pair["moving_image"]).name
        assert pair == {
            "moving_image": str(tmp_path / "mov" / name),
            "fixed_image": str(tmp_path / "fix" / name),
            "moving_label": str(tmp_path / "movlab" / name),
            "fixed_label": str(tmp_path / "fixlab" / name),
        }
    assert pair_files(tmp_path / "mov" / "a.nii.gz", tmp_path / "fix" / "b.nii") == [
        {"moving_image": str(tmp_path / "mov" / "a.nii.gz"), "fixed_image": str(tmp_path / "fix" / "b.nii")}
    ]


def test_self_pairs_and_mismatches_are_refused(tmp_path):
    _touch(tmp_path / "mov" / "a.nii.gz", tmp_path / "mov" / "b.nii.gz", tmp_path / "fix" / "a.nii.gz")
    os.symlink(tmp_path / "mov", tmp_path / "alias")
    image = tmp_path / "mov" / "a.nii.gz"
    with pytest.raises(InputError, match="same file"):
        pair_files(image, image)
    with pytest.raises(InputError, match="same folder"):
        pair_files(tmp_path / "mov", tmp_path / "alias")  # the same folder under another name
    with pytest.raises(InputError, match=r"only one of.*\['b'\]"):
        pair_files(tmp_path / "mov", tmp_path / "fix")
    with pytest.raises(InputError, match="both be files or both be folders"):
        pair_files(image, tmp_path / "fix")
    with pytest.raises(InputError, match="both --moving_label and --fixed_label"):
        pair_files(image, tmp_path / "fix" / "a.nii.gz", moving_label=image)


def _bad_inputs(tmp: Path, pair: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """Case -> (register arguments after BUNDLE, expected message)."""
    moving, fixed = str(pair["moving_image"]), str(pair["fixed_image"])
    labels = ["--moving_label", str(pair["moving_label"]), "--fixed_label", str(pair["fixed_label"])]
    garbage = tmp / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image")
    flat = _save(tmp / "flat.nii.gz", np.random.rand(16, 16).astype(np.float32), np.eye(4))
    inf_array = np.random.rand(*SHAPE).astype(np.float32)
    inf_array[3, 4, 5] = np.inf
    with_inf = _save(tmp / "inf.nii.gz", inf_array)
    shifted_affine = demo_affine(SHAPE)
    shifted_affine[:3, 3] += 5.0
    off_grid = _save(tmp / "off_grid.nii.gz", np.zeros(SHAPE, np.int16), shifted_affine)
    return {
        "missing": ([str(tmp / "absent.nii.gz"), fixed], "MOVING not found"),
        "unreadable": ([moving, str(garbage)], "cannot read image"),
        "2-D": ([str(flat), fixed], "expected a single-channel 3-D image"),
        "infinite": ([moving, with_inf], "1 voxels are infinite"),
        "label grid": ([moving, fixed, "--moving_label", off_grid, "--fixed_label", labels[3]], "does not match its image"),
        "self pair": ([moving, moving], "same file"),
    }


def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, pair_dir, capsys):
    for case, (args, message) in _bad_inputs(tmp_path, pair_dir).items():
        out = tmp_path / f"out_{case}"
        status = main(["register", "sitreg_oasis", args[0], args[1], str(out), *args[2:], *TINY])
        err = capsys.readouterr().err
        assert status == 2, case
        assert "error: " in err and message in err, (case, err)
        assert "Traceback" not in err, case
        assert not out.exists(), case


def test_missing_weights_are_a_clear_error(tmp_path, pair_dir, capsys):
    out = tmp_path / "out"
    args = ["register", "sitreg_oasis", str(pair_dir["moving_image"]), str(pair_dir["fixed_image"]), str(out)]
    status = main([*args, "--ckpt_path", str(tmp_path / "model.pt")])
    assert status == 2
    assert "trained weights not found" in capsys.readouterr().err
    assert not out.exists()


def test_entry_point_exit_status(tmp_path):
    """The real ``python -m monai_ext`` process: non-zero status and a one-line error for a missing file."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "monai_ext", "register", "sitreg_oasis", str(tmp_path / "m.nii.gz"), str(tmp_path), str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 2
    assert "error: MOVING not found" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_register_tiny_pair_writes_outputs_and_summary(tmp_path, pair_dir, capsys):
    out = tmp_path / "out"
    labels = ["--moving_label", str(pair_dir["moving_label"]), "--fixed_label", str(pair_dir["fixed_label"])]
    args = ["register", "sitreg_oasis", str(pair_dir["moving_image"]), str(pair_dir["fixed_image"]), str(out)]
    assert main([*args, *labels, *TINY]) == 0
    stdout = capsys.readouterr().out
    folder = out / "moving__fixed"
    expected = {
        "warped_image.nii.gz", "warped_label.nii.gz", "forward_ddf.nii.gz", "inverse_ddf.nii.gz",
        "forward_field_itk.nii.gz", "inverse_field_itk.nii.gz", "jacobian.nii.gz", "metrics.json", "qa.png",
    }
    assert {p.name for p in out.iterdir()} == {"moving__fixed"}  # no staging folders left
    assert {p.name for p in folder.iterdir()} == expected
    metrics = json.loads((folder / "metrics.json").read_text())
    # the per-pair line reports the numbers the bundle wrote
    line = (
        f"moving__fixed: Dice {metrics['dice_before']:.3f} -> {metrics['dice']:.3f}, "
        f"folding {100 * metrics['folding_fraction']:.3f}% of voxels"
    )
    assert line in stdout
    assert "1 pair(s): mean Dice" in stdout
    assert "no trained weights" in stdout and "1 Adam steps" in stdout
    # the warped label map is on the native fixed grid (the demo affine), as the fixed label map
    warped = nib.load(str(folder / "warped_label.nii.gz"))
    assert warped.shape == SHAPE
    np.testing.assert_allclose(warped.affine, nib.load(str(pair_dir["fixed_label"])).affine, atol=1e-5)


def test_evaluate_on_synthetic_oasis(tmp_path, capsys):
    """``evaluate`` = the bundle's train.json + evaluate.json on a 2-subject test division (1 pair)."""
    import torch

    from monai_ext.data.synthesis import write_synthetic_oasis
    from monai_ext.networks.sitreg import SITReg

    dataset = write_synthetic_oasis(tmp_path / "oasis", num_subjects=3, shape=SHAPE)
    network = dict(features=[8, 8], feature_convolutions=[1, 1], deformation_features=[8, 8], deformation_convolutions=[1, 1])
    torch.save({"model": SITReg(3, **network).state_dict()}, tmp_path / "model.pt")
    args = ["evaluate", "sitreg_oasis", "--dataset_dir", str(dataset), "--out", str(tmp_path / "eval")]
    args += ["--ckpt_dir", str(tmp_path), "--num_workers", "0", "--crop", "[[0,0],[0,0],[0,0]]"]
    args += ["--divisions", "{'train': [0, 1], 'validate': [0, 1], 'test': [1, 3]}"]
    for key, value in network.items():
        args += [f"--network_def#{key}", str(value).replace(" ", "")]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    summary = json.loads((tmp_path / "eval" / "test" / "summary.json").read_text())
    assert summary["num_pairs"] == 1
    name = "OASIS_OAS1_0002_MR1__OASIS_OAS1_0003_MR1"
    assert f"{name}: Dice" in stdout and "1 pair(s): mean Dice" in stdout
    assert f"-> {summary['metrics']['dice']['mean']:.3f}" in stdout


def test_register_with_masks(tmp_path, pair_dir):
    """A lung bundle takes a region mask per image (``--moving_mask`` / ``--fixed_mask``) and writes its outputs."""
    masks = []
    for side in ("moving", "fixed"):
        label = nib.load(str(pair_dir[f"{side}_label"]))
        mask = (np.asarray(label.dataobj) > 0).astype(np.uint8)
        masks += [f"--{side}_mask", _save(tmp_path / f"{side}_mask.nii.gz", mask, label.affine)]
    out = tmp_path / "out"
    network = [t for t in TINY if t not in ("--crop", "None")]  # sitreg_nlst has no crop setting
    args = ["register", "sitreg_nlst", str(pair_dir["moving_image"]), str(pair_dir["fixed_image"]), str(out)]
    assert main([*args, *masks, *network, "--outputs", "['forward_ddf','metrics']"]) == 0
    assert {p.name for p in (out / "moving__fixed").iterdir()} == {"forward_ddf.nii.gz", "metrics.json"}
