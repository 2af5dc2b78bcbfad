"""The embedded demo: two real brains registered by the shipped SITReg brain model, offline, in seconds.

One command (what the README shows)::

    python -m monai_ext demo --out demo_out

1. :func:`write_demo_pair` writes ``demo_out/data/``: ``moving.nii.gz`` / ``moving_label.nii.gz`` and
   ``fixed.nii.gz`` / ``fixed_label.nii.gz``, T1-weighted-like images synthesised
   (:func:`monai_ext.data.synthbrain.synthesize_contrast`) from two real FreeSurfer label maps of different
   subjects shipped in ``monai_ext/demo_data`` (2 mm copies of SynthSeg's ``training_seg_09`` / ``_10``,
   Apache-2.0, never used for training), each in its file's own orientation (LIA) and position.
2. The bundle ``bundles/sitreg_brain`` runs with ``configs/inference.json`` + ``configs/demo.json`` (``pairs`` =
   :func:`demo_pairs`, ``output_dir`` = ``demo_out/registration``) through :func:`monai_ext.cli.run_bundle`:
   both images are resampled in world space onto the model's 2 mm RAS grid, registered by the trained network
   (``models/model.pt``) and the outputs are written on the fixed image's native grid.
3. It prints Dice before / after over the brain structures, the folding fraction and the elapsed time;
   ``demo_out/registration/moving__fixed/`` holds the bundle's outputs (warped image and labels, DDFs, ITK
   fields, Jacobian, ``metrics.json``, ``qa.png``).

The same registration as a plain MONAI bundle run, after the data exist::

    python -m monai_ext.demo --out demo_out        # step 1 only; prints the command below
    python -m monai.bundle run \\
        --config_file "['bundles/sitreg_brain/configs/inference.json','bundles/sitreg_brain/configs/demo.json']" \\
        --bundle_root bundles/sitreg_brain --demo_dir demo_out

Nothing is read from outside this repository (no download, no shared data).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from monai_ext.cli import run_bundle
from monai_ext.data.synthbrain import HELD_OUT_MAPS, synthesis_index, synthesize_contrast

__all__ = ["DEMO_DATA", "DEMO_FILES", "write_demo_pair", "demo_pairs", "bundle_command", "prepare", "demo"]

#: folder of the shipped 2 mm label maps (and their licence)
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
DEMO_FILES = {
    "moving_image": "moving.nii.gz",
    "moving_label": "moving_label.nii.gz",
    "fixed_image": "fixed.nii.gz",
    "fixed_label": "fixed_label.nii.gz",
}
_BUNDLE = "sitreg_brain"
_CONFIGS = ("inference.json", "demo.json")


def write_demo_pair(data_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write the demo pair as NIfTI files (:data:`DEMO_FILES`): moving = ``training_seg_09``, fixed = ``_10``.

    Images are float32 in ``[0, 1]`` (T1-weighted-like contrast, deterministic for ``seed``), label maps int16
    FreeSurfer labels; each file keeps its label map's affine (2 mm voxels, LIA storage). Returns ``{key: path}``.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for offset, (side, name) in enumerate(zip(("moving", "fixed"), HELD_OUT_MAPS)):
        source = nib.load(str(DEMO_DATA / f"{name}_2mm.nii.gz"))
        labels = np.asarray(source.dataobj).astype(np.int16)
        generator = torch.Generator().manual_seed(seed * 2 + offset)
        image = synthesize_contrast(torch.from_numpy(synthesis_index(labels)), generator, t1_like=True)
        for key, array in ((f"{side}_image", image.numpy().astype(np.float32)), (f"{side}_label", labels)):
            paths[key] = data_dir / DEMO_FILES[key]
            nib.save(nib.Nifti1Image(array, source.affine), str(paths[key]))
    return paths


def demo_pairs(demo_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The bundle's ``pairs`` for a demo folder (``demo.json``): one pair of the files under ``<demo_dir>/data``."""
    data_dir = Path(demo_dir) / "data"
    pair = {key: str(data_dir / file) for key, file in DEMO_FILES.items()}
    missing = [path for path in pair.values() if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"demo data missing ({missing}): create them with python -m monai_ext.demo --out {demo_dir}")
    return [pair]


def bundle_command(demo_dir: str | os.PathLike) -> str:
    """The ``python -m monai.bundle run`` command registering the demo data of ``demo_dir`` (run from the repository root)."""
    configs = ",".join(f"'bundles/{_BUNDLE}/configs/{name}'" for name in _CONFIGS)
    return f"python -m monai.bundle run --config_file \"[{configs}]\" --bundle_root bundles/{_BUNDLE} --demo_dir {demo_dir}"


def demo(out: str = "demo_out", seed: int = 0, **override: Any) -> dict[str, Any]:
    """Write the demo pair into ``<out>/data``, register it with the shipped brain model, print and return the results.

    Args:
        out: demo folder (data in ``data/``, bundle outputs in ``registration/``).
        seed: seed of the synthetic contrast.
        override: further bundle config overrides (e.g. ``instance_optimization_steps=20``).

    Returns:
        the pair's metrics row (:func:`monai_ext.cli.run_bundle`) plus ``seconds`` (the whole demo).
    """
    start = time.perf_counter()
    out_dir = Path(out)
    write_demo_pair(out_dir / "data", seed)
    print(f"two held-out brains (T1-like, 2 mm, LIA storage) written to {out_dir / 'data'}")
    rows = run_bundle(_BUNDLE, _CONFIGS, {**override, "demo_dir": str(out_dir)})
    row = dict(rows[0])
    row["seconds"] = time.perf_counter() - start
    print(
        f"Dice over {row.get('num_labels', 'the')} brain structures {row['dice_before']:.3f} -> {row['dice']:.3f}; "
        f"folding {100 * row['folding_fraction']:.3f}% of voxels; {row['seconds']:.1f} s"
    )
    print(f"outputs (warped images, fields, Jacobian, metrics.json, qa.png): {row['output']}")
    return row


def prepare(out: str = "demo_out", seed: int = 0) -> str:
    """Write the demo data into ``<out>/data`` only; print and return the ``monai.bundle`` command registering them."""
    write_demo_pair(Path(out) / "data", seed)
    command = bundle_command(out)
    print(f"demo data written to {Path(out) / 'data'}; register them (from the repository root) with:\n{command}")
    return command


if __name__ == "__main__":
    import fire

    fire.Fire(prepare, name="monai_ext.demo", serialize=lambda result: None)
