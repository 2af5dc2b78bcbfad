"""KeyMorph's random affine augmentation (as the authors' reference implementation draws it) for images, label
maps and keypoints.

The augmentation matrix ``M`` acts on **normalised ``ij`` coordinates** (each axis in ``[-1, 1]``, voxel ``i``
of ``N`` at ``-1 + 2 i / (N - 1)``, component ``d`` along spatial array axis ``d``) as a homogeneous
``(B, n + 1, n + 1)`` matrix on column vectors ``[p; 1]``. It maps an *original* position to its
*augmented* position: keypoints move as ``p' = M [p; 1]`` and the augmented image reads the original at
``M^-1 x'`` for every voxel ``x'`` of the (same-sized) output grid, so a point and the image content under it
move together.

Recipe (reference ``keymorph/augmentation.py::AffineDeformation3d``): ``M = Z S T R`` with
``R = R_3 R_2 R_1``; ``R_1`` rotates the (1, 2) plane by ``theta_0`` (``[[c, -s], [s, c]]``), ``R_2`` the
(0, 2) plane by ``theta_1`` as ``[[c, 0, s], [0, 1, 0], [-s, 0, c]]``, ``R_3`` the (0, 1) plane by
``theta_2`` (``[[c, -s], [s, c]]``); ``T`` translates by ``offset``, ``S = diag(scale)``, ``Z`` is the
identity with the six ``shear`` values at ``(0,1), (0,2), (1,0), (1,2), (2,0), (2,1)`` in that order.
In 2-D (an extension: the reference is 3-D) ``R`` is one rotation ``[[c, -s], [s, c]]`` by ``theta_0`` and
the two shears sit at ``(0, 1), (1, 0)``.

Image read convention (``reference_grid``):

* ``False`` (default, consistent with :mod:`monai_ext.spatial.sampling`): normalised coordinates are read with
  align_corners=True, so the identity matrix reproduces the image exactly and ``M`` moves content exactly as
  it moves points;
* ``True`` (the reference's mixed convention, for parity with its augmented outputs): the output
  grid is built at ``linspace(-1, 1, N)`` but read with align_corners=False (``v = (p + 1) N / 2 - 0.5``), so
  even the identity ("rot0") zooms by ``N / (N - 1)`` about the centre.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor, ensure_tuple_rep

from monai_ext.spatial.affine import transform_points
from monai_ext.spatial.coordinates import invert_homogeneous, voxel_to_normalized
from monai_ext.spatial.sampling import affine_to_ddf, warp

__all__ = [
    "keymorph_affine_matrix",
    "check_max_params",
    "fixed_keymorph_affine",
    "rotation_augmentation_params",
    "random_keymorph_parameters",
    "random_keymorph_affine",
    "augmentation_ramp",
    "keymorph_affine_ddf",
    "apply_keymorph_affine",
    "KeyMorphAffined",
    "RandKeyMorphAffined",
]

_SHEAR_POSITIONS = {3: ((0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)), 2: ((0, 1), (1, 0))}
_NUM_ANGLES = {3: 3, 2: 1}


def _finite(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    if value.ndim != len(shape) or tuple(value.shape[1:]) != shape[1:]:
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, shape[1:]))}), got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains non-finite values")


def _rotation(n: int, theta: torch.Tensor) -> torch.Tensor:
    """``R = R_3 R_2 R_1`` (3-D) or the single 2-D rotation, ``(B, n, n)``."""
    cos, sin = theta.cos(), theta.sin()
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def block(*rows):
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    if n == 2:
        return block((cos[:, 0], -sin[:, 0]), (sin[:, 0], cos[:, 0]))
    c0, c1, c2, s0, s1, s2 = cos[:, 0], cos[:, 1], cos[:, 2], sin[:, 0], sin[:, 1], sin[:, 2]
    r1 = block((one, zero, zero), (zero, c0, -s0), (zero, s0, c0))
    r2 = block((c1, zero, s1), (zero, one, zero), (-s1, zero, c1))
    r3 = block((c2, -s2, zero), (s2, c2, zero), (zero, zero, one))
    return r3 @ r2 @ r1


def keymorph_affine_matrix(
    scale: torch.Tensor, offset: torch.Tensor, theta: torch.Tensor, shear: torch.Tensor
) -> torch.Tensor:
    """KeyMorph's augmentation matrix ``M = Z S T R`` in normalised ``ij`` coordinates (module docstring).

    Args:
        scale: ``(B, n)`` per-axis scale factors (1 = none).
        offset: ``(B, n)`` translation in normalised units (applied after the rotation, before the scaling).
        theta: ``(B, 3)`` rotation angles in radians (``(B, 1)`` in 2-D).
        shear: ``(B, 6)`` shear values (``(B, 2)`` in 2-D).

    Returns:
        ``(B, n + 1, n + 1)`` homogeneous matrix mapping original to augmented normalised positions, in the
        dtype and on the device of ``scale``.
    """
    if scale.ndim != 2 or scale.shape[1] not in (2, 3):
        raise ValueError(f"scale must have shape (B, n) with n in (2, 3), got {tuple(scale.shape)}")
    batch, n = scale.shape
    _finite("scale", scale, (batch, n))
    offset, theta, shear = (torch.as_tensor(v, dtype=scale.dtype, device=scale.device) for v in (offset, theta, shear))
    _finite("offset", offset, (batch, n))
    _finite("theta", theta, (batch, _NUM_ANGLES[n]))
    _finite("shear", shear, (batch, len(_SHEAR_POSITIONS[n])))
    eye = torch.eye(n + 1, dtype=scale.dtype, device=scale.device).repeat(batch, 1, 1)
    rotation, translation, scaling, shearing = eye.clone(), eye.clone(), eye.clone(), eye.clone()
    rotation[:, :n, :n] = _rotation(n, theta)
    translation[:, :n, n] = offset
    scaling[:, :n, :n] = torch.diag_embed(scale)
    rows, cols = zip(*_SHEAR_POSITIONS[n])
    shearing[:, list(rows), list(cols)] = shear
    return shearing @ scaling @ translation @ rotation


def check_max_params(max_params: Sequence[float]) -> tuple[float, float, float, float]:
    """``max_params`` ``(s, o, a, z)`` as floats; ``ValueError`` unless 4 finite non-negative numbers."""
    values = tuple(float(v) for v in max_params)
    if len(values) != 4 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(
            f"max_params must be 4 finite non-negative numbers (scale, offset, angle, shear), got {max_params}"
        )
    return values


def fixed_keymorph_affine(
    params: Sequence[float],
    spatial_dims: int = 3,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The deterministic evaluation augmentation of ``params = (s, o, a, z)``: scale ``1 + s``, offset ``o``,
    angle ``a`` (radians) and shear ``z`` on **every** axis / entry (the reference's ``affine_augment``).

    ``rotK`` is ``(0, 0, K pi / 180, 0)`` (:func:`rotation_augmentation_params`): a compound rotation by the same
    angle about all three axes. Returns ``(batch_size, n + 1, n + 1)``.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    values = tuple(float(v) for v in params)
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"params must be 4 finite numbers (scale, offset, angle, shear), got {params}")
    s, o, a, z = values
    n = spatial_dims

    def full(value, size):
        return torch.full((batch_size, size), value, dtype=torch.float64)

    matrix = keymorph_affine_matrix(
        full(1 + s, n), full(o, n), full(a, _NUM_ANGLES[n]), full(z, len(_SHEAR_POSITIONS[n]))
    )
    return matrix.to(dtype=dtype, device=device)


def rotation_augmentation_params(name: str) -> tuple[float, float, float, float]:
    """``"rot<K>"`` (K degrees, e.g. ``"rot45"``) -> ``(0, 0, K pi / 180, 0)`` for :func:`fixed_keymorph_affine`."""
    match = re.fullmatch(r"rot(\d+(?:\.\d+)?)", name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"name must look like 'rot<degrees>' (e.g. 'rot45'), got {name!r}")
    return (0.0, 0.0, math.radians(float(match.group(1))), 0.0)


def random_keymorph_parameters(
    max_params: Sequence[float] = (0.2, 0.2, 3.1416, 0.1),
    scale_params: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 1,
    shared: bool = True,
    spatial_dims: int = 3,
    uniform: Callable[[float, float, tuple[int, ...]], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Draw KeyMorph's random affine parameters (reference ``random_affine_augment``), float64 on the CPU.

    Every maximum ``(s, o, a, z)`` is multiplied by ``scale_params`` (the ramp, :func:`augmentation_ramp`), then
    ``scale ~ U(1 - s, 1 + s)^n``, ``offset ~ U(-o, o)^n`` (normalised units), ``theta ~ U(-a, a)`` (radians,
    3 angles in 3-D) and ``shear ~ U(-z, z)`` (6 in 3-D), drawn in that order.

    Args:
        max_params: ``(s, o, a, z)``; reference training maxima ``(0.2, 0.2, 3.1416, 0.1)``.
        scale_params: factor in ``[0, 1]`` on all maxima.
        generator: torch generator of the draws (global RNG if None).
        batch_size: ``B``.
        shared: one draw for the whole batch (reference ``main``); ``False``: one per item (MIDL code).
        spatial_dims: 2 or 3.
        uniform: optional sampler ``(low, high, shape) -> tensor`` replacing the torch generator (MONAI's
            ``RandomizableTransform.R`` in :class:`RandKeyMorphAffined`).

    Returns:
        ``{"scale", "offset", "theta", "shear"}`` of shapes ``(B, n)``, ``(B, n)``, ``(B, 3 | 1)``, ``(B, 6 | 2)``.
    """
    if not (math.isfinite(scale_params) and scale_params >= 0):
        raise ValueError(f"scale_params must be finite and >= 0, got {scale_params}")
    s, o, a, z = (v * float(scale_params) for v in check_max_params(max_params))
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if uniform is None:

        def uniform(low, high, shape):
            return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)

    n, draws = spatial_dims, 1 if shared else int(batch_size)
    sizes = {"scale": n, "offset": n, "theta": _NUM_ANGLES[n], "shear": len(_SHEAR_POSITIONS[n])}
    bounds = {"scale": (1 - s, 1 + s), "offset": (-o, o), "theta": (-a, a), "shear": (-z, z)}
    out = {}
    for key, size in sizes.items():
        value = torch.as_tensor(uniform(*bounds[key], (draws, size)), dtype=torch.float64)
        out[key] = value.expand(int(batch_size), size).clone()
    return out


def random_keymorph_affine(
    max_params: Sequence[float] = (0.2, 0.2, 3.1416, 0.1),
    scale_params: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 1,
    shared: bool = True,
    spatial_dims: int = 3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A random augmentation matrix ``(B, n + 1, n + 1)``: :func:`keymorph_affine_matrix` of
    :func:`random_keymorph_parameters` (same arguments), built in float64 and cast to ``dtype``."""
    params = random_keymorph_parameters(max_params, scale_params, generator, batch_size, shared, spatial_dims)
    return keymorph_affine_matrix(**params).to(dtype=dtype, device=device)


def augmentation_ramp(epoch: int, affine_slope: float) -> float:
    """KeyMorph's ramp ``min(epoch / affine_slope, 1)`` for ``affine_slope > 0``, else 1 (no ramp).

    ``epoch`` is the 1-based epoch (ignite's ``engine.state.epoch``; the reference counts from 1 too). The
    reference treats ``affine_slope = 0`` as a ramp (division by zero); here it means "no ramp".
    """
    return 1.0 if affine_slope <= 0 else min(float(epoch) / float(affine_slope), 1.0)


def keymorph_affine_ddf(
    matrix: torch.Tensor, spatial_shape: Sequence[int], reference_grid: bool = False
) -> torch.Tensor:
    """Voxel DDF ``(B, n, *spatial_shape)`` that warps an image by the augmentation ``matrix``.

    ``warp(image, ddf)`` reads the original image at ``M^-1 x'`` for every output voxel ``x'`` (same grid size).
    The output grid is at ``linspace(-1, 1, N)``; the original is read with align_corners=True
    (``reference_grid=False``) or False (the reference). ``matrix`` is ``(B, n + 1, n + 1)`` normalised ``ij``.
    """
    shape = tuple(int(s) for s in spatial_shape)
    n = len(shape)
    if matrix.ndim != 3 or matrix.shape[1:] != (n + 1, n + 1):
        raise ValueError(f"matrix must be (B, {n + 1}, {n + 1}) for a {n}-D grid, got {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError("matrix contains non-finite values")
    work = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    out_to_norm = voxel_to_normalized(shape, True, work, matrix.device)
    in_to_norm = voxel_to_normalized(shape, not reference_grid, work, matrix.device)
    voxel_inverse = invert_homogeneous(in_to_norm) @ invert_homogeneous(matrix.to(work)) @ out_to_norm
    return affine_to_ddf(voxel_inverse, shape).to(matrix.dtype)


def apply_keymorph_affine(
    matrix: torch.Tensor,
    image: torch.Tensor | None = None,
    label: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    reference_grid: bool = False,
    label_mode: str = "nearest",
) -> dict[str, torch.Tensor]:
    """Apply one augmentation ``matrix`` consistently to an image, a label map and keypoints.

    Args:
        matrix: ``(B, n + 1, n + 1)`` (normalised ``ij``, original -> augmented); ``B = 1`` is broadcast.
        image: ``(B, C, *spatial)``: multilinear, border padding.
        label: ``(B, C, *spatial)`` label map (integer or one-hot): ``label_mode`` ``"nearest"`` (reference
            augmentation) or ``"linear"``; border padding; integer maps keep their dtype.
        points: ``(B, K, n)`` normalised ``ij`` keypoints: ``M [p; 1]``.
        reference_grid: the reference's mixed read convention (module docstring).

    Returns:
        dict with ``"image"``, ``"label"``, ``"points"`` for the given inputs (plus ``"ddf"`` when warping).
    """
    out: dict[str, torch.Tensor] = {}
    tensors = {"image": image, "label": label}
    shapes = {tuple(t.shape[2:]) for t in tensors.values() if t is not None}
    if len(shapes) > 1:
        raise ValueError(f"image and label must share their spatial shape, got {sorted(shapes)}")
    if shapes:
        shape = shapes.pop()
        reference = image if image is not None else label
        dtype = reference.dtype if reference.is_floating_point() else matrix.dtype
        ddf = keymorph_affine_ddf(matrix.to(dtype=dtype, device=reference.device), shape, reference_grid)
        batch = max(t.shape[0] for t in tensors.values() if t is not None)
        ddf = ddf.expand(batch, *ddf.shape[1:])
        out["ddf"] = ddf
        if image is not None:
            out["image"] = warp(image.expand(batch, *image.shape[1:]), ddf, mode="linear")
        if label is not None:
            out["label"] = warp(label.expand(batch, *label.shape[1:]), ddf, mode=label_mode)
    if points is not None:
        out["points"] = transform_points(matrix.to(dtype=points.dtype, device=points.device), points)
    return out


class KeyMorphAffined(MapTransform):
    """Dictionary transform applying one fixed KeyMorph affine (e.g. the ``rotK`` evaluation augmentations).

    Items are channel-first ``(C, *spatial)`` (MONAI dictionary data, no batch dimension); points are ``(K, n)``
    normalised ``ij``. MetaTensor metadata is kept (the grid is unchanged: only the content moves).

    Args:
        keys: image / label keys to warp.
        params: ``(s, o, a, z)`` for :func:`fixed_keymorph_affine`, or a name ``"rot<K>"``.
        mode: per key ``"linear"`` (images) or ``"nearest"`` (label maps, the reference's choice).
        point_keys: keys of keypoint arrays ``(K, n)`` to transform with the same matrix.
        matrix_key: if set, the ``(n + 1, n + 1)`` matrix is stored under this key.
        reference_grid: the reference's mixed read convention (module docstring).
        allow_missing_keys: MONAI semantics.
    """

    def __init__(
        self,
        keys: KeysCollection,
        params: Sequence[float] | str = (0.0, 0.0, 0.0, 0.0),
        mode: Sequence[str] | str = "linear",
        point_keys: KeysCollection = (),
        matrix_key: str | None = None,
        reference_grid: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.params = rotation_augmentation_params(params) if isinstance(params, str) else tuple(params)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        for m in self.mode:
            if m not in ("linear", "nearest"):
                raise ValueError(f"mode must be 'linear' or 'nearest' per key, got {m!r}")
        self.point_keys = tuple(point_keys) if not isinstance(point_keys, str) else (point_keys,)
        self.matrix_key = matrix_key
        self.reference_grid = reference_grid

    def _spatial_dims(self, data: Mapping[Hashable, Any]) -> int:
        for key in self.key_iterator(data):
            return np.ndim(data[key]) - 1
        for key in self.point_keys:
            if key in data:
                return np.shape(data[key])[-1]
        raise ValueError(f"none of the keys {self.keys + self.point_keys} is in the data")

    def _matrix(self, spatial_dims: int) -> torch.Tensor:
        return fixed_keymorph_affine(self.params, spatial_dims, dtype=torch.float64)

    def _apply(self, data: Mapping[Hashable, Any], matrix: torch.Tensor) -> dict[Hashable, Any]:
        d = dict(data)
        for key, mode in self.key_iterator(d, self.mode):
            value = d[key]
            tensor = convert_to_tensor(value, track_meta=False)[None]
            out = apply_keymorph_affine(matrix, label=tensor, reference_grid=self.reference_grid, label_mode=mode)
            d[key], *_ = convert_to_dst_type(out["label"][0], value)
        for key in self.point_keys:
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"point key {key!r} not in the data")
            value = d[key]
            points = convert_to_tensor(value, track_meta=False)
            moved = transform_points(matrix.to(points.dtype), points[None])[0]
            d[key], *_ = convert_to_dst_type(moved, value)
        if self.matrix_key is not None:
            d[self.matrix_key] = matrix[0].float()
        return d

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self._apply(data, self._matrix(self._spatial_dims(data)))


class RandKeyMorphAffined(RandomizableTransform, KeyMorphAffined):
    """Random KeyMorph affine (:func:`random_keymorph_parameters`, drawn from MONAI's ``self.R``) applied to
    images, label maps and keypoints of a dictionary; items as in :class:`KeyMorphAffined`.

    Args:
        keys, mode, point_keys, matrix_key, reference_grid, allow_missing_keys: as in :class:`KeyMorphAffined`.
        max_params: ``(s, o, a, z)`` maxima.
        scale_params: factor on the maxima (set the attribute per epoch for a ramp).
        prob: probability of augmenting; otherwise the data is returned unchanged (and the identity matrix is
            stored under ``matrix_key``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        max_params: Sequence[float] = (0.2, 0.2, 3.1416, 0.1),
        scale_params: float = 1.0,
        mode: Sequence[str] | str = "linear",
        point_keys: KeysCollection = (),
        matrix_key: str | None = None,
        reference_grid: bool = False,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        KeyMorphAffined.__init__(
            self, keys, (0.0, 0.0, 0.0, 0.0), mode, point_keys, matrix_key, reference_grid, allow_missing_keys
        )
        self.max_params = check_max_params(max_params)
        self.scale_params = float(scale_params)

    def _matrix(self, spatial_dims: int) -> torch.Tensor:
        if not self._do_transform:
            return torch.eye(spatial_dims + 1, dtype=torch.float64)[None]
        params = random_keymorph_parameters(
            self.max_params, self.scale_params, spatial_dims=spatial_dims, uniform=self.R.uniform
        )
        return keymorph_affine_matrix(**params)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize(None)
        if not self._do_transform and self.matrix_key is None:
            return dict(data)
        return self._apply(data, self._matrix(self._spatial_dims(data)))
