"""QA figure: size, content, fold marking, keypoints, atomic output."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from monai_ext.io.qa import FOLD_COLOR, qa_figure
from monai_ext.metrics.deformation import jacobian_determinant
from monai_ext.spatial.sampling import voxel_grid, warp

SHAPE = (14, 12, 10)
DPI = 40  # panel 2 inches -> 80 pixels


def image(shape=SHAPE) -> torch.Tensor:
    g = voxel_grid(shape, torch.float64)
    return (torch.sin(0.6 * g[0]) + torch.cos(0.5 * g[1]) + g[-1] / 8)[None, None]


def smooth_ddf(shape=SHAPE) -> torch.Tensor:
    g = voxel_grid(shape, torch.float64)
    return torch.stack([0.8 * torch.sin(0.3 * g[(d + 1) % len(shape)]) for d in range(len(shape))])[None]


def folded_ddf() -> torch.Tensor:
    """A Gaussian bump pushing voxels along axis 0 towards the centre so hard that they cross (det < 0 there)."""
    g = voxel_grid(SHAPE, torch.float64)
    centre = torch.tensor([(s - 1) / 2 for s in SHAPE], dtype=torch.float64).view(3, 1, 1, 1)
    bump = torch.exp(-((g - centre) ** 2).sum(0) / 6)
    ddf = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    ddf[0, 0] = -2.5 * (g[0] - centre[0]) * bump  # d phi_0 / d x_0 = 1 - 2.5 at the centre
    return ddf


def fold_pixels(png: np.ndarray) -> np.ndarray:
    rgb = png[..., :3]
    return (np.abs(rgb - np.array(FOLD_COLOR)) < 0.05).all(-1)


def render(tmp_path, ddf, name="qa.png", shape=SHAPE, **kwargs) -> np.ndarray:
    fixed, moving = image(shape), image(shape) * 0.9 + 0.1
    path = qa_figure(fixed, moving, warp(moving, ddf), ddf, tmp_path / name, dpi=DPI, **kwargs)
    return matplotlib.image.imread(path)


def test_png_size_and_content(tmp_path):
    png = render(tmp_path, smooth_ddf())
    assert png.shape[:2] == (3 * 2 * DPI, 6 * 2 * DPI)  # 3 views x 6 columns of 2-inch panels
    assert png[..., :3].std() > 0.1  # not blank
    assert len(np.unique(png[..., :3].reshape(-1, 3), axis=0)) > 100
    assert (jacobian_determinant(smooth_ddf()) > 0).all()
    assert not fold_pixels(png).any()  # no folds, no fold colour


def test_folded_field_is_marked(tmp_path):
    ddf = folded_ddf()
    det = jacobian_determinant(ddf)
    assert (det <= 0).any() and (det[0, 0, :, SHAPE[1] // 2 - 1] <= 0).any()  # folds reach the mid-slice across axis 1
    png = render(tmp_path, ddf)
    marked = fold_pixels(png)
    assert marked.sum() > 10
    columns = np.nonzero(marked)[1]
    assert columns.min() >= 5 * png.shape[1] // 6  # only in the Jacobian column
    # a Jacobian map given by the caller is used as is: all positive -> nothing marked
    unmarked = render(tmp_path, ddf, name="given.png", jacobian=torch.ones(1, 1, *SHAPE))
    assert not fold_pixels(unmarked).any()


def test_keypoints_and_2d(tmp_path):
    points = {
        "moving": torch.tensor([[[6.0, 5.0, 4.0], [2.0, 3.0, 5.0]]]),
        "fixed": np.array([[7.0, 6.0, 5.0]]),
        "aligned": torch.tensor([[6.5, 6.0, 5.0]]),
    }
    plain = render(tmp_path, smooth_ddf(), name="plain.png")
    marked = render(tmp_path, smooth_ddf(), name="points.png", keypoints=points)
    assert plain.shape == marked.shape
    changed = np.nonzero(np.abs(plain - marked).max(-1) > 0.1)[1]
    assert changed.size > 0 and changed.max() < 3 * marked.shape[1] // 6  # only fixed / moving / warped panels
    flat = render(tmp_path, smooth_ddf((16, 12)), name="flat.png", shape=(16, 12), title="2-D")
    assert flat.shape[:2] == (2 * DPI, 6 * 2 * DPI)


def test_bad_input(tmp_path):
    ddf = smooth_ddf()
    fixed = image()
    with pytest.raises(ValueError, match=r"\.png"):
        qa_figure(fixed, fixed, fixed, ddf, tmp_path / "qa.jpg")
    with pytest.raises(ValueError, match="warped must be on the ddf's"):
        qa_figure(fixed, fixed, fixed[..., :-1], ddf, tmp_path / "qa.png")
    with pytest.raises(ValueError, match="jacobian must have"):
        qa_figure(fixed, fixed, fixed, ddf, tmp_path / "qa.png", jacobian=torch.ones(3, 3, 3))
    with pytest.raises(ValueError, match="keypoints"):
        qa_figure(fixed, fixed, fixed, ddf, tmp_path / "qa.png", keypoints={"moving": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="keypoints keys"):
        qa_figure(fixed, fixed, fixed, ddf, tmp_path / "qa.png", keypoints={"target": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="moving contains non-finite"):
        qa_figure(fixed, fixed * float("nan"), fixed, ddf, tmp_path / "qa.png")
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    def broken_savefig(self, filename, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        qa_figure(image(), image(), image(), smooth_ddf(), tmp_path / "qa.png", dpi=DPI)
    assert list(tmp_path.iterdir()) == []
