"""MONAI Label infer task: atlas-based label propagation with a registration bundle (needs ``monailabel``).

The task follows MONAI Label's ``BasicInferTask`` flow: ``pre_transforms`` load the request image (the fixed
image) and bring it to the bundle's grid, ``run_inferer`` registers the bundle's atlas to it and warps the
atlas labels (:class:`~monai_ext.label_app.atlas.AtlasPropagationd`), ``post_transforms`` restore the label map
to the request image's original grid (``monailabel.transform.post.Restored``), and MONAI Label's writer
returns it as a segmentation. ``main.py`` beside this file is the app (see the bundle docs for the commands).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.inferers import SimpleInferer
from monai.transforms import EnsureTyped
from monai.utils import optional_import

from monai_ext.label_app.atlas import AtlasPropagationd, atlas_preprocessing, bundle_network, load_atlas

BasicInferTask, _ = optional_import("monailabel.tasks.infer.basic_infer", name="BasicInferTask", as_type="base")
InferType, _ = optional_import("monailabel.interfaces.tasks.infer_v2", name="InferType")
Restored, _ = optional_import("monailabel.transform.post", name="Restored")

__all__ = ["AtlasPropagationInferTask"]


class AtlasPropagationInferTask(BasicInferTask):
    """Segment a request image by registering the bundle's atlas to it (MONAI Label ``SEGMENTATION`` type).

    Args:
        bundle_dir: a registration bundle of this package (``configs/inference.json`` with ``network_def``
            ``cat(moving, fixed)`` -> DDF, ``configs/metadata.json``, weights ``models/model.pt``).
        atlas_image, atlas_label: NIfTI atlas image and integer label map (e.g. ``<bundle>/atlas/*.nii.gz``).
        labels: ``{name: value}`` of the atlas labels shown by the client.
        spatial_size: the bundle's grid, a valid ``inputs.image.spatial_shape`` of its metadata
            (e.g. ``[160, 144, 192]`` for the cropped OASIS bundles).
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
        description: str = "Atlas-based label propagation by deformable registration",
        **kwargs: Any,
    ) -> None:
        bundle_dir = Path(bundle_dir)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.atlas_image, self.atlas_label = load_atlas(atlas_image, atlas_label, self.spatial_size)
        network = bundle_network(bundle_dir, weights=None)
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
        return atlas_preprocessing(self.spatial_size, keys=(self.input_key,))

    def inferer(self, data=None) -> SimpleInferer:
        return SimpleInferer()

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        network = self._get_network(device, data)
        propagate = AtlasPropagationd(
            network, self.atlas_image, self.atlas_label, image_key=self.input_key, pred_key=self.output_label_key
        )
        return propagate(data)

    def post_transforms(self, data=None) -> list:
        key = self.output_label_key
        return [EnsureTyped(keys=key, device="cpu"), Restored(keys=key, ref_image=self.input_key)]
