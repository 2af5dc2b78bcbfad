"""Command-line front end, ``python -m monai_ext <command>`` (python-fire): thin wrappers over the bundles.

Commands (every unknown ``--<config id> <value>`` flag is a bundle config override, as for
``python -m monai.bundle run``, e.g. ``--instance_optimization_steps 50`` or ``--device "$torch.device('cpu')"``)::

    python -m monai_ext register BUNDLE MOVING FIXED OUT [--moving_label M] [--fixed_label F] [--<id> value ...]
    python -m monai_ext evaluate BUNDLE [--dataset_dir DIR] [--out DIR] [--<id> value ...]
    python -m monai_ext demo [--out demo_out] [--shape 32,32,32] [--steps N] [--lr LR]

``BUNDLE`` is a bundle folder or the name of one under this repository's ``bundles/`` (e.g. ``sitreg_oasis``).
``register`` runs the bundle's ``configs/inference.json`` workflow with ``pairs`` and ``output_dir``
overridden; ``evaluate`` runs ``configs/train.json`` + ``configs/evaluate.json`` (the bundle's test-set
evaluation); ``demo`` is :func:`monai_ext.demo.demo`. Everything about the registration itself (preprocessing,
network, weights, instance optimisation, written files) comes from the configs: this module only turns the
command line into overrides, checks the input files up front, and reports progress and one line per pair.

MOVING / FIXED are two image files (one pair) or two folders, paired by file name (``a.nii.gz`` in MOVING with
``a.nii.gz`` in FIXED); an image is never registered to itself. Label maps (``--moving_label`` /
``--fixed_label``, files or folders named like their images) add Dice before / after to the summary.

Bad input (a missing or unreadable file, an image of the wrong dimensionality, non-finite voxels, a label map
whose grid differs from its image's, a self pair) is reported as ``error: <message>`` with exit status 2
before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.bundle import ConfigParser, create_workflow
from monai.data import decollate_batch
from tqdm import tqdm  # a dependency of huggingface_hub, which this package requires

from monai_ext.engines.registration import pair_metrics
from monai_ext.io.native import load_image
from monai_ext.io.outputs import pair_folder_name, summary_line

__all__ = [
    "InputError",
    "IMAGE_SUFFIXES",
    "bundle_path",
    "pair_files",
    "check_pair_images",
    "run_bundle",
    "register",
    "evaluate",
    "main",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
_PAIR_KEYS = (("moving_image", "moving_label"), ("fixed_image", "fixed_label"))


class InputError(ValueError):
    """Bad command-line input: reported as ``error: <message>`` with exit status 2, without a traceback."""


def bundle_path(bundle: str | os.PathLike) -> Path:
    """A bundle folder (holding ``configs/``) from a path or a bundle name under the repository's ``bundles/``."""
    path = Path(bundle)
    for candidate in (path, _BUNDLES / path):
        if (candidate / "configs").is_dir():
            return candidate.resolve()
    known = sorted(p.name for p in _BUNDLES.glob("*") if (p / "configs").is_dir())
    raise InputError(f"bundle {str(bundle)!r} not found: give a bundle folder or one of {known}")


def _stem(path: Path) -> str:
    name = path.name
    return next((name[: -len(s)] for s in IMAGE_SUFFIXES if name.lower().endswith(s)), name)


def _images_in(folder: Path) -> dict[str, Path]:
    """``{name without extension: path}`` of the image files in ``folder`` (hidden files ignored)."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return {_stem(p): p for p in files if p.name.lower().endswith(IMAGE_SUFFIXES)}


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and os.path.samefile(a, b)


def pair_files(
    moving: str | os.PathLike,
    fixed: str | os.PathLike,
    moving_label: str | os.PathLike | None = None,
    fixed_label: str | os.PathLike | None = None,
) -> list[dict[str, str]]:
    """Pair dicts ``{moving_image, fixed_image[, moving_label, fixed_label]}`` (file paths) for a bundle's ``pairs``.

    ``moving`` and ``fixed`` are two files (one pair) or two folders, whose image files (:data:`IMAGE_SUFFIXES`)
    are paired by name: every name must be in both folders. Label maps are given for both sides or neither,
    as files (with files) or folders holding a file of each image's name. A pair of one file with itself, or
    of a folder with itself, is refused. Raises :class:`InputError` (missing path, mismatched names, ...).
    """
    if (moving_label is None) != (fixed_label is None):
        raise InputError("give both --moving_label and --fixed_label, or neither")
    moving, fixed = Path(moving), Path(fixed)
    for name, path in (("MOVING", moving), ("FIXED", fixed)):
        if not path.exists():
            raise InputError(f"{name} not found: {path}")
    labels = None if moving_label is None else (Path(moving_label), Path(fixed_label))
    if moving.is_file() and fixed.is_file():
        if _same_file(moving, fixed):
            raise InputError(f"MOVING and FIXED are the same file ({moving}): an image is not registered to itself")
        pair = {"moving_image": str(moving), "fixed_image": str(fixed)}
        if labels is not None:
            if not all(p.is_file() for p in labels):
                raise InputError(f"with image files, the label maps must be files, got {labels[0]} and {labels[1]}")
            pair.update(moving_label=str(labels[0]), fixed_label=str(labels[1]))
        return [pair]
    if not (moving.is_dir() and fixed.is_dir()):
        raise InputError(f"MOVING and FIXED must both be files or both be folders, got {moving} and {fixed}")
    if _same_file(moving, fixed):
        raise InputError(f"MOVING and FIXED are the same folder ({moving}): pairing by name would register every image to itself")
    moving_images, fixed_images = _images_in(moving), _images_in(fixed)
    unmatched = sorted(set(moving_images) ^ set(fixed_images))
    if unmatched:
        raise InputError(f"images are paired by name; these names are in only one of {moving} and {fixed}: {unmatched}")
    if not moving_images:
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {moving}")
    if labels is not None and not all(p.is_dir() for p in labels):
        raise InputError(f"with image folders, the label maps must be folders, got {labels[0]} and {labels[1]}")
    label_files = None if labels is None else [_images_in(p) for p in labels]
    pairs = []
    for name in moving_images:
        pair = {"moving_image": str(moving_images[name]), "fixed_image": str(fixed_images[name])}
        if label_files is not None:
            for (_, key), found, folder in zip(_PAIR_KEYS, label_files, labels):
                if name not in found:
                    raise InputError(f"no label map named {name!r} in {folder}")
                pair[key] = str(found[name])
        pairs.append(pair)
    return pairs


def check_pair_images(pairs: Sequence[Mapping[str, Any]], spatial_dims: int = 3) -> None:
    """Read every file of ``pairs`` with :func:`monai_ext.io.native.load_image`; raise :class:`InputError` if any
    is missing, unreadable, not ``spatial_dims``-D, non-finite, or a label map off its image's grid; also
    refuse a pair whose moving and fixed image are the same file."""
    for index, pair in enumerate(pairs):
        if not isinstance(pair, Mapping) or not {"moving_image", "fixed_image"} <= set(pair):
            raise InputError(f"pairs[{index}] must be a dict with moving_image and fixed_image, got {pair!r}")
        if _same_file(Path(pair["moving_image"]), Path(pair["fixed_image"])):
            raise InputError(f"pairs[{index}]: moving and fixed image are the same file {pair['moving_image']}")
        try:
            for image_key, label_key in _PAIR_KEYS:
                image = load_image(pair[image_key], spatial_dims)
                if pair.get(label_key) is not None:
                    load_image(pair[label_key], spatial_dims, label=True, reference=image)
        except (FileNotFoundError, ValueError) as err:
            raise InputError(str(err)) from None


class _PairReport:
    """Ignite handler: advance a progress bar and print :func:`summary_line` after every evaluated pair.

    Attached after the bundle's own handlers, so it runs once the pair's outputs are written. The numbers are
    those of the pair's ``metrics.json`` when the bundle wrote one into ``<output_dir>/<pair>/``, otherwise
    :func:`~monai_ext.engines.registration.pair_metrics` of the evaluator output.
    """

    def __init__(self, total: int, output_dir: Path | None) -> None:
        self.bar = tqdm(total=total, unit="pair", desc="registration", file=sys.stderr, dynamic_ncols=True)
        self.output_dir = output_dir
        self.rows: list[dict[str, Any]] = []

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        items = decollate_batch(output, detach=True) if isinstance(output, Mapping) else list(output)
        for item in items:
            index = len(self.rows)
            name = pair_folder_name(item, index)
            folder = None if self.output_dir is None else self.output_dir / name
            if folder is not None and (folder / "metrics.json").is_file():
                row = json.loads((folder / "metrics.json").read_text())
            else:
                with warnings.catch_warnings():  # MONAI's Dice warns about labels absent from one map
                    warnings.simplefilter("ignore", UserWarning)
                    row = pair_metrics(item, index=index)
            row["name"] = name
            if folder is not None and folder.is_dir():
                row["output"] = str(folder)
            self.rows.append(row)
            self.bar.write(summary_line(row, name), file=sys.stdout)
            self.bar.update(1)


def _config_files(bundle_dir: Path, names: Sequence[str]) -> list[str]:
    files = [bundle_dir / "configs" / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputError(f"bundle {bundle_dir} has no {missing}")
    return [str(f) for f in files]


def run_bundle(
    bundle: str | os.PathLike,
    configs: Sequence[str],
    override: Mapping[str, Any],
    engine_id: str = "evaluator",
) -> list[dict[str, Any]]:
    """Run a bundle workflow (``monai.bundle.create_workflow`` on ``configs`` with ``override``) with a report per pair.

    Before anything runs: when the config has ``pairs``, every file is checked (:func:`check_pair_images`,
    dimensionality from ``network_def#spatial_dims``); when it has ``load_pretrained`` true, ``ckpt_path`` must
    exist. Then the ``engine_id`` evaluator gets a progress bar and a summary line per pair.

    Args:
        bundle: bundle folder or name (:func:`bundle_path`).
        configs: config file names under ``<bundle>/configs`` (later ones override earlier ones).
        override: config id -> value (``bundle_root`` defaults to the bundle folder).

    Returns:
        one :func:`~monai_ext.engines.registration.pair_metrics` row per pair (non-finite values as ``None`` when
        read from ``metrics.json``), plus ``name`` (the pair folder name) and ``output`` (that pair's folder under
        the config's ``output_dir``, when the bundle wrote one).
    """
    bundle_dir = bundle_path(bundle)
    files = _config_files(bundle_dir, configs)
    meta = bundle_dir / "configs" / "metadata.json"
    logging_conf = bundle_dir / "configs" / "logging.conf"
    workflow = create_workflow(
        config_file=files,
        meta_file=str(meta) if meta.is_file() else None,
        logging_file=str(logging_conf) if logging_conf.is_file() else None,
        **{"bundle_root": str(bundle_dir), **override},
    )
    parser: ConfigParser = workflow.parser
    for key, value in override.items():  # create_workflow drops None values (e.g. --crop None); set them here
        if value is None:
            parser[key] = None
    if "pairs" in parser:
        check_pair_images(parser.get_parsed_content("pairs"), int(parser.get("network_def#spatial_dims", 3)))
    if "load_pretrained" in parser and parser.get_parsed_content("load_pretrained") and "ckpt_path" in parser:
        ckpt = Path(parser.get_parsed_content("ckpt_path"))
        if not ckpt.is_file():
            raise InputError(
                f"trained weights not found: {ckpt} (train the bundle, or register without them: "
                "--load_pretrained False --instance_optimization_steps N)"
            )
    _announce_weights(parser)
    engine = parser.get_parsed_content(engine_id)  # cached: the workflow's run expression uses this object
    output_dir = Path(parser.get_parsed_content("output_dir")) if "output_dir" in parser else None
    report = _PairReport(len(engine.data_loader), output_dir)
    engine.add_event_handler(Events.ITERATION_COMPLETED, report)
    try:
        workflow.run()
        workflow.finalize()
    finally:
        report.bar.close()
    return report.rows


def _announce_weights(parser: ConfigParser) -> None:
    """Say so when a run uses no trained weights (``load_pretrained`` false), with or without instance optimisation."""
    if "load_pretrained" not in parser or parser.get_parsed_content("load_pretrained"):
        return
    steps = parser.get_parsed_content("instance_optimization_steps") if "instance_optimization_steps" in parser else 0
    if steps:
        lr = parser.get_parsed_content("instance_optimization_lr")
        print(
            f"no trained weights: the network starts from random weights and is optimised on each pair for {steps} "
            f"Adam steps (lr {lr}) before registering it (instance optimisation)"
        )
    else:
        print("warning: no trained weights and no instance optimisation: the registration uses random weights")


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
    return sum(values) / len(values) if values else math.nan


def _print_totals(rows: Sequence[Mapping[str, Any]]) -> None:
    totals = f"{len(rows)} pair(s)"
    if any("dice" in r for r in rows):
        totals += f": mean Dice {_mean(rows, 'dice_before'):.3f} -> {_mean(rows, 'dice'):.3f}"
    print(totals + f", mean folding {100 * _mean(rows, 'folding_fraction'):.3f}% of voxels")


def register(
    bundle: str,
    moving: str,
    fixed: str,
    out: str,
    moving_label: str | None = None,
    fixed_label: str | None = None,
    config: str | Sequence[str] = (),
    **override: Any,
) -> list[dict[str, Any]]:
    """Register MOVING to FIXED with ``<bundle>/configs/inference.json`` and write the outputs into ``out``.

    Args:
        bundle: bundle folder or name under ``bundles/``.
        moving, fixed: two image files or two folders paired by file name (:func:`pair_files`).
        out: output folder (the config's ``output_dir``): one sub-folder per pair, as the bundle writes it.
        moving_label, fixed_label: optional label maps (files or folders) for Dice before / after.
        config: extra config files under ``<bundle>/configs`` merged after ``inference.json`` (e.g. ``demo.json``).
        override: other config overrides, e.g. ``load_pretrained=False, instance_optimization_steps=50``.

    Returns:
        the per-pair rows of :func:`run_bundle`.
    """
    pairs = pair_files(moving, fixed, moving_label, fixed_label)
    extra = [config] if isinstance(config, str) else list(config)
    rows = run_bundle(bundle, ["inference.json", *extra], {**override, "pairs": pairs, "output_dir": str(out)})
    _print_totals(rows)
    return rows


def evaluate(
    bundle: str,
    dataset_dir: str | None = None,
    out: str | None = None,
    config: Sequence[str] = ("train.json", "evaluate.json"),
    **override: Any,
) -> list[dict[str, Any]]:
    """Evaluate the bundle's trained network on its test pairs (``train.json`` + ``evaluate.json`` by default).

    ``dataset_dir`` and ``out`` override the config's ``dataset_dir`` and ``output_dir`` (the bundle writes
    ``per_pair.csv`` / ``summary.csv`` / ``summary.json`` under it). Returns the per-pair rows of :func:`run_bundle`.
    """
    if dataset_dir is not None:
        override["dataset_dir"] = str(dataset_dir)
    if out is not None:
        override["output_dir"] = str(out)
    rows = run_bundle(bundle, list(config), override, engine_id="validate#evaluator")
    _print_totals(rows)
    return rows


def main(argv: Sequence[str] | None = None, commands: Mapping[str, Callable[..., Any]] | None = None) -> int:
    """Run a command with python-fire; returns the exit status (2 and ``error: ...`` on stderr for bad input)."""
    import fire

    if commands is None:
        from monai_ext.demo import demo  # demo builds on this module

        commands = {"register": register, "evaluate": evaluate, "demo": demo}
    try:
        fire.Fire(dict(commands), command=None if argv is None else list(argv), name="monai_ext", serialize=_quiet)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except fire.core.FireExit as exit_:
        return int(exit_.code or 0)
    return 0


def _quiet(result: Any) -> None:
    """Fire ``serialize`` hook: commands print their own report, so return values are not echoed."""
    return None
