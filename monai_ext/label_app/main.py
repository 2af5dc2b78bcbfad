"""MONAI Label app serving atlas-based label propagation with a registration bundle (needs ``monailabel``).

Serve it with (the ``--conf`` keys are read below)::

    APP=$(python -c 'import monai_ext.label_app as a, os; print(os.path.dirname(a.__file__))')
    monailabel start_server --app "$APP" \\
        --studies <folder of NIfTI images> \\
        --conf bundle <bundle folder> --conf spatial_size 160,144,192 \\
        [--conf pixdim 2] \\
        [--conf atlas_image <bundle>/atlas/image.nii.gz] [--conf atlas_label <bundle>/atlas/label.nii.gz] \\
        [--conf labels '{"left cerebral white matter": 1, ...}']

``spatial_size`` is the bundle's grid (``160,144,192`` for the cropped OASIS bundles, ``88,104,88`` for
``sitreg_brain``). Without ``pixdim`` the request image and the atlas are resized to it as arrays (images already
in the atlas space); with ``pixdim`` (mm, ``2`` for ``sitreg_brain``) both are resampled in world space onto RAS
grids of that voxel size centred on their foreground, as the brain bundles are trained. The returned label map
lies on the request image's own grid (its shape and affine).

The infer task is ``atlas_propagation`` (type segmentation); there is no trainer (MONAI Label's datastore gives
``{image, label}`` pairs, not the image pairs the registration training needs).
"""

from __future__ import annotations

import json
from pathlib import Path

from monai.utils import optional_import

from monai_ext.label_app.atlas import load_atlas
from monai_ext.label_app.infer import AtlasPropagationInferTask

MONAILabelApp, _ = optional_import("monailabel.interfaces.app", name="MONAILabelApp", as_type="base")


class AtlasPropagationApp(MONAILabelApp):
    """One infer task, :class:`~monai_ext.label_app.infer.AtlasPropagationInferTask`, configured by ``--conf``."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        for key in ("bundle", "spatial_size"):
            if not conf.get(key):
                raise ValueError(f"--conf {key} is required (see the module docstring of {__file__})")
        self.bundle = Path(conf["bundle"]).expanduser().resolve()
        self.atlas_image = Path(conf.get("atlas_image", self.bundle / "atlas" / "image.nii.gz"))
        self.atlas_label = Path(conf.get("atlas_label", self.bundle / "atlas" / "label.nii.gz"))
        for path in (self.bundle / "configs" / "inference.json", self.atlas_image, self.atlas_label):
            if not path.is_file():
                raise FileNotFoundError(f"MONAI Label atlas app: {path} not found")
        self.spatial_size = [int(s) for s in conf["spatial_size"].split(",")]
        self.pixdim = float(conf["pixdim"]) if conf.get("pixdim") else None
        metadata = json.loads((self.bundle / "configs" / "metadata.json").read_text())
        self.atlas_labels = json.loads(conf["labels"]) if conf.get("labels") else None
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"{metadata.get('name', self.bundle.name)} atlas propagation",
            description=metadata.get("description", ""),
            version=metadata.get("version", "0"),
        )

    def init_infers(self) -> dict:
        labels = self.atlas_labels
        if labels is None:  # every non-zero value of the atlas label map, named by value
            values = load_atlas(self.atlas_image, self.atlas_label, self.spatial_size, self.pixdim)[1].unique().tolist()
            labels = {f"label_{v}": int(v) for v in values if v != 0}
        return {
            "atlas_propagation": AtlasPropagationInferTask(
                self.bundle, self.atlas_image, self.atlas_label, labels, self.spatial_size, self.pixdim
            )
        }

    def init_trainers(self) -> dict:
        return {}
