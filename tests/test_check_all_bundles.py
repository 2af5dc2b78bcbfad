"""Every bundle under bundles/ passes scripts/check_bundles.py (files, metadata schema, changelog,
large_files.yml, verify_net_in_out)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_bundles", REPO / "scripts" / "check_bundles.py")
check_bundles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_bundles)

BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if p.is_dir())


def test_bundles_exist():
    assert BUNDLES, "no bundle under bundles/"


@pytest.mark.parametrize("bundle", BUNDLES, ids=[p.name for p in BUNDLES])
def test_bundle_passes_all_checks(bundle):
    result = check_bundles.check_bundle(bundle)
    failed = {check: result[check] for check in check_bundles.CHECKS if result[check] != "ok"}
    assert not failed, f"{bundle.name}: {failed}"


def _large_files_result(tmp_path: Path, text: str | None) -> str:
    bundle = tmp_path / "toy"
    bundle.mkdir()
    if text is not None:
        (bundle / "large_files.yml").write_text(text)
    return check_bundles.check_bundle(bundle)["large_files"]


ENTRY = (
    'large_files:\n  - path: "{path}"\n    url: "https://example.org/model.pt"\n'
    '    hash_val: "{hash}"\n    hash_type: "{kind}"\n'
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (ENTRY.format(path="models/model.pt", hash="ab" * 32, kind="sha256"), "ok"),
        ('large_files:\n  - path: "models/official.zip"\n    url: "https://example.org/official.zip"\n', "ok"),
        ("large_files: []\n", "ok"),
        (None, "no large_files.yml"),
        ("other: 1\n", "has no 'large_files' list"),
        ('large_files:\n  - path: "models/model.pt"\n', "lacks url"),
        (ENTRY.format(path="models/model.pt", hash="", kind="sha256"), "hash_val and hash_type go together"),
        (ENTRY.format(path="models/model.pt", hash="ab", kind="crc32"), "hash_type must be one of"),
        (ENTRY.format(path="../model.pt", hash="ab", kind="md5"), "leaves the bundle"),
    ],
)
def test_large_files_check(tmp_path, text, expected):
    result = _large_files_result(tmp_path, text)
    assert result == "ok" if expected == "ok" else expected in result, result
