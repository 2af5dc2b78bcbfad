"""Atlas-based label propagation: the MONAI Label use of a registration bundle.

MONAI Label serves one image in, one label map out. A registration bundle fits as label propagation: the
user's image is the *fixed* image, the atlas (image + label map, shipped with the bundle) is the *moving*
pair, ``network_def`` (``cat(moving, fixed)`` -> voxel DDF on the fixed grid, MONAI ``Warp`` convention)
registers the atlas to the user's image and the atlas label map, warped with nearest-neighbour sampling, is
the returned ``pred``.

The pipeline, all MONAI dictionary transforms on one request (tensors channel first, ``(C, *spatial)``; the
network sees the batch ``(1, 2C, *spatial)``):

1. :func:`atlas_preprocessing`: load the user's image with its metadata (world affine, original shape),
   normalise the intensities and bring it onto the bundle's grid (the *model grid*): an array resize, or a
   world-space RAS grid of a given voxel size (``pixdim``) as the brain bundles use;
2. :class:`AtlasPropagationd`: register the atlas (moving) to the user's image (fixed) on the model grid
   (optionally refined by :func:`~monai_ext.engines.field_refinement.refine_fields`, as the bundle does) and
   sample the atlas labels, nearest neighbour: from the atlas label *file* at the points the user's own voxels
   map to (``native_atlas_label``: one interpolation, directly on the user's grid), or on the model grid;
3. :class:`RestoreOriginalGridd`: bring the label map onto the user's image's own grid (its shape and world
   affine), nearest neighbour in world coordinates (a no-op for a label map sampled there already).

:func:`propagate_atlas` runs the three on one image file; :mod:`monai_ext.label_app.infer` runs the same three
as a ``monailabel`` infer task when ``monailabel`` is installed.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Resized,
    ScaleIntensityd,
    SpatialResample,
)
from torch import nn

from monai_ext.data.model_space import model_space_transforms
from monai_ext.engines.field_refinement import check_refinement_options, refine_fields
from monai_ext.engines.registration import forward_and_inverse
from monai_ext.io.native import ddf_model_to_native
from monai_ext.spatial.sampling import warp

__all__ = [
    "AtlasPropagationd",
    "RestoreOriginalGridd",
    "bundle_network",
    "bundle_refinement",
    "atlas_preprocessing",
    "load_atlas",
    "propagate_atlas",
]


def _channel_first(tensor: Any, name: str, spatial_dims: int | None = None) -> torch.Tensor:
    tensor = torch.as_tensor(tensor)
    if tensor.ndim not in (3, 4) or (spatial_dims is not None and tensor.ndim - 1 != spatial_dims):
        raise ValueError(f"{name} must be (C, *spatial) with 2 or 3 spatial dims, got {tuple(tensor.shape)}")
    return tensor


class AtlasPropagationd(MapTransform):
    """Register ``atlas_image`` (moving) to ``data[image_key]`` (fixed) and warp ``atlas_label`` into ``pred``.

    Args:
        network: ``cat(moving, fixed)`` ``(1, 2C, *spatial)`` -> voxel DDF ``(1, n, *spatial)`` mapping fixed-grid
            voxels into the moving (atlas) image, e.g. a bundle's ``network_def`` with its weights.
        atlas_image: ``(C, *spatial)`` float atlas intensities, preprocessed like the user's image.
        atlas_label: ``(1, *spatial)`` integer atlas label map on the atlas image's grid.
        image_key: key of the user's (fixed) image ``(C, *spatial)``, same spatial shape as the atlas
            (resample both to the bundle's grid in the preprocessing).
        pred_key: key of the propagated label map ``(1, *spatial)`` (int64, on the user's image grid).
        ddf_key: if set, also store the DDF ``(n, *spatial)`` (voxels, fixed grid -> atlas) there.
        native_atlas_label: optional atlas label map on its own file's grid, a ``MetaTensor`` ``(1, *native)``
            whose ``affine`` is that file's (:func:`monai_ext.io.native.load_image` with ``label=True``). With it
            ``atlas_image`` must
            be a ``MetaTensor`` carrying the atlas model grid's affine (as :func:`load_atlas` returns it), the user
            image a ``MetaTensor`` carrying its
            model grid's affine and the load metadata ``original_affine`` / ``spatial_shape`` of its file, and
            ``pred`` is the native atlas label sampled once (nearest, 0 outside the atlas) at the world points the
            registration maps the user's *native* voxels to, on the user's file grid. Without it the label map is
            warped on the model grid (after the atlas label was itself resampled onto that grid), which moves
            boundaries by up to a model voxel.
        refinement_steps: :func:`~monai_ext.engines.field_refinement.refine_fields` steps after the network
            (0: none; the inverse DDF comes from SITReg's symmetric pass, or from a second pass with the images
            swapped for other networks).
        refinement_lr: the refinement's learning rate.

    Labels are sampled nearest-neighbour, so they stay a subset of the atlas labels. A ``MetaTensor`` user image
    passes its metadata on to ``pred``.
    """

    def __init__(
        self,
        network: nn.Module,
        atlas_image: torch.Tensor,
        atlas_label: torch.Tensor,
        image_key: Hashable = "image",
        pred_key: Hashable = "pred",
        ddf_key: Hashable | None = None,
        native_atlas_label: MetaTensor | None = None,
        refinement_steps: int = 0,
        refinement_lr: float = 0.15,
    ) -> None:
        super().__init__(keys=image_key)
        self.atlas_affine = atlas_image.affine if isinstance(atlas_image, MetaTensor) else None
        if native_atlas_label is not None and (self.atlas_affine is None or not isinstance(native_atlas_label, MetaTensor)):
            raise ValueError("native_atlas_label needs MetaTensors with affines: the atlas image and the native label map")
        check_refinement_options(refinement_steps, refinement_lr, 2.0, 2, 3)
        self.native_atlas_label = native_atlas_label
        self.refinement_steps, self.refinement_lr = int(refinement_steps), float(refinement_lr)
        atlas_image = _channel_first(atlas_image, "atlas_image").float()
        atlas_label = _channel_first(atlas_label, "atlas_label", atlas_image.ndim - 1)
        if atlas_label.shape[0] != 1 or atlas_label.shape[1:] != atlas_image.shape[1:]:
            raise ValueError(
                f"atlas_label must be (1, *spatial) on the atlas image grid {tuple(atlas_image.shape[1:])}, "
                f"got {tuple(atlas_label.shape)}"
            )
        if atlas_label.is_floating_point() and not torch.equal(atlas_label, atlas_label.round()):
            raise ValueError("atlas_label must hold integer labels")
        self.network = network
        self.atlas_image = atlas_image
        self.atlas_label = atlas_label.long()
        self.image_key, self.pred_key, self.ddf_key = image_key, pred_key, ddf_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        fixed = _channel_first(image, f"data[{self.image_key!r}]", self.atlas_image.ndim - 1)
        if fixed.shape != self.atlas_image.shape:
            raise ValueError(
                f"data[{self.image_key!r}] {tuple(fixed.shape)} must have the atlas image's shape "
                f"{tuple(self.atlas_image.shape)} (resample it to the bundle's grid first)"
            )
        parameter = next(self.network.parameters(), None)
        device = parameter.device if parameter is not None else fixed.device
        moving = self.atlas_image.to(device)
        fixed = fixed.as_subclass(torch.Tensor).to(device=device, dtype=moving.dtype)
        moving = moving.as_subclass(torch.Tensor)
        with torch.no_grad():
            if self.refinement_steps:
                forward, inverse = forward_and_inverse(self.network, moving[None], fixed[None])
            else:
                forward = self.network(torch.cat([moving, fixed], dim=0)[None])
        if self.refinement_steps:
            forward, _ = refine_fields(
                moving[None], fixed[None], forward, inverse, steps=self.refinement_steps, learning_rate=self.refinement_lr
            )
        if self.ddf_key is not None:
            d[self.ddf_key] = forward[0]
        if self.native_atlas_label is None:
            label = warp(self.atlas_label.to(device)[None], forward, mode="nearest")[0]
            d[self.pred_key] = MetaTensor(label, meta=dict(image.meta)) if isinstance(image, MetaTensor) else label
            return d
        d[self.pred_key] = self._native_prediction(image, forward)
        return d

    def _native_prediction(self, image: Any, forward: torch.Tensor) -> MetaTensor:
        """``(1, *native user shape)`` int64 ``MetaTensor`` on the user's file grid (its ``original_affine``): the native
        atlas label map sampled (nearest, 0 outside) through ``forward``, the ``(1, n, *model shape)`` voxel DDF from
        the user's (fixed) model grid into the atlas (moving) model grid, mapped to native voxels through world mm."""
        meta = image.meta if isinstance(image, MetaTensor) else {}
        if not isinstance(image, MetaTensor) or meta.get("original_affine") is None or meta.get("spatial_shape") is None:
            raise ValueError(
                f"data[{self.image_key!r}] must be a MetaTensor with the 'original_affine' / 'spatial_shape' of its file "
                "(load it with LoadImaged) to sample the native atlas label"
            )
        native_affine = torch.as_tensor(meta["original_affine"], dtype=torch.float64)
        native_shape = [int(s) for s in torch.as_tensor(meta["spatial_shape"]).reshape(-1).tolist()]
        label = self.native_atlas_label
        ddf = ddf_model_to_native(
            forward.double(), image.affine, self.atlas_affine, native_affine, native_shape, label.affine
        )
        values = warp(label.as_tensor().to(ddf.device)[None], ddf, "nearest", "zeros")[0]
        out_meta = {key: value for key, value in meta.items() if key != "affine"}
        return MetaTensor(values, affine=native_affine, meta={**out_meta, "spatial_shape": native_shape})


def bundle_network(
    bundle_dir: str | os.PathLike,
    config_file: str = "configs/inference.json",
    weights: str | os.PathLike | None = "models/model.pt",
    **override: Any,
) -> nn.Module:
    """The bundle's ``network_def`` (eval mode), with ``weights`` (relative to the bundle, ``None``: random) loaded.

    ``override`` are config overrides (``"network_def#features": [...]``). A ``{"model": state_dict}`` checkpoint
    (``CheckpointSaver``) or a bare state dict is accepted; reference SITReg checkpoints are converted.
    """
    from monai.bundle import ConfigParser

    from monai_ext.checkpoints import load_sitreg_checkpoint
    from monai_ext.networks.sitreg import SITReg

    bundle_dir = Path(bundle_dir)
    parser = ConfigParser()
    parser.read_config(str(bundle_dir / config_file))
    parser.update({"bundle_root": str(bundle_dir), **override})
    network = parser.get_parsed_content("network_def")
    if weights is not None:
        checkpoint = torch.load(bundle_dir / weights, map_location="cpu", weights_only=True)
        state = checkpoint.get("model", checkpoint)
        if isinstance(network, SITReg):
            load_sitreg_checkpoint(network, state)
        else:
            network.load_state_dict(state)
    return network.eval()


def bundle_refinement(bundle_dir: str | os.PathLike, config_file: str = "configs/inference.json") -> dict[str, Any]:
    """The bundle's test-time field refinement as :class:`AtlasPropagationd` keyword arguments: ``refinement_steps``
    and ``refinement_lr`` from ``field_refinement_steps`` / ``field_refinement_lr`` of its config (0 steps where the
    bundle sets none)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(bundle_dir) / config_file))
    return {
        "refinement_steps": parser.get("field_refinement_steps", 0),
        "refinement_lr": parser.get("field_refinement_lr", 0.15),
    }


def atlas_preprocessing(
    spatial_size: Sequence[int], keys: Sequence[str] = ("image",), pixdim: float | None = None
) -> list[MapTransform]:
    """Load (with metadata) and channel first, then bring the image(s) onto the model grid of ``spatial_size`` voxels.

    - ``pixdim=None`` (array space): min-max intensities to ``[0, 1]``, resize the array to ``spatial_size``
      (trilinear; the field of view is kept, the voxel size changes). The user's image must already be in the
      atlas space up to a smooth deformation (e.g. affinely aligned brain MRI for the OASIS bundles): the
      registration networks are deformable only.
    - ``pixdim`` given (world space, as the brain bundles ``sitreg_brain`` / ``keymorph_brain_affine`` are
      trained): an RAS grid of ``spatial_size`` voxels of ``pixdim`` mm centred on the image's foreground
      centroid, resampled with the full affine (any orientation or voxel size), intensities normalised by the
      foreground's upper percentile (:func:`monai_ext.data.model_space.model_space_transforms`,
      ``centre="foreground"``, ``intensity="foreground_percentile"``). Atlas and user image of one anatomy land
      on grids aligned at their centroids.

    Either way the result is a ``MetaTensor`` ``(C, *spatial_size)`` whose ``affine`` is its grid's (voxel ->
    RAS mm) and whose metadata keep the file's ``original_affine`` / ``spatial_shape`` for
    :class:`RestoreOriginalGridd`.
    """
    if pixdim is not None:
        return list(
            model_space_transforms(
                list(keys),
                pixdim=[float(pixdim)] * len(spatial_size),
                spatial_size=list(spatial_size),
                intensity="foreground_percentile",
                centre="foreground",
            ).transforms
        )
    return [
        LoadImaged(keys=list(keys), image_only=False),
        EnsureChannelFirstd(keys=list(keys)),
        ScaleIntensityd(keys=list(keys), minv=0.0, maxv=1.0),
        Resized(
            keys=list(keys),
            spatial_size=list(spatial_size),
            mode="trilinear" if len(spatial_size) == 3 else "bilinear",
        ),
    ]


def load_atlas(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    spatial_size: Sequence[int],
    pixdim: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Atlas image ``(1, *spatial_size)`` float and label map ``(1, *spatial_size)`` int64 on the model grid.

    The image is preprocessed as :func:`atlas_preprocessing` (same ``pixdim``), except that the array-space resize
    of the image uses ``area`` interpolation; the label map follows its image with nearest-neighbour sampling.
    The image is a ``MetaTensor`` whose ``affine`` is the model grid's (voxel -> RAS mm), which
    :class:`AtlasPropagationd` needs to sample the atlas label map on its own grid.
    """
    if pixdim is not None:
        loaded = model_space_transforms(
            ["image"],
            ["label"],
            pixdim=[float(pixdim)] * len(spatial_size),
            spatial_size=list(spatial_size),
            intensity="foreground_percentile",
            centre="foreground",
        )({"image": str(image_path), "label": str(label_path)})
    else:
        loaded = Compose(
            [
                LoadImaged(keys=["image", "label"]),
                EnsureChannelFirstd(keys=["image", "label"]),
                ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
                Resized(keys=["image", "label"], spatial_size=list(spatial_size), mode=["area", "nearest"]),
            ]
        )({"image": str(image_path), "label": str(label_path)})
    image = loaded["image"]
    return MetaTensor(image.as_tensor().float(), affine=image.affine), loaded["label"].as_tensor().round().long()


class RestoreOriginalGridd(MapTransform):
    """Resample label maps from the model grid back onto the grid the reference image was loaded on.

    ``data[key]`` is a ``MetaTensor`` ``(C, *spatial)`` whose ``affine`` maps its voxel indices to world
    coordinates (millimetres, RAS as MONAI's loaders give it), e.g. the ``pred`` of :class:`AtlasPropagationd`,
    which carries the preprocessed image's affine. The destination grid is the reference image's as loaded:
    ``meta["original_affine"]`` and ``meta["spatial_shape"]`` of ``data[ref_key]`` (a ``MetaTensor``) or of
    ``data[f"{ref_key}_meta_dict"]``, both written by ``LoadImage``. Each destination voxel takes the label of
    the source voxel nearest to its centre in world coordinates (MONAI's ``SpatialResample``, ``nearest``,
    ``align_corners=False``, computed in float64); a destination voxel whose nearest source voxel lies outside the
    model grid gets 0 (background: the model grid of a world-space preprocessing may cover less than the image).
    The result is a ``MetaTensor`` ``(C, *spatial_shape)`` of the input's dtype with ``affine = original_affine``,
    so label values are kept exactly and the map lies on the reference image voxel for voxel.

    Why not a MONAI transform as it is: ``Invertd(nearest_interp=True)`` undoes ``Resized`` with torch's legacy
    ``"nearest"`` (source index ``floor(i * scale)``), up to one model-grid voxel away from the world-exact
    nearest voxel; ``ResampleToMatchd`` needs the destination image itself in the data (the loaded image has
    been replaced by the preprocessed one by then) and ``SpatialResampled`` takes a destination affine but not
    a destination shape; a world-space preprocessing (``pixdim`` of :func:`atlas_preprocessing`) records no
    invertible trace at all. None resamples onto a geometry (affine + shape) held in the loader's metadata; this
    transform does that with the array ``SpatialResample``, whatever preprocessing produced the model grid.

    Args:
        keys: the label maps to restore.
        ref_key: the image whose load metadata names the destination grid.
        mode: interpolation of ``SpatialResample`` (``"nearest"`` for label maps).
    """

    def __init__(self, keys: Any, ref_key: Hashable = "image", mode: str = "nearest") -> None:
        super().__init__(keys)
        self.ref_key = ref_key
        self.resample = SpatialResample(mode=mode, padding_mode="zeros", align_corners=False, dtype=torch.float64)

    def _destination(self, data: Mapping[Hashable, Any]) -> tuple[torch.Tensor, tuple[int, ...]]:
        reference = data.get(self.ref_key)
        meta = reference.meta if isinstance(reference, MetaTensor) else data.get(f"{self.ref_key}_meta_dict", {})
        if meta.get("original_affine") is None or meta.get("spatial_shape") is None:
            raise ValueError(
                f"data[{self.ref_key!r}] has no 'original_affine' / 'spatial_shape' metadata "
                "(load it with LoadImaged so that they are recorded)"
            )
        affine = torch.as_tensor(meta["original_affine"], dtype=torch.float64)
        shape = tuple(int(s) for s in torch.as_tensor(meta["spatial_shape"]).reshape(-1).tolist())
        if affine.shape != (len(shape) + 1, len(shape) + 1):
            raise ValueError(f"original_affine {tuple(affine.shape)} does not fit spatial_shape {shape}")
        return affine, shape

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        affine, shape = self._destination(d)
        for key in self.key_iterator(d):
            label = d[key]
            if not isinstance(label, MetaTensor):
                raise ValueError(f"data[{key!r}] must be a MetaTensor carrying the affine of its (model) grid")
            if label.ndim - 1 != len(shape):
                raise ValueError(
                    f"data[{key!r}] {tuple(label.shape)} must be (C, *spatial) with {len(shape)} spatial dims"
                )
            with self.resample.trace_transform(False):
                restored = self.resample(label, dst_affine=affine, spatial_size=shape)
            if label.dtype.is_floating_point:
                d[key] = restored.to(label.dtype)
            else:
                d[key] = restored.round().to(label.dtype)
        return d


def propagate_atlas(
    network: nn.Module,
    atlas_image: torch.Tensor,
    atlas_label: torch.Tensor,
    image: str | os.PathLike,
    spatial_size: Sequence[int],
    pixdim: float | None = None,
    native_atlas_label: MetaTensor | None = None,
    refinement_steps: int = 0,
    refinement_lr: float = 0.15,
) -> MetaTensor:
    """The atlas label map propagated onto one image file, on that image's own grid (what the infer task returns
    with ``native_atlas_label`` and the bundle's :func:`bundle_refinement`).

    Args:
        network: as :class:`AtlasPropagationd` (``cat(moving=atlas, fixed=image)`` ``(1, 2C, *spatial_size)`` ->
            voxel DDF ``(1, n, *spatial_size)`` on the model grid).
        atlas_image, atlas_label: ``(C, *spatial_size)`` / ``(1, *spatial_size)`` on the model grid, as
            :func:`load_atlas` returns them.
        image: the user's image file (the fixed image), any grid.
        spatial_size: the model grid (the bundle's input shape).
        pixdim: ``None`` (array-space resize) or the model voxel size in mm (world-space grid), as
            :func:`atlas_preprocessing`; the atlas must have been loaded with the same (:func:`load_atlas`).
        native_atlas_label, refinement_steps, refinement_lr: as :class:`AtlasPropagationd`.

    Returns:
        int64 ``MetaTensor`` ``(1, *image shape)`` with the image's affine (world millimetres, RAS).
    """
    pipeline = Compose(
        [
            *atlas_preprocessing(spatial_size, pixdim=pixdim),
            AtlasPropagationd(
                network,
                atlas_image,
                atlas_label,
                native_atlas_label=native_atlas_label,
                refinement_steps=refinement_steps,
                refinement_lr=refinement_lr,
            ),
            RestoreOriginalGridd(keys="pred", ref_key="image"),
        ]
    )
    return pipeline({"image": str(image)})["pred"]
