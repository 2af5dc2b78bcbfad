"""KeyMorph / BrainMorph keypoint detection: backbones and the centre-of-mass layer.

Official checkpoints are read by :func:`monai_ext.checkpoints.load_keymorph_checkpoint`.

A keypoint detector maps an image ``(B, C, *spatial)`` to ``K`` heatmaps and reduces every heatmap
to one point with a ReLU-normalised centre of mass (:class:`CenterOfMass`).

Keypoint coordinates (as in KeyMorph ``main`` since June 2024):

* shape ``(B, K, n)``, ``n = len(spatial)`` (2 or 3), component ``i`` along spatial array axis ``i``
  ("ij" order; ``indexing="xy"`` reverses it, the order of the pre-2024 reference code);
* each axis normalised on its own to ``[-1, 1]`` with the align_corners=True convention: voxel ``i``
  of an axis of length ``N`` is at ``-1 + 2 i / (N - 1)``, so -1 and +1 are the centres of the
  first and last voxel. Points are normalised on the *heatmap* grid; KeyMorph uses them directly
  as normalised coordinates of the image (the same [-1, 1] box), and so do its trained weights.

Reference: the authors' KeyMorph implementation, ``github.com/alanqrwang/keymorph`` at commit ``dcb7996``
(``keymorph/net.py``, ``keymorph/layers.py``, ``keymorph/unet3d``); papers: Yu et al., "KeyMorph: Robust
multi-modal affine registration via unsupervised keypoint detection", MIDL 2021; Wang et al., MedIA 2023
(KeyMorph with thin-plate splines); Wang et al., "BrainMorph", MELBA 2025.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Conv, Pool

from monai_ext.spatial.sampling import all_finite

__all__ = [
    "CenterOfMass",
    "power_weights",
    "ConvKeypointNet",
    "TruncatedUNetKeypointNet",
    "KeypointDetector",
    "heatmap_chunks",
]

_EMPTY_MODES = ("corner", "center", "raise")

RowSource = Callable[[int, int], torch.Tensor]
"""Rows ``start:stop`` along the first spatial axis of a volume ``(B, C, D, ...)``: ``(B, C, stop - start, ...)``."""

_SLAB_ELEMENTS = 2**24
"""Memory-saving path: elements per batch item of a slab's conv input and output together, and of a heatmap chunk."""


def _check_image(x: torch.Tensor, name: str, in_channels: int, spatial_dims: int, min_size: int) -> None:
    """``ValueError`` unless ``x`` is ``(B, in_channels, *spatial)`` with every spatial size ``>= min_size``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} must have shape (B, C, *spatial) with {spatial_dims} spatial dims, got {tuple(x.shape)}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} must have {in_channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    if min(x.shape[2:]) < min_size:
        raise ValueError(f"{name} spatial size must be at least {min_size} along every axis, got {tuple(x.shape[2:])}")


class CenterOfMass(nn.Module):
    """ReLU-normalised centre of mass of every heatmap channel (KeyMorph's keypoint layer).

    For heatmap ``h`` (one channel) and axis ``a`` of length ``N_a``, with ``m_a`` the ReLU'd mass
    summed over the other axes::

        c_a = sum_i (i / (N_a - 1)) m_a[i] / (sum_i m_a[i] + eps),   point_a = 2 c_a - 1

    i.e. the mean position under the density ``relu(h)`` in the align_corners=True normalised
    coordinates of the heatmap grid (module docstring). There is no softmax and no temperature. An
    axis of length 1 gives -1 (the reference's ``linspace(0, 1, 1) = [0]``).

    A channel with no positive value (*empty*: dead channel, or a backbone output of zeros) has
    zero mass. The reference's ``eps`` then puts it at -1 on every axis (``empty="corner"``). Never
    NaN in any mode; choose with ``empty``:

    * ``"corner"`` (default, reference): -1 on every axis;
    * ``"center"``: 0 on every axis (the grid centre);
    * ``"raise"``: ``ValueError`` naming the empty (batch, channel) pairs.

    With ``return_mass=True`` the per-keypoint mass ``sum relu(h)`` ``(B, K)`` is returned as well;
    it is 0 exactly for empty channels and is the input of :func:`power_weights`.

    Args:
        indexing: ``"ij"`` (array axis order, KeyMorph ``main``) or ``"xy"`` (reversed).
        empty: behaviour for empty channels, see above.
        eps: added to the mass in the denominator (reference: 1e-8). It biases channels of total
            mass comparable to ``eps`` towards -1; empty channels follow ``empty`` whatever ``eps``.
        return_mass: also return the mass.
    """

    def __init__(self, indexing: str = "ij", empty: str = "corner", eps: float = 1e-8, return_mass: bool = False):
        super().__init__()
        if indexing not in ("ij", "xy"):
            raise ValueError(f"indexing must be 'ij' or 'xy', got {indexing!r}")
        if empty not in _EMPTY_MODES:
            raise ValueError(f"empty must be one of {_EMPTY_MODES}, got {empty!r}")
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        self.indexing = indexing
        self.empty = empty
        self.eps = eps
        self.return_mass = return_mass

    def forward(self, heatmaps: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            heatmaps: ``(B, K, *spatial)``, ``len(spatial)`` in (2, 3), any real values (ReLU'd here).

        Returns:
            points ``(B, K, n)`` in normalised coordinates, and the mass ``(B, K)`` if ``return_mass``.
        """
        return self.from_chunks((heatmaps,))

    def from_chunks(self, chunks: Iterable[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` of heatmaps given as consecutive channel chunks ``(B, K_i, *spatial)`` (``sum K_i = K``).

        Every channel is reduced on its own, so only one chunk needs to exist at a time (e.g.
        :meth:`TruncatedUNetKeypointNet.heatmap_chunks`); the result equals :meth:`forward` of their concatenation.
        """
        points, mass = (torch.cat(parts, dim=1) for parts in zip(*(self._unmasked(chunk) for chunk in chunks)))
        empty = mass == 0
        if self.empty == "raise" and empty.any():
            raise ValueError(
                f"heatmaps have channels without positive values, (batch, channel): {empty.nonzero().tolist()}"
            )
        # explicit also for "corner" so that eps = 0 cannot give 0 / 0
        points = points.masked_fill(empty[..., None], -1.0 if self.empty == "corner" else 0.0)
        return (points, mass) if self.return_mass else points

    def _unmasked(self, heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Points ``(B, K, n)`` (before the ``empty`` rule) and masses ``(B, K)`` of heatmaps ``(B, K, *spatial)``."""
        if not isinstance(heatmaps, torch.Tensor):
            raise TypeError(f"heatmaps must be a torch.Tensor, got {type(heatmaps).__name__}")
        n = heatmaps.ndim - 2
        if n not in (2, 3):
            raise ValueError(
                f"heatmaps must have shape (B, K, *spatial) with 2 or 3 spatial dims, got {tuple(heatmaps.shape)}"
            )
        if not all_finite(heatmaps):
            raise ValueError("heatmaps contain non-finite values")
        density = torch.relu(heatmaps)
        mass = density.flatten(2).sum(-1)
        coords = []
        for axis in range(n):
            marginal = density.sum(dim=[2 + a for a in range(n) if a != axis])  # (B, K, N_axis)
            pos = torch.linspace(0, 1, heatmaps.shape[2 + axis], dtype=heatmaps.dtype, device=heatmaps.device)
            coords.append(2 * (marginal * pos).sum(-1) / (marginal.sum(-1) + self.eps) - 1)
        return torch.stack(coords if self.indexing == "ij" else coords[::-1], dim=-1), mass


def power_weights(mass_fixed: torch.Tensor, mass_moving: torch.Tensor) -> torch.Tensor:
    """KeyMorph ``power`` keypoint weights ``w_k = M_f,k M_m,k / sum_j M_f,j M_m,j``.

    ``M_.,k`` is the mass of keypoint ``k``'s heatmap (the sum of its ReLU'd values), so keypoints with a large
    mass in both images weigh more in the weighted fits (the reference's ``--weighted_kp_align power``).

    Args:
        mass_fixed: ``(B, K)`` heatmap masses of the fixed image (:class:`CenterOfMass` ``return_mass``).
        mass_moving: ``(B, K)`` the same for the moving image.

    Returns:
        ``(B, K)`` non-negative weights summing to 1 per batch item (the reference normalises over
        the whole batch and so only works for B = 1; this is its B = 1 result for every item).

    Raises:
        ValueError: if a batch item has no keypoint with positive mass in both images (the
            reference would return NaN).
    """
    if mass_fixed.ndim != 2 or mass_fixed.shape != mass_moving.shape:
        raise ValueError(
            "mass_fixed and mass_moving must both be (B, K), "
            f"got {tuple(mass_fixed.shape)} and {tuple(mass_moving.shape)}"
        )
    if (mass_fixed < 0).any() or (mass_moving < 0).any():
        raise ValueError("mass_fixed and mass_moving must be non-negative")
    joint = mass_fixed * mass_moving
    total = joint.sum(-1, keepdim=True)
    if (total == 0).any():
        items = (total[:, 0] == 0).nonzero()[:, 0].tolist()
        raise ValueError(f"no keypoint has positive mass in both images for batch items {items}")
    return joint / total


class ConvKeypointNet(nn.Sequential):
    """KeyMorph ``conv`` backbone (IXI half-resolution models, MedIA 2023): image -> ``K`` heatmaps.

    Nine blocks ``block1 .. block9``, each a MONAI :class:`~monai.networks.blocks.Convolution`
    (3^n conv with bias, padding 1 -> norm -> ReLU) with widths 32, 64, 64, 128, 128, 256, 256, 512,
    K, and a 2^n max-pool (floor) after blocks 2, 4, 6 and 8. Heatmaps are the ReLU'd block-9
    output, so they are non-negative, at ``floor`` 1/16 resolution (128^3 -> 8^3).

    Args:
        in_channels: image channels.
        num_keypoints: ``K``.
        spatial_dims: 2 or 3.
        norm: MONAI norm name or ``(name, args)``; the reference default (and the only one with checkpoint parity
            verified here) is ``"instance"`` (no affine, no running statistics).

    Input ``(B, in_channels, *spatial)`` with every spatial size >= 16 and at least one >= 32 (the
    final instance norm needs more than one heatmap voxel); output ``(B, K, *(s // 16))``.
    """

    widths = (32, 64, 64, 128, 128, 256, 256, 512)
    pooled_blocks = (2, 4, 6, 8)

    def __init__(
        self, in_channels: int = 1, num_keypoints: int = 512, spatial_dims: int = 3, norm: str | tuple = "instance"
    ):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        blocks = OrderedDict()
        channels = (in_channels, *self.widths, num_keypoints)
        for n, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:]), start=1):
            layers = OrderedDict(
                conv=Convolution(
                    spatial_dims,
                    c_in,
                    c_out,
                    kernel_size=3,
                    adn_ordering="NA",
                    norm=norm,
                    act=("relu", {"inplace": True}),
                )
            )
            if n in self.pooled_blocks:
                layers["pool"] = Pool[Pool.MAX, spatial_dims](kernel_size=2)
            blocks[f"block{n}"] = nn.Sequential(layers)
        super().__init__(blocks)
        self.in_channels = in_channels
        self.num_keypoints = num_keypoints
        self.spatial_dims = spatial_dims

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *spatial)`` -> heatmaps ``(B, K, *(spatial // 16))``."""
        _check_image(image, "image", self.in_channels, self.spatial_dims, 16)
        if max(image.shape[2:]) < 32:
            raise ValueError(
                "image needs at least one spatial size >= 32 (heatmap of more than one voxel), "
                f"got {tuple(image.shape[2:])}"
            )
        return super().forward(image)


class _PreNormConv(nn.Sequential):
    """GroupNorm on the *input* channels -> conv (k=3, padding 1, no bias) -> ReLU (pytorch-3dunet "gcr").

    Written by hand because MONAI's ``Convolution`` always normalises after the conv (its ADN
    block acts on the output channels); BrainMorph normalises the conv input.
    Groups: ``num_groups``, or 1 when ``in_channels < num_groups``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, num_groups: int):
        groups = num_groups if in_channels >= num_groups else 1
        if in_channels % groups:
            raise ValueError(
                f"num_groups={num_groups} must divide the {in_channels} input channels of a U-Net convolution"
            )
        super().__init__(
            OrderedDict(
                groupnorm=nn.GroupNorm(groups, in_channels),
                conv=Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=3, padding=1, bias=False),
                act=Act[Act.RELU](inplace=True),
            )
        )

    def slabs(self, parts: Sequence[RowSource], shape: Sequence[int]) -> Iterator[torch.Tensor]:
        """``self(cat(parts, dim=1))`` as consecutive slabs ``(B, C_out, d, ...)`` along the first spatial axis.

        The memory-saving path of :class:`TruncatedUNetKeypointNet` (no gradients): the input ``(B, C_in, *shape)``
        is read through ``parts`` (channel blocks, possibly computed on the fly) and neither it, its normalised copy
        nor the output exist in full. Written by hand because neither PyTorch nor MONAI has a slab-wise GroupNorm
        + conv: the group statistics need the whole input, so a first pass merges per-slab moments
        (:func:`_group_norm_affine`); the second normalises each slab with one halo row per side (zeros outside
        the volume, the conv's padding) and convolves it. Slabs have an even number of rows (so that a 2^n
        max-pool can follow slab by slab), except possibly the last (:func:`_slab_bounds`).
        """
        depth = shape[0]
        rows = _slab_rows(self.conv.in_channels, self.conv.out_channels, shape)
        scale, shift = _group_norm_affine(self.groupnorm, parts, depth, rows)
        conv = _CONV[len(shape)]
        padding = (0, *self.conv.padding[1:])
        for start, stop in _slab_bounds(depth, rows):
            x = _normalised_rows(parts, scale, shift, start, stop, depth)
            yield self.act(conv(x, self.conv.weight, self.conv.bias, padding=padding))


_CONV = {2: F.conv2d, 3: F.conv3d}


def _slab_rows(in_channels: int, out_channels: int, shape: Sequence[int]) -> int:
    """Rows per slab of a conv ``in_channels -> out_channels`` on a volume ``(B, C, *shape)``: an even number
    with ``(in_channels + out_channels) * rows * plane ~ _SLAB_ELEMENTS``, but enough rows for PyTorch to pick
    oneDNN over its several times slower native conv (for a batch of one only if ``C * (rows + 2) * shape[1] >
    20480``: the single-channel image of a 256^3 volume needs slabs of 80 rows)."""
    rows = _SLAB_ELEMENTS // ((in_channels + out_channels) * math.prod(shape[1:]))
    rows = max(rows, 20480 // (in_channels * shape[1]) - 1)
    return max(2, rows + rows % 2)


def _slab_bounds(depth: int, rows: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive slabs of ``rows`` rows covering ``range(depth)``. A remainder of fewer than
    ``max(2, rows // 2)`` rows joins the last slab: a single row would max-pool to nothing, and thin slabs take
    PyTorch's slow native conv (:func:`_slab_rows`)."""
    starts = list(range(0, depth, rows))
    if len(starts) > 1 and depth - starts[-1] < max(2, rows // 2):
        starts.pop()
    return list(zip(starts, [*starts[1:], depth]))


def _empty_channels_last(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Uninitialised channels-last tensor (faster oneDNN convolutions on the CPU) with ``like``'s dtype and device."""
    memory_format = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def _normalised_rows(
    parts: Sequence[RowSource], scale: torch.Tensor, shift: torch.Tensor, start: int, stop: int, depth: int
) -> torch.Tensor:
    """Rows ``start - 1 : stop + 1`` of ``cat(parts, dim=1) * scale + shift`` (``scale``, ``shift``: ``(B, C)``) as a
    channels-last ``(B, C, stop - start + 2, ...)``, zero outside ``range(depth)`` (a conv's zero padding)."""
    low, high = max(start - 1, 0), min(stop + 1, depth)
    first = low - start + 1  # row of input row ``low``: 1 after a zero row at the volume start, else 0
    blocks = [part(low, high) for part in parts]
    out = _empty_channels_last((*scale.shape, stop - start + 2, *blocks[0].shape[3:]), blocks[0])
    out[:, :, :first] = 0
    out[:, :, first + high - low :] = 0
    channel = 0
    for block in blocks:
        end = channel + block.shape[1]
        view = out[:, channel:end, first : first + high - low]
        torch.addcmul(_spread(shift[:, channel:end], view), block, _spread(scale[:, channel:end], view), out=view)
        channel = end
    return out


def _spread(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-channel ``values`` ``(B, C)`` broadcastable against ``like`` ``(B, C, *spatial)``."""
    return values.reshape(*values.shape, *(1,) * (like.ndim - 2))


def _rows(x: torch.Tensor) -> RowSource:
    """The rows of a stored volume ``x`` ``(B, C, D, ...)``."""
    return lambda start, stop: x[:, :, start:stop]


def _upsampled_rows(x: torch.Tensor, size: Sequence[int]) -> RowSource:
    """The rows of ``F.interpolate(x, size, mode="nearest")`` (as :class:`_UpCat`), computed on demand.

    The source row of every output row comes from upsampling the row indices themselves (the same nearest
    rule); the remaining axes are upsampled slab by slab (channels-last: PyTorch's fast nearest kernel).
    """
    index = torch.arange(x.shape[2], dtype=torch.float64, device=x.device).reshape(1, 1, -1)
    index = F.interpolate(index, size=size[0], mode="nearest").reshape(-1).long()

    def rows(start: int, stop: int) -> torch.Tensor:
        picked = _empty_channels_last((*x.shape[:2], stop - start, *x.shape[3:]), x)
        torch.index_select(x, 2, index[start:stop], out=picked)
        return F.interpolate(picked, size=(stop - start, *size[1:]), mode="nearest")

    return rows


def _materialize(slabs: Iterable[torch.Tensor], depth: int) -> torch.Tensor:
    """Stack slabs ``(B, C, d_i, ...)`` along the first spatial axis into a channels-last ``(B, C, depth, ...)``."""
    out, start = None, 0
    for slab in slabs:
        if out is None:
            out = _empty_channels_last((*slab.shape[:2], depth, *slab.shape[3:]), slab)
        out[:, :, start : start + slab.shape[2]] = slab
        start += slab.shape[2]
    return out


def _moments(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and biased variance ``(2, B, C)`` of ``x`` ``(B, C, *spatial)`` (two passes; a few times
    faster than ``torch.var_mean``'s scalar Welford loop on the CPU)."""
    dims = tuple(range(2, x.ndim))
    mean = x.mean(dims, keepdim=True)
    return torch.stack([mean.flatten(1), (x - mean).square_().mean(dims)])


def _group_norm_affine(
    norm: nn.GroupNorm, parts: Sequence[RowSource], depth: int, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` ``(B, C)`` with ``norm(x) = x * scale + shift`` for ``x = cat(parts, dim=1)``.

    Per-channel means and (biased) variances of every slab of ``rows`` rows are merged into the group moments
    in float64 (the pairwise update of Chan et al.: no sum-of-squares cancellation).
    """
    bounds = _slab_bounds(depth, rows)
    moments = [torch.cat([_moments(part(start, stop)) for part in parts], dim=-1) for start, stop in bounds]
    mean, variance = torch.stack(moments).double().unbind(1)  # (S, B, C) each
    slabs, batch, channels = mean.shape
    width = channels // norm.num_groups
    rows_per_slab = torch.tensor([stop - start for start, stop in bounds], dtype=torch.float64, device=mean.device)
    weight = (rows_per_slab / (depth * width)).reshape(slabs, 1, 1, 1)  # a slab channel's share of its group
    mean, variance = mean.reshape(slabs, batch, -1, width), variance.reshape(slabs, batch, -1, width)
    group_mean = (weight * mean).sum((0, 3))  # (B, G)
    group_variance = (weight * (variance + (mean - group_mean[..., None]) ** 2)).sum((0, 3))
    scale = (group_variance + norm.eps).rsqrt()[..., None] * norm.weight.double().reshape(-1, width)  # (B, G, width)
    shift = norm.bias.double().reshape(-1, width) - group_mean[..., None] * scale
    return tuple(t.reshape(batch, channels).to(norm.weight.dtype) for t in (scale, shift))


class _UpCat(nn.Module):
    """Decoder level: nearest upsampling to the skip's size, concatenation ``[skip, up]``, two convs.

    ``F.interpolate(size=...)`` is used instead of MONAI's ``UpSample`` because the target size is
    the skip's (floor-pooled, possibly odd) size, known only at run time; "nearest" is PyTorch's
    legacy rule ``src = floor(dst * in / out)`` as in the reference.
    """

    def __init__(self, spatial_dims: int, skip_channels: int, up_channels: int, num_groups: int):
        super().__init__()
        self.conv1 = _PreNormConv(spatial_dims, skip_channels + up_channels, skip_channels, num_groups)
        self.conv2 = _PreNormConv(spatial_dims, skip_channels, skip_channels, num_groups)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.conv2(self.conv1(torch.cat([skip, x], dim=1)))

    def slab_forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` in slabs (:meth:`_PreNormConv.slabs`): neither the upsampled ``x`` nor the
        concatenation is stored. Returns a channels-last tensor."""
        shape = skip.shape[2:]
        x = _materialize(self.conv1.slabs([_rows(skip), _upsampled_rows(x, shape)], shape), shape[0])
        return _materialize(self.conv2.slabs([_rows(x)], shape), shape[0])


class TruncatedUNetKeypointNet(nn.Module):
    """BrainMorph ``truncatedunet`` backbone: a U-Net (2-D or 3-D) whose last decoder level(s) are dropped.

    Encoder ``k`` (``k = 0 .. L-1``, width ``f_k = f_maps 2^k``): 2^n max-pool (floor, not for
    ``k = 0``), then two :class:`_PreNormConv` ``c_in -> max(f_k // 2, c_in) -> f_k``. Decoder ``i``
    (deepest first) joins encoder ``L-2-i``: nearest upsampling to the skip size, ``[skip, up]``,
    two convs to the skip width. The last ``num_truncated`` decoders are dropped and a 1^n conv with
    bias maps ``f_t`` (``t = num_truncated``) channels to ``K``. No final activation (the
    :class:`CenterOfMass` ReLUs).

    Named BrainMorph sizes (``num_levels`` as a string): ``"S"``: 4, ``"M"``: 5, ``"L"``: 6,
    ``"H"``: 7 levels (released with ``num_keypoints`` 128, 256 or 512).

    Args:
        in_channels: image channels.
        num_keypoints: ``K``.
        spatial_dims: 2 or 3.
        f_maps: width of the first level.
        num_levels: ``L >= 2`` or a size name.
        num_truncated: dropped decoder levels, ``0 <= t <= L - 1`` (reference default 1; 0 is the
            full U-Net layout, not parity-tested here).
        num_groups: GroupNorm groups (1 for convs with fewer input channels).
        low_memory_voxels: inputs of at least this many voxels per image take the memory-saving path when
            gradients are off (``None``: never); see below.

    Input ``(B, in_channels, *spatial)``, every spatial size ``>= 2^(L-1)``; output
    ``(B, K, *s_t)`` with ``s_t`` the size after ``t`` floor halvings (t = 1: half resolution).

    Memory-saving path (no gradients, not tracing, at least ``low_memory_voxels`` voxels): every convolution runs
    in slabs along the first spatial axis (:meth:`_PreNormConv.slabs`) on channels-last tensors, the unused
    full-resolution encoder outputs are max-pooled slab by slab instead of stored, and :meth:`heatmap_chunks`
    applies the final conv a few keypoints at a time. It computes the same function (float32 rounding aside,
    about 1e-6 relative) with a fraction of the memory (a 256^3 image: under 2 GB instead of about 9 GB);
    forward hooks of the submodules do not fire in it.
    """

    sizes = {"S": 4, "M": 5, "L": 6, "H": 7}

    def __init__(
        self,
        in_channels: int = 1,
        num_keypoints: int = 256,
        spatial_dims: int = 3,
        f_maps: int = 32,
        num_levels: int | str = 4,
        num_truncated: int = 1,
        num_groups: int = 8,
        low_memory_voxels: int | None = 64**3,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if isinstance(num_levels, str):
            if num_levels not in self.sizes:
                raise ValueError(f"num_levels must be an int or one of {sorted(self.sizes)}, got {num_levels!r}")
            num_levels = self.sizes[num_levels]
        if num_levels < 2:
            raise ValueError(f"num_levels must be at least 2, got {num_levels}")
        if not 0 <= num_truncated <= num_levels - 1:
            raise ValueError(f"num_truncated must be in [0, num_levels - 1 = {num_levels - 1}], got {num_truncated}")
        widths = [f_maps * 2**k for k in range(num_levels)]
        self.encoders = nn.ModuleList()
        c_in = in_channels
        for k, f in enumerate(widths):
            layers = OrderedDict()
            if k > 0:
                layers["pool"] = Pool[Pool.MAX, spatial_dims](kernel_size=2)
            mid = max(f // 2, c_in)
            layers["conv1"] = _PreNormConv(spatial_dims, c_in, mid, num_groups)
            layers["conv2"] = _PreNormConv(spatial_dims, mid, f, num_groups)
            self.encoders.append(nn.Sequential(layers))
            c_in = f
        self.decoders = nn.ModuleList(
            _UpCat(spatial_dims, widths[k], widths[k + 1], num_groups)
            for k in range(num_levels - 2, num_truncated - 1, -1)
        )
        self.final_conv = Conv[Conv.CONV, spatial_dims](widths[num_truncated], num_keypoints, kernel_size=1)
        self.in_channels = in_channels
        self.num_keypoints = num_keypoints
        self.spatial_dims = spatial_dims
        self.num_levels = num_levels
        self.num_truncated = num_truncated
        self.low_memory_voxels = low_memory_voxels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *spatial)`` -> heatmaps ``(B, K, *s_t)`` (may be negative)."""
        if self._saves_memory(image):
            return self._final_conv(self._slab_features(image), 0, self.num_keypoints)
        skips = []
        x = image
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if self.num_truncated <= level < self.num_levels - 1:  # joined by a decoder
                skips.append(x)
        for decoder in self.decoders:
            x = decoder(skips.pop(), x)
        return self.final_conv(x)

    def heatmap_chunks(self, image: torch.Tensor) -> Iterator[torch.Tensor]:
        """The heatmaps of :meth:`forward` as consecutive keypoint chunks ``(B, K_i, *s_t)`` (for
        :meth:`CenterOfMass.from_chunks`): on the memory-saving path the final conv makes them a chunk at a
        time, so that the ``K`` heatmaps never exist at once; otherwise a single chunk."""
        if not self._saves_memory(image):
            return iter((self(image),))
        features = self._slab_features(image)
        step = max(1, _SLAB_ELEMENTS // features[0, 0].numel())
        return (self._final_conv(features, k, k + step) for k in range(0, self.num_keypoints, step))

    def _final_conv(self, features: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Heatmaps ``start:stop`` ``(B, k, *s_t)`` (contiguous) of channels-last ``features`` ``(B, f_t, *s_t)``.

        The 1^n conv as a matrix product with the ``(B, f_t, N)`` view of the features: no contiguous copy, and
        PyTorch runs a single-threaded 1^n conv of channels-last input through its slow native kernel. The weight
        is detached (gradient-free path) because ``matmul`` avoids its fast folded route for operands that
        require grad, even under ``no_grad`` (five times slower).
        """
        weight, bias = self.final_conv.weight.detach().flatten(1)[start:stop], self.final_conv.bias[start:stop]
        return (weight @ features.flatten(2)).add_(bias[:, None]).unflatten(2, features.shape[2:])

    def _saves_memory(self, image: torch.Tensor) -> bool:
        """Validate ``image``; True for the memory-saving path (class docstring)."""
        _check_image(image, "image", self.in_channels, self.spatial_dims, 2 ** (self.num_levels - 1))
        return (
            self.low_memory_voxels is not None
            and math.prod(image.shape[2:]) >= self.low_memory_voxels
            and not torch.is_grad_enabled()
            and not torch.jit.is_tracing()
        )

    def _slab_features(self, image: torch.Tensor) -> torch.Tensor:
        """The last decoder's output ``(B, f_t, *s_t)`` (channels-last), every conv in slabs."""
        x, skips, pooled = image, [], False
        for level, encoder in enumerate(self.encoders):
            if level > 0 and not pooled:
                x = encoder.pool(x)
            x = _materialize(encoder.conv1.slabs([_rows(x)], x.shape[2:]), x.shape[2])
            slabs = encoder.conv2.slabs([_rows(x)], x.shape[2:])
            pooled = level < self.num_truncated  # not a skip: only its pooled version is needed
            if pooled:
                x = _materialize(map(self.encoders[level + 1].pool, slabs), x.shape[2] // 2)
            else:
                x = _materialize(slabs, x.shape[2])
                if level < self.num_levels - 1:
                    skips.append(x)
        for decoder in self.decoders:
            x = decoder.slab_forward(skips.pop(), x)
        return x


class KeypointDetector(nn.Module):
    """Backbone + :class:`CenterOfMass`: image ``(B, C, *spatial)`` -> keypoints ``(B, K, n)``.

    Keypoints are normalised align_corners=True coordinates of the heatmap grid in ``indexing``
    order (module docstring); with ``return_mass`` also the heatmap masses ``(B, K)`` for
    :func:`power_weights`. ``empty`` and ``eps`` are passed to :class:`CenterOfMass`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        indexing: str = "ij",
        empty: str = "corner",
        eps: float = 1e-8,
        return_mass: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.center_of_mass = CenterOfMass(indexing=indexing, empty=empty, eps=eps, return_mass=return_mass)

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if isinstance(image, torch.Tensor) and not torch.isfinite(image).all():
            raise ValueError("image contains non-finite values")
        return self.center_of_mass.from_chunks(heatmap_chunks(self.backbone, image))


def heatmap_chunks(backbone: nn.Module, image: torch.Tensor) -> Iterator[torch.Tensor]:
    """``backbone``'s heatmaps of ``image`` as keypoint chunks for :meth:`CenterOfMass.from_chunks`: its
    ``heatmap_chunks`` method if it has one (:class:`TruncatedUNetKeypointNet`), else one chunk ``backbone(image)``."""
    chunks = getattr(backbone, "heatmap_chunks", None)
    return iter((backbone(image),)) if chunks is None else chunks(image)
