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
  channel count and dtype);
* expressions: configs compose, they do not compute (:func:`computing_expressions`): no ``$`` expression of a
  ``configs/*.json`` holds a comprehension (list, set, dict, generator) or an inline conditional
  (``a if condition else b``) whose condition reads a config value (an ``@`` reference): a mode switch belongs in a
  ``monai_ext`` factory or a small override config. Conditionals on the machine or process only (``'nccl' if
  torch.cuda.is_available() else 'gloo'``, ``... if dist.get_rank() == 0 else None``) are allowed; so are the
  entries of :data:`EXPRESSION_EXCEPTIONS`.

Across bundles (:func:`check_shared`): a bundle must run on its own after ``monai.bundle download``, so blocks that
several bundles hold are copies, not references into a sibling's folder. The copies must not drift:

* :data:`SHARED_BLOCKS`: config values that must be equal wherever they appear (the brain pipeline
  ``sitreg_brain_raw`` repeats the network, grid, loss and affine-refinement settings of ``sitreg_brain`` and
  ``keymorph_brain_affine``, whose weights it loads);
* every ``configs/multi_gpu_train.json`` (the distributed-training overlay of the SITReg bundles) holds the same
  keys with the same values, except the keys of :data:`MULTI_GPU_OWN_KEYS`, which a bundle may set its own way.

Prints a table and exits with status 1 if any check failed (or no bundle was found), or if copies drifted.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCHEMA = REPO / "scripts" / "metadata_schema.json"
REQUIRED_FILES = ("LICENSE", "configs/metadata.json", "configs/inference.json")
CHECKS = ("files", "metadata", "changelog", "large_files", "net_in_out", "expressions")
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")

#: (what, [(bundle, config file, key), ...]): values that must be equal in every listed place (``#``-separated keys)
SHARED_BLOCKS = (
    ("SITReg brain network", [("sitreg_brain", "inference.json", "network_def"), ("sitreg_brain_raw", "inference.json", "network_def")]),
    ("SITReg brain grid shape", [("sitreg_brain", "inference.json", "shape"), ("sitreg_brain_raw", "inference.json", "shape")]),
    ("SITReg brain voxel size", [("sitreg_brain", "inference.json", "spacing"), ("sitreg_brain_raw", "inference.json", "spacing")]),
    ("SITReg brain pair loss", [("sitreg_brain", "inference.json", "loss"), ("sitreg_brain_raw", "inference.json", "loss")]),
    ("instance optimisation learning rate", [("sitreg_brain", "inference.json", "instance_optimization_lr"), ("sitreg_brain_raw", "inference.json", "instance_optimization_lr")]),
    ("brain keypoint detector", [("keymorph_brain_affine", "inference.json", "backbone"), ("sitreg_brain_raw", "inference.json", "affine_backbone")]),
    ("brain keypoint count", [("keymorph_brain_affine", "inference.json", "num_keypoints"), ("sitreg_brain_raw", "inference.json", "num_keypoints")]),
    ("brain keypoint grid shape", [("keymorph_brain_affine", "inference.json", "shape"), ("sitreg_brain_raw", "inference.json", "affine_shape")]),
    ("brain keypoint voxel size", [("keymorph_brain_affine", "inference.json", "spacing"), ("sitreg_brain_raw", "inference.json", "affine_spacing")]),
    ("affine refinement steps", [("keymorph_brain_affine", "inference.json", "refine_steps"), ("sitreg_brain_raw", "inference.json", "refine_steps")]),
    ("affine refinement voxel size", [("keymorph_brain_affine", "inference.json", "refine_pixdim"), ("sitreg_brain_raw", "inference.json", "refine_pixdim")]),
)  # fmt: skip
#: keys of ``multi_gpu_train.json`` a bundle may set its own way, and why
MULTI_GPU_OWN_KEYS = {
    "validate#handlers": "the checkpoint saver's key metric follows the task (Dice: higher is better; TRE: lower)",
    "train#dataloader#batch_size": "a bundle with a global batch splits it over the processes",
}


#: ``(bundle, config file, config id)`` -> why that ``$`` expression may still compute (:func:`computing_expressions`)
EXPRESSION_EXCEPTIONS: dict[tuple[str, str, str], str] = {}
_REFERENCE = re.compile(r"@[\w#:]+")  # a MONAI reference (@id, @id#sub_id, @id::sub_id)
_COMPREHENSIONS = {ast.ListComp: "list", ast.SetComp: "set", ast.DictComp: "dict", ast.GeneratorExp: "generator"}
_PLACEHOLDER = "__config_reference__"


def _expressions(value: Any, key: str = "") -> list[tuple[str, str]]:
    """``(config id, expression)`` of every ``$`` string in a config's content (``#``-separated ids)."""
    if isinstance(value, str):
        return [(key, value)] if value.startswith("$") else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    return [found for k, v in items for found in _expressions(v, f"{key}#{k}" if key else str(k))]


def computing_expressions(config: Any) -> list[tuple[str, str]]:
    """The ``$`` expressions of a config's content that compute instead of composing: ``(config id, what)`` each.

    Flagged: a comprehension of any kind, an inline conditional whose condition holds an ``@`` reference (a
    config value: a mode switch), and an expression that is not Python. An inline conditional on the machine or
    process alone (no reference in its condition) is a run-time choice and passes.
    """
    problems = []
    for key, expression in _expressions(config):
        code = _REFERENCE.sub(_PLACEHOLDER, expression[1:])
        try:
            tree = ast.parse(code)
        except SyntaxError:
            problems.append((key, f"not a Python expression: {expression}"))
            continue
        for node in ast.walk(tree):
            if type(node) in _COMPREHENSIONS:
                problems.append((key, f"{_COMPREHENSIONS[type(node)]} comprehension in {expression}"))
            elif isinstance(node, ast.IfExp) and any(
                isinstance(name, ast.Name) and name.id == _PLACEHOLDER for name in ast.walk(node.test)
            ):
                problems.append((key, f"inline conditional on a config value in {expression}"))
    return problems


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

    def expressions() -> None:
        problems = []
        for path in sorted((bundle_dir / "configs").glob("*.json")):
            for key, what in computing_expressions(json.loads(path.read_text())):
                if (bundle_dir.name, path.name, key) not in EXPRESSION_EXCEPTIONS:
                    problems.append(f"{path.name} {key}: {what}")
        if problems:
            raise ValueError("configs compute instead of composing (use a monai_ext factory or an override "
                             f"config): {'; '.join(problems)}")

    results = {"bundle": bundle_dir.name}
    for name, check in zip(CHECKS, (files, metadata, changelog, large_files, net_in_out, expressions)):
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


def _config_value(bundles_dir: Path, bundle: str, config: str, key: str) -> Any:
    """The raw (unparsed) value of ``key`` (``#``-separated) in ``<bundle>/configs/<config>``."""
    value: Any = json.loads((bundles_dir / bundle / "configs" / config).read_text())
    for part in key.split("#"):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"{bundle}/configs/{config} has no {key!r}")
        value = value[part]
    return value


def check_shared(bundles_dir: str | Path = REPO / "bundles") -> list[str]:
    """Copies that drifted (:data:`SHARED_BLOCKS`, ``multi_gpu_train.json``): one message each, ``[]`` if none."""
    bundles_dir = Path(bundles_dir)
    problems = []
    for what, places in SHARED_BLOCKS:
        present = [place for place in places if (bundles_dir / place[0]).is_dir()]
        if len(present) < 2:
            continue
        try:
            values = [_config_value(bundles_dir, *place) for place in present]
        except (KeyError, OSError, ValueError) as err:
            problems.append(f"{what}: {err}")
            continue
        if any(value != values[0] for value in values[1:]):
            where = ", ".join(f"{b}/configs/{c}#{k} = {json.dumps(v)[:80]}" for (b, c, k), v in zip(present, values))
            problems.append(f"{what} drifted: {where}")
    overlays = {p.parent.parent.name: json.loads(p.read_text()) for p in sorted(bundles_dir.glob("*/configs/multi_gpu_train.json"))}
    for key in sorted(set().union(*overlays.values()) - set(MULTI_GPU_OWN_KEYS)) if overlays else []:
        groups: dict[str, list[str]] = {}
        for bundle, overlay in overlays.items():
            groups.setdefault(json.dumps(overlay.get(key, "<missing>"), sort_keys=True), []).append(bundle)
        if len(groups) > 1:
            detail = "; ".join(f"{', '.join(names)}: {value[:80]}" for value, names in groups.items())
            problems.append(f"multi_gpu_train.json key {key!r} differs between bundles ({detail})")
    return problems


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
    drifted = check_shared(args.bundles_dir)
    print("shared blocks: " + ("ok (no copy drifted)" if not drifted else "FAIL\n  " + "\n  ".join(drifted)))
    return 1 if failed or drifted else 0


if __name__ == "__main__":
    sys.exit(main())
