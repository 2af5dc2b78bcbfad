"""Write the embedded demo label maps: 2 mm copies of the two held-out SynthSeg training label maps.

    python scripts/make_demo_data.py /path/to/synthseg_label_maps

Each 1 mm map is skull-stripped to the intracranial FreeSurfer labels (``BRAIN_LABELS`` and
``OTHER_BRAIN_LABELS`` of :mod:`monai_ext.data.synthbrain`), reduced to 2 mm by a majority vote over every
2x2x2 block (voxel ``i`` of the result covers 1 mm voxels ``2i, 2i + 1``, so its centre is at ``2i + 0.5``),
cropped to the brain with a 2-voxel margin and stored as uint8 in the map's own orientation (the affine says
where it lies) under ``monai_ext/demo_data/``. The maps are Apache-2.0 (SynthSeg, B. Billot et al.); the
licence is copied beside them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_ext.data.synthbrain import BRAIN_LABELS, HELD_OUT_MAPS, OTHER_BRAIN_LABELS

OUT = Path(__file__).resolve().parents[1] / "monai_ext" / "demo_data"


def downsample(labels: np.ndarray) -> np.ndarray:
    """Majority label of every 2x2x2 block (ties: the smaller label value); odd sizes are cropped by one."""
    kept = np.array((0, *BRAIN_LABELS, *OTHER_BRAIN_LABELS))
    lookup = np.zeros(int(labels.max()) + 1, np.int64)
    lookup[kept[kept <= labels.max()]] = np.nonzero(kept <= labels.max())[0]
    index = lookup[labels]
    shape = tuple(s // 2 for s in index.shape)
    blocks = index[: 2 * shape[0], : 2 * shape[1], : 2 * shape[2]].reshape(shape[0], 2, shape[1], 2, shape[2], 2)
    blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(-1, 8)
    counts = np.zeros((blocks.shape[0], len(kept)), np.int8)
    for column in range(8):
        np.add.at(counts, (np.arange(blocks.shape[0]), blocks[:, column]), 1)
    return kept[counts.argmax(1)].reshape(shape)


def main(source: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in HELD_OUT_MAPS:
        image = nib.load(str(Path(source) / f"{name}.nii.gz"))
        labels = np.rint(np.asarray(image.dataobj)).astype(np.int64)
        labels[~np.isin(labels, (*BRAIN_LABELS, *OTHER_BRAIN_LABELS))] = 0
        small = downsample(labels)
        inside = np.argwhere(small > 0)
        low, high = np.maximum(inside.min(0) - 2, 0), np.minimum(inside.max(0) + 3, small.shape)
        small = small[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
        to_source = np.diag([2.0, 2.0, 2.0, 1.0])
        to_source[:3, 3] = 2 * low + 0.5
        out = nib.Nifti1Image(small.astype(np.uint8), image.affine @ to_source)
        out.set_qform(out.affine, code=1)
        out.set_sform(out.affine, code=1)
        nib.save(out, str(OUT / f"{name}_2mm.nii.gz"))
        print(name, small.shape, (OUT / f"{name}_2mm.nii.gz").stat().st_size, "bytes")
    shutil.copyfile(Path(source) / "LICENSE.txt", OUT / "LICENSE.txt")


if __name__ == "__main__":
    main(sys.argv[1])
