"""neurite-oasis data module against a tiny fake archive of the same layout served on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import itertools
import tarfile

import nibabel as nib
import numpy as np
import pytest
import torch
from http_server import closed_port_url, serve

from monai_ext.data.download import ChecksumError, DownloadError
from monai_ext.data.base import crop_slices
from monai_ext.data.oasis import (
    OASIS_ARCHIVE,
    OASIS_CROP,
    download_oasis,
    oasis_cases,
    oasis_pairs,
    oasis_subjects,
    oasis_transforms,
)
from monai_ext.data.synthesis import write_synthetic_oasis

# the real volumes are 160x192x224; a fake 6x50x34 volume loses the same 24+24 / 16+16 voxels -> 6x2x2
FAKE_SHAPE = (6, 50, 34)


@pytest.fixture(scope="module")
def fake_archive(tmp_path_factory):
    """(archive bytes, source folder): 4 subjects in the neurite-oasis layout, as a tar.gz built in memory."""
    source = write_synthetic_oasis(tmp_path_factory.mktemp("src"), num_subjects=4, shape=FAKE_SHAPE)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(source)), recursive=False)
    return buffer.getvalue(), source


def test_download_resume_extract_and_load(fake_archive, tmp_path):
    data, source = fake_archive
    sha = hashlib.sha256(data).hexdigest()
    with serve({"/neurite-oasis.v1.0.tar": data}) as server:
        server.cut["/neurite-oasis.v1.0.tar"] = len(data) // 3
        url = server.url + "/neurite-oasis.v1.0.tar"
        with pytest.raises(DownloadError, match="resume"):
            download_oasis(tmp_path, url=url, sha256=sha, progress=False)
        root = download_oasis(tmp_path, url=url, sha256=sha, progress=False)
        assert [r[1] for r in server.requests] == [None, f"bytes={len(data) // 3}-"]
        download_oasis(tmp_path, url=url, sha256=sha)  # subjects.txt present: no request
        assert len(server.requests) == 2
    assert (root / OASIS_ARCHIVE).is_file()
    assert oasis_subjects(root, "all") == [f"OASIS_OAS1_{i:04d}_MR1" for i in range(1, 5)]
    cases = oasis_cases(root, "all")
    pairs = oasis_pairs(root, "all")
    assert [(p["moving_name"], p["fixed_name"]) for p in pairs] == [
        (a["name"], b["name"]) for a, b in itertools.combinations(cases, 2)
    ]
    item = oasis_transforms()(pairs[0])
    original = nib.load(str(source / "OASIS_OAS1_0001_MR1" / "aligned_norm.nii.gz")).get_fdata()
    labels = nib.load(str(source / "OASIS_OAS1_0002_MR1" / "aligned_seg35.nii.gz")).get_fdata()
    assert item["moving_image"].shape == (1, 6, 2, 2) and item["moving_image"].dtype == torch.float32
    assert item["fixed_label"].dtype == torch.int64
    np.testing.assert_allclose(item["moving_image"][0].numpy(), original[:, 24:-24, 16:-16], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(item["fixed_label"][0].numpy(), labels[:, 24:-24, 16:-16])
    # identity affine in the files: the crop moves the origin by the removed voxels (0, 24, 16)
    np.testing.assert_allclose(item["moving_image"].affine[:3, 3].numpy(), [0, 24, 16])


def test_checksum_failure_and_offline_leave_no_dataset(fake_archive, tmp_path):
    data, _ = fake_archive
    with serve({"/a.tar": data}) as server, pytest.raises(ChecksumError):
        download_oasis(tmp_path, url=server.url + "/a.tar", sha256="1" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DownloadError, match="could not reach"):
        download_oasis(tmp_path, url=closed_port_url(), sha256=None)
    assert not (tmp_path / OASIS_ARCHIVE).exists()


def test_divisions_follow_subjects_txt_order(tmp_path):
    names = [f"OASIS_OAS1_{i:04d}_MR1" for i in range(1, 415)]
    (tmp_path / "subjects.txt").write_text("\n".join(names) + "\n\n")
    assert oasis_subjects(tmp_path, "train") == names[:255]
    assert oasis_subjects(tmp_path, "validate") == names[255:275]
    assert oasis_subjects(tmp_path, "test") == names[275:]
    with pytest.raises(ValueError, match="division"):
        oasis_subjects(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="aligned_norm"):
        oasis_cases(tmp_path, "validate")
    with pytest.raises(FileNotFoundError, match="dataset_dir"):
        oasis_subjects(tmp_path / "nowhere", "train")


def test_crop_slices():
    full = torch.zeros(160, 192, 224)
    assert full[tuple(crop_slices(OASIS_CROP))].shape == (160, 144, 192)
    with pytest.raises(ValueError, match="crop"):
        crop_slices([(1, -1)])


def test_orient_like_reorients_exactly_and_refuses_voxel_landmarks():
    """OrientLiked stores an image in the reference's orientation (an exact flip here, affine updated, world
    positions kept) and refuses an item whose reoriented image has voxel landmarks."""
    from monai.data import MetaTensor

    from monai_ext.data.base import OrientLiked
    from monai_ext.errors import InputError

    array = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)
    flip = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    flip[0, 3] = 1.0  # voxel 0 of the first axis at x = 1, voxel 1 at x = 0
    item = {"fixed_image": MetaTensor(array, affine=torch.eye(4, dtype=torch.float64)),
            "moving_image": MetaTensor(array, affine=flip)}  # fmt: skip
    out = OrientLiked(["moving_image"], "fixed_image")(item)
    assert torch.equal(out["moving_image"].as_tensor(), array.flip(1))
    torch.testing.assert_close(out["moving_image"].affine, torch.eye(4, dtype=torch.float64))
    assert out["fixed_image"] is item["fixed_image"]
    same = OrientLiked(["moving_image"], "fixed_image")({**item, "moving_image": item["fixed_image"]})
    assert same["moving_image"] is item["fixed_image"]  # nothing to do: untouched
    with pytest.raises(InputError, match="landmarks"):
        OrientLiked(["moving_image"], "fixed_image", ["moving_points"])({**item, "moving_points": "points.csv"})
