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

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Conv, Pool

__all__ = [
    "CenterOfMass",
    "power_weights",
    "ConvKeypointNet",
    "TruncatedUNetKeypointNet",
    "KeypointDetector",
]

_EMPTY_MODES = ("corner", "center", "raise")


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
        if not isinstance(heatmaps, torch.Tensor):
            raise TypeError(f"heatmaps must be a torch.Tensor, got {type(heatmaps).__name__}")
        n = heatmaps.ndim - 2
        if n not in (2, 3):
            raise ValueError(
                f"heatmaps must have shape (B, K, *spatial) with 2 or 3 spatial dims, got {tuple(heatmaps.shape)}"
            )
        if not torch.isfinite(heatmaps).all():
            raise ValueError("heatmaps contain non-finite values")
        density = torch.relu(heatmaps)
        mass = density.flatten(2).sum(-1)
        coords = []
        for axis in range(n):
            marginal = density.sum(dim=[2 + a for a in range(n) if a != axis])  # (B, K, N_axis)
            pos = torch.linspace(0, 1, heatmaps.shape[2 + axis], dtype=heatmaps.dtype, device=heatmaps.device)
            coords.append(2 * (marginal * pos).sum(-1) / (marginal.sum(-1) + self.eps) - 1)
        points = torch.stack(coords if self.indexing == "ij" else coords[::-1], dim=-1)
        empty = mass == 0
        if self.empty == "raise" and empty.any():
            raise ValueError(
                f"heatmaps have channels without positive values, (batch, channel): {empty.nonzero().tolist()}"
            )
        # explicit also for "corner" so that eps = 0 cannot give 0 / 0
        points = points.masked_fill(empty[..., None], -1.0 if self.empty == "corner" else 0.0)
        return (points, mass) if self.return_mass else points


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

    Input ``(B, in_channels, *spatial)``, every spatial size ``>= 2^(L-1)``; output
    ``(B, K, *s_t)`` with ``s_t`` the size after ``t`` floor halvings (t = 1: half resolution).
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

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *spatial)`` -> heatmaps ``(B, K, *s_t)`` (may be negative)."""
        _check_image(image, "image", self.in_channels, self.spatial_dims, 2 ** (self.num_levels - 1))
        features = []
        x = image
        for encoder in self.encoders:
            x = encoder(x)
            features.append(x)
        for decoder, skip in zip(self.decoders, features[-2::-1]):
            x = decoder(skip, x)
        return self.final_conv(x)


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
        return self.center_of_mass(self.backbone(image))
