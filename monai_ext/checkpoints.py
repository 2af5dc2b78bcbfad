"""Load official (reference implementation) checkpoints into the ``monai_ext`` networks.

KeyMorph / BrainMorph: the official container ``{'epoch', 'args', 'state_dict', 'optimizer'}`` holding the
``DataParallel``-wrapped backbone's state dict (keys ``module.<name>`` or ``module.backbone.<name>``) is
renamed to :class:`~monai_ext.networks.keypoints.ConvKeypointNet` /
:class:`~monai_ext.networks.keypoints.TruncatedUNetKeypointNet` names.

SITReg: checkpoints of ``honkamj/SITReg`` (``model_epoch_EEE.pt`` with the network under
``"registration_network"``, or a bare ``model.state_dict()``) are renamed to the module names of
:class:`monai_ext.networks.sitreg.SITReg`; the reference's empty ``._indicator`` buffers (coordinate
system helpers) are dropped.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import re
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from monai_ext.errors import InputError, MissingInputError
from monai_ext.networks.keypoints import ConvKeypointNet, KeypointDetector, TruncatedUNetKeypointNet
from monai_ext.networks.sitreg import SITReg
from monai_ext.spatial.inversion import AndersonSolver, MaxAbsResidual, RelativeL2Residual

__all__ = [
    "sitreg_from_reference_config",
    "convert_sitreg_state_dict",
    "load_sitreg_checkpoint",
    "to_network_state_dict",
    "check_state_dict",
    "convert_keymorph_state_dict",
    "load_keymorph_checkpoint",
    "load_keymorph_weights",
]

_DEFORMATION_PREFIX = "_not_none_dense_extration_networks"  # sic, the reference's attribute name

_WB = r"(weight|bias)"
_ENCODER = r"_feature_extractor\."
_DOWN = _ENCODER + r"downsampling_blocks\.(\d+)\."
_DEFORM = _DEFORMATION_PREFIX + r"\.(\d+)\."
_AFFINE = r"_affine_extraction_network\."

# (reference key pattern, our key template); "{level}" is filled from the deformation-block index
_SITREG_RULES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(pattern), template)
    for pattern, template in (
        (_ENCODER + r"initial_projection\." + _WB, r"encoder.initial_projection.conv.\1"),
        (_ENCODER + r"initial_convs\.convolutions\.(\d+)\.conv\." + _WB, r"encoder.initial_block.\1.conv.\2"),
        (_ENCODER + r"initial_convs\.normalizers\.(\d+)\." + _WB, r"encoder.initial_block.\1.adn.N.\2"),
        (_DOWN + r"downsampling\.conv\." + _WB, r"encoder.down_blocks.\1.strided_conv.conv.\2"),
        (_DOWN + r"projection\.conv\." + _WB, r"encoder.down_blocks.\1.skip_projection.conv.\2"),
        (_DOWN + r"conv\.convolutions\.(\d+)\.conv\." + _WB, r"encoder.down_blocks.\1.block.\2.conv.\3"),
        (_DOWN + r"conv\.normalizers\.(\d+)\." + _WB, r"encoder.down_blocks.\1.block.\2.adn.N.\3"),
        (_DEFORM + r"convolutions\.convolutions\.(\d+)\.conv\." + _WB, r"deformation_blocks.{level}.block.\2.conv.\3"),
        (_DEFORM + r"convolutions\.normalizers\.(\d+)\." + _WB, r"deformation_blocks.{level}.block.\2.adn.N.\3"),
        (_DEFORM + r"final_convolution\.conv\." + _WB, r"deformation_blocks.{level}.final_conv.conv.\2"),
        (_AFFINE + r"linears\.0\." + _WB, r"affine_head.mlp.0.\1"),
        (_AFFINE + r"linears\.1\." + _WB, r"affine_head.mlp.2.\1"),
        (_AFFINE + r"final_linear\." + _WB, r"affine_head.mlp.4.\1"),
    )
)


_STOP_CRITERIA = {"MaxElementWiseAbsStopCriterion": MaxAbsResidual, "RelativeL2ErrorStopCriterion": RelativeL2Residual}


def _reference_solver(entry: Mapping | None) -> AndersonSolver | None:
    """Our Anderson solver from a reference ``{"stop_criterion": {"type", "args"}, "arguments": {...}}`` entry."""
    if entry is None:
        return None
    criterion = entry.get("stop_criterion", {})
    name = str(criterion.get("type", "MaxElementWiseAbsStopCriterion")).rsplit(".", 1)[-1]
    if name not in _STOP_CRITERIA:
        raise ValueError(f"unsupported fixed-point stop criterion {name!r}, expected one of {sorted(_STOP_CRITERIA)}")
    args = {"min_iterations": 1, "max_iterations": 50, "threshold": 1e-2, **criterion.get("args", {})}
    arguments = dict(entry.get("arguments", {}))
    return AndersonSolver(
        _STOP_CRITERIA[name](**args),
        memory=arguments.pop("memory_length", 4),
        **{key: arguments.pop(key) for key in ("beta", "matrix_epsilon") if key in arguments},
    )


def sitreg_from_reference_config(model_config: Mapping) -> SITReg:
    """Build a :class:`SITReg` from a reference ``model`` config (``training_config.json`` -> ``"model"``).

    Maps ``n_features_per_resolution`` -> ``features``, ``n_feature_convolutions_per_resolution`` ->
    ``feature_convolutions``, ``n_transformation_features_per_resolution`` -> ``deformation_features``,
    ``n_transformation_convolutions_per_resolution`` -> ``deformation_convolutions``, ``normalizer.args.n_groups``
    -> ``groups``, ``use_normalization_in_deformation_extraction`` (default true) -> ``deformation_normalization``,
    ``max_control_point_multiplier``, ``predict_affine``, ``input_shape``, ``voxel_size``, ``n_input_channels``
    and ``displacement_field_inversion`` (Anderson solvers). Only the settings of the published configs are
    supported (GroupNorm, ReLU, transformation downsampling factor 1); anything else raises ``ValueError``.
    """
    normalizer = model_config.get("normalizer", {"type": "GroupNormalizerFactory", "args": {"n_groups": 2}})
    if normalizer.get("type") != "GroupNormalizerFactory":
        raise ValueError(f"only GroupNormalizerFactory is supported, got normalizer {normalizer!r}")
    activation = model_config.get("activation", {"type": "ReLUFactory"})
    if activation.get("type") != "ReLUFactory":
        raise ValueError(f"only ReLUFactory is supported, got activation {activation!r}")
    factor = model_config.get("transformation_downsampling_factor")
    if factor is not None and any(float(f) != 1.0 for f in factor):
        raise ValueError(f"only transformation_downsampling_factor 1 is supported, got {factor}")
    input_shape = model_config["input_shape"]
    inversion = model_config.get("displacement_field_inversion", {})
    return SITReg(
        spatial_dims=len(input_shape),
        in_channels=model_config.get("n_input_channels", 1),
        features=model_config["n_features_per_resolution"],
        feature_convolutions=model_config["n_feature_convolutions_per_resolution"],
        deformation_features=model_config["n_transformation_features_per_resolution"],
        deformation_convolutions=model_config["n_transformation_convolutions_per_resolution"],
        groups=normalizer.get("args", {}).get("n_groups", 2),
        deformation_normalization=model_config.get("use_normalization_in_deformation_extraction", True),
        control_point_multiplier=model_config.get("max_control_point_multiplier", 0.99),
        predict_affine=model_config.get("predict_affine", False),
        input_shape=input_shape,
        voxel_size=model_config.get("voxel_size"),
        forward_solver=_reference_solver(inversion.get("forward_fixed_point_solver")),
        backward_solver=_reference_solver(inversion.get("backward_fixed_point_solver")),
    )


def convert_sitreg_state_dict(
    reference_state_dict: Mapping[str, torch.Tensor], deformation_levels: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Rename a reference SITReg ``state_dict`` to :class:`~monai_ext.networks.sitreg.SITReg`'s keys.

    Args:
        reference_state_dict: ``model.state_dict()`` of the reference ``SITReg`` (tensors are not copied).
        deformation_levels: resolution index (0 finest) of the ``i``-th deformation block of the reference
            (its blocks are numbered over the predicting levels only, finest first), i.e.
            ``SITReg.deformation_levels``. ``None``: block ``i`` is level ``i`` (feature-only levels, if
            any, are the coarsest ones, as in every reference config).

    Returns:
        the renamed state dict (``._indicator`` buffers dropped).

    Raises:
        ValueError: naming every key that is not part of a reference SITReg (a foreign checkpoint).

    Note: the current head of the authors' reference implementation never applies its first affine hidden
    layer whereas our affine head chains both hidden layers, as the paper's code did; weights of an affine
    model trained with that head therefore load but do not compute the same affine.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in reference_state_dict.items():
        if key.endswith("._indicator"):
            continue
        for pattern, template in _SITREG_RULES:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            level = ""
            if key.startswith(_DEFORMATION_PREFIX):
                index = int(match.group(1))
                if deformation_levels is not None and index >= len(deformation_levels):
                    raise ValueError(
                        f"{key!r} refers to deformation block {index} but only {len(deformation_levels)} "
                        f"deformation levels were given ({list(deformation_levels)}): architecture mismatch"
                    )
                level = str(index if deformation_levels is None else deformation_levels[index])
            converted[match.expand(template.replace("{level}", level))] = value
            break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"not a reference SITReg state dict: {len(unknown)} unexpected key(s) {unknown[:10]}"
            + (" ..." if len(unknown) > 10 else "")
        )
    return converted


def load_sitreg_checkpoint(
    model: SITReg, checkpoint: str | PathLike | Mapping[str, torch.Tensor], map_location: str | torch.device = "cpu"
) -> SITReg:
    """Load reference (or already converted) SITReg weights into ``model`` in place and return it.

    Args:
        model: a :class:`SITReg` built with the checkpoint's configuration.
        checkpoint: path of a ``torch.save`` file or a loaded mapping; either a state dict or a training
            checkpoint holding it under ``"registration_network"``. Reference keys are converted with
            :func:`convert_sitreg_state_dict`; keys already in our naming are used as they are.
        map_location: passed to ``torch.load``.

    Raises:
        ValueError: for a foreign checkpoint or an architecture mismatch, naming the missing and
            unexpected keys and the tensors whose shapes differ.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=True)
    state = checkpoint.get("registration_network", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint['registration_network'] must be a state dict, got {type(state).__name__}")
    state = to_network_state_dict(model, state)
    check_state_dict(model, state, "SITReg checkpoint")
    model.load_state_dict(state)
    return model


def to_network_state_dict(network: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` in ``network``'s own parameter names: a reference SITReg state dict is converted
    (:func:`convert_sitreg_state_dict`); anything else is returned as it is."""
    if isinstance(network, SITReg) and any(key.startswith(("_feature_extractor.", _DEFORMATION_PREFIX)) for key in state):
        return convert_sitreg_state_dict(state, network.deformation_levels)
    return dict(state)


def check_state_dict(network: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`~monai_ext.errors.InputError` (a ``ValueError``) naming ``source``, the network class and the
    missing, unexpected and shape-mismatched parameters (up to 5 of each) unless ``state`` fits ``network`` exactly."""
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:
        details = "; ".join(
            f"{label} {names[:5]}{' ...' if len(names) > 5 else ''} ({len(names)})"
            for label, names in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
            if names
        )
        raise InputError(
            f"{source} does not fit {type(network).__name__} as configured (another architecture or other "
            f"network_def settings, e.g. features, levels, deformation_normalization, predict_affine): {details}"
        )


_RENAMES = (
    (re.compile(r"^(block\d+)\.conv\.(weight|bias)$"), r"\1.conv.conv.\2"),
    (
        re.compile(
            r"^((?:en|de)coders\.\d+)\.basic_module\.SingleConv(\d)\.(groupnorm\.weight|groupnorm\.bias|conv\.weight)$"
        ),
        r"\1.conv\2.\3",
    ),
    (re.compile(r"^(final_conv\.(?:weight|bias))$"), r"\1"),
)


def convert_keymorph_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a KeyMorph / BrainMorph backbone state dict to :class:`ConvKeypointNet` /
    :class:`TruncatedUNetKeypointNet` names.

    Leading ``module.`` (``DataParallel``) and ``backbone.`` (``dev``-branch wrappers) are stripped,
    then ``block{n}.conv.*`` -> ``block{n}.conv.conv.*``,
    ``{en,de}coders.{k}.basic_module.SingleConv{j}.*`` -> ``{en,de}coders.{k}.conv{j}.*``,
    ``final_conv.*`` unchanged.

    Raises:
        ValueError: for a key of no known backbone (foreign checkpoint, unsupported backbone or norm).
    """
    converted = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(("module.", "backbone.")):
            name = name.split(".", 1)[1]
        for pattern, replacement in _RENAMES:
            if pattern.match(name):
                converted[pattern.sub(replacement, name)] = value
                break
        else:
            raise ValueError(
                f"state_dict key {key!r} belongs to no supported KeyMorph backbone "
                "('conv' with instance norm or 'truncatedunet'); is this a KeyMorph checkpoint?"
            )
    return converted


def _build_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Backbone with the architecture of a converted state dict (type, in_channels, K, dims, levels)."""
    if "block1.conv.conv.weight" in state_dict and "block9.conv.conv.weight" in state_dict:
        first, last = state_dict["block1.conv.conv.weight"], state_dict["block9.conv.conv.weight"]
        return ConvKeypointNet(first.shape[1], last.shape[0], spatial_dims=first.ndim - 2)
    if "encoders.0.conv1.conv.weight" in state_dict and "final_conv.weight" in state_dict:
        first = state_dict["encoders.0.conv1.conv.weight"]
        num_levels = len({k.split(".")[1] for k in state_dict if k.startswith("encoders.")})
        num_decoders = len({k.split(".")[1] for k in state_dict if k.startswith("decoders.")})
        return TruncatedUNetKeypointNet(
            first.shape[1],
            state_dict["final_conv.weight"].shape[0],
            spatial_dims=first.ndim - 2,
            f_maps=state_dict["encoders.0.conv2.conv.weight"].shape[0],
            num_levels=num_levels,
            num_truncated=num_levels - 1 - num_decoders,
        )
    raise InputError(f"cannot infer a KeyMorph backbone from the state_dict keys {sorted(state_dict)[:5]} ...")


def _load_strict(network: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    check_state_dict(network, state_dict, source)
    network.load_state_dict(state_dict, strict=True)


def load_keymorph_checkpoint(
    path: str | PathLike,
    network: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
    trusted: bool = False,
) -> nn.Module:
    """Load an official KeyMorph / BrainMorph checkpoint into a keypoint backbone.

    The container is ``torch.save({'epoch', 'args', 'state_dict', 'optimizer'})`` with the state
    dict of the ``DataParallel``-wrapped backbone (keys ``module.<name>`` or
    ``module.backbone.<name>``); a bare state dict is accepted too. Only ``state_dict`` is used.

    Args:
        path: checkpoint file (e.g. ``foundation-numkey256-numlevels5.pth.tar``).
        network: a :class:`ConvKeypointNet`, :class:`TruncatedUNetKeypointNet` or a
            :class:`KeypointDetector` around one, loaded in place. ``None``: build the backbone the
            keys describe (type, in_channels, K, levels; GroupNorm groups 8) in eval mode.
        map_location: as in ``torch.load``.
        trusted: ``False`` (default) loads with ``weights_only=True`` allowing only
            ``argparse.Namespace`` and ``pathlib.PosixPath`` besides tensors (what the reference
            stores in ``args``); ``True`` unpickles anything (``weights_only=False``): only for files
            you trust.

    Returns:
        ``network`` (or the new backbone) with the weights loaded.

    Raises:
        MissingInputError: no such file (a ``FileNotFoundError``).
        InputError: unreadable, foreign or mismatching (architecture, K) checkpoint (a ``ValueError``).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingInputError(f"KeyMorph checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, pathlib.PosixPath]):
            container = torch.load(path, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as err:
        reason = str(err).partition("WeightsUnpickler error:")[2].split(" Please use")[0].strip()
        reason = (reason or str(err)).strip().splitlines()[0]
        hint = (
            ""
            if trusted
            else (
                " (read with weights_only=True, which allows only tensors, argparse.Namespace and PosixPath;"
                " for a checkpoint you trust pass trusted=True)"
            )
        )
        raise InputError(f"cannot unpickle {path}: {reason}{hint}") from err
    except (RuntimeError, EOFError) as err:
        raise InputError(f"{path} is not a readable torch checkpoint: {err}") from err
    if isinstance(container, Mapping) and "state_dict" in container:
        state_dict = container["state_dict"]
    else:
        state_dict = container
    if (
        not isinstance(state_dict, Mapping)
        or not state_dict
        or not all(isinstance(v, torch.Tensor) for v in state_dict.values())
    ):
        keys = list(container)[:6] if isinstance(container, Mapping) else type(container).__name__
        raise InputError(
            f"{path} is not a KeyMorph checkpoint: expected a dict with a 'state_dict' of tensors, got {keys}"
        )
    state_dict = convert_keymorph_state_dict(state_dict)
    if network is None:
        network = _build_from_state_dict(state_dict).eval()
        _load_strict(network, state_dict, f"KeyMorph checkpoint {path}")
        return network
    _load_strict(network.backbone if isinstance(network, KeypointDetector) else network, state_dict, f"KeyMorph checkpoint {path}")
    return network


def load_keymorph_weights(
    network: nn.Module, path: str | os.PathLike | None, keys: Sequence[str] = ("model", "network")
) -> nn.Module:
    """Load weights into a :class:`~monai_ext.networks.keymorph.KeyMorph` (in place; ``None`` / ``""`` = keep them).

    A bundle checkpoint (``.pt`` of ``CheckpointSaver``: the KeyMorph state dict under the first of ``keys`` it
    holds, e.g. ``model.pt`` or a pretraining ``checkpoint_epoch=<E>.pt``) is loaded strictly; anything else is
    read as an official KeyMorph / BrainMorph checkpoint into ``network.backbone``
    (:func:`~monai_ext.checkpoints.load_keymorph_checkpoint`, ``weights_only`` loading). A missing, unreadable or
    mismatching file raises :class:`~monai_ext.errors.InputError` naming it.
    """
    if path is None or str(path) == "":
        return network
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"checkpoint not found: {path}")
    if path.suffix == ".pt":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle / zip errors of a corrupt or foreign file
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"cannot read checkpoint {path} ({reason}): give a torch.save file of weights") from None
        for key in keys:
            if isinstance(state, Mapping) and key in state:
                _load_strict(network, state[key], f"checkpoint {path}")
                return network
    load_keymorph_checkpoint(path, network.backbone)
    return network
