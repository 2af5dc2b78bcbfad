"""Checks of a registration's inputs and output location, run before any compute.

Shared by the command line (:mod:`monai_ext.cli`) and the bundle configs (through
:func:`monai_ext.io.outputs.check_pair_files`), so that both refuse the same bad inputs with the same message:

* :func:`check_image`: a readable, finite, single-channel image of the right dimensionality that is not constant
  (an all-zero or otherwise constant image has nothing to register); a label map or mask with integer values on
  its image's grid;
* :func:`check_pairs`: every file of a list of pair dicts, and no image paired with itself;
* :func:`check_output_dir`: the output location is a folder (or can be created as one) that this process may write;
* :func:`check_existing_outputs`: the pair folders a run would write do not exist yet, unless ``overwrite``.

Every failure raises :class:`InputError` (a ``ValueError``) with one line naming the input and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor

from monai_ext.errors import InputError, MissingInputError, OutputExistsError
from monai_ext.io.native import load_image

__all__ = [
    "InputError",
    "MissingInputError",
    "OutputExistsError",
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "check_image",
    "check_pairs",
    "check_output_dir",
    "check_existing_outputs",
]

#: image keys of a pair dict, and the label-map / mask keys that must lie on each image's grid
IMAGE_KEYS = ("moving_image", "fixed_image")
LABEL_KEYS = {"moving_image": ("moving_label", "moving_mask"), "fixed_image": ("fixed_label", "fixed_mask")}


def check_image(
    path: str | os.PathLike,
    spatial_dims: int = 3,
    label: bool = False,
    reference: MetaTensor | None = None,
    name: str | None = None,
) -> MetaTensor:
    """Load one input file with :func:`monai_ext.io.native.load_image` and refuse anything not worth registering.

    On top of ``load_image``'s checks (readable, ``spatial_dims``-D, one channel, no infinite values, integer labels on
    ``reference``'s grid), an intensity image must not be constant. ``name`` (e.g. ``"pairs[0]['moving_image']"``)
    prefixes the message. Raises :class:`MissingInputError` or :class:`InputError`.
    """
    prefix = f"{name}: " if name else ""
    try:
        image = load_image(path, spatial_dims, label=label, reference=reference)
    except FileNotFoundError as err:
        raise MissingInputError(f"{prefix}{err}") from None
    except ValueError as err:
        raise InputError(f"{prefix}{err}") from None
    if not label:
        low, high = torch.aminmax(image.as_tensor())
        if float(low) == float(high):
            raise InputError(
                f"{prefix}{path}: the image is constant (every voxel is {float(low):g}), there is nothing to "
                "register; give the intended image"
            )
    return image


def _same_file(a: Any, b: Any) -> bool:
    a, b = Path(a), Path(b)
    return a.exists() and b.exists() and os.path.samefile(a, b)


def check_pairs(
    pairs: Sequence[Mapping[str, Any]],
    spatial_dims: int = 3,
    image_keys: Sequence[str] = IMAGE_KEYS,
    label_keys: Mapping[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Check every file of pair dicts (:func:`check_image`): images, and the label maps / masks of each image.

    Args:
        pairs: dicts holding at least ``image_keys`` (file paths); other keys are kept unchecked.
        spatial_dims: required dimensionality.
        image_keys: the image keys of a pair.
        label_keys: image key -> keys of label maps or masks on that image's grid (default :data:`LABEL_KEYS`);
            those present in a pair are checked.

    Returns:
        the pairs as a list of dicts. Raises :class:`InputError` naming the pair index, the key and the file.
    """
    label_keys = LABEL_KEYS if label_keys is None else label_keys
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise InputError(f"pairs must be a non-empty list of dicts, got {pairs!r}")
    grids: dict[tuple[str, ...], MetaTensor] = {}  # each file (and label map on its image) is read once

    def check(path: Any, name: str, reference: MetaTensor | None = None, reference_path: str = "") -> MetaTensor:
        key = (os.fspath(path), reference_path)
        if key not in grids:
            image = check_image(path, spatial_dims, label=reference is not None, reference=reference, name=name)
            # keep the grid only (shape and affine, no voxel memory) to check label maps against it
            grids[key] = MetaTensor(torch.zeros(()).expand(image.shape), affine=image.affine)
        return grids[key]

    checked = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, Mapping) or not set(image_keys) <= set(pair):
            raise InputError(f"pairs[{index}] must be a dict with keys {list(image_keys)}, got {pair!r}")
        if len(image_keys) == 2 and _same_file(pair[image_keys[0]], pair[image_keys[1]]):
            raise InputError(
                f"pairs[{index}]: moving and fixed image are the same file {pair[image_keys[0]]}: "
                "an image is not registered to itself"
            )
        for image_key in image_keys:
            grid = check(pair[image_key], f"pairs[{index}][{image_key!r}]")
            for key in label_keys.get(image_key, ()):
                if pair.get(key) is not None:
                    check(pair[key], f"pairs[{index}][{key!r}]", grid, os.fspath(pair[image_key]))
        checked.append(dict(pair))
    return checked


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """The output folder, if it is one (or can be created as one) that this process may write into.

    Nothing is created. Raises :class:`InputError` when ``output_dir`` (or a parent) is a file, or when the folder
    (or the nearest existing parent it would be created in) is not writable.
    """
    path = Path(output_dir)
    if str(output_dir) == "":
        raise InputError("the output folder is empty: give a folder to write the results into")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is" if existing == path else f"would be inside {existing}, which is"
        raise InputError(f"output folder {path} {where} a file: give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (it would be created in {existing})"
        raise InputError(f"output folder {path} is not writable{where}: give a folder you may write into")
    return path


def check_existing_outputs(
    output_dir: str | os.PathLike, names: Iterable[str], overwrite: bool = False
) -> list[Path]:
    """The folders ``<output_dir>/<name>`` a run will write, refusing existing ones unless ``overwrite``.

    With ``overwrite`` an existing folder is accepted (the package then replaces only its own output files in
    it and keeps any other file), but never a file of that name. Raises :class:`OutputExistsError`.
    """
    folders = [Path(output_dir) / name for name in names]
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise OutputExistsError(f"output {folder} exists and is not a folder: move it away or choose another output folder")
        if folder.exists() and not overwrite:
            raise OutputExistsError(
                f"output folder {folder} already exists: choose another output folder, or pass --overwrite "
                "(config: overwrite=true) to replace the files this package writes there (other files are kept)"
            )
    return folders
