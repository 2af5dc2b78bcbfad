"""KeyMorph / BrainMorph inference: several closed-form alignments per pair, keypoint and matrix outputs, groupwise.

Pairwise (with MONAI's ``SupervisedEvaluator``): :class:`KeyMorphInferenceIteration` detects the keypoints of a
pair once and fits every requested alignment (``affine``, ``rigid``, ``tps_<lambda>``,
:meth:`monai_ext.networks.keymorph.KeyMorph.register`); :class:`KeyMorphWriter` (a
:class:`~monai_ext.io.outputs.RegistrationWriter`) writes ``<output_dir>/<moving>__<fixed>/``:

* ``keypoints_fixed.csv``, ``keypoints_moving.csv``: the ``K`` keypoints of each image (column ``index``, world
  ``x_ras, y_ras, z_ras`` in mm and ``i, j, k`` voxel coordinates of that image's **file**);
* per alignment ``<alignment>/``: every generic output of the RegistrationWriter (warped image / labels, DDFs, ITK
  displacement field, Jacobian, ``metrics.json``, ``qa.png``; all on the native fixed grid), plus
  ``keypoints_aligned.csv`` (the moving keypoints mapped into the fixed image, file voxels of the fixed image),
  ``mse`` in ``metrics.json`` (model space, warped moving vs fixed image), for ``affine`` / ``rigid`` the map as an
  ITK transform file ``transform_itk.tfm`` (world, fixed points -> moving points, ITK's resampling convention:
  ``antsApplyTransforms -t transform_itk.tfm`` warps the moving image onto the fixed one), and optionally
  ``keypoints_qa.png`` (model-space QA figure with the moving, fixed and aligned keypoints).

Groupwise (:func:`write_groupwise`): :meth:`KeyMorph.groupwise_register` over a lazy iterable of preprocessed
images; every image is warped into the common (template) space and written with its keypoints; ``metrics.json``
holds the mean pairwise Dice of the warped label maps (if any) and the folding fraction of every field.

Keypoint coordinates: KeyMorph keypoints are normalised ``[-1, 1]`` model-space coordinates (align_corners=True);
:func:`~monai_ext.networks.keymorph.normalized_to_voxels` turns them into model voxels (for the moving image with the reference's read
convention when the model uses ``reference_grid``), the model affine into world mm, the file affine into file voxels.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from monai_ext.io.itk_fields import write_image, write_itk_affine
from monai_ext.io.native import load_image
from monai_ext.io.outputs import OUTPUTS, RegistrationWriter, _merge_into, check_pair_files
from monai_ext.io.qa import qa_figure
from monai_ext.io.validation import (
    InputError,
    MissingInputError,
    check_existing_outputs,
    check_image,
    check_output_dir,
)
from monai_ext.data.atomic import atomic_output, umask_mode
from monai_ext.metrics.deformation import folding_fraction
from monai_ext.metrics.overlap import label_overlap
from monai_ext.networks.keymorph import normalized_to_voxels
from monai_ext.spatial.coordinates import invert_homogeneous
from monai_ext.spatial.sampling import warp

__all__ = [
    "KEYMORPH_OUTPUTS",
    "QA_OUTPUTS",
    "check_input_images",
    "KeyMorphWriter",
    "write_groupwise",
    "write_keypoints",
]

KEYMORPH_OUTPUTS = ("transform_itk", "keypoints", "keypoints_qa")
#: the QA pictures :class:`KeyMorphWriter` adds with ``qa_png``: the generic ``qa.png`` and ``keypoints_qa.png``
QA_OUTPUTS = ("qa", "keypoints_qa")
_LABEL_WARP = {"mode": "nearest", "padding": "zeros"}


def check_input_images(
    pairs: Sequence[Mapping[str, Any]] | None = None,
    images: Sequence[Mapping[str, Any]] | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Validate every input file before any output is written (so a bad input leaves no partial outputs).

    Every ``*_image`` / ``image`` must be a readable single-channel 3-D image with finite, non-constant values
    (a constant image has no keypoints); ``*_label`` / ``label`` maps must be integer and on their image's grid
    (:func:`monai_ext.io.validation.check_image`). Give ``pairs`` (pair dicts,
    :func:`~monai_ext.io.outputs.check_pair_files`, which with ``output_dir`` also refuses an unwritable output
    folder and existing pair folders unless ``overwrite``) or ``images`` (dicts with ``image`` and optionally
    ``label``; at least two for groupwise). Returns the checked dicts; raises
    :class:`~monai_ext.io.validation.InputError` (a ``ValueError``).
    """
    if (pairs is None) == (images is None):
        raise InputError("give pairs or images (exactly one)")
    if pairs is not None:
        return check_pair_files(pairs, output_dir=output_dir, overwrite=overwrite)
    items = [dict(i) for i in images]
    if len(items) < 2:
        raise InputError(f"groupwise registration needs at least 2 images, got {len(items)}")
    for index, item in enumerate(items):
        if "image" not in item or not Path(item["image"]).is_file():
            raise MissingInputError(f"images[{index}]: image file not found: {item.get('image')}")
        image = check_image(item["image"], spatial_dims=3, name=f"images[{index}]")
        if "label" in item:
            check_image(item["label"], spatial_dims=3, label=True, reference=image, name=f"images[{index}]['label']")
    if output_dir is not None:
        check_output_dir(output_dir)
        check_existing_outputs(output_dir, ["groupwise"], overwrite)
    return items


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _model_affine(image: torch.Tensor) -> torch.Tensor:
    n = image.ndim - 1
    return image.affine.to(torch.float64) if isinstance(image, MetaTensor) else torch.eye(n + 1, dtype=torch.float64)


def _file_affine(image: torch.Tensor) -> torch.Tensor:
    """The image file's voxel to RAS affine (``meta["original_affine"]``), else the model affine."""
    meta = image.meta if isinstance(image, MetaTensor) else {}
    if "original_affine" in meta:
        return torch.as_tensor(np.asarray(meta["original_affine"]), dtype=torch.float64)
    return _model_affine(image)


def write_keypoints(path: Path, points: torch.Tensor, to_world: torch.Tensor, file_affine: torch.Tensor) -> None:
    """Keypoints as a CSV of world (RAS mm) and file voxel coordinates (columns ``index, x_ras, y_ras, z_ras, i, j,
    k``), written atomically.

    Args:
        path: the CSV file.
        points: ``(K, n)`` keypoints, e.g. model voxels.
        to_world: ``(n + 1, n + 1)`` map of ``points`` to RAS mm (a model affine; the identity for world points).
        file_affine: voxel to RAS affine of the image file whose voxel coordinates the CSV gives.
    """
    points = points.detach().cpu().double().reshape(-1, points.shape[-1])
    n = points.shape[1]
    homogeneous = torch.cat([points, torch.ones(len(points), 1, dtype=torch.float64)], 1)
    world = homogeneous @ to_world.double().T
    file_voxels = world @ invert_homogeneous(file_affine).T
    stream = io.StringIO()
    writer = csv.writer(stream)
    writer.writerow(["index", *("x_ras", "y_ras", "z_ras")[:n], *("i", "j", "k")[:n]])
    for k in range(len(points)):
        values = world[k, :n].tolist() + file_voxels[k, :n].tolist()
        writer.writerow([k, *(f"{v:.6f}" for v in values)])
    with atomic_output(path) as tmp:
        tmp.write_text(stream.getvalue())


class KeyMorphWriter(RegistrationWriter):
    """:class:`~monai_ext.io.outputs.RegistrationWriter` for :class:`KeyMorphInferenceIteration` outputs.

    Writes the generic outputs once per alignment into ``<pair>/<alignment>/`` and the KeyMorph outputs of the
    module docstring; a pair folder appears only when all its alignments are complete (the parent's staging).

    Args:
        output_dir: root folder.
        outputs: generic names (:data:`monai_ext.io.outputs.OUTPUTS`) and KeyMorph names (:data:`KEYMORPH_OUTPUTS`:
            ``transform_itk``, ``keypoints``, ``keypoints_qa``); default: everything except ``keypoints_qa``.
        qa_png: also write the QA pictures ``qa.png`` and ``keypoints_qa.png`` (added to ``outputs`` when missing).
        kwargs: ``labels``, ``hd95``, the keys and ``overwrite``, as in the parent.
    """

    extra_output_names = KEYMORPH_OUTPUTS

    def __init__(
        self,
        output_dir: str | os.PathLike,
        outputs: Sequence[str] = (*OUTPUTS, "transform_itk", "keypoints"),
        qa_png: bool = False,
        **kwargs: Any,
    ) -> None:
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        if qa_png:
            outputs += [o for o in QA_OUTPUTS if o not in outputs]
        super().__init__(output_dir, outputs, **kwargs)

    def _write(self, item: Mapping[str, Any], folder: Path, name: str) -> None:
        moving_key, fixed_key = self.keys[:2]
        alignments = item.get("alignments")
        if not isinstance(alignments, Mapping) or not alignments:
            raise ValueError("engine output must hold 'alignments' (use KeyMorphInferenceIteration)")
        moving, fixed = item[moving_key], item[fixed_key]
        affines = {side: (_model_affine(x), _file_affine(x)) for side, x in (("moving", moving), ("fixed", fixed))}
        wanted = set(self.extra_outputs)
        for alignment, result in alignments.items():
            sub = {k: v for k, v in item.items() if k != "alignments"}
            sub.update(result)
            target = folder / alignment
            super()._write(sub, target, f"{name} {alignment}")
            if "metrics" in self.outputs:  # add the alignment name and the model-space MSE
                metrics_path = target / "metrics.json"
                mse = float(torch.mean((_plain(result[f"{moving_key}_warped"]) - _plain(fixed)) ** 2))
                payload = {"alignment": alignment, **json.loads(metrics_path.read_text()), "mse": mse}
                with atomic_output(metrics_path) as tmp:
                    tmp.write_text(json.dumps(payload, indent=2))
            if "transform_itk" in wanted and "inverse_matrix_voxel" in result:
                matrix = result["inverse_matrix_voxel"]  # fixed model voxel -> moving model voxel
                write_itk_affine(target / "transform_itk.tfm", matrix, affines["fixed"][0], affines["moving"][0])
            if "keypoints" in wanted:
                write_keypoints(target / "keypoints_aligned.csv", result["points_aligned_voxel"], *affines["fixed"])
            if "keypoints_qa" in wanted:
                points = {
                    "moving": result["points_moving_voxel"],
                    "fixed": result["points_fixed_voxel"],
                    "aligned": result["points_aligned_voxel"],
                }
                warped, ddf = _plain(result[f"{moving_key}_warped"]), _plain(result["forward_ddf"])[None]
                path = target / "keypoints_qa.png"
                qa_figure(_plain(fixed), _plain(moving), warped, ddf, path, points, title=f"{name} {alignment}")
        if "keypoints" in wanted:
            first = next(iter(alignments.values()))
            write_keypoints(folder / "keypoints_fixed.csv", first["points_fixed_voxel"], *affines["fixed"])
            write_keypoints(folder / "keypoints_moving.csv", first["points_moving_voxel"], *affines["moving"])


def _pairwise_dice(labels: Sequence[torch.Tensor]) -> float:
    """Mean over all unordered pairs of integer label maps ``(1, *spatial)`` of their Dice
    (:func:`~monai_ext.metrics.overlap.label_overlap`, mean over the nonzero labels present in either map):
    BrainMorph's group metric, except that the reference includes the background and scores labels absent from
    both maps as Dice 1."""
    scores = []
    for a in range(len(labels)):
        for b in range(a + 1, len(labels)):
            x, y = labels[a].round().long(), labels[b].round().long()
            values = [int(v) for v in torch.cat([x.unique(), y.unique()]).unique() if v != 0]
            if values:
                scores.append(label_overlap(x[None], y[None], values, suffix="_pair")["dice_pair"])
    return float(np.mean(scores)) if scores else math.nan


def write_groupwise(
    network: nn.Module,
    images: Sequence[Mapping[str, Any]],
    transform: Any,
    output_dir: str | os.PathLike,
    alignments: Sequence[str] = ("affine",),
    num_iterations: int = 5,
    image_key: str = "image",
    label_key: str = "label",
    device: torch.device | str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Groupwise KeyMorph registration of files; writes ``<output_dir>/groupwise/`` atomically (all or nothing).

    An existing ``groupwise`` folder is refused before any compute unless ``overwrite``; then the new files replace
    those of the same names in it and other files are kept.

    Keypoints are detected one image at a time through a generator (only ``(N, K, 3)`` points are kept). The
    common space is the template keypoint frame sampled on the model grid; its world affine is the first image's
    model-space affine (all images must share the model shape, e.g. 256^3). Per alignment ``<alignment>/``:
    ``<name>_warped.nii.gz`` (each image in the common space), ``<name>_warped_label.nii.gz`` (nearest),
    ``<name>_keypoints.csv`` (original keypoints, world and file voxels), ``template_keypoints.csv`` (world),
    ``<name>_transform_itk.tfm`` (affine / rigid: template world -> image world) and ``metrics.json``
    (``dice``: mean pairwise Dice of the warped label maps; ``folding_fraction`` per image).

    Args:
        network: a :class:`~monai_ext.networks.keymorph.KeyMorph`.
        images: dicts ``{image_key: path, [label_key: path], ["name": str]}`` (checked with :func:`check_input_images`).
        transform: preprocessing of one dict (e.g. :func:`monai_ext.data.keymorph.keymorph_transforms`).
        alignments: names as in :class:`KeyMorphInferenceIteration`.
        num_iterations: groupwise iterations (reference 5).
    """
    images = check_input_images(
        images=[
            {"image": i[image_key], "name": i.get("name"), **({"label": i[label_key]} if label_key in i else {})}
            for i in images
        ],
        output_dir=output_dir,
        overwrite=overwrite,
    )
    names = [i["name"] or Path(i["image"]).name.split(".")[0] for i in images]
    if len(set(names)) != len(names):
        raise ValueError(f"image names must be distinct, got {names}")
    model = getattr(network, "module", network).eval()

    def load(index: int) -> dict[str, Any]:
        item = {image_key: images[index]["image"]}
        if "label" in images[index]:
            item[label_key] = images[index]["label"]
        return transform(item)

    def stream() -> Iterable[torch.Tensor]:
        for index in range(len(images)):
            yield load(index)[image_key][None].to(device)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-groupwise-", dir=output_dir))
    try:
        umask_mode(staging)  # mkdtemp makes it private (0o700)
        first = load(0)[image_key]
        common_affine = _model_affine(first)
        shape = tuple(first.shape[1:])
        for alignment in alignments:
            group = model.groupwise_register(stream(), alignment, num_iterations)
            target = staging / alignment
            warped_labels, folding = [], {}
            template_voxels = normalized_to_voxels(group.template, shape)
            write_keypoints(target / "template_keypoints.csv", template_voxels, common_affine, common_affine)
            for index, ddf in enumerate(group.ddfs()):
                item = load(index)
                image, name = item[image_key], names[index]
                if tuple(image.shape[1:]) != shape:
                    got = tuple(image.shape[1:])
                    raise ValueError(f"all images must share the model shape {shape}, {name} has {got}")
                write_image(target / f"{name}_warped.nii.gz", warp(_plain(image)[None].to(ddf), ddf)[0], common_affine)
                if label_key in item:
                    label = warp(_plain(item[label_key])[None].to(ddf), ddf, **_LABEL_WARP)[0]
                    warped_labels.append(label)
                    write_image(target / f"{name}_warped_label.nii.gz", label.round().to(torch.int32), common_affine)
                voxels = normalized_to_voxels(group.points[index], shape, not model.reference_grid)
                write_keypoints(target / f"{name}_keypoints.csv", voxels, _model_affine(image), _file_affine(image))
                transform_i = group.transform(index)
                if transform_i.inverse_matrix is not None:
                    _, inverse_voxel = transform_i.voxel_matrices(shape, shape, model.reference_grid)
                    path = target / f"{name}_transform_itk.tfm"
                    write_itk_affine(path, inverse_voxel[0], common_affine, _model_affine(image))
                folding[name] = float(folding_fraction(ddf.double())[0])
            metrics = {"alignment": alignment, "num_images": len(images), "folding_fraction": folding}
            dice = _pairwise_dice(warped_labels) if warped_labels else math.nan
            metrics["dice"] = dice if math.isfinite(dice) else None
            with atomic_output(target / "metrics.json") as tmp:
                tmp.write_text(json.dumps(metrics, indent=2))
        final = output_dir / "groupwise"
        check_existing_outputs(output_dir, ["groupwise"], overwrite)
        if final.exists():
            _merge_into(staging, final)
            shutil.rmtree(staging)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir / "groupwise"
