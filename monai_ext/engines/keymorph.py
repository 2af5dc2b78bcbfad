"""KeyMorph self-supervised pretraining and registration training with MONAI's ``SupervisedTrainer``.

Same pattern as :mod:`monai_ext.engines.registration` (SITReg): the callables below replace the trainer's
iteration through its ``iteration_update`` argument, so handlers, checkpointing and tracking stay MONAI's::

    "trainer": {"_target_": "SupervisedTrainer", "network": "@network", "loss_function": "@loss", ...,
                "iteration_update": {"_target_": "monai_ext.engines.keymorph.KeyMorphTrainIteration",
                                     "max_params": [0.2, 0.2, 3.1416, 0.1]}}

* :class:`KeyMorphPretrainIteration` (KeyMorph's self-supervised pretraining): the detector learns to put
  keypoint ``k`` at the ``k``-th of ``K`` random reference locations (:class:`ReferenceKeypoints`, sampled once
  from the first image and saved in the checkpoint), co-transformed with a random affine augmentation; or,
  when the images come with label maps (``label_key``), at the centroid of label ``k`` (:func:`label_centroids`):
  anatomical targets that correspond across subjects, which the random reference points of one subject do not.
* :class:`KeyMorphTrainIteration` (the reference's training step): moving image augmented, registered to the
  fixed image by ``engine.network`` (a :class:`~monai_ext.networks.keymorph.KeyMorph`), loss on the warped image
  (MSE / LNCC) or on warped one-hot labels (soft Dice, :class:`~monai_ext.losses.keymorph.KeyMorphLoss`), plus
  the optional keypoint-consistency step. :func:`keymorph_train_loss` and :func:`keymorph_train_iteration` build
  the loss and the iteration of one training mode (unsupervised or supervised, with or without the consistency
  step) from the bundles' plain settings.

Keypoints are ``(B, K, n)`` normalised ``ij`` (align_corners=True); augmentation matrices as in
:mod:`monai_ext.data.keymorph_augmentation`; DDFs ``(B, n, *fixed)`` voxel units, fixed grid -> moving image.
AMP and gradient accumulation are not supported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from monai.utils import convert_to_tensor
from torch import nn

from monai_ext.data.keymorph import CONSISTENCY_IMAGE_KEYS, PAIR_LABEL_KEYS
from monai_ext.data.keymorph_augmentation import (
    apply_keymorph_affine,
    augmentation_ramp,
    check_max_params,
    random_keymorph_affine,
)
from monai_ext.data.model_space import REFINE_SUFFIX
from monai_ext.engines.affine_refinement import refine_keymorph_result
from monai_ext.engines.registration import as_loss_terms, backward_and_step, pair_from_batch, to_device
from monai_ext.losses.keymorph import KeypointConsistencyLoss, KeyMorphLoss
from monai_ext.networks.keymorph import fit_keypoint_transform, normalized_to_voxels, parse_alignment
from monai_ext.spatial.affine import transform_points
from monai_ext.spatial.sampling import affine_to_ddf, warp

__all__ = [
    "KeyMorphInferenceIteration",
    "sample_reference_points",
    "ReferenceKeypoints",
    "one_hot_label_pair",
    "label_centroids",
    "KeyMorphPretrainIteration",
    "KeyMorphTrainIteration",
    "keymorph_train_loss",
    "keymorph_train_iteration",
]


def sample_reference_points(
    image: torch.Tensor, num_keypoints: int, threshold: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random keypoints at voxels brighter than ``threshold`` (KeyMorph's pretraining targets).

    Voxels are drawn uniformly with replacement among those with a value ``> threshold`` in any channel (the
    distribution of the reference's rejection sampling ``sample_valid_coordinates_3d``), independently per batch
    item, and returned in **our** normalised convention ``-1 + 2 i / (N - 1)`` (align_corners=True, the keypoints'
    convention). The reference normalises with ``2 i / N - 1`` (range ``[-1, 1 - 2 / N]``), a shift of up to
    ``2 / N`` that its own keypoint layer could never reproduce exactly; the consistent form is used instead.

    Args:
        image: ``(B, C, *spatial)``, 2 or 3 spatial dims.
        num_keypoints: ``K``.
        threshold: intensity threshold (reference 0.1 on min-max normalised images).
        generator: torch generator (CPU) of the draws.

    Returns:
        ``(B, K, n)`` in ``image``'s floating dtype (float32 for integer images) on its device.
    """
    if not isinstance(image, torch.Tensor) or image.ndim not in (4, 5):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be (B, C, *spatial) with 2 or 3 spatial dims, got {shape}")
    if int(num_keypoints) < 1:
        raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
    valid = (image.detach() > threshold).any(1).flatten(1).cpu()  # (B, V)
    empty = (~valid.any(1)).nonzero()[:, 0].tolist()
    if empty:
        raise ValueError(f"image has no voxel above threshold={threshold} in batch items {empty}")
    flat = torch.multinomial(valid.double(), int(num_keypoints), replacement=True, generator=generator)
    shape = image.shape[2:]
    index = torch.stack(torch.unravel_index(flat, shape), dim=-1).double()  # (B, K, n)
    size = torch.tensor(shape, dtype=torch.float64)
    points = torch.where(size > 1, 2 * index / (size - 1).clamp(min=1) - 1, torch.zeros_like(index))
    dtype = image.dtype if image.is_floating_point() else torch.float32
    return points.to(dtype=dtype, device=image.device)


class ReferenceKeypoints(nn.Module):
    """Holder of the ``K`` pretraining target keypoints ``(K, n)`` as buffers, so that they are saved and restored
    with the checkpoint (add it to ``CheckpointSaver``'s ``save_dict``; the reference stores ``ref_points``).

    Buffers: ``points`` ``(K, n)`` (normalised ``ij``) and ``initialized`` (bool scalar).
    """

    def __init__(self, num_keypoints: int, spatial_dims: int = 3) -> None:
        super().__init__()
        if int(num_keypoints) < 1 or spatial_dims not in (2, 3):
            raise ValueError(f"num_keypoints must be >= 1 and spatial_dims 2 or 3, got {num_keypoints}, {spatial_dims}")
        self.register_buffer("points", torch.zeros(int(num_keypoints), spatial_dims))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def sample_(self, image: torch.Tensor, threshold: float = 0.1, generator: torch.Generator | None = None) -> None:
        """Sample the points from ``image[:1]`` ``(B, C, *spatial)`` (:func:`sample_reference_points`)."""
        if image.ndim - 2 != self.points.shape[1]:
            raise ValueError(f"image must have {self.points.shape[1]} spatial dims, got shape {tuple(image.shape)}")
        points = sample_reference_points(image[:1], self.points.shape[0], threshold, generator)[0]
        self.points.copy_(points)
        self.initialized.fill_(True)

    def forward(self) -> torch.Tensor:
        if not bool(self.initialized):
            raise ValueError("reference keypoints are not sampled yet (call sample_ or load a checkpoint)")
        return self.points


def one_hot_label_pair(
    fixed_label: torch.Tensor,
    moving_label: torch.Tensor,
    max_channels: int | None = None,
    num_labels: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-hot maps of a pair of integer label maps ``(B, 1, *spatial)`` with the same channel order.

    * ``max_channels`` set (reference ``--max_train_seg_channels``): the labels present in **both** maps (whole
      batch; background included when present), a random subset of at most ``max_channels`` of them;
    * else ``num_labels`` set: labels ``0 .. num_labels - 1`` (the reference's ``F.one_hot``; absent labels give
      all-zero channels, which score a constant Dice 1);
    * else the labels present in either map.

    Returns ``(fixed_onehot, moving_onehot, labels)``, float ``(B, L, *spatial)`` and the label values ``(L,)``.
    """
    for name, label in (("fixed_label", fixed_label), ("moving_label", moving_label)):
        if not isinstance(label, torch.Tensor) or label.ndim not in (4, 5) or label.shape[1] != 1:
            shape = tuple(label.shape) if isinstance(label, torch.Tensor) else type(label).__name__
            raise ValueError(f"{name} must be an integer label map (B, 1, *spatial), got {shape}")
    fixed_ids, moving_ids = fixed_label.round().long(), moving_label.round().long()
    if max_channels is not None:
        if int(max_channels) < 1:
            raise ValueError(f"max_channels must be >= 1, got {max_channels}")
        present = fixed_ids.unique()
        common = present[torch.isin(present, moving_ids.unique())]
        if common.numel() == 0:
            raise ValueError("fixed_label and moving_label share no label")
        if common.numel() > int(max_channels):
            pick = torch.randperm(common.numel(), generator=generator)[: int(max_channels)]
            common = common[pick.to(common.device)]
        labels = common
    elif num_labels is not None:
        labels = torch.arange(int(num_labels), device=fixed_ids.device)
        values = torch.cat([fixed_ids.flatten(), moving_ids.flatten()])
        if values.min() < 0 or values.max() >= num_labels:
            raise ValueError(f"label values must lie in [0, num_labels={num_labels})")
    else:
        labels = torch.cat([fixed_ids.unique(), moving_ids.unique()]).unique()
    channels = labels.view((1, -1) + (1,) * (fixed_ids.ndim - 2))
    return (fixed_ids == channels).float(), (moving_ids == channels).float(), labels


def label_centroids(label: torch.Tensor, num_keypoints: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids of labels ``1 .. num_keypoints`` of an integer label map ``(B, 1, *spatial)`` as keypoints.

    Returns ``(points, present)``: ``(B, K, n)`` normalised ``ij`` coordinates (align_corners=True: voxel ``i`` of
    ``N`` at ``-1 + 2 i / (N - 1)``, the keypoints' convention) and ``(B, K)`` bool, False for labels absent from
    an item (their points are 0). Values outside ``0 .. K`` are ignored.
    """
    if not isinstance(label, torch.Tensor) or label.ndim not in (4, 5) or label.shape[1] != 1:
        shape = tuple(label.shape) if isinstance(label, torch.Tensor) else type(label).__name__
        raise ValueError(f"label must be an integer label map (B, 1, *spatial), got {shape}")
    if int(num_keypoints) < 1:
        raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
    k = int(num_keypoints)
    batch, shape = label.shape[0], label.shape[2:]
    ids = label.round().long().flatten(1)  # (B, V)
    ids = torch.where((ids >= 1) & (ids <= k), ids, torch.zeros_like(ids))
    offset = (torch.arange(batch, device=ids.device) * (k + 1))[:, None]
    counts = torch.bincount((ids + offset).flatten(), minlength=batch * (k + 1)).view(batch, k + 1)[:, 1:]
    axes = [
        torch.linspace(-1, 1, s, dtype=torch.float64, device=ids.device) if s > 1 else torch.zeros(1, dtype=torch.float64)
        for s in shape
    ]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape))  # (V, n)
    sums = torch.zeros(batch * (k + 1), len(shape), dtype=torch.float64, device=ids.device)
    sums.index_add_(0, (ids + offset).flatten(), coords.repeat(batch, 1))
    sums = sums.view(batch, k + 1, -1)[:, 1:]
    present = counts > 0
    points = sums / counts.clamp(min=1)[..., None]
    dtype = label.dtype if label.is_floating_point() else torch.float32
    return points.to(dtype), present


def _model(network: nn.Module) -> nn.Module:
    """The module behind a ``DataParallel`` / ``DistributedDataParallel`` wrapper."""
    return network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network


def _keypoints(network: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Keypoints ``(B, K, n)`` of ``image``: ``KeyMorph.keypoints`` or a detector's output (first item of a tuple)."""
    model = _model(network)
    out = model.keypoints(image)[0] if hasattr(model, "keypoints") else network(image)
    return out[0] if isinstance(out, (tuple, list)) else out


class _AugmentingIteration:
    """Shared parts: the ramped random KeyMorph affine and the ``SupervisedTrainer`` checks."""

    def __init__(self, max_params: Sequence[float], affine_slope: float, shared: bool, seed: int | None) -> None:
        self.max_params = check_max_params(max_params)
        self.affine_slope = float(affine_slope)
        self.shared = shared
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    @staticmethod
    def _check_engine(engine: Any, batchdata: Any) -> None:
        if batchdata is None:
            raise ValueError("batchdata must not be None")
        if getattr(engine, "amp", False) or getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("KeyMorph iterations support neither amp nor accumulation_steps > 1")

    def random_matrix(self, engine: Any, like: torch.Tensor) -> torch.Tensor | None:
        """``(B, n + 1, n + 1)`` augmentation for this epoch's ramp, or None if all maxima are 0."""
        if not any(self.max_params):
            return None
        scale = augmentation_ramp(engine.state.epoch, self.affine_slope)
        return random_keymorph_affine(
            self.max_params, scale, self.generator, like.shape[0], self.shared, like.ndim - 2, like.dtype, like.device
        )


class KeyMorphPretrainIteration(_AugmentingIteration):
    """``iteration_update`` for ``SupervisedTrainer``: one step of KeyMorph's self-supervised pretraining.

    For a batch image ``x`` ``(B, 1, *spatial)`` (any subject, any modality): draw ``M`` with the maxima scaled by
    the ramp ``min(epoch / affine_slope, 1)``, ``x' = warp(x, M)``, prediction ``p = keypoints(x')``, loss
    ``engine.loss_function(p, t)`` (``torch.nn.MSELoss()``: the reference's ``F.mse_loss``); backward and
    ``engine.optimizer`` step. The targets ``t``:

    * ``reference`` given (the paper's recipe): ``t = M . ref_points``; the reference points are sampled from the
      first batch's first image if ``reference`` is not yet initialised;
    * ``label_key`` given: the centroids of labels ``1 .. K`` of the batch's label map warped by ``M`` (nearest;
      :func:`label_centroids`), the loss taken over the labels present only.

    ``engine.network`` is a :class:`~monai_ext.networks.keymorph.KeyMorph` (its ``keypoints``) or a keypoint
    detector returning ``(B, K, n)`` points.

    ``engine.state.output``: ``image`` (the input; and ``label`` in label mode), ``image_augmented``, ``matrix``,
    ``points`` (also ``pred``), ``points_target`` and ``loss``. Fires ``FORWARD_COMPLETED``, ``LOSS_COMPLETED``,
    ``BACKWARD_COMPLETED``, ``MODEL_COMPLETED``.

    Args:
        reference: the target holder (save it with the checkpoint); give it or ``label_key``.
        max_params: augmentation maxima ``(s, o, a, z)`` (reference pretraining ``(0.2, 0.2, 3.1416, 0.1)``).
        affine_slope: ramp length in epochs (``<= 0``: no ramp; 1000 in the reference's README, 5000 for
            BrainMorph).
        image_key: batch key of the image.
        threshold: reference sampling threshold.
        shared: one augmentation for the whole batch (reference) or one per item.
        reference_grid: the reference's mixed image read convention for the augmentation.
        seed: seed of a private generator for augmentations and reference points (global RNG if None).
        label_key: batch key of an integer label map ``(B, 1, *spatial)`` with labels ``1 .. K`` (``K`` keypoints).
    """

    def __init__(
        self,
        reference: ReferenceKeypoints | None = None,
        max_params: Sequence[float] = (0.2, 0.2, 3.1416, 0.1),
        affine_slope: float = -1,
        image_key: str = "image",
        threshold: float = 0.1,
        shared: bool = True,
        reference_grid: bool = False,
        seed: int | None = None,
        label_key: str | None = None,
    ) -> None:
        if (reference is None) == (label_key is None):
            raise ValueError("give exactly one of reference (random reference points) and label_key (label centroids)")
        if reference is not None and not isinstance(reference, ReferenceKeypoints):
            raise TypeError(f"reference must be a ReferenceKeypoints, got {type(reference).__name__}")
        super().__init__(max_params, affine_slope, shared, seed)
        self.reference = reference
        self.image_key = image_key
        self.label_key = label_key
        self.threshold = threshold
        self.reference_grid = reference_grid

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        self._check_engine(engine, batchdata)
        image, label = to_device(engine, batchdata, (self.image_key, self.label_key))
        if image is None or (self.label_key is not None and label is None):
            wanted = [k for k in (self.image_key, self.label_key) if k]
            raise ValueError(f"batch must contain {wanted}, got keys {sorted(batchdata)}")
        matrix = self.random_matrix(engine, image)
        augmented, inputs = image, {self.image_key: image}
        if self.label_key is not None:
            inputs[self.label_key] = label
        if self.reference is not None:
            if not bool(self.reference.initialized):
                self.reference.sample_(image, self.threshold, self.generator)
            targets = self.reference().to(dtype=image.dtype, device=image.device).expand(image.shape[0], -1, -1)
            if matrix is not None:
                augmented = apply_keymorph_affine(matrix, image=image, reference_grid=self.reference_grid)["image"]
                targets = transform_points(matrix, targets)
            present = None
        else:
            if matrix is not None:
                warped = apply_keymorph_affine(matrix, image=image, label=label, reference_grid=self.reference_grid)
                augmented, label = warped["image"], warped["label"]
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        points = _keypoints(engine.network, augmented)
        if self.label_key is not None:
            targets, present = label_centroids(label, points.shape[1])
            targets = targets.to(dtype=points.dtype, device=points.device)
        engine.state.output = {
            **inputs,
            f"{self.image_key}_augmented": augmented,
            "matrix": matrix,
            "points": points,
            "points_target": targets,
            Keys.PRED: points,
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        if present is None:
            loss = engine.loss_function(points, targets).mean()
        else:
            loss = engine.loss_function(points[present], targets[present]).mean()
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class KeyMorphTrainIteration(_AugmentingIteration):
    """``iteration_update`` for ``SupervisedTrainer``: one KeyMorph registration training step (as the reference's).

    1. the moving image (and its label map, nearest neighbour) is augmented by a random KeyMorph affine with the
       maxima scaled by the ramp (fixed image untouched);
    2. ``engine.network.register(moving, fixed, alignment)`` (a :class:`~monai_ext.networks.keymorph.KeyMorph` in
       training mode: random TPS ``lambda`` per batch item for ``tps_uniform`` / ``tps_loguniform`` /
       ``tps_lognormal``, random keypoint subset if ``max_train_keypoints``) gives the DDF;
    3. the moving image is warped (linear, border) and, when labels are given and the loss needs them, the moving
       one-hot map is warped linearly (differentiable, as the reference) against the fixed one-hot map
       (:func:`one_hot_label_pair`);
    4. ``engine.loss_function(moving_warped, fixed[, moving_label_warped, fixed_label])`` (a
       :class:`~monai_ext.losses.keymorph.KeyMorphLoss`, or e.g. ``torch.nn.MSELoss`` without labels; a dict with
       ``"loss"`` or a scalar); backward, step;
    5. if ``consistency_weight > 0``: a separate step (as the reference's ``kpconsistency_step``) on the batch
       images under ``consistency_keys`` (the same subject in two modalities): both get the same random affine,
       loss ``consistency_weight * MSE(keypoints_1, keypoints_2)``; backward, step.

    ``engine.state.output``: ``moving_image`` (augmented), ``fixed_image``, ``moving_image_warped``,
    ``forward_ddf`` (also ``pred``), ``points_fixed``, ``points_moving``, ``points_aligned``, ``matrix`` (the
    augmentation or None), ``loss``, every loss term detached, ``labels`` ``(B, L)`` (the label values of the
    one-hot channels, the same for every item) and ``kpconsistency``. Fires
    ``FORWARD_COMPLETED``, ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED`` and
    ``MODEL_COMPLETED`` (after both steps), like the SITReg iteration.

    Args:
        moving_key, fixed_key: batch keys of the images ``(B, 1, *spatial)``.
        moving_label_key, fixed_label_key: optional batch keys of integer label maps ``(B, 1, *spatial)``.
        alignment: training alignment; default ``engine.network.alignment``.
        max_params: augmentation maxima ``(s, o, a, z)``; reference training ``(0.2, 0.2, 3.1416, 0.1)``,
            ``main``'s default ``(0, 0, 0, 0)`` (no augmentation).
        affine_slope: ramp length in epochs (``<= 0``: no ramp).
        max_train_seg_channels: random subset of at most this many labels present in both maps (BrainMorph 14).
        num_labels: one-hot over ``0 .. num_labels - 1`` when no subset is used (default: labels present).
        consistency_keys: two batch keys holding co-registered images of one subject (e.g. T1, T2).
        consistency_weight: the reference's ``kpconsistency_coeff`` (README example 10); 0 disables the step.
        shared: one augmentation for the whole batch (reference) or one per item.
        reference_grid: augmentation read convention; default ``engine.network.reference_grid``.
        seed: seed of a private generator for augmentations and label subsets (global RNG if None).
    """

    def __init__(
        self,
        moving_key: str = "moving_image",
        fixed_key: str = "fixed_image",
        moving_label_key: str | None = None,
        fixed_label_key: str | None = None,
        alignment: str | None = None,
        max_params: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        affine_slope: float = -1,
        max_train_seg_channels: int | None = None,
        num_labels: int | None = None,
        consistency_keys: Sequence[str] | None = None,
        consistency_weight: float = 0.0,
        shared: bool = True,
        reference_grid: bool | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(max_params, affine_slope, shared, seed)
        if (moving_label_key is None) != (fixed_label_key is None):
            raise ValueError("give both moving_label_key and fixed_label_key, or neither")
        if consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}")
        if consistency_weight > 0 and (consistency_keys is None or len(consistency_keys) != 2):
            raise ValueError(f"consistency_weight > 0 needs two consistency_keys, got {consistency_keys}")
        self.keys = (moving_key, fixed_key, moving_label_key, fixed_label_key)
        self.alignment = alignment
        self.max_train_seg_channels = max_train_seg_channels
        self.num_labels = num_labels
        self.consistency_keys = tuple(consistency_keys) if consistency_keys is not None else None
        self.consistency_weight = float(consistency_weight)
        self.consistency_loss = KeypointConsistencyLoss()
        self.reference_grid = reference_grid

    def _reference_grid(self, model: nn.Module) -> bool:
        return bool(getattr(model, "reference_grid", False)) if self.reference_grid is None else self.reference_grid

    def _consistency_step(self, engine: Any, batchdata: Mapping[str, Any], model: nn.Module) -> torch.Tensor:
        first, second = to_device(engine, batchdata, self.consistency_keys)
        if first is None or second is None or first.shape != second.shape:
            raise ValueError(f"batch must contain two same-shaped images under {self.consistency_keys}")
        matrix = self.random_matrix(engine, first)
        if matrix is not None:
            first, second = (
                apply_keymorph_affine(matrix, image=x, reference_grid=self._reference_grid(model))["image"]
                for x in (first, second)
            )
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        loss = self.consistency_weight * self.consistency_loss(
            _keypoints(engine.network, first), _keypoints(engine.network, second)
        )
        loss.backward()
        engine.optimizer.step()
        return loss.detach()

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        self._check_engine(engine, batchdata)
        moving, fixed, moving_label, fixed_label = to_device(engine, batchdata, self.keys)
        if moving is None or fixed is None:
            raise ValueError(f"batch must contain {self.keys[0]!r} and {self.keys[1]!r}, got keys {sorted(batchdata)}")
        model = _model(engine.network)
        if not hasattr(model, "register"):
            raise ValueError(f"engine.network must be a KeyMorph (with register), got {type(model).__name__}")
        alignment = self.alignment or model.alignment
        matrix = self.random_matrix(engine, moving)
        if matrix is not None:
            augmented = apply_keymorph_affine(
                matrix, image=moving, label=moving_label, reference_grid=self._reference_grid(model)
            )
            moving, moving_label = augmented["image"], augmented.get("label", moving_label)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        result = model.register(moving, fixed, alignment)[alignment]
        ddf = result["ddf"]
        moving_warped = warp(moving, ddf)
        engine.state.output = {
            self.keys[0]: moving,
            self.keys[1]: fixed,
            f"{self.keys[0]}_warped": moving_warped,
            "forward_ddf": ddf,
            Keys.PRED: ddf,
            "matrix": matrix,
            **{k: result[k] for k in ("points_fixed", "points_moving", "points_aligned")},
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        label_args: tuple[torch.Tensor, ...] = ()
        if moving_label is not None and fixed_label is not None and getattr(engine.loss_function, "needs_labels", True):
            fixed_onehot, moving_onehot, labels = one_hot_label_pair(
                fixed_label, moving_label, self.max_train_seg_channels, self.num_labels, self.generator
            )
            label_args = (warp(moving_onehot.to(ddf.dtype), ddf), fixed_onehot.to(ddf.dtype))
            engine.state.output["labels"] = labels.expand(moving.shape[0], -1)  # (B, L): decollates per item
        backward_and_step(engine, as_loss_terms(engine.loss_function(moving_warped, fixed, *label_args)))
        if self.consistency_weight > 0:
            engine.state.output["kpconsistency"] = self._consistency_step(engine, batchdata, model)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def keymorph_train_loss(supervised: bool = False, image_loss: str = "mse") -> KeyMorphLoss:
    """The KeyMorph training loss of one mode, as the reference trains: one term only.

    ``supervised``: soft Dice of the warped one-hot label maps (``KeyMorphLoss(image_loss=None,
    label_loss="dice")``; ``image_loss`` is not used); otherwise the image term ``image_loss`` (``"mse"`` or
    ``"lncc"``) alone.
    """
    if supervised:
        return KeyMorphLoss(image_loss=None, label_loss="dice")
    return KeyMorphLoss(image_loss=image_loss, label_loss=None)


def keymorph_train_iteration(
    supervised: bool = False,
    consistency_weight: float = 0.0,
    alignment: str | None = None,
    max_params: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    affine_slope: float = -1,
    max_train_seg_channels: int | None = None,
    num_labels: int | None = None,
    seed: int | None = None,
) -> KeyMorphTrainIteration:
    """A :class:`KeyMorphTrainIteration` on the batch keys of the KeyMorph training items (listed pairs of
    :class:`~monai_ext.data.pairs.RegistrationPairDataset`, with ``consistency_`` extras) for one training mode.

    ``supervised``: the label maps under :data:`~monai_ext.data.keymorph.PAIR_LABEL_KEYS` are read, augmented
    with the moving image and handed to the loss (:func:`keymorph_train_loss`); otherwise no label key is read
    (the batch may still hold unloaded label paths). ``consistency_weight > 0``: the keypoint-consistency step
    on the images under :data:`~monai_ext.data.keymorph.CONSISTENCY_IMAGE_KEYS`. The other arguments are those of
    :class:`KeyMorphTrainIteration`.
    """
    moving_label_key, fixed_label_key = PAIR_LABEL_KEYS if supervised else (None, None)
    return KeyMorphTrainIteration(
        moving_label_key=moving_label_key,
        fixed_label_key=fixed_label_key,
        alignment=alignment,
        max_params=max_params,
        affine_slope=affine_slope,
        max_train_seg_channels=max_train_seg_channels,
        num_labels=num_labels,
        consistency_keys=CONSISTENCY_IMAGE_KEYS if consistency_weight > 0 else None,
        consistency_weight=consistency_weight,
        seed=seed,
    )


_LABEL_WARP = {"mode": "nearest", "padding": "zeros"}


class KeyMorphInferenceIteration:
    """``iteration_update`` for ``SupervisedEvaluator``: every alignment of a pair from one keypoint detection.

    ``engine.network`` is a :class:`~monai_ext.networks.keymorph.KeyMorph` (in eval mode, no gradients). The output
    keeps the batch's images, labels and names and adds ``alignments``: ``{name: {"forward_ddf", "moving_image_warped",
    "inverse_ddf", ["moving_label_warped", "fixed_label_warped"], "points_fixed_voxel", "points_moving_voxel",
    "points_aligned_voxel", ["inverse_matrix_voxel"]}}`` (model voxels; ``forward_ddf``: fixed grid -> moving image;
    ``inverse_ddf``: moving grid -> fixed image: for affine / rigid the exact inverse matrix, for TPS the same
    alignment fitted with the keypoint roles swapped (no second detection; a separate fit, as KeyMorph's forward
    point map, so only approximately inverse); label maps warped nearest,
    0 outside), and the first alignment's ``forward_ddf`` / ``pred`` at the top level.

    Args:
        alignments: names (``affine``, ``rigid``, ``tps_<lambda>``; random-lambda names draw per call).
        inverse: also compute ``inverse_ddf`` (inverse outputs, ``dice_inverse``, inverse consistency).
        moving_key, fixed_key, moving_label_key, fixed_label_key: batch keys.
        refine_steps: affine / rigid alignments are refined by mutual information with this many Adam steps per
            smoothing level, coarse first (:func:`~monai_ext.engines.affine_refinement.refine_keymorph_result`;
            batch size 1, consistent grid convention), on the images' finer copies ``<key>_refine`` where the
            batch has them (:func:`~monai_ext.data.model_space.model_space_transforms` ``refine_pixdim``), else
            on the network's grids; ``()`` or zeros: the keypoint fit only.
    """

    def __init__(
        self,
        alignments: Sequence[str] = ("affine",),
        inverse: bool = True,
        moving_key: str = "moving_image",
        fixed_key: str = "fixed_image",
        moving_label_key: str = "moving_label",
        fixed_label_key: str = "fixed_label",
        refine_steps: Sequence[int] = (),
    ) -> None:
        if isinstance(alignments, str):
            alignments = [alignments]
        if not alignments or len(set(alignments)) != len(alignments):
            raise ValueError(f"alignments must be a non-empty list of distinct names, got {alignments}")
        for name in alignments:
            parse_alignment(name)
        self.alignments = list(alignments)
        self.inverse = inverse
        self.keys = (moving_key, fixed_key, moving_label_key, fixed_label_key)
        self.refine_steps = tuple(int(s) for s in refine_steps)

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        moving, fixed, moving_label, fixed_label = pair_from_batch(engine, batchdata, self.keys)
        model = getattr(engine.network, "module", engine.network)
        if not hasattr(model, "register"):
            raise ValueError(f"engine.network must be a KeyMorph (with register), got {type(model).__name__}")
        model.eval()
        reference_grid = bool(getattr(model, "reference_grid", False))
        with torch.no_grad():
            results = model.register(moving, fixed, self.alignments)
        if sum(self.refine_steps):
            if reference_grid or moving.shape[0] != 1:
                raise ValueError("refine_steps needs batch size 1 and the consistent grid convention (reference_grid=False)")
            grids = to_device(engine, batchdata, [f"{key}{REFINE_SUFFIX}" for key in self.keys[:2]])
            for name, result in results.items():
                if "inverse_matrix_voxel" in result:
                    fine = None if any(g is None for g in grids) else (grids[0], grids[1])
                    results[name] = refine_keymorph_result(result, moving, fixed, self.refine_steps, refine_grids=fine)
        output = {k: v for k, v in batchdata.items() if not isinstance(v, torch.Tensor)}
        output.update({self.keys[0]: moving, self.keys[1]: fixed})
        if moving_label is not None and fixed_label is not None:
            output.update({self.keys[2]: moving_label, self.keys[3]: fixed_label})
        fixed_shape, moving_shape = fixed.shape[2:], moving.shape[2:]
        per_alignment = {}
        for name in self.alignments:
            result = results[name]
            ddf = result["ddf"]
            out = {
                "forward_ddf": ddf,
                f"{self.keys[0]}_warped": warp(convert_to_tensor(moving, track_meta=False), ddf),
                "points_fixed_voxel": normalized_to_voxels(result["points_fixed"], fixed_shape),
                "points_moving_voxel": normalized_to_voxels(result["points_moving"], moving_shape, not reference_grid),
                "points_aligned_voxel": normalized_to_voxels(result["points_aligned"], fixed_shape),
            }
            if self.inverse and "matrix_voxel" in result:  # affine / rigid: the exact inverse map
                out["inverse_ddf"] = affine_to_ddf(result["matrix_voxel"], moving_shape)
            elif self.inverse:  # TPS has no closed-form inverse: refit with the roles swapped
                swapped = fit_keypoint_transform(
                    result["points_moving"], result["points_fixed"], name, result.get("weights"), result.get("lmbda")
                )
                out["inverse_ddf"] = swapped.ddf(moving_shape, fixed_shape, reference_grid, model.chunk_size)
            if moving_label is not None and fixed_label is not None:
                out[f"{self.keys[2]}_warped"] = warp(convert_to_tensor(moving_label, track_meta=False).to(ddf.dtype), ddf, **_LABEL_WARP)
                if self.inverse:
                    fixed_ids = convert_to_tensor(fixed_label, track_meta=False).to(ddf.dtype)
                    out[f"{self.keys[3]}_warped"] = warp(fixed_ids, out["inverse_ddf"], **_LABEL_WARP)
            if "inverse_matrix_voxel" in result:
                out["inverse_matrix_voxel"] = result["inverse_matrix_voxel"]
            per_alignment[name] = out
        output["alignments"] = per_alignment
        output["forward_ddf"] = output["pred"] = per_alignment[self.alignments[0]]["forward_ddf"]
        engine.state.output = output
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
