"""Bad inputs, one table: every case fails before any compute with one clear message and leaves no partial output.

Command line (``monai_ext.__main__.main``, in process): exit status 2, ``error: <message>`` as the only stderr line,
no traceback, nothing written. Bundle path (``monai.bundle.create_workflow`` on ``sitreg_oasis``'s
``inference.json``, as ``python -m monai.bundle run`` does): ``run()`` raises before the engine starts, with the
:class:`~monai_ext.io.validation.InputError` (MONAI wraps errors of config expressions in a ``RuntimeError`` whose
cause it is), and nothing is written. Images are 16^3 and the network tiny, so every case takes well under a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import create_workflow

from monai_ext.__main__ import main  # the command line: the cli commands and the demo
from monai_ext.io.validation import InputError
from synthetic_pair import test_affine as grid_affine
from synthetic_pair import write_synthetic_pair

REPO = Path(__file__).resolve().parents[1]
OASIS = REPO / "bundles" / "sitreg_oasis"
SHAPE = (16, 16, 16)
NETWORK = {
    "network_def#features": [8, 8],
    "network_def#feature_convolutions": [1, 1],
    "network_def#deformation_features": [8, 8],
    "network_def#deformation_convolutions": [1, 1],
}
TINY = ["--instance_optimization_steps", "1", "--crop", "None"]  # appended to the sitreg_oasis cases
for _key, _value in NETWORK.items():
    TINY += [f"--{_key}", str(_value).replace(" ", "")]


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array, grid_affine(SHAPE) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A good pair (images and label maps) and one file per kind of bad input, written once."""
    root = tmp_path_factory.mktemp("inputs")
    good = {k: str(v) for k, v in write_synthetic_pair(root / "pair", SHAPE, seed=3).items()}
    rng = np.random.default_rng(0)
    noise = rng.random(SHAPE).astype(np.float32)
    (root / "garbage.nii.gz").write_bytes(b"this is not an image")
    (root / "empty.nii.gz").write_bytes(b"")
    inf = noise.copy()
    inf[1, 1, 1] = np.inf
    all_nan = np.full(SHAPE, np.nan, np.float32)  # NaN voxels read as background, but there is no image left
    shifted = grid_affine(SHAPE)
    shifted[:3, 3] += 5.0
    label = np.asarray(nib.load(good["moving_label"]).dataobj)
    bad = {
        "garbage": str(root / "garbage.nii.gz"),
        "empty": str(root / "empty.nii.gz"),
        "flat2d": _save(root / "flat2d.nii.gz", rng.random((16, 16)).astype(np.float32), np.eye(4)),
        "slice": _save(root / "slice.nii.gz", rng.random((16, 16, 1)).astype(np.float32)),
        "channels": _save(root / "channels.nii.gz", rng.random((*SHAPE, 1, 2)).astype(np.float32)),
        "all_nan": _save(root / "all_nan.nii.gz", all_nan),
        "other_shape": _save(root / "other_shape.nii.gz", rng.random((16, 16, 18)).astype(np.float32)),
        "inf": _save(root / "inf.nii.gz", inf),
        "zeros": _save(root / "zeros.nii.gz", np.zeros(SHAPE, np.float32)),
        "fives": _save(root / "fives.nii.gz", np.full(SHAPE, 5, np.int16)),
        "label_shifted": _save(root / "label_shifted.nii.gz", label, shifted),
        "label_shape": _save(root / "label_shape.nii.gz", np.zeros((16, 16, 15), np.int16)),
        "label_float": _save(root / "label_float.nii.gz", label.astype(np.float32) + 0.5),
        "weights": str(root / "no_weights_here.pt"),
        "weights_garbage": str(root / "garbage.pt"),
        "weights_no_state": str(root / "no_state.pt"),
        "weights_other": str(root / "other_network.pt"),
    }
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"epoch": 3}, root / "no_state.pt")
    torch.save({"model": torch.nn.Conv3d(2, 3, 3).state_dict()}, root / "other_network.pt")
    os.symlink(good["moving_image"], root / "alias.nii.gz")
    bad["alias"] = str(root / "alias.nii.gz")
    for name in ("mov", "fix", "movlab", "fixlab", "only_a", "only_b", "nothing_a", "nothing_b"):
        (root / name).mkdir()
    for side in ("moving", "fixed"):
        short = side[:3]
        shutil.copy(good[f"{side}_image"], root / short / "a.nii.gz")
        shutil.copy(good[f"{side}_image"], root / short / "b.nii.gz")
        shutil.copy(good[f"{side}_label"], root / f"{short}lab" / "a.nii.gz")  # b's label maps are missing
    shutil.copy(good["moving_image"], root / "only_a" / "a.nii.gz")
    shutil.copy(good["fixed_image"], root / "only_b" / "b.nii.gz")
    (root / "a_file").write_text("not a folder")
    for key in ("mov", "fix", "movlab", "fixlab", "only_a", "only_b", "nothing_a", "nothing_b", "a_file"):
        bad[key] = str(root / key)
    return {**good, **bad, "root": str(root)}


# case -> (arguments after ``register``, with {placeholders} for ``files`` and {out}, expected message)
M, F, ML, FL = "{moving_image}", "{fixed_image}", "{moving_label}", "{fixed_label}"
LABELS = ["--moving_label", ML, "--fixed_label", FL]
CLI_CASES = {
    "moving missing": (["sitreg_oasis", "{root}/absent.nii.gz", F, "{out}"], "MOVING not found"),
    "fixed missing": (["sitreg_oasis", M, "{root}/absent.nii.gz", "{out}"], "FIXED not found"),
    "moving unreadable": (["sitreg_oasis", "{garbage}", F, "{out}"], "cannot read image"),
    "fixed unreadable": (["sitreg_oasis", M, "{garbage}", "{out}"], "cannot read image"),
    "empty file": (["sitreg_oasis", M, "{empty}", "{out}"], "cannot read image"),
    "2-D image": (["sitreg_oasis", "{flat2d}", F, "{out}"], "expected a single-channel 3-D image"),
    "one-slice image": (["sitreg_oasis", M, "{slice}", "{out}"], "expected a single-channel 3-D image"),
    "two channels": (["sitreg_oasis", "{channels}", F, "{out}"], "single-channel"),
    "every voxel NaN": (["sitreg_oasis", M, "{all_nan}", "{out}"], "no finite voxel: 4096 of 4096 voxels are NaN"),
    "infinite voxel": (["sitreg_oasis", "{inf}", F, "{out}"], "1 voxels are infinite"),
    "all-zero moving": (["sitreg_oasis", "{zeros}", F, "{out}"], "the image is constant (every voxel is 0)"),
    "all-zero fixed": (["sitreg_oasis", M, "{zeros}", "{out}"], "the image is constant (every voxel is 0)"),
    "constant non-zero": (["sitreg_oasis", "{fives}", F, "{out}"], "the image is constant (every voxel is 5)"),
    "label off grid": (
        ["sitreg_oasis", M, F, "{out}", "--moving_label", "{label_shifted}", "--fixed_label", FL],
        "does not match its image",
    ),
    "label of another shape": (
        ["sitreg_oasis", M, F, "{out}", "--moving_label", ML, "--fixed_label", "{label_shape}"],
        "does not match its image",
    ),
    "label not integer": (
        ["sitreg_oasis", M, F, "{out}", "--moving_label", "{label_float}", "--fixed_label", FL],
        "must hold integer values",
    ),
    "label missing": (
        ["sitreg_oasis", M, F, "{out}", "--moving_label", "{root}/absent.nii.gz", "--fixed_label", FL],
        "--moving_label not found",
    ),
    "masks for a bundle without masks": (
        ["sitreg_oasis", M, F, "{out}", "--moving_mask", ML, "--fixed_mask", FL], "does not use masks"
    ),
    "lung bundle without masks": (["sitreg_nlst", M, F, "{out}"], "needs a mask of each image"),
    "masks for LUMIR (it derives its own)": (
        ["sitreg_lumir", M, F, "{out}", "--moving_mask", ML, "--fixed_mask", FL], "does not use masks"
    ),
    "one mask only": (["sitreg_nlst", M, F, "{out}", "--moving_mask", ML], "give both --moving_mask and --fixed_mask"),
    "one label only": (["sitreg_oasis", M, F, "{out}", "--moving_label", ML], "give both --moving_label and --fixed_label"),
    "self pair": (["sitreg_oasis", M, M, "{out}"], "same file"),
    "self pair by symlink": (["sitreg_oasis", M, "{alias}", "{out}"], "same file"),
    "same folder": (["sitreg_oasis", "{mov}", "{mov}", "{out}"], "same folder"),
    "file and folder": (["sitreg_oasis", M, "{fix}", "{out}"], "both be files or both be folders"),
    "unpaired names": (["sitreg_oasis", "{only_a}", "{only_b}", "{out}"], "in only one of"),
    "no images in folders": (["sitreg_oasis", "{nothing_a}", "{nothing_b}", "{out}"], "no image files"),
    "label folder lacks a name": (
        ["sitreg_oasis", "{mov}", "{fix}", "{out}", "--moving_label", "{movlab}", "--fixed_label", "{fixlab}"],
        "no label map named 'b'",
    ),
    "label files with folders": (
        ["sitreg_oasis", "{mov}", "{fix}", "{out}", *LABELS],
        "with image folders, the label maps must be folders",
    ),
    "output is a file": (["sitreg_oasis", M, F, "{a_file}"], "is a file"),
    "output inside a file": (["sitreg_oasis", M, F, "{a_file}/out"], "which is a file"),
    "unknown flag (misspelt config id)": (
        ["sitreg_oasis", M, F, "{out}", "--instance_optimisation_steps", "5"],
        "unknown flag --instance_optimisation_steps",
    ),
    "unknown flag (misspelt register flag)": (["sitreg_oasis", M, F, "{out}", "--overwirte"], "unknown flag --overwirte"),
    "unknown nested config id": (
        ["sitreg_oasis", M, F, "{out}", "--network_def#featurez", "[8,8]"],
        "unknown flag --network_def#featurez",
    ),
    "boolean flag, bad value": (["sitreg_oasis", M, F, "{out}", "--overwrite", "maybe"], "--overwrite takes true or false"),
    "boolean flag, number": (["sitreg_oasis", M, F, "{out}", "--no_weights", "2"], "--no_weights takes true or false"),
    "boolean config id, bad value": (
        ["sitreg_oasis", M, F, "{out}", "--load_pretrained", "nope"],
        "--load_pretrained takes true or false",
    ),
    "weights and no weights": (
        ["sitreg_oasis", M, F, "{out}", "--no_weights", "--weights", "{weights}"],
        "give --no_weights or --weights PATH, not both",
    ),
    "weights file missing": (["sitreg_oasis", M, F, "{out}", "--weights", "{weights}"], "trained weights not found"),
    "bundle weights missing": (
        ["sitreg_oasis", M, F, "{out}", "--ckpt_path", "{weights}"],
        "trained weights not found",
    ),
    "weights not a checkpoint": (["sitreg_oasis", M, F, "{out}", "--weights", "{weights_garbage}"], "cannot read checkpoint"),
    "weights without a state dict": (
        ["sitreg_oasis", M, F, "{out}", "--weights", "{weights_no_state}"], "holds no state dict"
    ),
    "weights of another network": (["sitreg_oasis", M, F, "{out}", "--weights", "{weights_other}"], "does not fit SITReg"),
    "keymorph: weights not a checkpoint": (
        ["keymorph_ixi_half", M, F, "{out}", "--weights", "{weights_garbage}"], "cannot read checkpoint"
    ),
    "keymorph: weights of another network": (
        ["keymorph_ixi_half", M, F, "{out}", "--weights", "{weights_other}"], "does not fit KeyMorph"
    ),
    "weights flag without a value": (["sitreg_oasis", M, F, "{out}", "--weights"], "--weights needs a value"),
    "flag given twice": (["sitreg_oasis", M, F, "{out}", "--overwrite", "--overwrite"], "--overwrite is given twice"),
    "unknown bundle": (["no_such_bundle", M, F, "{out}"], "bundle 'no_such_bundle' not found"),
    "missing positional": (["sitreg_oasis", M, F], "missing OUT"),
    "extra positional": (["sitreg_oasis", M, F, "{out}", "surplus"], "got extra ['surplus']"),
    "extra config file missing": (["sitreg_oasis", M, F, "{out}", "--config", "nope.json"], "has no"),
    "register flag set twice as config id": (
        ["sitreg_oasis", M, F, "{out}", "--output_dir", "{root}/elsewhere"],
        "--output_dir is set by the register arguments",
    ),
    "keymorph: unknown flag": (
        ["keymorph_ixi_half", M, F, "{out}", "--load_pretrained", "False"],
        "unknown flag --load_pretrained",
    ),
    "brain: negative field refinement steps": (
        ["sitreg_brain", M, F, "{out}", "--field_refinement_steps", "-2"],
        "field refinement steps must be a non-negative integer, got -2",
    ),
    "brain: zero field refinement learning rate": (
        ["sitreg_brain", M, F, "{out}", "--field_refinement_lr", "0"],
        "field refinement learning_rate must be positive",
    ),
    "brain: fractional instance optimisation steps": (
        ["sitreg_brain", M, F, "{out}", "--instance_optimization_steps", "2.5"],
        "instance optimisation steps must be a non-negative integer, got 2.5",
    ),
    "keymorph: weights missing": (["keymorph_ixi_half", M, F, "{out}"], "trained weights not found"),
    "keymorph: all-zero image": (["keymorph_ixi_half", "{zeros}", F, "{out}", "--no_weights"], "the image is constant"),
    "keymorph: label off grid": (
        ["keymorph_ixi_half", M, F, "{out}", "--no_weights", "--moving_label", "{label_shifted}", "--fixed_label", FL],
        "does not match its image",
    ),
}


def _fill(args: list[str], files: dict[str, str], out: Path) -> list[str]:
    return [a.format(**files, out=out) for a in args]


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input(case, files, tmp_path, capsys):
    args, message = CLI_CASES[case]
    out = tmp_path / "out"
    tiny = TINY if args[0] == "sitreg_oasis" else []
    status = main(["register", *_fill(args, files, out), *tiny])
    err = capsys.readouterr().err
    assert status == 2, (case, err)
    assert err.startswith("error: ") and err.count("\n") == 1, (case, err)  # one line
    assert message in err, (case, err)
    assert not out.exists() and not Path(files["root"], "elsewhere").exists(), case
    assert Path(files["a_file"]).read_text() == "not a folder"


def test_cli_unknown_command_and_no_command(capsys):
    assert main(["regsiter"]) == 2
    assert "error: unknown command 'regsiter'; commands: register, evaluate, demo" in capsys.readouterr().err
    assert main([]) == 2


def _existing_pair_folder(files: dict[str, str], out: Path) -> Path:
    folder = out / "moving__fixed"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    return folder


def test_cli_existing_pair_folder_needs_overwrite(files, tmp_path, capsys):
    out = tmp_path / "out"
    folder = _existing_pair_folder(files, out)
    status = main(["register", "sitreg_oasis", files["moving_image"], files["fixed_image"], str(out), *TINY])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert f"output folder {folder} already exists" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["moving__fixed"]
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_cli_existing_pair_file_is_refused_even_with_overwrite(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "moving__fixed").write_text("mine")
    args = ["register", "sitreg_oasis", files["moving_image"], files["fixed_image"], str(out), "--overwrite", *TINY]
    assert main(args) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["moving__fixed"]
    assert (out / "moving__fixed").read_text() == "mine"


def test_cli_read_only_output(files, tmp_path, capsys, monkeypatch):
    """A folder this process may not write into (as root every folder is writable, so the permission answer is
    simulated for that one folder)."""
    import monai_ext.io.validation as validation

    parent = tmp_path / "read_only"
    parent.mkdir(mode=0o555)
    real_access = os.access
    monkeypatch.setattr(validation.os, "access", lambda p, mode: False if Path(p) == parent else real_access(p, mode))
    status = main(["register", "sitreg_oasis", files["moving_image"], files["fixed_image"], str(parent / "out"), *TINY])
    assert status == 2 and "is not writable" in capsys.readouterr().err
    assert not (parent / "out").exists()


# ---- the bundle path: sitreg_oasis/configs/inference.json as python -m monai.bundle run runs it ----

BUNDLE_CASES = {
    "moving missing": ({"moving_image": "{root}/absent.nii.gz"}, "file not found"),
    "unreadable": ({"fixed_image": "{garbage}"}, "cannot read image"),
    "empty file": ({"moving_image": "{empty}"}, "cannot read image"),
    "2-D image": ({"moving_image": "{flat2d}"}, "expected a single-channel 3-D image"),
    "infinite voxel": ({"fixed_image": "{inf}"}, "1 voxels are infinite"),
    "all-zero image": ({"moving_image": "{zeros}"}, "the image is constant (every voxel is 0)"),
    "constant image": ({"fixed_image": "{fives}"}, "the image is constant (every voxel is 5)"),
    "label off grid": ({"moving_label": "{label_shifted}"}, "does not match its image"),
    "label not integer": ({"fixed_label": "{label_float}"}, "must hold integer values"),
    "self pair": ({"fixed_image": "{moving_image}"}, "same file"),
    "one label only": ({"fixed_label": None}, "must give all of"),
    "no fixed image": ({"fixed_image": None}, "lacks ['fixed_image']"),
    "output is a file": ({"output_dir": "{a_file}"}, "is a file"),
    "output inside a file": ({"output_dir": "{a_file}/out"}, "which is a file"),
    "pairs not a list": ({"pairs": "{moving_image}"}, "pairs must be a non-empty list of dicts"),
    "pairs empty": ({"pairs": []}, "pairs must be a non-empty list of dicts"),
}


def _bundle_workflow(pair_changes: dict, files: dict[str, str], out: Path):
    pair = {k: files[k] for k in ("moving_image", "fixed_image", "moving_label", "fixed_label")}
    override = {"output_dir": str(out)}
    for key, value in pair_changes.items():
        value = value.format(**files) if isinstance(value, str) else value
        if key in ("output_dir", "pairs"):
            override[key] = value
        elif value is None:
            pair.pop(key)
        else:
            pair[key] = value
    override.setdefault("pairs", [pair])
    return create_workflow(
        config_file=str(OASIS / "configs" / "inference.json"),
        workflow_type="infer",
        bundle_root=str(OASIS),
        load_pretrained=False,
        crop=None,
        device="$torch.device('cpu')",
        **NETWORK,
        **override,
    )


def _raised_input_error(raised: pytest.ExceptionInfo) -> InputError:
    err, chain = raised.value, []
    while err is not None:
        chain.append(err)
        err = err.__cause__
    found = [e for e in chain if isinstance(e, InputError)]
    assert len(found) == 1, chain  # one error, possibly wrapped once by MONAI's config parser
    return found[0]


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_bundle_bad_input(case, files, tmp_path):
    changes, message = BUNDLE_CASES[case]
    out = tmp_path / "out"
    workflow = _bundle_workflow(changes, files, out)
    with pytest.raises(Exception) as raised:
        workflow.run()
    assert message in str(_raised_input_error(raised)), case
    assert "\n" not in str(_raised_input_error(raised))
    assert "evaluator" not in workflow.parser.ref_resolver.resolved_content, case  # the engine never started
    assert not out.exists(), case
    assert Path(files["a_file"]).read_text() == "not a folder"


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("weights", "checkpoint not found"),
        ("weights_garbage", "cannot read checkpoint"),
        ("weights_no_state", "holds no state dict"),
        ("weights_other", "does not fit SITReg"),
    ],
)
def test_bundle_bad_weights(weights, message, files, tmp_path):
    """Trained weights are read and checked against the configured network when the evaluator is built."""
    out = tmp_path / "out"
    workflow = _bundle_workflow({}, files, out)
    workflow.parser.update({"load_pretrained": True, "ckpt_path": files[weights]})
    with pytest.raises(Exception) as raised:
        workflow.run()
    error = str(_raised_input_error(raised))
    assert message in error and files[weights] in error and "\n" not in error
    assert "evaluator" not in workflow.parser.ref_resolver.resolved_content  # the engine was never built
    assert not out.exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_bundle_existing_pair_folder(overwrite, files, tmp_path):
    """An existing pair folder is refused before the engine starts; with ``overwrite`` a file of its name still is."""
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "moving__fixed").write_text("mine")
    else:
        _existing_pair_folder(files, out)
    workflow = _bundle_workflow({}, files, out)
    workflow.parser["overwrite"] = overwrite
    with pytest.raises(Exception) as raised:
        workflow.run()
    message = "exists and is not a folder" if overwrite else "already exists"
    assert message in str(_raised_input_error(raised))
    assert [p.name for p in out.iterdir()] == ["moving__fixed"]


def test_cli_nan_background_registers_as_its_lowest_value(files, tmp_path):
    """NaN voxels (the "no data" background of some SPM / FSL outputs) are not an error: they read as the image's
    lowest value, with a warning naming the file, and the registration equals that of the image filled so."""
    image = nib.load(files["moving_image"])
    holes = np.asarray(image.dataobj, np.float32).copy()
    holes[:4] = np.nan
    filled = np.where(np.isnan(holes), np.nanmin(holes), holes)
    results = {}
    for name, data in (("holes", holes), ("filled", filled)):
        (tmp_path / name).mkdir()
        moving = _save(tmp_path / name / "moving.nii.gz", data, image.affine)
        out = tmp_path / f"out_{name}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["register", "sitreg_oasis", moving, files["fixed_image"], str(out), "--no_weights", *TINY]) == 0
        expected = [f"{moving}: 1024 NaN voxels (25.0%) read as background (the image's lowest value)"]
        assert [str(w.message) for w in caught if "NaN" in str(w.message)] == (expected if name == "holes" else [])
        results[name] = {f.name: np.asarray(nib.load(f).dataobj) for f in (out / "moving__fixed").glob("*.nii.gz")}
    assert results["holes"].keys() == results["filled"].keys() and "warped_image.nii.gz" in results["holes"]
    for key, array in results["holes"].items():
        assert np.isfinite(array).all(), key
        np.testing.assert_array_equal(array, results["filled"][key], err_msg=key)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        # sitreg_oasis crops 24 and 16 voxels from both ends of two axes (for OASIS' 160x192x224 images): a 16^3 pair
        # is cropped away, which the network's size check reports
        (("moving_image", "fixed_image"), "error: images of spatial shape (16, 0, 0) are too small"),
        # a voxel-space bundle (one grid for its dataset's images) and a pair on grids of two shapes
        (("moving_image", "other_shape"), "error: moving (1, 1, 16, 16, 16) and fixed (1, 1, 16, 16, 18) images must"),
    ],
    ids=["cropped away", "two grid shapes"],
)
def test_cli_pairs_the_network_cannot_take(images, message, files, tmp_path):
    """Found when the pair reaches the network, after the progress bar started: the command (a real process, as a
    user runs it) ends with one error line, exit status 2, no traceback, and writes nothing."""
    out = tmp_path / "out"
    moving, fixed = (files[key] for key in images)
    command = [sys.executable, "-m", "monai_ext", "register", "sitreg_oasis", moving, fixed, str(out), "--no_weights"]
    result = subprocess.run(command + ["--crop", "None"] * (images[1] == "other_shape"), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert not out.exists() or not any(out.iterdir())
