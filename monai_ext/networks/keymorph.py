"""KeyMorph / BrainMorph registration: closed-form keypoint aligners, the pairwise model, groupwise registration.

A keypoint detector (:mod:`monai_ext.networks.keypoints`) gives ``K`` corresponding keypoints in the moving and
the fixed image; a closed-form fit of those keypoints gives the transformation. The fit always goes **fixed ->
moving** (the pull-back map: every fixed voxel gets the moving-image position to read); the forward map
(moving -> fixed) only moves points. Alignments (reference: the authors' implementation
``github.com/alanqrwang/keymorph`` at commit ``dcb7996``):

* ``"affine"``: least-squares affine fit; forward map = its matrix inverse;
* ``"rigid"``: least-squares proper rotation + translation (standard Kabsch, not the reference's row-flip
  reflection fix nor its ``w^2`` weighting; both agree with it whenever the reference does not reflect and is
  unweighted); forward map = its matrix inverse;
* ``"tps_<lambda>"``: thin-plate spline with regularisation ``lambda`` (``"tps_0"`` interpolates the keypoints
  exactly), or ``"tps_uniform"`` / ``"tps_loguniform"`` / ``"tps_lognormal"`` with a random ``lambda`` per batch
  item (:func:`tps_lambda`). The forward point map is, as in the reference, a *separate* TPS fitted moving ->
  fixed (a TPS has no closed-form inverse; for ``lambda = 0`` both fits interpolate the keypoints, so the
  forward-mapped moving keypoints are exactly the fixed keypoints either way).

Coordinates. Keypoints are ``(B, K, n)`` in ``ij`` (array axis) order, each axis normalised to ``[-1, 1]`` with
the align_corners=True convention (voxel ``i`` of ``N`` at ``-1 + 2 i / (N - 1)``). Matrices are homogeneous
``(B, n + 1, n + 1)`` on column vectors ``[p; 1]``. Dense outputs are voxel DDFs ``(B, n, *fixed_spatial)`` in
the convention of :mod:`monai_ext.spatial.sampling` (``warp(moving, ddf)`` resembles ``fixed``). Two grid
conventions (``reference_grid``):

* ``False`` (default, consistent): normalised moving coordinates are read with align_corners=True, the same
  convention as the keypoints, so identical keypoints give a zero DDF and reproduce the image exactly;
* ``True`` (the reference's mixed convention, for bit-compatibility with its released weights and outputs): the
  fixed grid is built with ``linspace(-1, 1)`` (align_corners=True positions) but the moving position is read
  with align_corners=False, ``v = (p + 1) N / 2 - 0.5``. The identity is then a zoom by ``N / (N - 1)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from monai_ext.networks.keypoints import CenterOfMass, KeypointDetector, heatmap_chunks, power_weights
from monai_ext.spatial.affine import check_spread, fit_affine, fit_rigid, transform_points
from monai_ext.spatial.coordinates import invert_homogeneous, voxel_to_normalized
from monai_ext.spatial.sampling import voxel_grid
from monai_ext.spatial.tps import fit_tps, tps_dense, tps_transform_points

__all__ = [
    "normalized_to_voxels",
    "parse_alignment",
    "tps_lambda",
    "KeypointTransform",
    "fit_keypoint_transform",
    "groupwise_keypoints",
    "GroupwiseRegistration",
    "KeyMorph",
]

_RANDOM_LAMBDAS = ("uniform", "loguniform", "lognormal")
_TPS = re.compile(r"^tps_(.+)$")
_LOGUNIFORM_MIN = 1e-6  # lower bound of the reference's scipy loguniform(1e-6, max)


def parse_alignment(alignment: str) -> tuple[str, float | str | None]:
    """Split an alignment name into ``(kind, lambda)``.

    ``"affine"`` / ``"rigid"`` -> ``(kind, None)``; ``"tps_<number>"`` -> ``("tps", float)`` (``>= 0``);
    ``"tps_uniform"`` / ``"tps_loguniform"`` / ``"tps_lognormal"`` -> ``("tps", name)``. Raises ``ValueError``
    for anything else.
    """
    if alignment in ("affine", "rigid"):
        return alignment, None
    match = _TPS.match(alignment) if isinstance(alignment, str) else None
    if match is None:
        raise ValueError(
            f"alignment must be 'affine', 'rigid', 'tps_<lambda>' or 'tps_{{{','.join(_RANDOM_LAMBDAS)}}}', "
            f"got {alignment!r}"
        )
    suffix = match.group(1)
    if suffix in _RANDOM_LAMBDAS:
        return "tps", suffix
    try:
        value = float(suffix)
    except ValueError:
        raise ValueError(
            f"alignment {alignment!r}: the TPS lambda must be a number or one of {_RANDOM_LAMBDAS}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"alignment {alignment!r}: the TPS lambda must be finite and >= 0")
    return "tps", value


def tps_lambda(
    alignment: str,
    batch: int,
    max_lambda: float = 10.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The TPS regularisation ``(batch,)`` of a ``"tps_*"`` alignment (the suffix after ``tps_``).

    A number is repeated; ``uniform``: ``U(0, max_lambda)``; ``loguniform``: log-uniform on
    ``[1e-6, max_lambda]``; ``lognormal``: ``exp(N(0, 1))`` (the legacy/tps branches; ``max_lambda`` unused).
    Random values are drawn per batch item on every call (training and evaluation alike, as the reference).
    """
    kind, value = parse_alignment(alignment)
    if kind != "tps":
        raise ValueError(f"alignment {alignment!r} is not a TPS alignment")
    if not isinstance(value, str):
        return torch.full((batch,), value, dtype=dtype, device=device)
    if value != "lognormal" and not (math.isfinite(max_lambda) and max_lambda > _LOGUNIFORM_MIN):
        raise ValueError(f"max_lambda must be finite and > {_LOGUNIFORM_MIN}, got {max_lambda}")
    if value == "lognormal":
        return torch.randn(batch, generator=generator, dtype=dtype).exp().to(device)
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    if value == "uniform":
        return (u * max_lambda).to(dtype=dtype, device=device)
    low, high = math.log(_LOGUNIFORM_MIN), math.log(max_lambda)
    return (low + u * (high - low)).exp().to(dtype=dtype, device=device)


def normalized_to_voxels(points: torch.Tensor, spatial_shape: Sequence[int], align_corners: bool = True) -> torch.Tensor:
    """KeyMorph normalised coordinates ``(..., n)`` (``ij`` order, ``[-1, 1]`` per axis) -> voxel coordinates.

    ``align_corners=True``: ``v = (p + 1) (N - 1) / 2`` (KeyMorph's keypoint convention, and ours for grids);
    ``False``: ``v = (p + 1) N / 2 - 0.5`` (how the reference *reads* the moving image: ``reference_grid=True``).
    """
    size = torch.tensor([float(s) for s in spatial_shape], dtype=points.dtype, device=points.device)
    return (points + 1) * (size - 1) / 2 if align_corners else (points + 1) * size / 2 - 0.5


@dataclass
class KeypointTransform:
    """A fitted keypoint alignment between a fixed and a moving image (normalised ``ij`` coordinates).

    Attributes:
        alignment: the alignment name it was fitted with.
        points_fixed, points_moving: ``(B, K, n)`` the keypoints used for the fit.
        weights: ``(B, K)`` keypoint weights or None.
        inverse_matrix: affine / rigid: ``(B, n + 1, n + 1)`` fixed -> moving (the fit; drives the grid).
        matrix: affine / rigid: its inverse, moving -> fixed.
        lmbda: TPS: ``(B,)`` regularisation.
        theta_inverse: TPS fixed -> moving ``(B, K + n + 1, n)``, control points ``points_fixed`` (drives the grid).
        theta: TPS moving -> fixed, control points ``points_moving``: a separate fit (forward point map).
    """

    alignment: str
    points_fixed: torch.Tensor
    points_moving: torch.Tensor
    weights: torch.Tensor | None = None
    inverse_matrix: torch.Tensor | None = None
    matrix: torch.Tensor | None = None
    lmbda: torch.Tensor | None = None
    theta_inverse: torch.Tensor | None = None
    theta: torch.Tensor | None = None

    def fixed_to_moving(self, points: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """Map fixed-image points ``(B, N, n)`` (normalised) to moving-image points (the grid's map)."""
        if self.theta_inverse is None:
            return transform_points(self.inverse_matrix, points)
        return tps_transform_points(self.theta_inverse, self.points_fixed, points, chunk_size)

    def moving_to_fixed(self, points: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """Map moving-image points ``(B, N, n)`` (normalised) into the fixed image (KeyMorph's ``points_a``)."""
        if self.theta is None:
            return transform_points(self.matrix, points)
        return tps_transform_points(self.theta, self.points_moving, points, chunk_size)

    def sampling_grid(self, fixed_shape: Sequence[int], chunk_size: int = 65536) -> torch.Tensor:
        """Normalised moving coordinates ``(B, *fixed_shape, n)`` (``ij``) of every fixed voxel centre.

        The fixed voxel centres are at ``linspace(-1, 1, N)`` per axis (align_corners=True positions). Reverse
        the last axis for ``grid_sample`` (``align_corners=True`` in the consistent convention, ``False`` for
        the reference's). TPS grids are evaluated ``chunk_size`` voxels at a time (:func:`tps_dense`).
        """
        shape = tuple(int(s) for s in fixed_shape)
        n = self.points_fixed.shape[-1]
        if len(shape) != n:
            raise ValueError(f"fixed_shape must have {n} sizes for {n}-D keypoints, got {shape}")
        to_normalized = voxel_to_normalized(shape, True, self.points_fixed.dtype, self.points_fixed.device)
        if self.theta_inverse is None:
            matrix = self.inverse_matrix @ to_normalized
            grid = voxel_grid(shape, matrix.dtype, matrix.device).reshape(n, -1).T[None]
            return transform_points(matrix, grid).reshape(matrix.shape[0], *shape, n)
        return tps_dense(
            self.theta_inverse,
            self.points_fixed,
            shape,
            to_points=lambda v: transform_points(to_normalized[None], v[None]),
            chunk_size=chunk_size,
        )

    def ddf(
        self,
        fixed_shape: Sequence[int],
        moving_shape: Sequence[int] | None = None,
        reference_grid: bool = False,
        chunk_size: int = 65536,
    ) -> torch.Tensor:
        """Voxel DDF ``(B, n, *fixed_shape)`` from fixed voxels into moving voxels (``warp(moving, ddf)``).

        ``moving_shape`` defaults to ``fixed_shape``; ``reference_grid`` selects the moving read convention
        (module docstring).
        """
        grid = self.sampling_grid(fixed_shape, chunk_size)
        voxels = normalized_to_voxels(grid, fixed_shape if moving_shape is None else moving_shape, not reference_grid)
        shape = grid.shape[1:-1]
        return voxels.movedim(-1, 1) - voxel_grid(shape, voxels.dtype, voxels.device)[None]

    def voxel_matrices(
        self, fixed_shape: Sequence[int], moving_shape: Sequence[int] | None = None, reference_grid: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Affine / rigid only: ``(matrix, inverse_matrix)`` in voxel units.

        ``inverse_matrix`` maps fixed voxels to moving voxels (``affine_to_ddf`` of it equals :meth:`ddf`),
        ``matrix`` maps moving voxels to fixed voxels; same read convention as :meth:`ddf`.
        """
        if self.inverse_matrix is None:
            raise ValueError(f"alignment {self.alignment!r} has no matrix (only 'affine' and 'rigid' do)")
        moving_shape = fixed_shape if moving_shape is None else moving_shape
        dtype, device = self.inverse_matrix.dtype, self.inverse_matrix.device
        fixed_to_norm = voxel_to_normalized(fixed_shape, True, dtype, device)
        moving_to_norm = voxel_to_normalized(moving_shape, not reference_grid, dtype, device)
        inverse = invert_homogeneous(moving_to_norm) @ self.inverse_matrix @ fixed_to_norm
        return invert_homogeneous(inverse), inverse


def fit_keypoint_transform(
    points_fixed: torch.Tensor,
    points_moving: torch.Tensor,
    alignment: str = "affine",
    weights: torch.Tensor | None = None,
    lmbda: float | torch.Tensor | None = None,
    max_lambda: float = 10.0,
) -> KeypointTransform:
    """Fit an alignment to corresponding keypoints ``(B, K, n)`` (normalised ``ij``; any batch size).

    Args:
        points_fixed: keypoints of the fixed image.
        points_moving: the corresponding keypoints of the moving image.
        alignment: ``"affine"``, ``"rigid"`` or ``"tps_*"`` (module docstring).
        weights: optional ``(B, K)`` keypoint weights (e.g. :func:`~monai_ext.networks.keypoints.power_weights`).
            Affine / rigid: weighted least squares (scale-free). TPS: per-point regularisation ``lmbda / w_k``
            (:func:`~monai_ext.spatial.tps.fit_tps`; not the reference's buggy form, identical for ``lambda = 0``).
        lmbda: TPS only: overrides the lambda of the name (e.g. a value drawn once for the batch).
        max_lambda: upper bound for ``tps_uniform`` / ``tps_loguniform``.

    Raises:
        ValueError: bad alignment name, shapes, non-finite values, too few keypoints (affine 4 in 3-D, rigid 3,
            TPS 5) or degenerate (collinear / coplanar) keypoints.
    """
    kind, value = parse_alignment(alignment)
    if kind == "affine":
        inverse = fit_affine(points_fixed, points_moving, weights)
        check_spread(points_moving, weights, points_moving.shape[-1], "points_moving")  # invertible forward map
    elif kind == "rigid":
        inverse = fit_rigid(points_fixed, points_moving, weights)
    else:
        if lmbda is None:
            lmbda = tps_lambda(alignment, points_fixed.shape[0], max_lambda, points_fixed.dtype, points_fixed.device)
        theta_inverse = fit_tps(points_fixed, points_moving, lmbda, weights)
        theta = fit_tps(points_moving, points_fixed, lmbda, weights)
        lmbda = torch.as_tensor(lmbda, dtype=points_fixed.dtype, device=points_fixed.device)
        return KeypointTransform(
            alignment,
            points_fixed,
            points_moving,
            weights,
            lmbda=lmbda.reshape(-1).expand(points_fixed.shape[0]),
            theta_inverse=theta_inverse,
            theta=theta,
        )
    return KeypointTransform(
        alignment, points_fixed, points_moving, weights, inverse_matrix=inverse, matrix=invert_homogeneous(inverse)
    )


def groupwise_keypoints(
    points: torch.Tensor, alignment: str = "affine", num_iterations: int = 5, lmbda: float | None = None
) -> dict[str, torch.Tensor]:
    """BrainMorph's groupwise keypoint alignment (Wang et al., MELBA 2025): iterate ``N`` keypoint sets to their mean.

    Iteration ``j``: ``mu_j`` = mean of the current sets; every set ``G_i`` is fitted as moving to ``mu_j`` as
    fixed and replaced by its forward-mapped points. The template is ``mu_{J-1}``, the mean *entering* the last
    iteration (the reference's choice; the final transforms go from the original sets to it).

    Args:
        points: ``(N, K, n)`` keypoints of the ``N`` images (normalised ``ij``).
        alignment: as in :func:`fit_keypoint_transform` (all ``N`` fits are batched).
        num_iterations: ``J >= 1``.
        lmbda: TPS lambda override (random names draw a new lambda per image and iteration otherwise).

    Returns:
        ``{"points_aligned": (N, K, n), "means": (J, K, n), "template": (K, n)}``.
    """
    if points.ndim != 3 or points.shape[0] < 2:
        raise ValueError(f"points must be (N, K, n) with N >= 2 images, got {tuple(points.shape)}")
    if int(num_iterations) < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    current, means = points, []
    for _ in range(int(num_iterations)):
        mean = current.mean(0)
        means.append(mean)
        transform = fit_keypoint_transform(mean.expand_as(current), current, alignment, lmbda=lmbda)
        current = transform.moving_to_fixed(current)
    return {"points_aligned": current, "means": torch.stack(means), "template": means[-1]}


@dataclass
class GroupwiseRegistration:
    """Result of :meth:`KeyMorph.groupwise_register`: keypoints only; dense fields are produced on demand.

    The common (template) space of image ``i`` is its own voxel grid: :meth:`ddf` maps template-space voxels of
    image ``i``'s grid into image ``i`` (``warp(image_i, ddf(i))`` is image ``i`` in the common space).

    Attributes:
        alignment: alignment name.
        points: ``(N, K, n)`` original keypoints (the reference's ``grouppoints_m``).
        points_aligned: ``(N, K, n)`` keypoints after the iterations (``grouppoints_a``).
        means: ``(J, K, n)`` the mean of every iteration.
        template: ``(K, n)`` the template keypoints.
        spatial_shapes: the spatial shape of every image.
        reference_grid, chunk_size, lmbda: as in :class:`KeyMorph`.
    """

    alignment: str
    points: torch.Tensor
    points_aligned: torch.Tensor
    means: torch.Tensor
    template: torch.Tensor
    spatial_shapes: list[tuple[int, ...]] = field(default_factory=list)
    reference_grid: bool = False
    chunk_size: int = 65536
    lmbda: float | None = None

    def __len__(self) -> int:
        return self.points.shape[0]

    def transform(self, index: int) -> KeypointTransform:
        """The fit from image ``index``'s original keypoints (moving) to the template (fixed).

        Refitted on every call (closed form, cheap); a random TPS lambda is redrawn unless ``lmbda`` is set.
        """
        return fit_keypoint_transform(
            self.template[None], self.points[index : index + 1], self.alignment, lmbda=self.lmbda
        )

    def ddf(self, index: int) -> torch.Tensor:
        """``(1, n, *spatial_i)`` voxel DDF from the common space into image ``index``."""
        shape = self.spatial_shapes[index]
        return self.transform(index).ddf(shape, shape, self.reference_grid, self.chunk_size)

    def ddfs(self) -> Iterator[torch.Tensor]:
        """Generator of the ``N`` DDFs in image order; only one is alive at a time if the caller does not keep it."""
        return (self.ddf(index) for index in range(len(self)))


class KeyMorph(nn.Module):
    """KeyMorph / BrainMorph keypoint registration (Wang et al., MedIA 2023; BrainMorph, MELBA 2025).

    Args:
        detector: a :class:`~monai_ext.networks.keypoints.KeypointDetector` (its backbone and its centre-of-mass
            settings ``empty`` / ``eps`` are used, ``indexing`` must be ``"ij"``) or a bare backbone
            (image ``(B, C, *spatial)`` -> heatmaps ``(B, K, *spatial')``), e.g. from
            :func:`~monai_ext.checkpoints.load_keymorph_checkpoint`.
        alignment: default alignment of :meth:`forward` (module docstring).
        weighted: use KeyMorph's ``power`` keypoint weights (heatmap masses of both images).
        max_train_keypoints: in training mode, TPS fits use a random subset of this many keypoints (the same
            subset for both images; reference default 64, BrainMorph 32).
        max_tps_lambda: upper bound of random TPS lambdas.
        reference_grid: the reference's mixed grid convention (module docstring).
        chunk_size: voxels per chunk of dense TPS evaluation.
    """

    def __init__(
        self,
        detector: nn.Module,
        alignment: str = "affine",
        weighted: bool = False,
        max_train_keypoints: int | None = None,
        max_tps_lambda: float = 10.0,
        reference_grid: bool = False,
        chunk_size: int = 65536,
    ):
        super().__init__()
        parse_alignment(alignment)
        if max_train_keypoints is not None and int(max_train_keypoints) < 5:
            raise ValueError(f"max_train_keypoints must be None or >= 5 (a 3-D TPS needs 5), got {max_train_keypoints}")
        if isinstance(detector, KeypointDetector):
            com = detector.center_of_mass
            if com.indexing != "ij":
                raise ValueError("detector must use indexing='ij' (keypoints in array axis order)")
            self.backbone = detector.backbone
            self.center_of_mass = CenterOfMass("ij", empty=com.empty, eps=com.eps, return_mass=True)
        elif isinstance(detector, nn.Module):
            self.backbone = detector
            self.center_of_mass = CenterOfMass("ij", return_mass=True)
        else:
            raise TypeError(f"detector must be an nn.Module, got {type(detector).__name__}")
        self.alignment = alignment
        self.weighted = weighted
        self.max_train_keypoints = max_train_keypoints
        self.max_tps_lambda = max_tps_lambda
        self.reference_grid = reference_grid
        self.chunk_size = chunk_size

    def keypoints(self, image: torch.Tensor, name: str = "image") -> tuple[torch.Tensor, torch.Tensor]:
        """Keypoints ``(B, K, n)`` (normalised ``ij``) and heatmap masses ``(B, K)`` of ``image`` ``(B, C, *spatial)``.

        Empty heatmaps follow the detector's ``empty`` rule (reference: the corner ``-1``), but an image whose
        heatmaps are *all* empty (e.g. a blank image) has no keypoints at all and raises ``ValueError``.
        """
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
        dims = getattr(self.backbone, "spatial_dims", None)
        if image.ndim not in (4, 5) or (dims is not None and image.ndim != dims + 2):
            want = f"{dims}" if dims is not None else "2 or 3"
            raise ValueError(f"{name} must be (B, C, *spatial) with {want} spatial dims, got {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise ValueError(f"{name} contains non-finite values")
        points, mass = self.center_of_mass.from_chunks(heatmap_chunks(self.backbone, image))
        if (mass == 0).all(dim=1).any():
            items = (mass == 0).all(dim=1).nonzero()[:, 0].tolist()
            raise ValueError(f"{name}: every heatmap is empty (blank image?) for batch items {items}: no keypoints")
        return points, mass

    def _subsample(self, alignment: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """Random ``max_train_keypoints`` subset for TPS in training, as the reference, shared by all tensors
        (dim 1 = keypoints)."""
        k = tensors[0].shape[1]
        limit = self.max_train_keypoints
        if not (self.training and alignment.startswith("tps_") and limit is not None and limit < k):
            return tensors
        index = torch.randperm(k, device=tensors[0].device)[: int(limit)]
        return tuple(None if t is None else t[:, index] for t in tensors)

    def register(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        alignments: Sequence[str] | str | None = None,
        dense: bool = True,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Register ``moving`` ``(B, C, *spatial_m)`` to ``fixed`` ``(B, C, *spatial_f)`` with every alignment.

        The keypoints are detected once; every alignment is a closed-form fit. Returns, per alignment name:

        * ``points_fixed``, ``points_moving``: ``(B, K, n)`` keypoints (normalised ``ij``), and ``weights``
          ``(B, K)`` if ``weighted``; in training with ``max_train_keypoints``, the TPS subset;
        * ``points_aligned``: ``(B, K, n)`` the moving keypoints mapped into the fixed image (forward map);
        * affine / rigid: ``matrix`` (moving -> fixed) and ``inverse_matrix`` (fixed -> moving), ``(B, n+1, n+1)``
          in normalised coordinates, and ``matrix_voxel`` / ``inverse_matrix_voxel`` in voxel units;
        * TPS: ``lmbda`` ``(B,)``, ``theta_inverse`` (fixed -> moving, control ``points_fixed``) and ``theta``
          (moving -> fixed, control ``points_moving``);
        * if ``dense``: ``ddf`` ``(B, n, *spatial_f)`` voxel DDF (``warp(moving, ddf)`` ~ ``fixed``) and ``grid``
          ``(B, *spatial_f, n)`` normalised moving coordinates in ``grid_sample``'s reversed (x, y, z) order,
          to be read with ``align_corners = not reference_grid``.
        """
        if alignments is None or isinstance(alignments, str):
            alignments = (self.alignment if alignments is None else alignments,)
        if self.training and len(alignments) != 1:
            raise ValueError("training mode takes exactly one alignment")
        for name in alignments:
            parse_alignment(name)
        for name, image in (("moving", moving), ("fixed", fixed)):
            if not isinstance(image, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
        if moving.ndim != fixed.ndim or moving.shape[:2] != fixed.shape[:2]:
            raise ValueError(
                f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must agree in batch, channels and dims"
            )
        points_moving, mass_moving = self.keypoints(moving, "moving")
        points_fixed, mass_fixed = self.keypoints(fixed, "fixed")
        weights = power_weights(mass_fixed, mass_moving) if self.weighted else None
        fixed_shape, moving_shape = fixed.shape[2:], moving.shape[2:]
        results = {}
        for name in alignments:
            p_fixed, p_moving, w = self._subsample(name, points_fixed, points_moving, weights)
            transform = fit_keypoint_transform(p_fixed, p_moving, name, w, max_lambda=self.max_tps_lambda)
            out = {"points_fixed": p_fixed, "points_moving": p_moving}
            if w is not None:
                out["weights"] = w
            out["points_aligned"] = transform.moving_to_fixed(p_moving)
            if transform.matrix is not None:
                out["matrix"], out["inverse_matrix"] = transform.matrix, transform.inverse_matrix
                out["matrix_voxel"], out["inverse_matrix_voxel"] = transform.voxel_matrices(
                    fixed_shape, moving_shape, self.reference_grid
                )
            else:
                out.update(lmbda=transform.lmbda, theta_inverse=transform.theta_inverse, theta=transform.theta)
            if dense:
                grid = transform.sampling_grid(fixed_shape, self.chunk_size)
                voxels = normalized_to_voxels(grid, moving_shape, not self.reference_grid)
                out["ddf"] = voxels.movedim(-1, 1) - voxel_grid(fixed_shape, grid.dtype, grid.device)[None]
                out["grid"] = grid.flip(-1)
            results[name] = out
        return results

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x = cat(moving, fixed)`` ``(B, 2C, *spatial)`` -> DDF ``(B, n, *spatial)`` of the configured alignment.

        The DDF is in voxel units on the fixed grid and maps into the moving image: ``warp(moving, ddf)`` ~ fixed.
        """
        if not isinstance(x, torch.Tensor) or x.ndim < 4 or x.shape[1] % 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be cat(moving, fixed) with an even channel count (B, 2C, *spatial), got {shape}")
        moving, fixed = x.chunk(2, dim=1)
        return self.register(moving, fixed, self.alignment)[self.alignment]["ddf"]

    @torch.no_grad()
    def groupwise_register(
        self,
        images: torch.Tensor | Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
        alignment: str | None = None,
        num_iterations: int = 5,
        lmbda: float | None = None,
        image_key: str = "image",
    ) -> GroupwiseRegistration:
        """Groupwise registration of ``N >= 2`` images to their keypoint template (BrainMorph, MELBA 2025).

        Keypoints are detected one batch at a time (unweighted, no gradients); only the ``(N, K, n)`` keypoints
        are kept, so ``images`` can be a lazy iterable (a generator or a DataLoader) of hundreds of volumes. The
        dense fields come on demand from the result (:meth:`GroupwiseRegistration.ddf` / ``ddfs()``).

        Args:
            images: a tensor ``(N, C, *spatial)`` (processed one image at a time) or an iterable of tensors
                ``(B_i, C, *spatial_i)`` or of mappings holding one under ``image_key`` (MONAI dictionary data).
            alignment: defaults to the model's.
            num_iterations: iterations of :func:`groupwise_keypoints` (reference: 5).
            lmbda: TPS lambda override.
        """
        alignment = self.alignment if alignment is None else alignment
        parse_alignment(alignment)
        batches = images.split(1) if isinstance(images, torch.Tensor) else images
        points, shapes = [], []
        for item in batches:
            image = item[image_key] if isinstance(item, Mapping) else item
            points.append(self.keypoints(image, "images")[0])
            shapes += [tuple(image.shape[2:])] * image.shape[0]
        if not points:
            raise ValueError("images is empty")
        points = torch.cat(points)
        result = groupwise_keypoints(points, alignment, num_iterations, lmbda)
        return GroupwiseRegistration(
            alignment,
            points,
            result["points_aligned"],
            result["means"],
            result["template"],
            shapes,
            self.reference_grid,
            self.chunk_size,
            lmbda,
        )
