"""LPBA40: AIR reading and resampling, preprocessing from fake LONI archives of the same layout, splits."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from http_server import serve

from monai_ext.data.lpba40 import (
    LPBA40_ARCHIVES,
    LPBA40_DIVISIONS,
    LPBA40_LABELS,
    air_resample,
    lpba40_cases,
    lpba40_pairs,
    lpba40_transforms,
    prepare_lpba40,
    read_air,
)

# AIR 5 AIR_Air16 layout, written independently of the module: e[4][4] (transposed), s_file, s key info,
# r_file, r key info, comment, s_hash, r_hash, s_volume, r_volume, reserved
AIR_FORMAT = "<16d128s4I3d128s4I3d128s2i2H116s"


def _air_bytes(matrix, standard_shape, standard_size, reslice_shape, reslice_size) -> bytes:
    return struct.pack(AIR_FORMAT, *np.asarray(matrix, np.float64).T.ravel(), b"std.hdr", 16, *standard_shape,
                       *standard_size, b"res.hdr", 16, *reslice_shape, *reslice_size, b"", 0, 0, 0, 0, b"")


def _analyze(array, zooms) -> tuple[bytes, bytes]:
    image = nib.AnalyzeImage(array, np.eye(4))
    image.header.set_zooms(zooms)
    header, data = io.BytesIO(), io.BytesIO()
    image.to_file_map({"header": nib.FileHolder(fileobj=header), "image": nib.FileHolder(fileobj=data)})
    return header.getvalue(), gzip.compress(data.getvalue())


def test_read_air_and_resample_a_linear_function_exactly(tmp_path):
    """Native (standard) grid 9x8x7 with voxels 1 x 2 x 1.5 mm: AIR's matrix acts on cubic 1 mm voxels, so the
    standard voxel of reslice voxel v is diag(1, 1/2, 1/1.5) M^-1 v. Linear interpolation reproduces a linear
    function exactly, and border extrapolation equals it at the per-axis clamped coordinate."""
    matrix = np.array([[0.9, 0.1, 0.0, 1.0], [-0.1, 1.1, 0.05, -2.0], [0.0, 0.2, 0.8, 0.5], [0, 0, 0, 1]])
    path = tmp_path / "t.air"
    path.write_bytes(_air_bytes(matrix, (9, 8, 7), (1.0, 2.0, 1.5), (10, 9, 8), (1.0, 1.0, 1.0)))
    air = read_air(path)
    np.testing.assert_array_equal(air.matrix, matrix)
    assert air.standard_shape == (9, 8, 7) and air.reslice_shape == (10, 9, 8)
    assert air.standard_voxel_size == (1.0, 2.0, 1.5) and air.reslice_voxel_size == (1.0, 1.0, 1.0)

    coefficients = np.array([0.3, -0.2, 0.5])
    native = 1.0 + np.einsum("i,i...->...", coefficients, np.indices((9, 8, 7), dtype=np.float64))
    out = air_resample(native, air.standard_voxel_size, air)
    grid = np.indices((10, 9, 8), dtype=np.float64).reshape(3, -1)
    standard = np.diag([1.0, 0.5, 1 / 1.5]) @ (np.linalg.inv(matrix) @ np.vstack([grid, np.ones(grid.shape[1])]))[:3]
    clamped = np.clip(standard, 0, np.array([8, 7, 6])[:, None])
    np.testing.assert_allclose(out.ravel(), 1.0 + coefficients @ clamped, rtol=0, atol=1e-4)
    assert 0.1 < (np.abs(standard - clamped).max(0) > 0).mean() < 0.9  # both inside and border voxels are tested

    path.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="720"):
        read_air(path)


NATIVE, DELINEATION = (22, 22, 26), (22, 26, 22)
# delineation voxel v <- native voxel (21 - v0, v2, v1): M (native cubic voxel u -> delineation voxel) below
PERMUTE = np.array([[-1.0, 0, 0, 21], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])


def _to_delineation(native):
    return np.flip(native, 0).transpose(0, 2, 1)


@pytest.fixture(scope="module")
def fake_loni_archives():
    """The two LONI zips (outer zip -> inner LPBA40subjects.*.zip -> LPBA40/ tree) for the 5 validation subjects."""
    rng = np.random.default_rng(4)
    delineation, native, truth = {}, {}, {}
    for name in LPBA40_DIVISIONS["validate"]:
        image = rng.uniform(10, 100, NATIVE).astype(np.float32)
        tissue = rng.integers(0, 4, NATIVE).astype(np.uint8)
        tissue[5:15, 5:15, 5:15] = 3
        label = rng.choice([0, *LPBA40_LABELS], DELINEATION).astype(np.int16)
        truth[name] = (image, tissue, label)
        base = f"LPBA40/native_space/{name}/"
        for path, (array, zooms) in {
            f"{base}{name}.native.brain.bfc": (image, (1.0, 1.0, 1.0)),
            f"{base}tissue/{name}.native.tissue": (tissue, (1.0, 1.0, 1.0)),
        }.items():
            native[path + ".hdr"], native[path + ".img.gz"] = _analyze(array, zooms)
        native[f"{base}transforms/{name}.delineation.to.native.air"] = _air_bytes(
            PERMUTE, NATIVE, (1.0, 1.0, 1.0), DELINEATION, (1.0, 1.0, 1.0))
        stem = f"LPBA40/delineation_space/{name}/{name}.delineation.structure.label"
        delineation[stem + ".hdr"], delineation[stem + ".img.gz"] = _analyze(label[..., None], (1.0, 1.0, 1.0, 1.0))
    delineation["LPBA40/delineation_space/lpba40.label.xml"] = b"<labels/>"

    def nested(inner_name, files):
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as archive:
            for path, data in files.items():
                archive.writestr(path, data)
        outer = io.BytesIO()
        with zipfile.ZipFile(outer, "w") as archive:
            archive.writestr(inner_name, inner.getvalue())
        return outer.getvalue()

    archives = {LPBA40_ARCHIVES[0]: nested("LPBA40subjects.delineation_space.zip", delineation),
                LPBA40_ARCHIVES[1]: nested("LPBA40subjects.native_space.zip", native)}
    return archives, truth


def test_prepare_from_archives_normalises_and_splits(fake_loni_archives, tmp_path):
    archives, truth = fake_loni_archives
    with pytest.raises(FileNotFoundError, match="data use agreement") as info:
        prepare_lpba40(tmp_path)
    assert "LPBA40/native_space/S01" in str(info.value) and LPBA40_ARCHIVES[1] in str(info.value)
    for name, data in archives.items():
        (tmp_path / name).write_bytes(data)
    root = prepare_lpba40(tmp_path)
    assert not list(root.glob(".*staging"))
    pairs = lpba40_pairs(root, "validate")
    assert len(pairs) == 10 and (pairs[0]["moving_name"], pairs[0]["fixed_name"]) == ("S14", "S16")
    assert len(lpba40_pairs(root, "validate", both_directions=True)) == 20
    with pytest.raises(FileNotFoundError, match="prepare_lpba40"):
        lpba40_cases(root, "test")
    for case in lpba40_cases(root, "validate"):
        image, tissue, label = truth[case["name"]]
        tissue_d = _to_delineation(tissue)
        expected = _to_delineation(image) / _to_delineation(image)[tissue_d == 3].mean() * (tissue_d > 0)
        saved = nib.load(case["image"])
        np.testing.assert_allclose(saved.get_fdata(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(saved.get_fdata()[tissue_d == 3].mean(), 1.0, rtol=1e-5)  # white matter -> 1
        np.testing.assert_array_equal(saved.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
        np.testing.assert_array_equal(nib.load(case["label"]).get_fdata(), label)
        item = lpba40_transforms(image_keys=("image",), label_keys=("label",))(case)
        # default crop ((11, 10), (20, 5), (0, 21)) of a 22 x 26 x 22 volume leaves one voxel
        assert item["image"].shape == item["label"].shape == (1, 1, 1, 1) and item["label"].dtype == torch.int64
        np.testing.assert_allclose(item["image"][0].numpy(), expected[11:-10, 20:-5, :-21], rtol=1e-5)
        np.testing.assert_array_equal(item["label"][0].numpy(), label[11:-10, 20:-5, :-21])
    assert len(LPBA40_LABELS) == 56 and sum(map(len, LPBA40_DIVISIONS.values())) == 40


def test_download_option_and_idempotence(fake_loni_archives, tmp_path):
    archives, _ = fake_loni_archives
    with serve({f"/{name}": data for name, data in archives.items()}) as server:
        urls = {name: f"{server.url}/{name}" for name in archives}
        root = prepare_lpba40(tmp_path, download=True, urls=urls, progress=False)
        assert len(server.requests) == 2
    first = (root / "S14" / "S14.delineation.brain.bfc.nii.gz").stat().st_mtime_ns
    prepare_lpba40(root)  # processed subjects are skipped
    assert (root / "S14" / "S14.delineation.brain.bfc.nii.gz").stat().st_mtime_ns == first
    assert len(lpba40_cases(root, "validate")) == 5
