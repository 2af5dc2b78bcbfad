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
