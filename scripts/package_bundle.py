"""Zip a bundle folder for ``python -m monai.bundle download --name <name> --url <zip url>``.

Usage::

    python scripts/package_bundle.py bundles/sitreg_oasis [--output dist] [--include-weights]

writes ``dist/<name>_v<version>.zip`` (version from ``configs/metadata.json``, the Model Zoo release name) whose
members all sit under ``<name>/``, as ``monai.bundle.download`` expects (it extracts into ``bundle_dir`` and
uses ``<bundle_dir>/<name>``). Left out: run outputs (``eval/``, ``inference/``), caches, partial downloads
and, unless ``--include-weights``, the files that ``large_files.yml`` lists with a download ``url`` (fetched afterwards
with ``python -m monai.bundle download_large_files --bundle_path <bundle_dir>/<name>``). An entry with an empty
``url`` is a file shipped inside the bundle (weights trained by this project, e.g. ``sitreg_brain``): it is always
packed, and ``download_large_files`` only checks its hash.

The configs import the package ``monai_ext``: the environment that runs a downloaded bundle needs
``monai-registration`` installed (``required_packages_version`` in ``configs/metadata.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

EXCLUDED_DIRS = {"eval", "inference", "__pycache__", ".ipynb_checkpoints", ".git"}
EXCLUDED_SUFFIXES = (".part", ".pyc")


def _large_files(bundle_dir: Path) -> set[Path]:
    """The files of ``large_files.yml`` that are downloaded from a ``url`` (an empty ``url``: shipped in the bundle)."""
    from monai.bundle import ConfigParser

    listed = set()
    for path in bundle_dir.glob("large_files*"):
        if path.suffix in (".yml", ".yaml", ".json"):
            for entry in ConfigParser.load_config_file(str(path)).get("large_files", []):
                if entry.get("url"):
                    listed.add((bundle_dir / entry["path"]).resolve())
    return listed


def package_bundle(
    bundle_dir: str | Path, output_dir: str | Path, include_weights: bool = False, name: str | None = None
) -> Path:
    """Write ``<output_dir>/<name>_v<version>.zip`` (members under ``<name>/``) and return its path.

    ``name`` defaults to the folder name; the version is ``configs/metadata.json``'s ``version``.
    """
    bundle_dir = Path(bundle_dir).resolve()
    meta = bundle_dir / "configs" / "metadata.json"
    if not meta.is_file():
        raise FileNotFoundError(f"not a bundle (no configs/metadata.json): {bundle_dir}")
    version = json.loads(meta.read_text()).get("version")
    if not version:
        raise ValueError(f"{meta} has no version")
    name = name or bundle_dir.name
    skip = set() if include_weights else _large_files(bundle_dir)
    archive = Path(output_dir) / f"{name}_v{version}.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(bundle_dir.rglob("*")):
            relative = path.relative_to(bundle_dir)
            if (
                not path.is_file()
                or EXCLUDED_DIRS & set(relative.parts[:-1])
                or path.name.endswith(EXCLUDED_SUFFIXES)
                or path.resolve() in skip
            ):
                continue
            zf.write(path, f"{name}/{relative.as_posix()}")
    return archive


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle_dir")
    parser.add_argument("--output", default="dist")
    parser.add_argument("--include-weights", action="store_true", help="also pack the files large_files.yml downloads")
    parser.add_argument("--name", default=None, help="bundle name (default: the folder name)")
    args = parser.parse_args(argv)
    print(package_bundle(args.bundle_dir, args.output, args.include_weights, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
