"""scripts/check_bundles.py on throwaway bundles built in tmp_path (metadata + a tiny MONAI network)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_bundles.py"
_spec = importlib.util.spec_from_file_location("check_bundles", SCRIPT)
check_bundles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_bundles)

TENSOR = {
    "type": "image",
    "format": "magnitude",
    "modality": "MR",
    "num_channels": 2,
    "spatial_shape": ["16*n", "16*n", "16*n"],
    "dtype": "float32",
    "value_range": [0, 1],
    "is_patch_data": False,
    "channel_def": {"0": "moving image", "1": "fixed image"},
}
METADATA = {
    # an unreachable schema URL: the check must use the local schema file and never download
    "schema": "http://127.0.0.1:9/meta_schema_20240725.json",
    "version": "0.1.0",
    "changelog": {"0.1.0": "initial release"},
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "numpy_version": "2.2.6",
    "required_packages_version": {"nibabel": "5.4.2"},
    "name": "Toy registration",
    "task": "pairwise 3-D registration",
    "description": "test bundle",
    "authors": "tests",
    "copyright": "tests",
    "network_data_format": {
        "inputs": {"image": TENSOR},
        "outputs": {
            "pred": {
                **TENSOR,
                "format": "displacement",
                "num_channels": 3,
                "value_range": [],
                "channel_def": {"0": "axis 0", "1": "axis 1", "2": "axis 2"},
            }
        },
    },
}
INFERENCE = {
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "network_def": {
        "_target_": "monai.networks.nets.LocalNet",
        "spatial_dims": 3,
        "in_channels": 2,
        "out_channels": 3,
        "num_channel_initial": 2,
        "extract_levels": [1],
    },
}


def make_bundle(root: Path, name: str = "toy_mri_registration", metadata=METADATA, inference=INFERENCE) -> Path:
    bundle = root / name
    (bundle / "configs").mkdir(parents=True)
    (bundle / "LICENSE").write_text("MIT")
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (bundle / "large_files.yml").write_text(
        'large_files:\n  - path: "models/model.pt"\n    url: "https://example.org/model.pt"\n'
        f'    hash_val: "{"0" * 64}"\n    hash_type: "sha256"\n'
    )
    if inference is not None:
        (bundle / "configs" / "inference.json").write_text(json.dumps(inference))
    return bundle


def test_valid_bundle_passes_every_check(tmp_path, capsys):
    make_bundle(tmp_path / "bundles")
    assert check_bundles.main(["--bundles-dir", str(tmp_path / "bundles")]) == 0
    out = capsys.readouterr().out
    assert "toy_mri_registration" in out and "1 of 1 bundles passed" in out and "FAIL" not in out
    assert not (tmp_path / "bundles" / "toy_mri_registration" / "eval").exists()


def _broken(**changes):
    metadata = copy.deepcopy(METADATA)
    for key, value in changes.items():
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    return metadata


@pytest.mark.parametrize(
    "metadata",
    [
        _broken(task=None),  # a mandatory key missing
        _broken(version="1.0"),  # not semver
        _broken(network_data_format={"inputs": {"image": TENSOR}, "outputs": {"ddf": TENSOR}}),  # no 'pred'
        _broken(required_packages_version=["nibabel"]),  # must be a dict
    ],
)
def test_broken_metadata_fails(tmp_path, metadata):
    result = check_bundles.check_bundle(make_bundle(tmp_path, metadata=metadata))
    assert result["metadata"].startswith("FAIL")
    assert check_bundles.main(["--bundles-dir", str(tmp_path)]) == 1


def test_changelog_must_hold_the_version(tmp_path):
    result = check_bundles.check_bundle(make_bundle(tmp_path, metadata=_broken(changelog={"0.0.9": "old"})))
    assert result["changelog"].startswith("FAIL") and "0.1.0" in result["changelog"]


def test_network_output_must_match_metadata(tmp_path):
    metadata = copy.deepcopy(METADATA)
    metadata["network_data_format"]["outputs"]["pred"]["num_channels"] = 2
    result = check_bundles.check_bundle(make_bundle(tmp_path, metadata=metadata))
    assert result["metadata"] == "ok" and result["net_in_out"].startswith("FAIL") and "channel" in result["net_in_out"]


def test_missing_inference_config_is_an_error_not_a_skip(tmp_path):
    result = check_bundles.check_bundle(make_bundle(tmp_path, inference=None))
    assert "configs/inference.json" in result["files"] and result["net_in_out"].startswith("FAIL")


def test_no_bundles_is_an_error(tmp_path, capsys):
    assert check_bundles.main(["--bundles-dir", str(tmp_path)]) == 1
    assert "no bundles found" in capsys.readouterr().out


REPO_BUNDLES = SCRIPT.parents[1] / "bundles"


def _copy_configs(root: Path, names) -> Path:
    for name in names:
        (root / name / "configs").mkdir(parents=True)
        for config in (REPO_BUNDLES / name / "configs").glob("*.json"):
            (root / name / "configs" / config.name).write_text(config.read_text())
    return root


def test_repository_copies_have_not_drifted():
    assert check_bundles.check_shared(REPO_BUNDLES) == []


def test_drifted_copies_are_reported(tmp_path):
    names = ["sitreg_brain", "sitreg_brain_raw", "keymorph_brain_affine", "sitreg_oasis", "sitreg_lpba40"]
    root = _copy_configs(tmp_path, names)
    assert check_bundles.check_shared(root) == []
    raw = root / "sitreg_brain_raw" / "configs" / "inference.json"
    config = json.loads(raw.read_text())
    config["network_def"]["features"][0] = 16
    config["refine_pixdim"] = 3.0
    raw.write_text(json.dumps(config))
    overlay = root / "sitreg_lpba40" / "configs" / "multi_gpu_train.json"
    config = json.loads(overlay.read_text())
    config["backend"] = "gloo"
    config["train#dataloader#batch_size"] = 2  # a key a bundle may set its own way: not a drift
    overlay.write_text(json.dumps(config))
    problems = check_bundles.check_shared(root)
    assert len(problems) == 3, problems
    assert any(p.startswith("SITReg brain network drifted") for p in problems)
    assert any(p.startswith("affine refinement voxel size drifted") for p in problems)
    assert any("'backend'" in p and "sitreg_lpba40" in p for p in problems)
    del config["backend"]
    overlay.write_text(json.dumps(config))
    assert any("'backend'" in p and "<missing>" in p for p in check_bundles.check_shared(root))


def test_computing_expressions_flags_comprehensions_and_mode_switches():
    config = {
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",  # the machine's choice: ok
        "backend": "$'nccl' if torch.cuda.is_available() else 'gloo'",
        "path": "$@bundle_root + '/models'",
        "imports": ["$import os"],
        "pixdim": "$[@spacing] * 3",  # arithmetic: not this check's business
        "keys": "$[k for k in ('a', 'b') if k in @data#0]",
        "run": ["$@trainer.run()", "$monai_ext.f(@a) if @download else None"],
        "nested": {"sets": "${k for k in @a}", "dicts": "${k: 1 for k in @a}", "total": "$sum(x for x in @a)"},
        "attach": "$@saver.attach(@trainer) if dist.get_rank() == 0 else None",
        "broken": "$[@a",
    }
    problems = check_bundles.computing_expressions(config)
    assert [key for key, _ in problems] == ["keys", "run#1", "nested#sets", "nested#dicts", "nested#total", "broken"]
    what = [w for _, w in problems]
    assert what[0].startswith("list comprehension") and what[1].startswith("inline conditional on a config value")
    assert what[2].startswith("set comprehension") and what[4].startswith("generator comprehension")
    assert what[5].startswith("not a Python expression")


def test_expressions_check_fails_a_computing_config(tmp_path):
    inference = {**INFERENCE, "label_keys": "$[k for k in ('moving_label', 'fixed_label') if k in @pairs[0]]"}
    bundle = make_bundle(tmp_path, inference=inference)
    (bundle / "configs" / "train.json").write_text(json.dumps({"mask": "$None if @ignore_mask else 'mask'"}))
    result = check_bundles.check_bundle(bundle)
    assert result["expressions"].startswith("FAIL") and result["net_in_out"] == "ok"
    assert "inference.json label_keys: list comprehension" in result["expressions"]
    assert "train.json mask: inline conditional" in result["expressions"]


def test_expression_exceptions_are_still_needed():
    """Every allowed exception names an expression that still computes (a fixed one must leave the table)."""
    for (bundle, config, key), why in check_bundles.EXPRESSION_EXCEPTIONS.items():
        content = json.loads((REPO_BUNDLES / bundle / "configs" / config).read_text())
        assert key in [k for k, _ in check_bundles.computing_expressions(content)], (bundle, key, why)
