"""Check every bundle under ``bundles/``: required files, metadata schema, changelog, network in/out.

Usage::

    python scripts/check_bundles.py [--bundles-dir bundles] [--schema scripts/metadata_schema.json] [--n 1]

or from Python: ``from check_bundles import check_bundle, check_all``.

Per bundle (no check is skipped; a missing file is a failure):

* files: ``LICENSE``, ``configs/metadata.json`` and ``configs/inference.json`` exist;
* metadata: ``monai.bundle.verify_metadata`` against the local schema ``scripts/metadata_schema.json``. It
  is handed over as ``filepath``: ``verify_metadata`` downloads ``metadata["schema"]`` to ``filepath`` only
  when that file does not exist yet, so with the local file present nothing is fetched;
* changelog: ``version`` is a key of ``changelog`` (the Model Zoo's ``verify_version_changes``);
* large_files: ``large_files.yml`` (or ``.yaml`` / ``.json``) exists with a ``large_files`` list for ``monai.bundle
  download_large_files`` (empty while a bundle has no published weights; its docs say so). Every entry has
  ``path`` (inside the bundle) and ``url``; ``hash_val`` and ``hash_type`` (md5, sha1, sha256 or sha512) come
  together, and only an entry whose publisher gives no checksum may omit both. An empty ``url`` marks a file
  shipped inside the bundle (weights trained by this project): it must exist and match its hash, which is what
  ``download_large_files`` then checks before skipping the download;
* net_in_out: ``monai.bundle.verify_net_in_out("network_def", ...)`` with ``configs/inference.json`` on CPU
  (a random ``image`` of the declared channels and shape, ``"*n"`` sizes with ``n``; checks ``pred``'s
  channel count and dtype).

Prints a table and exits with status 1 if any check failed (or no bundle was found).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCHEMA = REPO / "scripts" / "metadata_schema.json"
REQUIRED_FILES = ("LICENSE", "configs/metadata.json", "configs/inference.json")
CHECKS = ("files", "metadata", "changelog", "large_files", "net_in_out")
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")


def _run(check: Callable[[], None]) -> str:
    try:
        check()
    except Exception as err:  # noqa: BLE001 (every failure becomes a table cell)
        message = " ".join(str(err).split())
        return f"FAIL: {type(err).__name__}: {message[:300]}"
    return "ok"


def check_bundle(
    bundle_dir: str | Path, schema: str | Path = DEFAULT_SCHEMA, n: int = 1, p: int = 1, any_size: int = 1
) -> dict[str, str]:
    """Run all checks on one bundle folder; returns ``{check: "ok" | "FAIL: ..."}`` plus ``"bundle"``."""
    from monai.bundle import verify_metadata, verify_net_in_out

    bundle_dir, schema = Path(bundle_dir), Path(schema)
    if not schema.is_file():
        raise FileNotFoundError(f"schema not found: {schema}")
    meta = bundle_dir / "configs" / "metadata.json"
    inference = bundle_dir / "configs" / "inference.json"

    def files() -> None:
        missing = [f for f in REQUIRED_FILES if not (bundle_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"missing {', '.join(missing)}")

    def metadata() -> None:
        # the schema is a file of this repository: its own md5 only tells verify_metadata not to warn
        digest = hashlib.md5(schema.read_bytes()).hexdigest()  # noqa: S324 (not a security use)
        try:
            verify_metadata(meta_file=str(meta), filepath=str(schema), hash_val=digest, hash_type="md5")
        except ValueError as err:  # MONAI names the metadata's schema URL; the file actually used is ours
            raise ValueError(f"{err} (validated with the local schema {schema})") from err

    def changelog() -> None:
        content = json.loads(meta.read_text())
        if content.get("version") not in content.get("changelog", {}):
            raise ValueError(f"version {content.get('version')!r} has no entry in changelog")

    def large_files() -> None:
        from monai.bundle import ConfigParser

        found = sorted(p for p in bundle_dir.glob("large_files*") if p.suffix in (".yml", ".yaml", ".json"))
        if not found:
            raise FileNotFoundError("no large_files.yml (list the published weights, or an empty list while there are none)")
        entries = ConfigParser.load_config_file(str(found[0])).get("large_files")
        if not isinstance(entries, list):
            raise ValueError(f"{found[0].name} has no 'large_files' list")
        for entry in entries:
            missing = [k for k in ("path", "url") if k not in entry or (k == "path" and not entry[k])]
            if missing:
                raise ValueError(f"{found[0].name} entry {entry.get('path')!r} lacks {', '.join(missing)}")
            if bool(entry.get("hash_val")) != bool(entry.get("hash_type")):
                raise ValueError(f"{found[0].name} entry {entry['path']!r}: hash_val and hash_type go together")
            if entry.get("hash_type") and entry["hash_type"] not in HASH_TYPES:
                raise ValueError(f"{found[0].name} entry {entry['path']!r}: hash_type must be one of {HASH_TYPES}")
            target = (bundle_dir / entry["path"]).resolve()
            if not target.is_relative_to(bundle_dir.resolve()):
                raise ValueError(f"{found[0].name} entry path {entry['path']!r} leaves the bundle")
            if not entry["url"]:  # shipped inside the bundle: it must be there, with the recorded checksum
                if not (entry.get("hash_val") and target.is_file()):
                    raise ValueError(f"{found[0].name} entry {entry['path']!r}: an empty url means the file ships "
                                     "in the bundle with its hash_val, but it or its hash is missing")
                digest = hashlib.new(entry["hash_type"], target.read_bytes()).hexdigest()
                if digest != entry["hash_val"]:
                    raise ValueError(f"{entry['path']}: {entry['hash_type']} {digest} differs from large_files' {entry['hash_val']}")

    def net_in_out() -> None:
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(meta),
            config_file=str(inference),
            device="cpu",
            n=n,
            p=p,
            any=any_size,
            bundle_root=str(bundle_dir),
        )

    results = {"bundle": bundle_dir.name}
    for name, check in zip(CHECKS, (files, metadata, changelog, large_files, net_in_out)):
        results[name] = _run(check)
    return results


def check_all(
    bundles_dir: str | Path = REPO / "bundles", schema: str | Path = DEFAULT_SCHEMA, **kwargs
) -> list[dict[str, str]]:
    """:func:`check_bundle` for every sub-folder of ``bundles_dir`` (sorted)."""
    bundles_dir = Path(bundles_dir)
    if not bundles_dir.is_dir():
        raise FileNotFoundError(f"bundles folder not found: {bundles_dir}")
    return [check_bundle(d, schema, **kwargs) for d in sorted(bundles_dir.iterdir()) if d.is_dir()]


def format_table(results: Sequence[dict[str, str]]) -> str:
    """Plain-text table, one row per bundle and one column per check."""
    columns = ("bundle", *CHECKS)
    rows = [columns] + [tuple(r[c] for c in columns) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles-dir", default=str(REPO / "bundles"))
    parser.add_argument("--schema", default=str(DEFAULT_SCHEMA))
    parser.add_argument("--n", type=int, default=1, help="value of n in spatial shapes such as '16*n'")
    parser.add_argument("--p", type=int, default=1, help="value of p in spatial shapes such as '2**p'")
    parser.add_argument("--any", dest="any_size", type=int, default=1, help="size used for '*' in spatial shapes")
    args = parser.parse_args(argv)
    results = check_all(args.bundles_dir, args.schema, n=args.n, p=args.p, any_size=args.any_size)
    if not results:
        print(f"no bundles found under {args.bundles_dir}")
        return 1
    print(format_table(results))
    failed = [r["bundle"] for r in results if any(r[c] != "ok" for c in CHECKS)]
    print(
        f"\n{len(results) - len(failed)} of {len(results)} bundles passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
