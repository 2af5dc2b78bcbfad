"""``python -m monai_ext register`` flags: booleans, help, one flag set for SITReg and KeyMorph, ``--overwrite``,
file modes, and SIGINT / SIGTERM (exit 130 / 143, one line, no temporary files left)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import monai_ext.cli as cli
from monai_ext.__main__ import main as package_main
from monai_ext.cli import InputError, as_bool, main
from synthetic_pair import TINY_SITREG, write_synthetic_pair

REPO = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 16)
TINY = TINY_SITREG


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, str]:
    return {k: str(v) for k, v in write_synthetic_pair(tmp_path_factory.mktemp("pair"), SHAPE, seed=3).items()}


def _args(bundle: str, pair: dict[str, str], out: Path) -> list[str]:
    return ["register", bundle, pair["moving_image"], pair["fixed_image"], str(out)]


@pytest.mark.parametrize("word", ["true", "True", "TRUE", "1", "yes", "On", True, 1])
def test_true_in_any_spelling(word):
    assert as_bool(word) is True


@pytest.mark.parametrize("word", ["false", "False", "FALSE", "0", "no", "OFF", False, 0])
def test_false_in_any_spelling(word):
    assert as_bool(word) is False


@pytest.mark.parametrize("word", ["maybe", "", 2, None, 0.5])
def test_anything_else_is_not_a_boolean(word):
    with pytest.raises(InputError, match="--flag takes true or false"):
        as_bool(word, "--flag")


@pytest.fixture
def captured(monkeypatch) -> list[dict]:
    """The overrides ``register`` hands to :func:`monai_ext.cli.run_bundle` (which is not run)."""
    calls: list[dict] = []
    monkeypatch.setattr(cli, "run_bundle", lambda bundle, configs, override, **kw: calls.append(dict(override)) or [])
    return calls


@pytest.mark.parametrize("word", ["false", "FALSE", "False", "0", "no"])
def test_boolean_config_ids_accept_any_spelling(word, pair, tmp_path, captured):
    assert main([*_args("sitreg_oasis", pair, tmp_path / "out"), "--load_pretrained", word]) == 0
    assert captured[0]["load_pretrained"] is False


def test_one_flag_set_for_sitreg_and_keymorph(pair, tmp_path, captured):
    weights = tmp_path / "w.pt"
    for bundle in ("sitreg_oasis", "keymorph_ixi_half"):
        assert main([*_args(bundle, pair, tmp_path / "out"), "--no_weights", "--overwrite", "true"]) == 0
        assert main([*_args(bundle, pair, tmp_path / "out"), "--weights", str(weights)]) == 0
    sitreg_untrained, sitreg_weights, keymorph_untrained, keymorph_weights = captured
    assert sitreg_untrained["load_pretrained"] is False and sitreg_untrained["overwrite"] is True
    assert sitreg_weights["load_pretrained"] is True and sitreg_weights["ckpt_path"] == str(weights)
    assert keymorph_untrained["checkpoint"] == "" and keymorph_untrained["overwrite"] is True
    assert keymorph_weights["checkpoint"] == str(weights)
    for overrides in captured:
        assert overrides["pairs"] == [{"moving_image": pair["moving_image"], "fixed_image": pair["fixed_image"]}]
        assert overrides["output_dir"] == str(tmp_path / "out")
    assert keymorph_untrained["moving"] == pair["moving_image"] and keymorph_untrained["fixed"] == pair["fixed_image"]


def test_values_are_literals_and_paths_stay_strings(pair, tmp_path, captured):
    out = tmp_path / "2024"  # a number-like folder name stays a path
    args = [*_args("sitreg_oasis", pair, out), "--instance_optimization_steps=5", "--crop", "None"]
    assert main([*args, "--network_def#features", "[8,8]", "--instance_optimization_lr", "1e-3"]) == 0
    overrides = captured[0]
    assert overrides["output_dir"] == str(out) and overrides["instance_optimization_steps"] == 5
    assert overrides["crop"] is None and overrides["network_def#features"] == [8, 8]
    assert overrides["instance_optimization_lr"] == 1e-3


def test_help_lists_every_flag_with_its_default(capsys):
    assert main(["register", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--moving_label (None)", "--fixed_label (None)", "--overwrite (False)", "--no_weights (False)",
                 "--weights (None)", "--config (())", "--<config id> VALUE"):
        assert flag in text
    assert "usage: python -m monai_ext register BUNDLE MOVING FIXED OUT" in text
    assert main(["register", "sitreg_oasis", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--instance_optimization_steps (0)", "--load_pretrained (true)", "--network_def#features ([8, 40, 40, 40])"):
        assert flag in text
    assert main(["register", "keymorph_ixi_half", "-h"]) == 0
    assert "--checkpoint (" in capsys.readouterr().out
    for command in ("evaluate", "demo"):  # python -m monai_ext: the cli's commands plus the demo
        assert package_main([command, "--help"]) == 0
        assert "flags (default):" in capsys.readouterr().out
    assert package_main(["--help"]) == 0
    assert "register,evaluate,demo" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "register,evaluate}" in capsys.readouterr().out


def test_overwrite_keeps_user_files_and_modes_follow_the_umask(pair, tmp_path, capsys):
    out = tmp_path / "out"
    previous = os.umask(0o002)
    try:
        assert main([*_args("sitreg_oasis", pair, out), "--no_weights", *TINY]) == 0
        folder = out / "moving__fixed"
        assert folder.stat().st_mode & 0o777 == 0o775
        assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o664}
        (folder / "notes.txt").write_text("mine")
        before = (folder / "metrics.json").stat().st_mtime_ns
        capsys.readouterr()
        assert main([*_args("sitreg_oasis", pair, out), "--no_weights", *TINY]) == 2
        assert "already exists" in capsys.readouterr().err
        assert main([*_args("sitreg_oasis", pair, out), "--no_weights", "--overwrite", *TINY]) == 0
    finally:
        os.umask(previous)
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "metrics.json").stat().st_mtime_ns > before
    assert [p.name for p in out.iterdir()] == ["moving__fixed"]


def test_keymorph_without_weights(pair, tmp_path, capsys):
    out = tmp_path / "out"
    tiny = ["--spatial_size", "[32,32,32]", "--pixdim", "[1.0,1.0,1.0]", "--num_keypoints", "8", "--chunk_size", "4096"]
    assert main([*_args("keymorph_ixi_half", pair, out), "--no_weights", *tiny, "--outputs", "['metrics']"]) == 0
    assert "no trained weights" in capsys.readouterr().out
    assert json.loads((out / "moving__fixed" / "affine" / "metrics.json").read_text())["alignment"] == "affine"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_writing_leaves_nothing(signum, pair, tmp_path, capsys, monkeypatch):
    """The signal arrives while a pair's files are being written: the staging folder is removed, exit 128 + signum."""
    import monai_ext.io.outputs as outputs

    def interrupted(self, item, folder, name):
        (folder / "warped_image.nii.gz").write_bytes(b"partial")
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises in this frame

    monkeypatch.setattr(outputs.RegistrationWriter, "_write", interrupted)
    out = tmp_path / "out"
    assert main([*_args("sitreg_oasis", pair, out), "--no_weights", *TINY]) == 128 + signum
    err = capsys.readouterr().err  # the progress bar, then one line
    assert err.endswith(f"\ninterrupted by {signal.Signals(signum).name}: stopped, temporary files removed\n")
    assert "Traceback" not in err and "Error" not in err
    assert list(out.iterdir()) == []  # no pair folder, no hidden staging folder
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_sigint_of_the_real_process(pair, tmp_path):
    """``python -m monai_ext register`` interrupted during instance optimisation: exit 130, one line, no traceback."""
    out = tmp_path / "out"
    command = [sys.executable, "-u", "-m", "monai_ext", *_args("sitreg_oasis", pair, out)[0:], "--no_weights", *TINY]
    command[command.index("--instance_optimization_steps") + 1] = "100000"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    for line in process.stdout:  # wait until the registration runs
        if "no trained weights" in line:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted by SIGINT: stopped, temporary files removed" in stderr
    assert not out.exists() or list(out.iterdir()) == []
