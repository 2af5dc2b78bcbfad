"""Atlas-based label propagation: the MONAI Label use of a registration bundle.

MONAI Label serves one image in, one label map out. A registration bundle fits as label propagation: the
user's image is the *fixed* image, the atlas (image + label map, shipped with the bundle) is the *moving*
pair, ``network_def`` (``cat(moving, fixed)`` -> voxel DDF on the fixed grid, MONAI ``Warp`` convention)
registers the atlas to the user's image and the atlas label map, warped with nearest-neighbour sampling, is
the returned ``pred``.

:class:`AtlasPropagationd` is the dictionary transform doing that (usable in a bundle's inference
``postprocessing`` or in a MONAI Label infer task); :mod:`monai_ext.label_app.infer` wraps it as a
``monailabel`` infer task when ``monailabel`` is installed.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, MapTransform, Resized, ScaleIntensityd
from torch import nn

from monai_ext.spatial.sampling import warp

__all__ = ["AtlasPropagationd", "bundle_network", "atlas_preprocessing", "load_atlas"]


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

    Labels are warped with nearest-neighbour sampling (border extrapolation), so they stay a subset of the atlas
    labels. A ``MetaTensor`` user image passes its metadata (affine) on to ``pred``.
    """

    def __init__(
        self,
        network: nn.Module,
        atlas_image: torch.Tensor,
        atlas_label: torch.Tensor,
        image_key: Hashable = "image",
        pred_key: Hashable = "pred",
        ddf_key: Hashable | None = None,
    ) -> None:
        super().__init__(keys=image_key)
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
        with torch.no_grad():
            ddf = self.network(torch.cat([moving, fixed], dim=0)[None])
            label = warp(self.atlas_label.to(device)[None], ddf, mode="nearest")[0]
        d[self.pred_key] = MetaTensor(label, meta=dict(image.meta)) if isinstance(image, MetaTensor) else label
        if self.ddf_key is not None:
            d[self.ddf_key] = ddf[0]
        return d


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


def atlas_preprocessing(spatial_size: Sequence[int], keys: Sequence[str] = ("image",)) -> list[MapTransform]:
    """Load (with metadata), channel first, min-max intensities to ``[0, 1]``, resize to the bundle's grid.

    The user's image must already be in the atlas space up to a smooth deformation (e.g. affinely aligned brain
    MRI for the OASIS bundles): the registration networks are deformable only.
    """
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
    image_path: str | os.PathLike, label_path: str | os.PathLike, spatial_size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Atlas image ``(1, *spatial_size)`` (as :func:`atlas_preprocessing`) and label map ``(1, *spatial_size)``
    (int64, resized with nearest neighbour)."""
    loaded = Compose(
        [
            LoadImaged(keys=["image", "label"]),
            EnsureChannelFirstd(keys=["image", "label"]),
            ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
            Resized(keys=["image", "label"], spatial_size=list(spatial_size), mode=["area", "nearest"]),
        ]
    )({"image": str(image_path), "label": str(label_path)})
    return loaded["image"].as_tensor().float(), loaded["label"].as_tensor().round().long()
