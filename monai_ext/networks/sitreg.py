"""SITReg: symmetric, inverse consistent and topology preserving multi-resolution registration network.

Honkamaa & Marttinen, "SITReg: Multi-resolution architecture for symmetric, inverse consistent, and
topology preserving image registration", MELBA 2024 (doi 10.59275/j.melba.2024-276b).

Conventions (those of ``monai_ext.spatial.sampling``): images ``(B, C, *spatial)`` with 2 or 3 spatial
dims; every deformation is a voxel DDF ``(B, n, *spatial)`` on the full-resolution input grid, channel
``i`` along spatial axis ``i``, multilinear between voxel centres and border-replicated outside. The
*moving* image is image 1 and the *fixed* image is image 2 of the paper: the forward DDF ``u_f`` maps
fixed-grid voxels into the moving image (``warp(moving, u_f)`` resembles ``fixed``), the inverse DDF
``u_i`` maps moving-grid voxels into the fixed image, and ``u_i`` is the inverse of ``u_f`` up to the
fixed-point tolerance and linear resampling.

Algorithm (all geometry in voxel units): a shared ResNet-style encoder gives features at levels
``k = 0`` (full resolution) .. ``L - 1`` (each level ceil-halves the shape; level-``k`` voxel ``j`` is
centred at full-resolution coordinate ``2^k j + (2^k - 1) / 2``). From the coarsest level to the finest,
the features of both images are warped to their common mid-space by the chains ``Aff_f o L_f`` and
``Aff_i o R_f`` and a deformation block predicts two bounded cubic B-spline fields ``A_fwd = U(f1, f2)``
and ``A_rev = U(f2, f1)``; the half-way updates ``F = A_fwd o A_rev^-1`` and ``I = A_rev o A_fwd^-1`` are
exact inverses of each other and enter four full-resolution chains::

    L_f <- L_f o F,   R_f <- R_f o I,   L_i <- I o L_i,   R_i <- F o R_i
    phi_f = Aff_f o L_f o R_i o Aff_f,   phi_i = Aff_i o R_f o L_i o Aff_i

Swapping the two images swaps every ``U(f1, f2)`` with ``U(f2, f1)`` and therefore ``phi_f`` with
``phi_i`` exactly (bit for bit). Levels whose deformation settings are ``None`` only provide features
(e.g. for the affine stage); the level index is the resolution index itself. (The current head of the
authors' reference implementation counts only the predicting levels when it indexes its outputs, so with
feature-only levels its "level 0" output comes after only the coarsest few predicting levels; the
2023 code that produced the paper's results indexed them correctly, as here.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from monai_ext.errors import InputError
from monai_ext.spatial.affine import affine_matrix_from_parameters
from monai_ext.spatial.bspline import bspline_upsample, control_point_bound
from monai_ext.spatial.coordinates import invert_homogeneous, voxel_to_centered_normalized
from monai_ext.spatial.inversion import AndersonSolver, DDFInversion
from monai_ext.spatial.sampling import all_finite, sample, upsample_ddf, voxel_grid

__all__ = [
    "SITRegEncoder",
    "SITRegDeformationBlock",
    "SITRegAffineHead",
    "SITRegLevel",
    "SITRegOutput",
    "SITReg",
]


class _CentredGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, state-dict keys and float64 values) computed with centred statistics.

    PyTorch's CPU kernel for channels-last inputs (the layout the convolutions here work in) forms the group
    variance as ``E[x^2] - E[x]^2`` from float32 running sums and the output as ``x * scale + shift``; where
    a group's mean is large compared with its spread (image intensities, features after a ReLU) both
    cancel, and in float32 the normalised features carry absolute errors up to ~1e-2 (against ~5e-6 here).
    Through the encoder these errors reach the predicted deformations: on the LUMIR configuration with
    displacements of ~10 voxels they made the float32 output 5-10 times less accurate than the
    architecture allows. Here every statistic is a reduction of centred values and the output is
    ``(x - mean) * (rstd * weight) + bias``:

    * ``mean``: per-channel means (cascade-summed), averaged over the channels of the group;
    * ``var``: the group average of per-channel means of ``(x - mean)^2``;
    * the memory layout of ``x`` is kept.

    Gradients are those of these elementwise ops and reductions (the same function as ``nn.GroupNorm``).
    With ``inplace=True`` and no autograd the input is normalised in its own memory (for an input nothing else
    reads, such as a convolution's output), and the squares are summed a few slices at a time: a full-size
    temporary costs more in page faults than its arithmetic on a CPU.
    """

    def __init__(
        self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, inplace: bool = False
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        groups = self.num_groups
        per_group = channels // groups
        dims = tuple(range(2, x.ndim))
        ones = (1,) * (x.ndim - 2)

        def per_channel(group_values: torch.Tensor) -> torch.Tensor:  # (B, G) -> (B, C, 1, ...)
            return group_values[:, :, None].expand(batch, groups, per_group).reshape(batch, channels, *ones)

        tracked = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        mean = x.mean(dim=dims).view(batch, groups, per_group).mean(-1)
        if tracked or not self.inplace:
            centred = x - per_channel(mean)
            square_sums = centred.square().sum(dim=dims)
        else:
            centred = x.sub_(per_channel(mean))
            rows = max(1, _SQUARE_CHUNK // max(1, x[:, :, 0].numel()))
            square_sums = sum(part.square().sum(dim=dims) for part in centred.split(rows, dim=2))
        var = (square_sums / math.prod(x.shape[2:])).view(batch, groups, per_group).mean(-1)
        scale = per_channel((var + self.eps).rsqrt())
        if self.weight is not None:
            scale = scale * self.weight.view(1, channels, *ones)
        bias = None if self.bias is None else self.bias.view(1, channels, *ones)
        if tracked:
            return centred * scale if bias is None else torch.addcmul(bias, centred, scale)
        centred.mul_(scale)  # no autograd: the temporary (or the input) becomes the output
        return centred if bias is None else centred.add_(bias)


# elements per part when the squares of a GroupNorm input are summed part by part (8 MiB in float32)
_SQUARE_CHUNK = 1 << 21


def _conv_block(
    spatial_dims: int, in_channels: int, out_channels: int, n_convolutions: int, groups: int | None
) -> nn.Sequential:
    """``n_convolutions`` x [3^n conv (zero padding 1, bias) -> GroupNorm(groups) if ``groups`` -> ReLU].

    The ReLU works in place on the conv / GroupNorm output (neither backward needs that output). The
    GroupNorm is :class:`_CentredGroupNorm` (``nn.GroupNorm`` with float32-accurate statistics), which without
    autograd normalises the conv output in place.
    """
    norm = ("group", {"num_groups": groups}) if groups else None
    units = [
        Convolution(
            spatial_dims,
            in_channels if j == 0 else out_channels,
            out_channels,
            kernel_size=3,
            padding=1,
            act=("relu", {"inplace": True}),
            norm=norm,
            adn_ordering="NA" if groups else "A",
        )
        for j in range(n_convolutions)
    ]
    if groups:
        for unit in units:
            native = unit.adn.N
            unit.adn.N = _CentredGroupNorm(
                native.num_groups, native.num_channels, native.eps, native.affine, inplace=True
            )
    return nn.Sequential(*units)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory order on the CPU (same values).

    oneDNN convolutions, GroupNorm and pooling work in that order directly, without reordered copies of
    their inputs and outputs (faster, and far less peak memory at full resolution); their outputs keep it.
    """
    if x.device.type != "cpu":
        return x
    return x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)


def _pointwise(unit: Convolution, x: torch.Tensor) -> torch.Tensor:
    """A ``1^n`` convolution ``unit`` (``conv_only``) applied as the equivalent linear map over channels.

    The result is in channels-last order. Used for the image projection: oneDNN would pad a single-channel
    input to its blocked layout (16 times the image's memory at full resolution).
    """
    conv = unit.conv
    return F.linear(x.contiguous().movedim(1, -1), conv.weight.flatten(1), conv.bias).movedim(-1, 1)


def _pad_odd_to_even(x: torch.Tensor) -> torch.Tensor:
    """Append one zero at the end of every odd-sized spatial axis (so that ``ceil(N / 2)`` voxels remain)."""
    pads: list[int] = []
    for size in reversed(x.shape[2:]):
        pads += [0, size % 2]
    return _channels_last(F.pad(x, pads)) if any(pads) else x


class _DownsamplingBlock(nn.Module):
    """Encoder level ``i + 1``: ``main = conv_k2s2(out) + conv_1x1(avgpool_2(skip))``, then a conv block."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, n_convolutions: int, groups: int):
        super().__init__()
        self.strided_conv = Convolution(
            spatial_dims, in_channels, out_channels, strides=2, kernel_size=2, padding=0, conv_only=True
        )
        self.skip_projection = Convolution(spatial_dims, in_channels, out_channels, kernel_size=1, conv_only=True)
        self.block = _conv_block(spatial_dims, out_channels, out_channels, n_convolutions, groups)
        self._avg_pool = (F.avg_pool2d, F.avg_pool3d)[spatial_dims - 2]

    def forward(self, out: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(features, skip)`` of the next level, shapes ceil-halved."""
        main = self.strided_conv(_pad_odd_to_even(out)) + self.skip_projection(
            self._avg_pool(_pad_odd_to_even(skip), 2)
        )
        return self.block(main), main


class SITRegEncoder(nn.Module):
    """Shared multi-resolution feature extractor of SITReg (ResNet-style encoder, no decoder).

    ``skip = conv_1x1(image)``, level 0 = conv block(skip); level ``i >= 1``: odd axes are zero padded at
    the end, ``main = conv_k2s2(features) + conv_1x1(avgpool_2(skip))``, ``skip = main``, level ``i`` =
    conv block(main). Conv blocks are ``n`` x [3^n conv -> GroupNorm(groups) -> ReLU] (MONAI ``Convolution``).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of one image.
        features: channels per level, finest first.
        convolutions: 3^n convolutions per level.
        groups: GroupNorm groups.

    ``forward(x)``: ``x`` ``(B, in_channels, *spatial)`` -> list of level features, finest first,
    level ``k`` of shape ``(B, features[k], *ceil(spatial / 2^k))``. GroupNorm is per sample, so both
    images of a pair can share one batch.

    Assembled from MONAI ``Convolution`` units; written here because no MONAI encoder has this
    strided-conv + pooled-skip residual structure with ceil-halving, which the reference weights need.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        features: Sequence[int],
        convolutions: Sequence[int],
        groups: int = 2,
    ) -> None:
        super().__init__()
        if len(features) != len(convolutions) or not features:
            raise ValueError(
                f"features and convolutions must be non-empty and of equal length, got {features} and {convolutions}"
            )
        self.initial_projection = Convolution(spatial_dims, in_channels, features[0], kernel_size=1, conv_only=True)
        self.initial_block = _conv_block(spatial_dims, features[0], features[0], convolutions[0], groups)
        self.down_blocks = nn.ModuleList(
            _DownsamplingBlock(spatial_dims, features[i], features[i + 1], convolutions[i + 1], groups)
            for i in range(len(features) - 1)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skip = _pointwise(self.initial_projection, x)
        out = self.initial_block(skip)
        levels = [out]
        for block in self.down_blocks:
            out, skip = block(out, skip)
            levels.append(out)
        return levels

    def finest(self, x: torch.Tensor) -> torch.Tensor:
        """Level-0 features alone, ``(B, features[0], *spatial)``: the same as ``forward(x)[0]``."""
        out = _pointwise(self.initial_projection, x)
        for convolution in self.initial_block:
            for layer in convolution:  # conv, then norm + activation: each input is released after use
                out = layer(out)
        return out


def _use_bfloat16(mixed_precision: bool | str, device: torch.device) -> bool:
    """Whether ``SITReg(mixed_precision=...)`` runs its convolutions in bfloat16 on ``device``."""
    if mixed_precision != "auto":
        return bool(mixed_precision)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# elements of one activation of a slab in a slab-wise deformation-block evaluation (28 MiB in float32: below the
# 32 MiB above which glibc maps fresh pages for every allocation, so the slabs reuse recycled memory)
_SLAB_ELEMENTS = 7 << 20


def _rows_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, edges: tuple[bool, bool]
) -> torch.Tensor:
    """A 3^n convolution (stride 1, zero padding 1) of rows ``x`` of a volume along its first spatial axis.

    ``edges``: whether the first / last row of ``x`` is the volume's edge (zero padded, as in the whole-volume
    convolution) or an inner row whose neighbour is absent (not padded: the output loses that row, which a
    whole-volume convolution could not compute from ``x`` alone). Other axes are zero padded.
    """
    n = x.ndim - 2
    conv = (F.conv2d, F.conv3d)[n - 2]
    if edges[0] == edges[1]:
        return conv(x, weight, bias, padding=(int(edges[0]),) + (1,) * (n - 1))
    # one edge of each kind: padded on both sides, the row computed from the padding at the halo side dropped
    # (an explicitly padded copy would make PyTorch fall back to its slow non-oneDNN convolution)
    out = conv(x, weight, bias, padding=1)
    return out[:, :, :-1] if edges[0] else out[:, :, 1:]


class SITRegDeformationBlock(nn.Module):
    """Deformation-from-features block ``U(a, b)`` of one level.

    ``pre_tanh = conv_1x1(conv block(cat(a - b, a + b)))`` (``n_dims`` output channels), and the cubic
    B-spline control points are ``max_control_point * tanh(pre_tanh)`` in level voxel units, where
    ``max_control_point`` = multiplier x the bound that keeps the upsampled field a contraction
    (so ``x + u(x)`` is invertible and its fixed-point inversion converges).

    Args:
        spatial_dims: 2 or 3.
        in_channels: feature channels ``C_k`` of one image at this level.
        features: channels of the conv block.
        convolutions: number of 3^n convolutions.
        upsampling_factor: ``2^k``, the level's downsampling factor (same on every axis).
        groups: GroupNorm groups inside the conv block, ``None`` for no normalisation.
        control_point_multiplier: fraction of the theoretical bound used (0.99 in the paper).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        features: int,
        convolutions: int,
        upsampling_factor: int,
        groups: int | None = None,
        control_point_multiplier: float = 0.99,
    ) -> None:
        super().__init__()
        self.block = _conv_block(spatial_dims, 2 * in_channels, features, convolutions, groups)
        self.final_conv = Convolution(spatial_dims, features, spatial_dims, kernel_size=1, conv_only=True)
        # voxels one slab of a slab-wise evaluation needs on each side: one per 3^n convolution
        self.halo = int(convolutions)
        self.width = int(features)  # channels of one activation
        self.normalized = groups is not None
        self.upsampling_factor = int(upsampling_factor)
        factors = (self.upsampling_factor,) * spatial_dims
        self.max_control_point = float(control_point_multiplier) * float(control_point_bound(factors))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-tanh control-point values ``(B, n, *level_shape)`` of ``U(a, b)`` and ``U(b, a)``.

        ``a``, ``b``: features ``(B, C_k, *level_shape)`` of the two images at this level; ``U(a, b)`` is the conv
        block on ``cat(a - b, a + b)``. ``U(b, a)`` sees ``b + a``, bit-identical to ``a + b``, and ``b - a = -(a - b)``
        exactly, so swapping the inputs swaps the outputs bit for bit (the network is exactly symmetric).

        Without autograd both directions share their first convolution: it is linear in ``cat(a - b, a + b)``, so
        with its weight split as ``[W_d | W_s]`` over the two halves ``U(a, b)`` starts from ``S + D`` and
        ``U(b, a)`` from ``S - D``, where ``S = W_s * (a + b) + bias`` and ``D = W_d * (a - b)`` (half the cost of
        two full first convolutions; ``S`` is symmetric and ``D`` antisymmetric bit for bit, as above). Under
        autograd each direction runs the block as written, which keeps less for the backward pass.

        Without autograd and without GroupNorm, large inputs are evaluated in slabs along the first
        spatial axis, each with a halo of ``halo`` rows (the receptive field of the 3^n convolutions; each
        convolution consumes one halo row per side), so that no full-size activation of the block exists at
        once; every output voxel sees exactly the inputs of the whole-volume evaluation.
        """
        if torch.is_grad_enabled():  # autograd keeps less for backward with the per-direction form (1 GB on OASIS)
            return self._direction(a, b), self._direction(b, a)
        depth = a.shape[2]
        slab = depth
        if not self.normalized:
            slice_elements = a.shape[0] * self.width * math.prod(a.shape[3:])
            n_slabs = -(-depth // max(1, _SLAB_ELEMENTS // slice_elements))
            slab = -(-depth // n_slabs)  # slabs of equal thickness
        if slab >= depth:
            return self._pre_tanh(a, b, (True, True))
        shape = (a.shape[0], a.ndim - 2, *a.shape[2:])
        out_fwd, out_rev = a.new_empty(shape), a.new_empty(shape)
        for start in range(0, depth, slab):
            stop = min(start + slab, depth)
            low, high = max(start - self.halo, 0), min(stop + self.halo, depth)
            edges = (low == 0, high == depth)
            fwd, rev = self._pre_tanh(a[:, :, low:high], b[:, :, low:high], edges)
            first = low if edges[0] else start  # first row of the outputs
            out_fwd[:, :, start:stop] = fwd[:, :, start - first : stop - first]
            out_rev[:, :, start:stop] = rev[:, :, start - first : stop - first]
        return out_fwd, out_rev

    def _direction(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``U(a, b)`` as the paper writes it: the conv block on ``cat(a - b, a + b)``."""
        return self.final_conv(self.block(_channels_last(torch.cat((a - b, a + b), dim=1))))

    def _pre_tanh(
        self, a: torch.Tensor, b: torch.Tensor, edges: tuple[bool, bool]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on rows of the level along its first spatial axis; ``edges``: whether the first / last row is
        the level's own edge (zero padding beyond, as in the whole-level convolutions) or a halo row."""
        first, *rest = self.block
        weight, channels = first.conv.weight, a.shape[1]
        # (contiguous weight halves: oneDNN would fall back to a slow layout for strided weights)
        shared = _rows_conv(_channels_last(a + b), weight[:, channels:].contiguous(), first.conv.bias, edges)
        odd = _rows_conv(_channels_last(a - b), weight[:, :channels].contiguous(), None, edges)
        starts = [shared + odd]  # S + D, then S - D in D's memory
        starts.append(odd.neg_().add_(shared))
        del shared, odd
        outputs = []
        while starts:
            out = first.adn(starts.pop(0))
            for unit in rest:
                out = unit.adn(_rows_conv(out, unit.conv.weight, unit.conv.bias, edges))
            outputs.append(self.final_conv(out))
        return outputs[0], outputs[1]

    def control_points(self, pre_tanh: torch.Tensor) -> torch.Tensor:
        """Bounded control points ``max_control_point * tanh(pre_tanh)`` (level voxel units)."""
        return self.max_control_point * torch.tanh(pre_tanh)

    def upsample(self, control_points: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        """Full-resolution voxel DDF ``(B, n, *spatial_shape)`` of the cubic B-spline with these control points."""
        factors = (self.upsampling_factor,) * (control_points.ndim - 2)
        return bspline_upsample(control_points, factors, spatial_shape)


class SITRegAffineHead(nn.Module):
    """Affine parameters ``U(a, b)`` from flattened coarsest features: Linear-ReLU-Linear-ReLU-Linear.

    Input ``cat(flatten(a - b), flatten(a + b))`` of width ``2 * in_features``; output ``(B, 12)`` (3-D)
    or ``(B, 6)`` (2-D) parameters for :func:`monai_ext.spatial.affine.affine_matrix_from_parameters`
    (centred-normalised world coordinates). Both hidden layers are chained as in the paper's code
    (the current head of the authors' reference implementation skips the first hidden layer).

    Args:
        spatial_dims: 2 or 3.
        in_features: ``C * prod(coarsest level shape)`` of one image.
    """

    def __init__(self, spatial_dims: int, in_features: int) -> None:
        super().__init__()
        width = 2 * in_features
        n_params = {2: 6, 3: 12}[spatial_dims]
        self.mlp = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, n_params)
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.flatten(1), b.flatten(1)
        return self.mlp(torch.cat((a - b, a + b), dim=1))


@dataclass
class SITRegLevel:
    """Quantities of one predicting level (``level`` = resolution index, 0 finest), for inspection/parity.

    Level-shaped tensors are ``(B, ., *level_shape)``; every DDF is a full-resolution voxel DDF. Chains are
    stored after this level's update; the cumulative DDFs are the outputs if the network stopped here.
    """

    level: int
    warped_features_1: torch.Tensor
    warped_features_2: torch.Tensor
    pre_tanh_fwd: torch.Tensor
    pre_tanh_rev: torch.Tensor
    control_points_fwd: torch.Tensor
    control_points_rev: torch.Tensor
    atomic_fwd: torch.Tensor  # A_fwd = U(f1, f2) upsampled
    atomic_rev: torch.Tensor  # A_rev = U(f2, f1) upsampled
    atomic_fwd_inverse: torch.Tensor
    atomic_rev_inverse: torch.Tensor
    update_fwd: torch.Tensor  # F = A_fwd o A_rev^-1 on the grid
    update_inv: torch.Tensor  # I = A_rev o A_fwd^-1 on the grid
    left_forward: torch.Tensor  # L_f
    right_forward: torch.Tensor  # R_f
    left_inverse: torch.Tensor  # L_i
    right_inverse: torch.Tensor  # R_i
    cumulative_forward_ddf: torch.Tensor
    cumulative_inverse_ddf: torch.Tensor


@dataclass
class SITRegOutput:
    """Result of :meth:`SITReg.forward_and_inverse` with ``return_intermediates=True``.

    ``forward_affine`` / ``inverse_affine`` are the half-way affine maps ``Aff_f`` / ``Aff_i`` as
    ``(B, n + 1, n + 1)`` voxel-to-voxel matrices (``None`` without the affine stage); ``levels`` is
    ordered as processed (coarsest first).
    """

    forward_ddf: torch.Tensor
    inverse_ddf: torch.Tensor
    forward_affine: torch.Tensor | None
    inverse_affine: torch.Tensor | None
    levels: list[SITRegLevel]


def _apply_affine(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``matrix`` ``(B, n + 1, n + 1)`` applied to voxel coordinates ``points`` ``(B|1, n, *out)``."""
    n = matrix.shape[1] - 1
    flat = points.reshape(points.shape[0], n, -1)
    mapped = matrix[:, :n, :n] @ flat + matrix[:, :n, n:]
    return mapped.reshape(matrix.shape[0], n, *points.shape[2:])


def _chain(
    points: torch.Tensor | None, disp: torch.Tensor | None, maps: Sequence[torch.Tensor | None], inplace: bool = False
) -> torch.Tensor:
    """Displacement at ``points`` of ``maps[-1] o ... o maps[0] o (x + disp)``, evaluated lazily (nested).

    ``points`` ``(1|B, n, *out)`` voxel coordinates, or ``None`` for the voxel grid of ``disp`` (not formed as a
    whole unless an affine needs it); ``disp`` the displacement already applied (``None``: none); each map is a
    full-resolution voxel DDF ``(B, n, *spatial)`` (sampled multilinearly, border), a voxel affine
    ``(B, n + 1, n + 1)``, or ``None`` (identity, skipped). With ``inplace`` (no autograd) the result is written
    into ``disp``'s memory.
    """
    if points is None and disp is None:
        raise ValueError("a chain needs points or a displacement")
    owned = inplace  # whether disp may be overwritten (made here, or given up by the caller)
    for m in maps:
        if m is None:
            continue
        if m.ndim == 3 and points is None:
            points = voxel_grid(disp.shape[2:], disp.dtype, disp.device)[None]
        if m.ndim == 3:
            current = points if disp is None else points + disp
            disp = _apply_affine(m, current) - points
        else:
            out = disp if owned and not torch.is_grad_enabled() else None
            disp = sample(m, points, displacement=disp, accumulate=disp, out=out)
        owned = True
    if disp is None:
        raise ValueError("cannot evaluate an identity chain")
    return disp


class SITReg(nn.Module):
    """SITReg network: ``forward(x)`` with ``x = cat(moving, fixed)`` on channels -> forward voxel DDF.

    Args (reference config key in brackets):
        spatial_dims: 2 or 3 (``len(input_shape)``).
        in_channels: channels of one image (``n_input_channels``).
        features: encoder channels per level, finest first (``n_features_per_resolution``).
        feature_convolutions: 3^n convs per encoder level (``n_feature_convolutions_per_resolution``).
        deformation_features: deformation-block channels per level, ``None`` for a feature-only level
            (``n_transformation_features_per_resolution``).
        deformation_convolutions: deformation-block convs per level, ``None`` exactly where
            ``deformation_features`` is ``None`` (``n_transformation_convolutions_per_resolution``).
        groups: GroupNorm groups (``normalizer.args.n_groups``).
        deformation_normalization: GroupNorm inside deformation blocks
            (``use_normalization_in_deformation_extraction``; false in the paper configs).
        control_point_multiplier: fraction of the B-spline control-point bound (``max_control_point_multiplier``).
        predict_affine: add the affine stage on the coarsest features (``predict_affine``; full affine).
        input_shape: image shape; required with ``predict_affine`` (it fixes the affine MLP width) and
            then enforced, otherwise unused (``input_shape``).
        voxel_size: relative voxel size, used only by the affine stage's centred-normalised world
            frame (``voxel_size``; default isotropic).
        forward_solver, backward_solver: fixed-point solvers of the deformation inversions
            (``displacement_field_inversion``); ``None`` = Anderson(memory 4) with max-abs / relative-L2
            residual 1e-2, 2..50 evaluations, as in all reference configs.

        transformation_downsampling_factor: ``2^t``; the deformations are composed and inverted on the
            level-``t`` grid (``ceil(spatial / 2^t)``, voxel ``j`` centred at input coordinate
            ``2^t j + (2^t - 1) / 2``) and the outputs are interpolated multilinearly to the input grid
            (``transformation_downsampling_factor``; 1 in every reference config, where all deformations
            live on the input grid). Levels finer than ``t`` must not predict deformations; the affine
            stage needs 1. A factor of 2 makes the sampling inside compositions and inversions, which
            dominates the cost of a training step on a CPU, 8 times cheaper.
        mixed_precision: ``True``: run the convolutions (encoder and deformation blocks) under bfloat16 autocast
            on the inputs' device and return their outputs in the inputs' dtype; the B-spline upsampling,
            sampling, inversions and compositions stay in that dtype. ``"auto"``: only where the device computes
            bfloat16 natively (a CPU with AVX-512 BF16 or AMX, a CUDA device with bfloat16 support; elsewhere
            bfloat16 is emulated and slower). Not in the paper: it makes a CPU training step ~30 % cheaper; the
            symmetry of the deformation blocks is kept (both directions run the same operations).

    Inputs of any shape whose every axis exceeds ``2^(L - 2)`` (so each level really halves it) are accepted.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        features: Sequence[int] = (8, 40, 40, 40),
        feature_convolutions: Sequence[int] = (2, 2, 2, 2),
        deformation_features: Sequence[int | None] = (16, 72, 72, 72),
        deformation_convolutions: Sequence[int | None] = (2, 2, 2, 2),
        groups: int = 2,
        deformation_normalization: bool = False,
        control_point_multiplier: float = 0.99,
        predict_affine: bool = False,
        input_shape: Sequence[int] | None = None,
        voxel_size: Sequence[float] | None = None,
        forward_solver: AndersonSolver | None = None,
        backward_solver: AndersonSolver | None = None,
        transformation_downsampling_factor: int = 1,
        mixed_precision: bool | str = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        n_levels = len(features)
        for name, values in (
            ("feature_convolutions", feature_convolutions),
            ("deformation_features", deformation_features),
            ("deformation_convolutions", deformation_convolutions),
        ):
            if len(values) != n_levels:
                raise ValueError(f"{name} must have one entry per level ({n_levels} = len(features)), got {values}")
        for level, (f, c) in enumerate(zip(deformation_features, deformation_convolutions)):
            if (f is None) != (c is None):
                raise ValueError(
                    f"deformation_features and deformation_convolutions must both be None or both set, level {level}"
                )
        if all(f is None for f in deformation_features):
            raise ValueError("at least one level must predict a deformation (deformation_features all None)")
        normalized = list(features) + ([f for f in deformation_features if f] if deformation_normalization else [])
        if groups < 1 or any(channels % groups for channels in normalized):
            widths = "features and deformation_features" if deformation_normalization else "features"
            raise ValueError(f"groups={groups} must divide every GroupNorm width ({widths}), got {normalized}")
        if not 0 < control_point_multiplier <= 1:
            raise ValueError(f"control_point_multiplier must be in (0, 1], got {control_point_multiplier}")
        factor = int(transformation_downsampling_factor)
        if factor != transformation_downsampling_factor or factor < 1 or factor & (factor - 1):
            raise ValueError(
                f"transformation_downsampling_factor must be a power of 2, got {transformation_downsampling_factor}"
            )
        self.transformation_level = factor.bit_length() - 1
        first = min(level for level, f in enumerate(deformation_features) if f is not None)
        if self.transformation_level > first:
            raise ValueError(
                f"transformation_downsampling_factor={factor} is coarser than the finest deformation level "
                f"{first} (factor {2**first})"
            )
        if predict_affine and factor != 1:
            raise ValueError("predict_affine needs transformation_downsampling_factor=1")
        if voxel_size is not None and (len(voxel_size) != spatial_dims or min(voxel_size) <= 0):
            raise ValueError(f"voxel_size must have {spatial_dims} positive entries, got {voxel_size}")
        if input_shape is not None and len(input_shape) != spatial_dims:
            raise ValueError(f"input_shape must have {spatial_dims} entries, got {input_shape}")
        if predict_affine and input_shape is None:
            raise ValueError("input_shape is required with predict_affine=True (it fixes the affine MLP width)")

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.n_levels = n_levels
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.voxel_size = (1.0,) * spatial_dims if voxel_size is None else tuple(float(v) for v in voxel_size)
        self.encoder = SITRegEncoder(spatial_dims, in_channels, features, feature_convolutions, groups)
        self.deformation_blocks = nn.ModuleDict(
            {
                str(level): SITRegDeformationBlock(
                    spatial_dims,
                    features[level],
                    deformation_features[level],
                    deformation_convolutions[level],
                    2 ** (level - self.transformation_level),
                    groups if deformation_normalization else None,
                    control_point_multiplier,
                )
                for level in range(n_levels)
                if deformation_features[level] is not None
            }
        )
        self.affine_head = None
        if predict_affine:
            coarsest = self.level_shapes(self.input_shape)[-1]
            self.affine_head = SITRegAffineHead(spatial_dims, features[-1] * math.prod(coarsest))
        self.inversion = DDFInversion(forward_solver, backward_solver)
        if mixed_precision not in (True, False, "auto"):
            raise ValueError(f"mixed_precision must be True, False or 'auto', got {mixed_precision!r}")
        self.mixed_precision = mixed_precision

    @property
    def deformation_levels(self) -> list[int]:
        """Resolution indices (0 finest) of the levels that predict a deformation, ascending."""
        return sorted(int(k) for k in self.deformation_blocks)

    def level_shapes(self, spatial_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Spatial shape of every level, finest first (iterated ceil-halving)."""
        shapes = [tuple(int(s) for s in spatial_shape)]
        for _ in range(self.n_levels - 1):
            shapes.append(tuple((s + 1) // 2 for s in shapes[-1]))
        return shapes

    def _check_images(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        for name, image in (("moving", moving), ("fixed", fixed)):
            if not isinstance(image, torch.Tensor) or image.ndim != self.spatial_dims + 2:
                raise ValueError(
                    f"{name} must be a (B, {self.in_channels}, *spatial) tensor with {self.spatial_dims} spatial dims, "
                    f"got {tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}"
                )
            if image.shape[1] != self.in_channels:
                raise ValueError(f"{name} must have in_channels={self.in_channels} channels, got {image.shape[1]}")
            if not image.is_floating_point():
                raise ValueError(f"{name} must be a floating point tensor, got {image.dtype}")
            if not all_finite(image):
                raise ValueError(f"{name} contains non-finite values")
        if moving.shape != fixed.shape:
            raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must have the same shape")
        shape = tuple(moving.shape[2:])
        min_size = 2 ** (self.n_levels - 2) if self.n_levels > 1 else 0
        if min(shape) <= min_size:  # an input error: the images (after a bundle's crop or pooling) are too small
            raise InputError(
                f"images of spatial shape {shape} are too small for this {self.n_levels}-level SITReg network: every "
                f"axis must exceed 2^(n_levels - 2) = {min_size} voxels so that each level halves it (in a bundle: "
                "after its preprocessing, whose crop, crop_or_pad_to and downsampling are set for its dataset's images)"
            )
        if self.affine_head is not None and shape != self.input_shape:
            raise ValueError(f"spatial shape {shape} differs from input_shape {self.input_shape} of the affine stage")

    def _affine_stage(
        self, features_1: torch.Tensor, features_2: torch.Tensor, spatial_shape: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Half-way affines ``(Aff_f, Aff_i)`` as voxel matrices; ``Aff_i`` is the exact inverse of ``Aff_f``."""
        a_fwd = affine_matrix_from_parameters(self.affine_head(features_1, features_2))
        a_rev = affine_matrix_from_parameters(self.affine_head(features_2, features_1))
        world_fwd = a_fwd @ invert_homogeneous(a_rev)
        world_inv = a_rev @ invert_homogeneous(a_fwd)
        to_world = voxel_to_centered_normalized(spatial_shape, self.voxel_size, a_fwd.dtype, a_fwd.device)
        to_voxel = invert_homogeneous(to_world)
        return to_voxel @ world_fwd @ to_world, to_voxel @ world_inv @ to_world

    def _convolve(self, module: Callable[..., Any], *inputs: torch.Tensor) -> Any:
        """``module(*inputs)``, under bfloat16 autocast with ``mixed_precision`` (outputs cast back to the inputs'
        dtype: a tensor, or a list or tuple of tensors)."""
        if not _use_bfloat16(self.mixed_precision, inputs[0].device):
            return module(*inputs)
        dtype = inputs[0].dtype
        with torch.autocast(inputs[0].device.type, dtype=torch.bfloat16):
            out = module(*inputs)
        return type(out)(o.to(dtype) for o in out) if isinstance(out, (list, tuple)) else out.to(dtype)

    def _encode(self, image: torch.Tensor, drop_finest: bool) -> list[torch.Tensor | None]:
        """Encoder features of one image, finest first; level 0 replaced by ``None`` if ``drop_finest``."""
        features: list[torch.Tensor | None] = self._convolve(self.encoder, image)
        if drop_finest:
            features[0] = None
        return features

    def _pop_finest(self, features: list[torch.Tensor | None], image: torch.Tensor) -> torch.Tensor:
        """Remove and return the finest remaining level of ``features``, recomputed from ``image`` if dropped."""
        popped = features.pop()
        return self._convolve(self.encoder.finest, image) if popped is None else popped

    def _warp_features(
        self, features: torch.Tensor, level: int, chain: torch.Tensor | None, affine: torch.Tensor | None
    ) -> torch.Tensor:
        """Sample level features through ``affine o chain`` (on the transformation grid) at the level's voxel
        centres (identity: unchanged)."""
        if chain is None and affine is None:
            return features
        factor = 2 ** (level - self.transformation_level)
        centres = voxel_grid(features.shape[2:], features.dtype, features.device)[None] * factor + (factor - 1) / 2
        if factor == 1 and chain is not None:  # the chain lives on this level's grid: no need to sample it there
            mapped = centres + chain if affine is None else _chain(centres, chain, (affine,)).add_(centres)
        else:
            mapped = _chain(centres, None, (chain, affine)).add_(centres)  # transformation-grid coordinates
        del centres
        return sample(features, mapped.add_(0.5).div_(factor).sub_(0.5))

    def _outputs(
        self,
        chains: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        affines: tuple[torch.Tensor | None, torch.Tensor | None],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``phi_f = Aff_f o L_f o R_i o Aff_f`` and ``phi_i = Aff_i o R_f o L_i o Aff_i`` on the grid."""
        left_f, right_f, left_i, right_i = chains
        aff_f, aff_i = affines
        if aff_f is None:
            return _chain(None, right_i, (left_f,)), _chain(None, left_i, (right_f,))
        grid = voxel_grid(left_f.shape[2:], left_f.dtype, left_f.device)[None]
        return (
            _chain(grid, None, (aff_f, right_i, left_f, aff_f)),
            _chain(grid, None, (aff_i, left_i, right_f, aff_i)),
        )

    def forward_and_inverse(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        return_intermediates: bool = False,
        full_resolution: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor] | SITRegOutput:
        """Register ``moving`` (image 1) and ``fixed`` (image 2), both ``(B, in_channels, *spatial)``.

        Returns:
            ``(forward_ddf, inverse_ddf)``, voxel DDFs ``(B, n, *spatial)``: ``forward_ddf`` maps fixed-grid
            voxels into the moving image (``warp(moving, forward_ddf)`` ~ ``fixed``), ``inverse_ddf`` the
            reverse. With ``full_resolution=False`` they stay on the transformation grid (level ``t`` of
            ``transformation_downsampling_factor = 2^t``: shape ``ceil(spatial / 2^t)``, units of its voxels),
            e.g. for a training loss evaluated there. With ``return_intermediates`` a :class:`SITRegOutput`
            that also holds the affine matrices and every level's quantities (on the transformation grid).
        """
        self._check_images(moving, fixed)
        image_shape = tuple(moving.shape[2:])
        spatial_shape = self.level_shapes(image_shape)[self.transformation_level]
        # GroupNorm is per sample, so encoding the images one at a time gives the same features. Without
        # autograd the full-resolution features are dropped and recomputed when level 0 is reached: held
        # through the coarser levels, they would dominate the peak memory.
        features_1 = self._encode(moving, drop_finest=not torch.is_grad_enabled())
        features_2 = self._encode(fixed, drop_finest=not torch.is_grad_enabled())
        affines: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        if self.affine_head is not None:
            affines = self._affine_stage(features_1[-1], features_2[-1], spatial_shape)
        aff_f, aff_i = affines
        left_f = right_f = left_i = right_i = None
        levels: list[SITRegLevel] = []
        # Without return_intermediates every tensor is released after its last use (the `del`s below).
        inplace = not (return_intermediates or torch.is_grad_enabled())
        for level in reversed(self.deformation_levels):
            block = self.deformation_blocks[str(level)]
            del features_1[level + 1 :], features_2[level + 1 :]  # levels already processed
            warped_1 = self._warp_features(self._pop_finest(features_1, moving), level, left_f, aff_f)
            warped_2 = self._warp_features(self._pop_finest(features_2, fixed), level, right_f, aff_i)
            pre_fwd, pre_rev = self._convolve(block, warped_1, warped_2)
            control_fwd, control_rev = block.control_points(pre_fwd), block.control_points(pre_rev)
            if not return_intermediates:
                del warped_1, warped_2, pre_fwd, pre_rev
            atomic_fwd = block.upsample(control_fwd, spatial_shape)
            atomic_rev = block.upsample(control_rev, spatial_shape)
            if not return_intermediates:
                del control_fwd, control_rev
            # F = A_fwd o A_rev^-1 and I = A_rev o A_fwd^-1, evaluated lazily (nested) wherever needed, on the
            # voxel grid of the fields (points None); without autograd and intermediates every chain is updated in
            # its own memory (the inverses become F and I). The reverse inverse is folded into the chains before the
            # forward inversion runs, so that each inversion runs beside six fields (four chains, two atomic).
            inverse_rev = self.inversion(atomic_rev)
            if right_i is not None:
                right_i = _chain(None, right_i, (inverse_rev, atomic_fwd), inplace)
            update_fwd = _chain(None, inverse_rev, (atomic_fwd,), inplace)
            if left_f is None:  # (a separate copy of the chains that are updated in place)
                left_f, right_i = update_fwd, update_fwd.clone() if inplace else update_fwd
            else:
                left_f = _chain(None, update_fwd, (left_f,), inplace)
            inverse_fwd = self.inversion(atomic_fwd)
            if left_i is not None:
                left_i = _chain(None, left_i, (inverse_fwd, atomic_rev), inplace)
            update_inv = _chain(None, inverse_fwd, (atomic_rev,), inplace)
            if right_f is None:
                right_f, left_i = update_inv, update_inv.clone() if inplace else update_inv
            else:
                right_f = _chain(None, update_inv, (right_f,), inplace)
            if not return_intermediates:
                del atomic_fwd, atomic_rev, inverse_fwd, inverse_rev, update_fwd, update_inv
            else:
                cumulative = self._outputs((left_f, right_f, left_i, right_i), affines)
                levels.append(
                    SITRegLevel(
                        level, warped_1, warped_2, pre_fwd, pre_rev, control_fwd, control_rev, atomic_fwd, atomic_rev,
                        inverse_fwd, inverse_rev, update_fwd, update_inv, left_f, right_f, left_i, right_i,
                        *cumulative,
                    )
                )  # fmt: skip
        if levels:
            forward_ddf, inverse_ddf = levels[-1].cumulative_forward_ddf, levels[-1].cumulative_inverse_ddf
        else:
            forward_ddf, inverse_ddf = self._outputs((left_f, right_f, left_i, right_i), affines)
        if full_resolution and self.transformation_level:
            forward_ddf, inverse_ddf = self.upsample_ddf(forward_ddf, image_shape), self.upsample_ddf(inverse_ddf, image_shape)
        if return_intermediates:
            return SITRegOutput(forward_ddf, inverse_ddf, aff_f, aff_i, levels)
        return forward_ddf, inverse_ddf

    def upsample_ddf(self, ddf: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        """A transformation-grid voxel DDF ``(B, n, *ceil(spatial / 2^t))`` as an input-grid voxel DDF
        ``(B, n, *spatial_shape)``: multilinear interpolation (border), values scaled by ``2^t``."""
        return upsample_ddf(ddf, 2**self.transformation_level, spatial_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward DDF ``(B, n, *spatial)`` of ``x = cat(moving, fixed)``, ``(B, 2 * in_channels, *spatial)``.

        The DDF maps fixed-grid voxels into the moving image (MONAI ``Warp`` convention).
        """
        if not isinstance(x, torch.Tensor) or x.ndim != self.spatial_dims + 2 or x.shape[1] != 2 * self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"x must be cat(moving, fixed) of shape (B, {2 * self.in_channels}, *spatial) with "
                f"{self.spatial_dims} spatial dims, got {got}"
            )
        return self.forward_and_inverse(x[:, : self.in_channels], x[:, self.in_channels :])[0]
