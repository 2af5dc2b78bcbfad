"""Load official (reference implementation) checkpoints into the ``monai_ext`` networks.

SITReg: checkpoints of ``honkamj/SITReg`` (``model_epoch_EEE.pt`` with the network under
``"registration_network"``, or a bare ``model.state_dict()``) are renamed to the module names of
:class:`monai_ext.networks.sitreg.SITReg`; the reference's empty ``._indicator`` buffers (coordinate
system helpers) are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from os import PathLike

import torch

from monai_ext.networks.sitreg import SITReg
from monai_ext.spatial.inversion import AndersonSolver, MaxAbsResidual, RelativeL2Residual

__all__ = [
    "sitreg_from_reference_config",
    "convert_sitreg_state_dict",
    "load_sitreg_checkpoint",
    "to_network_state_dict",
    "check_state_dict",
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


def _reference_solver(spec: Mapping | None) -> AndersonSolver | None:
    """Our Anderson solver from a reference ``{"stop_criterion": {"type", "args"}, "arguments": {...}}`` entry."""
    if spec is None:
        return None
    criterion = spec.get("stop_criterion", {})
    name = str(criterion.get("type", "MaxElementWiseAbsStopCriterion")).rsplit(".", 1)[-1]
    if name not in _STOP_CRITERIA:
        raise ValueError(f"unsupported fixed-point stop criterion {name!r}, expected one of {sorted(_STOP_CRITERIA)}")
    args = {"min_iterations": 1, "max_iterations": 50, "threshold": 1e-2, **criterion.get("args", {})}
    arguments = dict(spec.get("arguments", {}))
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

    Note: the reference HEAD never applies its first affine hidden layer (spec section 12.2) whereas our
    affine head chains both hidden layers, as the paper's code did; weights of an affine model trained with
    HEAD therefore load but do not compute the same affine.
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
    """Raise ``ValueError`` naming ``source``, the network class and the missing, unexpected and
    shape-mismatched parameters (up to 5 of each) unless ``state`` fits ``network`` exactly."""
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
        raise ValueError(
            f"{source} does not fit {type(network).__name__} as configured (another architecture or other "
            f"network_def settings, e.g. features, levels, deformation_normalization, predict_affine): {details}"
        )
