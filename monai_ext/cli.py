"""Command-line front end, ``python -m monai_ext <command>``: thin wrappers over the bundles.

Commands::

    python -m monai_ext register BUNDLE MOVING FIXED OUT [--moving_label M --fixed_label F] [--overwrite]
                                 [--no_weights] [--weights PATH] [--<config id> VALUE ...]
    python -m monai_ext evaluate BUNDLE [--dataset_dir DIR] [--out DIR] [--<config id> VALUE ...]
    python -m monai_ext demo [--out demo_out] [--seed 0] [--<config id> VALUE ...]
    python -m monai_ext COMMAND [BUNDLE] --help       # every flag with its default (and the bundle's config ids)

``BUNDLE`` is a bundle folder, the name of one under this repository's ``bundles/`` (e.g. ``sitreg_oasis``) or an
alias of :data:`BUNDLE_ALIASES`: ``brain`` is ``sitreg_brain_raw``, raw (unaligned) brain pairs registered by the
KeyMorph affine then the SITReg deformable brain model, one transform per pair (``affine_itk.mat`` +
``deformable_field_itk.nii.gz``): ``antsApplyTransforms -d 3 -i moving.nii.gz -r fixed.nii.gz
-t deformable_field_itk.nii.gz -t affine_itk.mat -o warped.nii.gz``.
``register`` runs the bundle's ``configs/inference.json`` workflow with ``pairs`` and ``output_dir`` overridden;
``evaluate`` runs ``configs/train.json`` + ``configs/evaluate.json`` (the bundle's test-set evaluation); ``demo``
is :func:`monai_ext.demo.demo`, added to the commands of :func:`main` by :mod:`monai_ext.__main__` (the demo
builds on :func:`run_bundle` here, so this module does not import it). Everything about the registration itself (preprocessing, network, weights,
instance optimisation, written files) comes from the configs: this module turns the command line into
overrides, checks every input and the output location before any compute, and reports one line per pair.

Flags are ``--name VALUE``, ``--name=VALUE`` or, for a boolean, ``--name`` alone (true). Values are read as
Python literals (python-fire's parser: ``[8,8]``, ``None``, ``1e-4``; anything else stays a string). A flag that
is neither a parameter of the command nor a config id of the bundle (``--instance_optimization_steps 50``,
``--network_def#features "[8,8]"``) is an error naming the valid ones; so is a boolean (a flag or a config id
whose value is ``true`` / ``false``) given anything but true / false, yes / no, on / off or 1 / 0 (any case).

MOVING / FIXED are two image files (one pair) or two folders, paired by file name (``a.nii.gz`` in MOVING with
``a.nii.gz`` in FIXED); an image is never registered to itself. Label maps (``--moving_label`` /
``--fixed_label``, files or folders named like their images) add Dice before / after to the summary. The same
flags serve SITReg and KeyMorph bundles: ``--no_weights`` registers without trained weights (SITReg:
``load_pretrained=False``; KeyMorph: ``checkpoint=""``; add ``--instance_optimization_steps N`` to optimise the
network on each pair first) and ``--weights PATH`` uses another weights file.

Bad input (a missing or unreadable file, an image of the wrong dimensionality, infinite voxels, a constant image,
a label map whose grid differs from its image's, a self pair, an output location that is a file or not writable,
an existing pair folder without ``--overwrite``, missing weights, an unknown flag or a bad value) is reported
as one line ``error: <message>`` on stderr with exit status 2, before anything is computed or written; so is a
pair whose keypoints admit no affine (:class:`~monai_ext.engines.affine_deformable.AffineFitError`, found during
the run: the pairs before it are written, that pair leaves nothing). SIGINT
and SIGTERM stop a command with one line on stderr and exit status 130 / 143; temporary files are removed and
no partial output is left.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.bundle import ConfigParser, create_workflow
from monai.data import decollate_batch
from tqdm import tqdm  # a dependency of huggingface_hub, which this package requires

from monai_ext.data.base import IMAGE_SUFFIXES, image_stem
from monai_ext.engines.affine_deformable import AffineFitError
from monai_ext.metrics.overlap import pair_metrics
from monai_ext.io.outputs import pair_folder_name, pair_folder_names, summary_line
from monai_ext.io.validation import InputError, check_existing_outputs, check_output_dir, check_pairs

__all__ = [
    "InputError",
    "IMAGE_SUFFIXES",
    "BUNDLE_ALIASES",
    "MODE_CONFIGS",
    "as_bool",
    "bundle_path",
    "pair_files",
    "check_pair_images",
    "run_bundle",
    "register",
    "evaluate",
    "main",
]

_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
#: short names of bundles under ``bundles/`` (a bundle folder of the same name in the working directory wins)
BUNDLE_ALIASES = {"brain": "sitreg_brain_raw"}
#: files given beside each image of a pair (``--moving_<kind>`` / ``--fixed_<kind>``) and what they are
_NOUNS = {"label": "label map", "mask": "mask"}


def bundle_path(bundle: str | os.PathLike) -> Path:
    """A bundle folder (holding ``configs/``) from a path, an alias (:data:`BUNDLE_ALIASES`) or a bundle name under
    the repository's ``bundles/``."""
    path = Path(bundle)
    alias = BUNDLE_ALIASES.get(str(bundle))
    for candidate in (path, *([_BUNDLES / alias] if alias else []), _BUNDLES / path):
        if (candidate / "configs").is_dir():
            return candidate.resolve()
    known = sorted(p.name for p in _BUNDLES.glob("*") if (p / "configs").is_dir())
    aliases = sorted(BUNDLE_ALIASES)
    raise InputError(f"bundle {str(bundle)!r} not found: give a bundle folder, an alias {aliases} or one of {known}")


def _images_in(folder: Path) -> dict[str, Path]:
    """``{name without extension: path}`` of the image files in ``folder`` (hidden files ignored)."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return {image_stem(p): p for p in files if p.name.lower().endswith(IMAGE_SUFFIXES)}


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and os.path.samefile(a, b)


def pair_files(
    moving: str | os.PathLike,
    fixed: str | os.PathLike,
    moving_label: str | os.PathLike | None = None,
    fixed_label: str | os.PathLike | None = None,
    moving_mask: str | os.PathLike | None = None,
    fixed_mask: str | os.PathLike | None = None,
) -> list[dict[str, str]]:
    """Pair dicts ``{moving_image, fixed_image[, moving_label, fixed_label][, moving_mask, fixed_mask]}`` (file paths)
    for a bundle's ``pairs``.

    ``moving`` and ``fixed`` are two files (one pair) or two folders, whose image files (:data:`IMAGE_SUFFIXES`)
    are paired by name: every name must be in both folders. Label maps (and masks) are given for both sides or
    neither, as files (with files) or folders holding a file of each image's name. A pair of one file with itself,
    or of a folder with itself, is refused. Raises :class:`InputError` (missing path, mismatched names, ...).
    """
    extras: dict[str, tuple[Path, Path]] = {}
    for kind, (first, second) in zip(_NOUNS, ((moving_label, fixed_label), (moving_mask, fixed_mask))):
        if (first is None) != (second is None):
            raise InputError(f"give both --moving_{kind} and --fixed_{kind}, or neither")
        if first is not None:
            extras[kind] = (Path(first), Path(second))
    moving, fixed = Path(moving), Path(fixed)
    for name, path in (("MOVING", moving), ("FIXED", fixed)) + tuple(
        (f"--{side}_{kind}", path) for kind, paths in extras.items() for side, path in zip(("moving", "fixed"), paths)
    ):
        if not path.exists():
            raise InputError(f"{name} not found: {path}")
    if moving.is_file() and fixed.is_file():
        if _same_file(moving, fixed):
            raise InputError(f"MOVING and FIXED are the same file ({moving}): an image is not registered to itself")
        pair = {"moving_image": str(moving), "fixed_image": str(fixed)}
        for kind, paths in extras.items():
            if not all(p.is_file() for p in paths):
                raise InputError(f"with image files, the {_NOUNS[kind]}s must be files, got {paths[0]} and {paths[1]}")
            pair.update({f"moving_{kind}": str(paths[0]), f"fixed_{kind}": str(paths[1])})
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
    listings: dict[str, tuple[tuple[Path, dict[str, Path]], ...]] = {}
    for kind, paths in extras.items():
        if not all(p.is_dir() for p in paths):
            raise InputError(f"with image folders, the {_NOUNS[kind]}s must be folders, got {paths[0]} and {paths[1]}")
        listings[kind] = tuple((folder, _images_in(folder)) for folder in paths)
    pairs = []
    for name in moving_images:
        pair = {"moving_image": str(moving_images[name]), "fixed_image": str(fixed_images[name])}
        for kind, sides in listings.items():
            for side, (folder, found) in zip(("moving", "fixed"), sides):
                if name not in found:
                    raise InputError(f"no {_NOUNS[kind]} named {name!r} in {folder}")
                pair[f"{side}_{kind}"] = str(found[name])
        pairs.append(pair)
    return pairs


def check_pair_images(pairs: Sequence[Mapping[str, Any]], spatial_dims: int = 3) -> None:
    """Check every file of ``pairs`` (:func:`monai_ext.io.validation.check_pairs`); raise :class:`InputError` if any
    is missing, unreadable, not ``spatial_dims``-D, non-finite, constant, or a label map off its image's grid, or
    if a pair's moving and fixed image are the same file."""
    check_pairs(pairs, spatial_dims)


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def as_bool(value: Any, name: str = "value") -> bool:
    """``value`` as a boolean: ``True`` / ``False``, ``1`` / ``0`` or the words true / false, yes / no, on / off
    (any case); anything else raises :class:`InputError` naming ``name`` (e.g. ``--overwrite``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise InputError(f"{name} takes true or false (also yes/no, on/off, 1/0, any case), got {value!r}")


class _PairReport:
    """Ignite handler: advance a progress bar and print :func:`summary_line` after every evaluated pair.

    Attached after the bundle's own handlers, so it runs once the pair's outputs are written. The numbers are
    those of the pair's ``metrics.json`` when the bundle wrote one into ``<output_dir>/<pair>/``, otherwise
    :func:`~monai_ext.metrics.overlap.pair_metrics` of the evaluator output.
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


def _load_config(files: Sequence[str]) -> ConfigParser:
    """The merged (unparsed) configs, later files overriding earlier ones, as ``monai.bundle`` merges them."""
    parser = ConfigParser()
    parser.read_config(list(files))
    return parser


def _settable_ids(parser: ConfigParser) -> list[str]:
    """The config ids worth setting on the command line: top-level settings (not components, ``imports`` or
    ``+`` merges) and the plain arguments of the network (``network_def#<arg>``)."""
    config = parser.get()

    def setting(value: Any) -> bool:
        return not isinstance(value, dict) and not (isinstance(value, list) and any(isinstance(v, dict) for v in value))

    ids = [k for k, v in config.items() if not k.startswith(("_", "+")) and k not in ("imports", "run", "initialize")]
    ids = [k for k in ids if setting(config[k])]
    network = config.get("network_def")
    if isinstance(network, dict):
        ids += [f"network_def#{k}" for k, v in network.items() if not k.startswith("_") and setting(v)]
    return sorted(ids)


def _check_overrides(parser: ConfigParser, override: Mapping[str, Any], bundle_dir: Path, files: Sequence[str]) -> dict:
    """Refuse override ids the configs do not have; read booleans of boolean config items (:func:`as_bool`)."""
    checked = {}
    for key, value in override.items():
        if key != "bundle_root" and key not in parser:
            names = ", ".join(Path(f).name for f in files)
            valid = " ".join(f"--{k}" for k in _settable_ids(parser))
            raise InputError(
                f"unknown flag --{key}: not a flag of this command nor a config id of {bundle_dir.name} ({names}); "
                f"config ids: {valid} (any nested id as --<id>#<key>)"
            )
        if key in parser and isinstance(parser.get(key), bool):
            value = as_bool(value, f"--{key}")
        checked[key] = value
    return checked


def _input_error(err: BaseException) -> InputError | None:
    """The :class:`InputError` that ``err`` is or was raised from (MONAI wraps errors of config expressions), or
    one carrying the message of an :class:`~monai_ext.engines.affine_deformable.AffineFitError` (a pair the
    affine stage cannot align)."""
    while err is not None:
        if isinstance(err, InputError):
            return err
        if isinstance(err, AffineFitError):
            return InputError(str(err))
        err = err.__cause__ or err.__context__
    return None


def run_bundle(
    bundle: str | os.PathLike,
    configs: Sequence[str],
    override: Mapping[str, Any],
    engine_id: str = "evaluator",
) -> list[dict[str, Any]]:
    """Run a bundle workflow (``monai.bundle.create_workflow`` on ``configs`` with ``override``) with a report per pair.

    Before anything runs: every override must be a config id (booleans are read with :func:`as_bool`); when the
    config has ``pairs``, every file is checked (:func:`monai_ext.io.validation.check_pairs`, dimensionality from
    ``network_def#spatial_dims``); ``output_dir`` must be a writable folder location and, with ``pairs``, the pair
    folders must not exist unless the config's ``overwrite`` is true; trained weights (``ckpt_path`` with
    ``load_pretrained`` true, or a non-empty ``checkpoint``) must exist. Each failure raises :class:`InputError`,
    also when the bundle's own checks (``check_pair_files``) fail inside the workflow. Then the ``engine_id``
    evaluator gets a progress bar and a summary line per pair.

    Args:
        bundle: bundle folder or name (:func:`bundle_path`).
        configs: config file names under ``<bundle>/configs`` (later ones override earlier ones).
        override: config id -> value (``bundle_root`` defaults to the bundle folder).

    Returns:
        one :func:`~monai_ext.metrics.overlap.pair_metrics` row per pair (non-finite values as ``None`` when
        read from ``metrics.json``), plus ``name`` (the pair folder name) and ``output`` (that pair's folder under
        the config's ``output_dir``, when the bundle wrote one).
    """
    bundle_dir = bundle_path(bundle)
    files = _config_files(bundle_dir, configs)
    override = _check_overrides(_load_config(files), override, bundle_dir, files)
    meta = bundle_dir / "configs" / "metadata.json"
    logging_conf = bundle_dir / "configs" / "logging.conf"
    with warnings.catch_warnings():  # MONAI warns that configs run code: the user chose this bundle to run
        warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)
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
    _check_workflow_inputs(parser)
    _announce_weights(parser)
    try:
        engine = parser.get_parsed_content(engine_id)  # cached: the workflow's run expression uses this object
        output_dir = Path(parser.get_parsed_content("output_dir")) if "output_dir" in parser else None
        report = _PairReport(len(engine.data_loader), output_dir)
        engine.add_event_handler(Events.ITERATION_COMPLETED, report)
        try:
            workflow.run()
            workflow.finalize()
        finally:
            report.bar.close()
    except Exception as err:
        cause = _input_error(err)
        if cause is None:
            raise
        raise cause from None
    return report.rows


def _check_workflow_inputs(parser: ConfigParser) -> None:
    """The up-front checks of :func:`run_bundle` on a workflow's parsed config."""
    pairs = None
    if "pairs" in parser:
        pairs = parser.get_parsed_content("pairs")
        check_pairs(pairs, int(parser.get("network_def#spatial_dims", 3)))
    if "output_dir" in parser:
        output_dir = parser.get_parsed_content("output_dir")
        check_output_dir(output_dir)
        if pairs:
            overwrite = bool(parser.get_parsed_content("overwrite")) if "overwrite" in parser else False
            check_existing_outputs(output_dir, pair_folder_names(pairs), overwrite)
    weights = []
    if "load_pretrained" in parser and parser.get_parsed_content("load_pretrained"):
        # ckpt_path: the network's weights (--weights); affine_ckpt_path: an affine stage's (two-stage bundles)
        weights = [str(parser.get_parsed_content(k)) for k in ("ckpt_path", "affine_ckpt_path") if k in parser]
    elif "checkpoint" in parser:
        weights = [str(parser.get_parsed_content("checkpoint") or "")]
    for path in weights:
        if path and not Path(path).is_file():
            raise InputError(
                f"trained weights not found: {path} (train the bundle, give them with --weights PATH (the affine "
                "stage's with --affine_ckpt_path PATH), or register without them: --no_weights "
                "--instance_optimization_steps N)"
            )


def _announce_weights(parser: ConfigParser) -> None:
    """Say so when a run uses no trained weights (``load_pretrained`` false or an empty ``checkpoint``)."""
    if "load_pretrained" in parser:
        untrained = not parser.get_parsed_content("load_pretrained")
    elif "checkpoint" in parser:
        untrained = not parser.get_parsed_content("checkpoint")
    else:
        untrained = False
    if not untrained:
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


#: ``register`` flags that select a mode of a bundle by merging its override config (``configs/<file>``) after
#: ``inference.json``; a bundle without that file keeps the flag as an ordinary config id (or refuses it).
MODE_CONFIGS = {"groupwise": "groupwise.json"}


def register(
    bundle: str,
    moving: str,
    fixed: str,
    out: str,
    moving_label: str | None = None,
    fixed_label: str | None = None,
    moving_mask: str | None = None,
    fixed_mask: str | None = None,
    overwrite: bool = False,
    no_weights: bool = False,
    weights: str | None = None,
    config: str | Sequence[str] = (),
    **override: Any,
) -> list[dict[str, Any]]:
    """Register MOVING to FIXED with ``<bundle>/configs/inference.json`` and write the outputs into ``out``.

    Args:
        bundle: bundle folder, name under ``bundles/`` (SITReg or KeyMorph, the same flags for both) or alias:
            ``brain`` = ``sitreg_brain_raw`` for raw (unaligned) brain scans in any orientation, voxel size and
            position (KeyMorph affine, then SITReg deformable; writes ``affine_itk.mat`` and
            ``deformable_field_itk.nii.gz``, applied by ``antsApplyTransforms -d 3 -i moving.nii.gz -r fixed.nii.gz
            -t deformable_field_itk.nii.gz -t affine_itk.mat -o warped.nii.gz``).
        moving: moving image file, or a folder of images paired by file name with those of ``fixed``.
        fixed: fixed image file or folder.
        out: output folder (the config's ``output_dir``): one sub-folder ``<moving>__<fixed>`` per pair.
        moving_label: moving label map (file or folder), for Dice before / after; give both or neither.
        fixed_label: fixed label map (file or folder).
        moving_mask: moving region mask (file or folder), for bundles that use masks (lung: ``sitreg_nlst``,
            ``sitreg_lung250m_4b`` need them); give both or neither.
        fixed_mask: fixed region mask (file or folder).
        overwrite: write into existing pair folders, replacing only this package's output files (other files
            are kept); without it an existing pair folder is an error.
        no_weights: register without trained weights (random initial network); add
            ``--instance_optimization_steps N`` to optimise the network on each pair first.
        weights: trained weights file to use instead of the bundle's ``models/`` file (``brain``: the deformable
            model's; the affine model's is ``--affine_ckpt_path PATH``).
        config: extra config files under ``<bundle>/configs`` merged after ``inference.json`` (e.g. ``demo.json``).
            A mode flag of :data:`MODE_CONFIGS` adds its file: ``--groupwise true`` is ``--config groupwise.json``
            for a bundle that has that file (KeyMorph: groupwise registration of the images of MOVING).
        override: other ``--<config id> VALUE`` overrides of the bundle's configs, e.g.
            ``--instance_optimization_steps 50`` (``register BUNDLE --help`` lists the ids).

    Returns:
        the per-pair rows of :func:`run_bundle`.
    """
    overwrite, no_weights = as_bool(overwrite, "--overwrite"), as_bool(no_weights, "--no_weights")
    bundle_dir = bundle_path(bundle)
    extra = [config] if isinstance(config, str) else list(config)
    for flag, name in MODE_CONFIGS.items():
        if flag in override and (bundle_dir / "configs" / name).is_file():
            if as_bool(override.pop(flag), f"--{flag}") and name not in extra:
                extra.append(name)
    files = _config_files(bundle_dir, ["inference.json", *extra])
    parser = _load_config(files)
    override = _check_overrides(parser, override, bundle_dir, files)
    # mask files are inputs where the bundle's pair check requires them (lung bundles); LUMIR derives its masks
    required = re.search(r"check_pair_files\([^)]*required=\[([^\]]*)\]", json.dumps(parser.get()))
    uses_masks = required is not None and "moving_mask" in required.group(1)
    if (moving_mask, fixed_mask) != (None, None) and not uses_masks:
        raise InputError(f"--moving_mask/--fixed_mask: bundle {bundle_dir.name} does not use masks; drop them")
    if moving_mask is None and fixed_mask is None and uses_masks:
        raise InputError(f"bundle {bundle_dir.name} needs a mask of each image: give --moving_mask and --fixed_mask")
    pairs = pair_files(moving, fixed, moving_label, fixed_label, moving_mask, fixed_mask)
    check_output_dir(out)
    flags: dict[str, Any] = {"pairs": pairs, "output_dir": str(out)}
    if "overwrite" in parser:
        flags["overwrite"] = overwrite
    elif overwrite:
        raise InputError(f"--overwrite: bundle {bundle_dir.name} has no 'overwrite' config id")
    if no_weights and weights is not None:
        raise InputError("give --no_weights or --weights PATH, not both")
    if "load_pretrained" in parser:  # SITReg bundles
        if no_weights:
            flags["load_pretrained"] = False
        elif weights is not None:
            flags.update(load_pretrained=True, ckpt_path=str(weights))
    elif "checkpoint" in parser:  # KeyMorph bundles
        if no_weights or weights is not None:
            flags["checkpoint"] = "" if no_weights else str(weights)
    elif no_weights or weights is not None:
        raise InputError(f"bundle {bundle_dir.name} has no weights setting (load_pretrained / checkpoint)")
    if "moving" in parser and "fixed" in parser:  # KeyMorph bundles name their inputs too
        flags.update(moving=str(moving), fixed=str(fixed))
        if moving_label is not None:
            flags.update(moving_label=str(moving_label), fixed_label=str(fixed_label))
    clash = sorted(set(override) & {"pairs", "output_dir", "overwrite", "load_pretrained", "ckpt_path", "checkpoint"} & set(flags))
    if clash:
        raise InputError(f"--{clash[0]} is set by the register arguments; drop it")
    rows = run_bundle(bundle_dir, ["inference.json", *extra], {**override, **flags})
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

    Args:
        bundle: bundle folder or name under ``bundles/``.
        dataset_dir: the dataset folder (the config's ``dataset_dir``).
        out: output folder (the config's ``output_dir``): ``per_pair.csv``, ``summary.csv``, ``summary.json``.
        config: config files under ``<bundle>/configs``.
        override: other ``--<config id> VALUE`` overrides.

    Returns:
        the per-pair rows of :func:`run_bundle`.
    """
    if dataset_dir is not None:
        override["dataset_dir"] = str(dataset_dir)
    if out is not None:
        override["output_dir"] = str(out)
    rows = run_bundle(bundle, list(config), override, engine_id="validate#evaluator")
    _print_totals(rows)
    return rows


def _flag_name(token: str) -> str | None:
    """``name`` of a ``--name`` / ``--name=value`` token, else ``None`` (a value, e.g. ``-1`` or a path)."""
    if token.startswith("--") and len(token) > 2 and (token[2].isalpha() or token[2] == "_"):
        return token[2:].split("=", 1)[0]
    return None


def _parse_argv(argv: Sequence[str]) -> tuple[list[str], dict[str, str | bool], bool]:
    """Split ``argv`` into positional arguments, ``{flag: raw value}`` (``True`` for a bare flag) and ``--help``."""
    positional: list[str] = []
    flags: dict[str, str | bool] = {}
    wants_help = False
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name = _flag_name(token)
        if token in ("-h", "--help"):
            wants_help = True
        elif name is None:
            positional.append(token)
        else:
            if name in flags:
                raise InputError(f"--{name} is given twice")
            if "=" in token:
                flags[name] = token.split("=", 1)[1]
            elif i + 1 < len(tokens) and _flag_name(tokens[i + 1]) is None and tokens[i + 1] not in ("-h", "--help"):
                flags[name] = tokens[i + 1]
                i += 1
            else:
                flags[name] = True
        i += 1
    return positional, flags, wants_help


def _raw_string(parameter: inspect.Parameter) -> bool:
    """A parameter whose value is a path or name (annotated ``str``): kept as typed, not read as a literal."""
    annotation = parameter.annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return text.startswith("str") and "Sequence" not in text


def _value(parameter: inspect.Parameter | None, raw: str | bool) -> Any:
    from fire.parser import DefaultParseValue

    if isinstance(raw, bool) or (parameter is not None and _raw_string(parameter)):
        return raw
    return DefaultParseValue(raw)


def _bind(name: str, command: Callable[..., Any], argv: Sequence[str]) -> tuple[list[Any], dict[str, Any]] | None:
    """Arguments of ``command`` from ``argv``; ``None`` after printing the help for ``--help``."""
    positional, flags, wants_help = _parse_argv(argv)
    signature = inspect.signature(command)
    parameters = {k: p for k, p in signature.parameters.items() if p.kind is not p.VAR_POSITIONAL}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    named = {k: p for k, p in parameters.items() if p.kind is not p.VAR_KEYWORD}
    if wants_help:
        print(_help(name, command, positional))
        return None
    required = [k for k, p in named.items() if p.default is p.empty]
    args = [_value(named[k], v) if k in named else v for k, v in zip(required, positional)]
    if len(positional) > len(required):
        raise InputError(f"{name} takes {len(required)} positional argument(s) ({' '.join(k.upper() for k in required)}), got extra {positional[len(required):]}")
    kwargs: dict[str, Any] = {}
    for flag, raw in flags.items():
        parameter = named.get(flag)
        if parameter is None and not takes_any or flag in required[: len(positional)]:
            valid = " ".join(f"--{k}" for k in named if k not in required)
            raise InputError(f"unknown flag --{flag} for {name}; its flags: {valid}")
        value = _value(parameter, raw)
        if parameter is not None and isinstance(parameter.default, bool):
            value = as_bool(value, f"--{flag}")
        elif raw is True and parameter is not None:
            raise InputError(f"--{flag} needs a value")
        kwargs[flag] = value
    missing = [k for k in required[len(positional):] if k not in kwargs]
    if missing:
        raise InputError(f"{name} needs {' '.join(k.upper() for k in required)}; missing {' '.join(k.upper() for k in missing)} (see {name} --help)")
    return args, kwargs


def _help(name: str, command: Callable[..., Any], positional: Sequence[str]) -> str:
    """Usage, description and every flag with its default; with a bundle given, that bundle's config ids."""
    signature = inspect.signature(command)
    required = [k for k, p in signature.parameters.items() if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    flags = [(k, p.default) for k, p in signature.parameters.items() if p.default is not p.empty]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    usage = f"usage: python -m monai_ext {name} {' '.join(k.upper() for k in required)} [flags]"
    lines = [usage, "", inspect.getdoc(command) or ""]
    if "bundle" in required:
        lines += ["", "bundle aliases:"]
        for alias, target in BUNDLE_ALIASES.items():
            meta = _BUNDLES / target / "configs" / "metadata.json"
            title = json.loads(meta.read_text()).get("name", "") if meta.is_file() else ""
            lines.append(f"  {alias} = bundles/{target}" + (f": {title}" if title else ""))
    lines += ["", "flags (default):"]
    lines += [f"  --{k} ({d!r})" for k, d in flags]
    if takes_any:
        lines.append("  --<config id> VALUE: any id of the bundle's configs (give BUNDLE before --help to list them)")
    if takes_any and positional and "bundle" in required:
        try:
            bundle_dir = bundle_path(positional[0])
            default = signature.parameters.get("config")
            names = {"register": ["inference.json"], "evaluate": []}.get(name, [])
            extra = default.default if default is not None and default.default is not default.empty else ()
            names += [extra] if isinstance(extra, str) else list(extra)
            parser = _load_config(_config_files(bundle_dir, names))
        except InputError as err:
            lines.append(f"  ({err})")
        else:
            lines += ["", f"config ids of {bundle_dir.name} ({', '.join(names)}), with their values:"]
            lines += [f"  --{k} ({json.dumps(parser.get(k))})" for k in _settable_ids(parser)]
            lines.append("  (any other nested id as --<id>#<key>, e.g. --dataloader#num_workers)")
    return "\n".join(lines)


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received: unwinds the command (temporary outputs are removed on the way)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum: int, frame: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not interrupt the clean-up
        signal.signal(sig, signal.SIG_IGN)
    logging.disable(logging.CRITICAL)  # the engines log the interruption with a traceback on the way out
    raise _Interrupted(signum)


def main(argv: Sequence[str] | None = None, commands: Mapping[str, Callable[..., Any]] | None = None) -> int:
    """Run a command; returns the exit status: 0, 2 with ``error: ...`` on stderr for bad input, or 130 / 143
    after SIGINT / SIGTERM (one line on stderr, temporary files removed).

    ``commands`` maps command names to functions (default: ``register`` and ``evaluate``). ``python -m monai_ext``
    (:func:`monai_ext.__main__.main`) adds ``demo``: :mod:`monai_ext.demo` builds on this module, so this module
    does not import it.
    """
    if commands is None:
        commands = {"register": register, "evaluate": evaluate}
    argv = list(sys.argv[1:] if argv is None else argv)
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # only the main thread may handle signals
        handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(f"usage: python -m monai_ext {{{','.join(commands)}}} ... (COMMAND --help for its flags)")
            return 0 if argv else 2
        name, *rest = argv
        if name not in commands:
            raise InputError(f"unknown command {name!r}; commands: {', '.join(commands)}")
        bound = _bind(name, commands[name], rest)
        if bound is not None:
            commands[name](*bound[0], **bound[1])
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except _Interrupted as stop:
        print(f"interrupted by {signal.Signals(stop.signum).name}: stopped, temporary files removed", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        logging.disable(logging.NOTSET)
    return 0

