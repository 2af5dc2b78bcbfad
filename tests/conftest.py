"""Shared test helpers.

Parity tests read the reference fixtures from ``../shared/fixtures`` (beside the checkout, as in CI).
When ``../shared`` is absent (a user's fresh machine) they are skipped; when it is present a missing
fixture file is an error, never a silent skip.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def fixture_path(*parts: str) -> Path:
    """Path of a file under ``../shared/fixtures``; skips only when ``../shared`` itself is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the checkout: reference fixtures unavailable")
    path = SHARED.joinpath("fixtures", *parts)
    if not path.exists():
        raise FileNotFoundError(f"reference fixture missing although ../shared is present: {path}")
    return path


def load_npz(*parts: str) -> dict[str, np.ndarray]:
    """All arrays of a fixture ``.npz`` as a dict."""
    with np.load(fixture_path(*parts)) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture()
def label_folder(tmp_path) -> Path:
    """A brain label-map folder for the brain bundles' training configs: the two shipped 2 mm held-out maps,
    copied once under training names (``subject_<i>``) and once under their held-out names."""
    from monai_ext.demo import DEMO_DATA

    folder = tmp_path / "maps"
    folder.mkdir()
    for index, source in enumerate(sorted(DEMO_DATA.glob("training_seg_*_2mm.nii.gz"))):
        shutil.copy(source, folder / f"subject_{index}.nii.gz")
        shutil.copy(source, folder / f"training_seg_{9 + index:02d}.nii.gz")
    return folder


def run_brain_training(config_files: Sequence[Path], bundle_root: Path, label_folder: Path, override: Mapping[str, Any]):
    """Run a brain bundle's training configs (``initialize`` then ``run``) on ``label_folder`` (the
    :func:`label_folder` fixture) with two pairs per epoch, no workers and ``override``; returns the parser."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update(
        {
            "bundle_root": str(bundle_root),
            "dataset_dir": str(label_folder),
            "pairs_per_epoch": 2,
            "num_workers": 0,
            **override,
        }
    )
    for _ in parser.get_parsed_content("initialize"):
        pass
    for _ in parser.get_parsed_content("run"):
        pass
    return parser
