"""A downloaded bundle runs with the package installed from its built wheel, in a fresh virtual environment.

The project's wheel is built offline (``pip wheel --no-build-isolation --no-index``, from a copy of the sources so
the checkout gets no ``build/``), ``bundles/sitreg_brain`` is packaged by ``scripts/package_bundle.py`` (its shipped
weights inside), served on 127.0.0.1 and fetched with ``monai.bundle.download(url=...)``. A new venv
(``--system-site-packages``: torch, MONAI, nibabel and ITK come from the current environment, nothing is
downloaded) gets the wheel (``pip install --no-deps --no-index``), and its Python runs ``python -m monai.bundle run
--config_file inference.json`` on a small pair (the demo's two held-out brains, 2 mm) from a folder outside the
repository. The editable install of the current environment must not shadow the wheel: the bundle run itself
prints the ``monai_ext`` it imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import download, download_large_files

from http_server import serve

REPO = Path(__file__).resolve().parents[1]
NAME = "sitreg_brain"
DISTRIBUTION = "monai-registration"
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # [project]
_spec = importlib.util.spec_from_file_location("package_bundle", REPO / "scripts" / "package_bundle.py")
package_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(package_bundle)


def _env() -> dict[str, str]:
    """The environment of the subprocesses: nothing that points Python at the checkout, pip offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _run(command: list[str], cwd: Path, timeout: float = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{output[-4000:]}"
    return output


def _package_files(package: Path) -> set[str]:
    return {
        p.relative_to(package.parent).as_posix()
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """``(wheel, source copy)``: the wheel built from a copy of pyproject.toml, README.md, LICENSE and monai_ext/."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "monai_ext", source / "monai_ext", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(root / "dist"), str(source)],
        cwd=root,
    )  # fmt: skip
    wheels = list((root / "dist").glob("*.whl"))
    assert [w.name for w in wheels] == [f"monai_registration-{VERSION}-py3-none-any.whl"]
    return wheels[0], source


def test_wheel_holds_every_file_of_the_package(built):
    wheel, source = built
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _package_files(source / "monai_ext")
    assert {n for n in expected if not n.endswith(".py")} >= {
        "monai_ext/demo_data/training_seg_09_2mm.nii.gz",
        "monai_ext/demo_data/training_seg_10_2mm.nii.gz",
        "monai_ext/demo_data/LICENSE.txt",
    }
    assert sorted(expected - names) == [], "package files missing from the wheel (pyproject package-data)"
    assert {n for n in names if n.startswith("monai_ext/")} == expected  # and nothing stale
    metadata = zipfile.ZipFile(wheel).read(f"monai_registration-{VERSION}.dist-info/METADATA").decode()
    assert f"Name: {DISTRIBUTION}" in metadata and f"Version: {VERSION}" in metadata


def test_every_bundle_states_the_package_requirement():
    bundles = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
    assert len(bundles) >= 10
    for bundle in bundles:
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        assert meta["required_packages_version"].get(DISTRIBUTION) == VERSION, bundle.name
        docs = (bundle / "docs" / "README.md").read_text()
        assert "## Requirements" in docs and f"`{DISTRIBUTION}`" in docs and "pip install" in docs, bundle.name


def _new_venv(root: Path, wheel: Path) -> Path:
    """A venv seeing the current environment's packages, with the wheel installed; returns its Python."""
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
    purelib = Path(purelib.strip())
    if sys.prefix != sys.base_prefix:  # the current environment is a venv itself: --system-site-packages misses it
        lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
        (purelib / "_current_environment.pth").write_text("\n".join(lines) + "\n")
    # pip of the current environment (visible through the system site-packages) installs into the venv
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
         cwd=root)
    return python


@pytest.mark.filterwarnings("ignore:No hash value provided")  # monai.bundle.download(url=...) takes none
def test_downloaded_bundle_runs_inference_from_the_wheel_in_a_fresh_venv(tmp_path, built):
    from monai_ext.demo import write_demo_pair

    wheel, _ = built
    work = tmp_path / "work"  # the working directory of every command: outside the repository
    work.mkdir()
    assert not work.resolve().is_relative_to(REPO)

    archive = package_bundle.package_bundle(REPO / "bundles" / NAME, tmp_path / "dist")
    members = zipfile.ZipFile(archive).namelist()
    assert f"{NAME}/models/model.pt" in members  # shipped weights (empty url in large_files.yml) are packed
    assert f"{NAME}/configs/inference.json" in members and not any("/inference/" in m for m in members)

    python = _new_venv(tmp_path, wheel)
    found = json.loads(
        _run([str(python), "-c", "import json, sysconfig, monai_ext; "
              "print(json.dumps([monai_ext.__file__, sysconfig.get_paths()['purelib']]))"], cwd=work)
    )  # fmt: skip
    module, purelib = Path(found[0]), Path(found[1])
    assert module == purelib / "monai_ext" / "__init__.py" and purelib.is_relative_to(tmp_path / "venv"), found
    assert (purelib / "monai_ext" / "demo_data" / "training_seg_09_2mm.nii.gz").is_file()

    hub = tmp_path / "hub"  # monai.bundle download, in this process (a fresh Python costs ~10 s of imports)
    with serve({"/" + archive.name: archive.read_bytes()}) as server:
        download(name=NAME, url=f"{server.url}/{archive.name}", bundle_dir=str(hub), progress=False)
    assert [p for p, _ in server.requests] == [f"/{archive.name}"]
    bundle = hub / NAME
    download_large_files(bundle_path=str(bundle))  # the shipped weights: their sha256 is checked

    pair = write_demo_pair(work / "data")  # two held-out brains, 2 mm, LIA storage, different grids
    mixin = work / "pair.json"
    mixin.write_text(json.dumps({
        "pairs": [{key: str(path) for key, path in pair.items()}],
        "+initialize": ["$print('monai_ext imported from', monai_ext.__file__)"],
    }))  # fmt: skip
    configs = f"['{bundle / 'configs' / 'inference.json'}','{mixin}']"
    output = _run(
        [str(python), "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle),
         "--output_dir", str(work / "out")],
        cwd=work,
    )  # fmt: skip
    assert f"monai_ext imported from {purelib / 'monai_ext' / '__init__.py'}" in output, output[-2000:]

    folder = work / "out" / "moving__fixed"
    fixed = nib.load(str(pair["fixed_label"]))
    for name in ("warped_image", "warped_label", "jacobian"):
        image = nib.load(str(folder / f"{name}.nii.gz"))
        assert image.shape == fixed.shape and np.allclose(image.affine, fixed.affine, atol=1e-4), name
    field = nib.load(str(folder / "forward_field_itk.nii.gz"))
    assert field.shape == (*fixed.shape, 1, 3) and np.allclose(field.affine, fixed.affine, atol=1e-4)
    ddf = np.asarray(nib.load(str(folder / "forward_ddf.nii.gz")).dataobj)
    assert ddf.shape == (*fixed.shape, 3) and np.abs(ddf).mean() > 0.5  # a real deformation, in voxels
    metrics = json.loads((folder / "metrics.json").read_text())
    # the shipped model registers two different real brains: a clear Dice gain, no folding
    assert metrics["dice"] > metrics["dice_before"] + 0.1, metrics
    assert metrics["folding_fraction"] == 0
    assert (folder / "qa.png").stat().st_size > 0
