"""MONAI Label infer task: atlas-based label propagation with a registration bundle (needs ``monailabel``).

The task follows MONAI Label's ``BasicInferTask`` flow on one request image (the *fixed* image; the atlas is
the *moving* one):

- ``pre_transforms`` (:func:`~monai_ext.label_app.atlas.atlas_preprocessing`): load the image with its
  metadata, normalise the intensities and bring it onto the bundle's grid (the model grid), ``(C, *spatial_size)``:
  an array resize, or with ``pixdim`` a world-space RAS grid of ``pixdim`` mm voxels centred on the foreground;
- ``run_inferer`` (:class:`~monai_ext.label_app.atlas.AtlasPropagationd`): the bundle's network maps
  ``cat(atlas, image)`` ``(1, 2C, D, H, W)`` to a DDF ``(1, 3, D, H, W)`` in model-grid voxels, refined by the
  bundle's own test-time field refinement where its ``inference.json`` sets ``field_refinement_steps``
  (``sitreg_brain``: 4); the atlas label map *as stored in its file* is sampled once (nearest neighbour) at the
  atlas points that the registration maps the request image's own voxels to: ``pred`` lies on the request grid;
- ``post_transforms``: :class:`~monai_ext.label_app.atlas.RestoreOriginalGridd` checks that ``pred`` lies on the
  request image's own grid (its original shape and affine; it would resample it there otherwise), then the
  channel is dropped and the labels are cast to int32, which MONAI Label's ITK writer stores with that affine.

Only ``monailabel``'s task and app base classes are imported (nothing of ``monailabel.transform.post``, which
needs torchvision). :func:`~monai_ext.label_app.atlas.propagate_atlas` computes the same label map without a
server. ``main.py`` beside this file is the app (its docstring has the command).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.inferers import SimpleInferer
from monai.transforms import CastToTyped, EnsureTyped, SqueezeDimd
from monai.utils import optional_import

from monai_ext.io.native import load_image
from monai_ext.label_app.atlas import (
    AtlasPropagationd,
    RestoreOriginalGridd,
    atlas_preprocessing,
    bundle_network,
    bundle_refinement,
    load_atlas,
)

BasicInferTask, _ = optional_import("monailabel.tasks.infer.basic_infer", name="BasicInferTask", as_type="base")
InferType, _ = optional_import("monailabel.interfaces.tasks.infer_v2", name="InferType")

__all__ = ["AtlasPropagationInferTask"]


class AtlasPropagationInferTask(BasicInferTask):
    """Segment a request image by registering the bundle's atlas to it (MONAI Label ``SEGMENTATION`` type).

    Args:
        bundle_dir: a registration bundle of this package (``configs/inference.json`` with ``network_def``
            ``cat(moving, fixed)`` -> DDF, ``configs/metadata.json``, weights ``models/model.pt``).
        atlas_image, atlas_label: NIfTI atlas image and integer label map (e.g. ``<bundle>/atlas/*.nii.gz``).
        labels: ``{name: value}`` of the atlas labels shown by the client.
        spatial_size: the bundle's grid, a valid ``inputs.image.spatial_shape`` of its metadata
            (e.g. ``[160, 144, 192]`` for the cropped OASIS bundles, ``[88, 104, 88]`` for ``sitreg_brain``).
        pixdim: ``None``: the request image and the atlas are resized to ``spatial_size`` as arrays (images
            already in the atlas space, e.g. the OASIS bundles); a voxel size in mm: both are resampled in world
            space onto RAS grids of ``spatial_size`` voxels of ``pixdim`` mm centred on their foreground, as the
            brain bundles are trained (``2.0`` for ``sitreg_brain``); see
            :func:`~monai_ext.label_app.atlas.atlas_preprocessing`.
        kwargs: further ``BasicInferTask`` arguments (``preload``, ``load_strict``, ...).

    The weights are read by MONAI Label from ``models/model.pt`` (``checkpoint.get("model", checkpoint)``): use
    the bundle's own (converted) weights, not a reference-format checkpoint.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        atlas_image: str | os.PathLike,
        atlas_label: str | os.PathLike,
        labels: Mapping[str, int],
        spatial_size: Sequence[int],
        pixdim: float | None = None,
        description: str = "Atlas-based label propagation by deformable registration",
        **kwargs: Any,
    ) -> None:
        bundle_dir = Path(bundle_dir)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.pixdim = None if pixdim is None else float(pixdim)
        self.atlas_image, self.atlas_label = load_atlas(atlas_image, atlas_label, self.spatial_size, self.pixdim)
        self.native_atlas_label = load_image(atlas_label, spatial_dims=len(self.spatial_size), label=True)
        network = bundle_network(bundle_dir, weights=None)
        self.refinement = bundle_refinement(bundle_dir)  # the bundle's own test-time refinement (sitreg_brain: 4)
        super().__init__(
            path=str(bundle_dir / "models" / "model.pt"),
            network=network,
            type=InferType.SEGMENTATION,
            labels=dict(labels),
            dimension=len(self.spatial_size),
            description=description,
            **kwargs,
        )

    def pre_transforms(self, data=None) -> list:
        return atlas_preprocessing(self.spatial_size, keys=(self.input_key,), pixdim=self.pixdim)

    def inferer(self, data=None) -> SimpleInferer:
        return SimpleInferer()

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        network = self._get_network(device, data)
        propagate = AtlasPropagationd(
            network,
            self.atlas_image,
            self.atlas_label,
            image_key=self.input_key,
            pred_key=self.output_label_key,
            native_atlas_label=self.native_atlas_label,
            **self.refinement,
        )
        return propagate(data)

    def post_transforms(self, data=None) -> list:
        """``pred`` ``(1, *model grid)`` -> int32 ``(*request image shape)`` with the request image's affine."""
        key = self.output_label_key
        return [
            EnsureTyped(keys=key, device="cpu"),
            RestoreOriginalGridd(keys=key, ref_key=self.input_key),
            SqueezeDimd(keys=key, dim=0),  # MONAI Label's writer takes a single-channel label map without channel
            CastToTyped(keys=key, dtype=torch.int32),  # ITK (the writer) has no int64 images
        ]
