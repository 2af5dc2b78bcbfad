"""Every SITReg task bundle's inference end to end at its real input size, on NIfTI files (issue 12, item 7).

The other bundle tests run tiny networks on tiny volumes; a code path that only large activations take (e.g. the
slab-wise deformation blocks of :mod:`monai_ext.networks.sitreg`, used above ``2^24`` elements) is exercised
only here. Each case writes a moving / fixed pair at the native size and voxel spacing of the bundle's real data
(so that the bundle's own preprocessing - crop, crop-or-pad, pooling - brings it to the full model grid the
bundle is configured for), stored in a non-RAS orientation, with smooth blob content (the moving image a shifted
copy) and label maps or lung masks where the bundle reads them. The bundle's full-size network runs with random
weights (this is about running at size, not accuracy) through the package's front end: :func:`monai_ext.cli.register`
for image (+ label) pairs, :func:`monai_ext.cli.run_bundle` with ``pairs`` for the lung bundles, whose pairs
carry lung masks (``register`` has no mask arguments). The outputs must lie on the fixed file's native grid and
be finite.

The Lung250M-4B case found that :class:`~monai_ext.data.base.AvgPoold` overwrote ``meta["spatial_shape"]`` (the
file's shape) with the pooled one, so the outputs came out on a 160x112x160 grid with the file's affine;
:func:`test_pooling_keeps_the_native_grid_of_the_file` checks that on a small file.

Cost (measured 2026-12-07 on this project's 2-core CPU machine, ``OMP_NUM_THREADS=1``, under load: CPU seconds
user + system, peak RSS): sitreg_oasis 82 s / 2.9 GB, sitreg_oasis_raw 326 s / 7.8 GB (256^3 with 36 full-resolution
features: far the heaviest), sitreg_lpba40 107 s / 3.0 GB, sitreg_lumir 155 s / 4.2 GB, sitreg_lung250m_4b
85 s / 4.3 GB, sitreg_nlst 205 s / 5.2 GB.

The default suite runs :data:`DEFAULT_CASES`; the other four carry the ``real_size`` marker, which ``pyproject.toml``
deselects by default (``python -m pytest -m real_size`` runs them: about 13 CPU-minutes and up to 8 GB).

``sitreg_brain`` / ``sitreg_brain_raw`` (88x104x88 model grid) are left out: their real-size inference on NIfTI
files is run by ``tests/test_brain_native_space.py`` and ``tests/test_brain_pipeline.py``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ext.cli import register, run_bundle
from monai_ext.data.base import centered_crop_or_pad_offsets, volume_transforms
from monai_ext.io.native import ddf_model_to_native
from monai_ext.io.outputs import _Grid

# axis directions (columns of the affine's 3x3 part, before scaling by the spacing): all non-RAS
LPS = np.diag([-1.0, -1.0, 1.0])
LIA = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # FreeSurfer's conformed orientation
PSR = np.array([[0, 0, 1.0], [-1.0, 0, 0], [0, -1.0, 0]])  # permuted axes
ASL = np.array([[0, 0, -1.0], [1.0, 0, 0], [0, 1.0, 0]])

# bundle -> native shape, voxel spacing (mm), orientation, kind of pair, model grid the preprocessing produces
CASES = {
    # neurite-oasis aligned_norm: 160x192x224 at 1 mm, cropped [[0,0],[24,24],[16,16]] -> 160x144x192
    "sitreg_oasis": ((160, 192, 224), 1.0, LIA, "labels", (160, 144, 192)),
    # FreeSurfer norm.mgz (conformed 256^3 at 1 mm, LIA), no crop: input_shape 256^3 with the affine head
    "sitreg_oasis_raw": ((256, 256, 256), 1.0, LIA, "labels", (256, 256, 256)),
    # delineation space 181x217x181 at 1 mm (diag(-s, -s, s) as prepare_lpba40 writes), crop -> 160x192x160
    "sitreg_lpba40": ((181, 217, 181), 1.0, LPS, "labels", (160, 192, 160)),
    # LUMIR: 160x224x192 at 1 mm, intensities 0..255, no crop
    "sitreg_lumir": ((160, 224, 192), 1.0, PSR, "labels", (160, 224, 192)),
    # Lung250M-4B: any size, centred crop-or-pad to 320x224x320 (here cropped on axis 0, padded on axis 1),
    # then 2x average pooling -> 160x112x160
    "sitreg_lung250m_4b": ((328, 216, 320), 1.0, ASL, "masks", (160, 112, 160)),
    # NLST: 224x192x224 at 1.5 mm, no crop
    "sitreg_nlst": ((224, 192, 224), 1.5, LPS, "masks", (224, 192, 224)),
}
SHIFT = (3.0, -2.0, 2.5)  # voxels: the moving image's blobs are the fixed one's moved by this


def _affine(shape, spacing: float, direction: np.ndarray) -> np.ndarray:
    """Voxel -> RAS affine with ``direction`` axes, centred near the world origin."""
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = -affine[:3, :3] @ (np.asarray(shape) / 2.0) + [1.5, -7.0, 4.0]
    return affine


def _ellipsoid(shape, radii) -> np.ndarray:
    """Boolean centred ellipsoid with semi-axes ``radii`` (fractions of the half sizes)."""
    axes = [((np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1) / r for n, r in zip(shape, radii)]
    return (axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2) <= 1


def _blobs(shape, shift=(0.0, 0.0, 0.0), seed: int = 0) -> np.ndarray:
    """Sum of separable Gaussian blobs in [0, 1] (float32); ``shift`` moves every blob by that many voxels."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, dtype=np.float32)
    for _ in range(8):
        profiles = []
        for axis, n in enumerate(shape):
            centre = rng.uniform(0.25, 0.75) * n + shift[axis]
            sigma = rng.uniform(0.06, 0.15) * n
            profiles.append(np.exp(-0.5 * ((np.arange(n) - centre) / sigma) ** 2).astype(np.float32))
        weight = rng.uniform(0.4, 1.0)
        out += weight * profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return out / out.max()


def _write_pair(folder: Path, bundle: str) -> dict[str, str]:
    """The pair files of ``bundle``: ``{moving_image, fixed_image[, *_label | *_mask]}`` paths."""
    shape, spacing, direction, kind, _ = CASES[bundle]
    affine = _affine(shape, spacing, direction)
    files = {}
    for side, shift in (("fixed", (0.0, 0.0, 0.0)), ("moving", SHIFT)):
        content = _blobs(shape, shift)
        if kind == "labels":  # a brain-like ellipsoid, background 0; labels 1..4 from the intensity
            inside = _ellipsoid(shape, (0.8, 0.85, 0.8))
            image = (0.15 + 0.85 * content) * inside
            if bundle == "sitreg_lumir":
                image = image * 255.0  # LUMIR files are 0..255 (the bundle divides by 255)
            extra = np.where(inside, 1 + np.minimum((content * 4).astype(np.int16), 3), 0).astype(np.int16)
        else:  # CT in HU: body 40 HU, air -1024 outside it; lungs (the masks) -950 .. -300 HU
            body = _ellipsoid(shape, (0.85, 0.75, 0.9))
            lungs = _ellipsoid(shape, (0.6, 0.5, 0.75))
            image = np.where(body, 40.0, -1024.0) + lungs * (-990.0 + 690.0 * content)
            extra = lungs.astype(np.uint8)
        for name, data in (("image", image.astype(np.float32)), (kind[:-1], extra)):
            path = folder / f"{side}_{name}.nii.gz"
            nib.save(nib.Nifti1Image(data, affine), str(path))
            files[f"{side}_{name}"] = str(path)
    return files


#: in the default suite: the size that once crashed (OASIS) and the pooling path (Lung250M-4B), about 3 CPU-minutes;
#: the others are heavier (up to 8 GB) and run with ``pytest -m real_size``
DEFAULT_CASES = ("sitreg_oasis", "sitreg_lung250m_4b")


@pytest.mark.parametrize(
    "bundle", [b if b in DEFAULT_CASES else pytest.param(b, marks=pytest.mark.real_size) for b in CASES]
)
def test_inference_at_real_size_on_nifti(bundle, tmp_path):
    shape, _, _, kind, _ = CASES[bundle]
    files = _write_pair(tmp_path, bundle)
    out = tmp_path / "out"
    outputs = ["warped_image", "forward_field_itk"] + (["warped_label"] if kind == "labels" else [])
    if kind == "labels":
        rows = register(
            bundle, files["moving_image"], files["fixed_image"], str(out), moving_label=files["moving_label"],
            fixed_label=files["fixed_label"], no_weights=True, outputs=outputs, num_workers=0,
        )  # fmt: skip
    else:
        rows = run_bundle(
            bundle, ["inference.json"],
            {"pairs": [files], "output_dir": str(out), "load_pretrained": False, "outputs": outputs, "num_workers": 0},
        )  # fmt: skip
    assert len(rows) == 1
    folder = Path(rows[0]["output"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{name}.nii.gz" for name in outputs)

    fixed_affine = nib.load(files["fixed_image"]).affine
    for name in outputs:
        written = nib.load(str(folder / f"{name}.nii.gz"))
        assert written.shape[:3] == shape, name
        np.testing.assert_allclose(written.affine, fixed_affine, atol=1e-4, err_msg=name)
        data = np.asarray(written.dataobj)
        assert np.isfinite(data).all(), name
    field = np.asarray(nib.load(str(folder / "forward_field_itk.nii.gz")).dataobj)
    assert field.shape == (*shape, 1, 3)  # ITK's (X, Y, Z, 1, 3) vector image
    assert np.abs(field).max() > 0  # random weights still displace
    if kind == "labels":
        labels = np.asarray(nib.load(str(folder / "warped_label.nii.gz")).dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}


def test_pooling_keeps_the_native_grid_of_the_file(tmp_path):
    """Crop-or-pad + 2x pooling (the Lung250M-4B pipeline) keeps the file's shape and affine as the native grid:
    ``meta["spatial_shape"]`` / ``original_affine`` stay those of the file, the model affine is the pooled one,
    and a zero model DDF becomes a zero DDF on the file's grid (not on the pooled grid)."""
    shape = (9, 6, 8)
    affine = _affine(shape, 1.5, ASL)
    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), affine), str(path))
    image = volume_transforms(["image"], crop_or_pad_to=(8, 8, 8), downsample=2)({"image": str(path)})["image"]
    assert image.shape == (1, 4, 4, 4)
    assert tuple(np.asarray(image.meta["spatial_shape"]).tolist()) == shape
    np.testing.assert_allclose(np.asarray(image.meta["original_affine"]), affine, atol=1e-6)
    # coarse voxel j = fine voxel 2 j + 0.5 of the cropped / padded grid = 2 j + 0.5 - offset of the file's grid
    step = np.diag([2.0, 2.0, 2.0, 1.0])
    step[:3, 3] = 0.5 - np.array(centered_crop_or_pad_offsets(shape, (8, 8, 8)))
    np.testing.assert_allclose(image.affine.numpy(), affine @ step, atol=1e-6)
    grid = _Grid(image, None)
    assert grid.native and grid.shape == shape
    np.testing.assert_allclose(grid.affine.numpy(), affine, atol=1e-6)
    zero = torch.zeros(1, 3, 4, 4, 4)
    native = ddf_model_to_native(zero, grid.model_affine, grid.model_affine, grid.affine, grid.shape, grid.affine)
    assert native.shape == (1, 3, *shape)
    assert float(native.abs().max()) < 1e-5
