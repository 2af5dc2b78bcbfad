"""Raw (unaligned) brain pairs: ``register brain`` = ``bundles/sitreg_brain_raw`` (KeyMorph affine -> SITReg deformable).

* end to end through the command line on the demo pair with the moving image rotated by 60 degrees and shifted in
  world space (its affine only, no resampling), with the shipped weights (a random KeyMorph of the bundle's
  architecture when ``bundles/keymorph_brain_affine/models/model.pt`` is not there yet);
* the written ``affine_itk.mat`` + ``deformable_field_itk.nii.gz`` reproduce ``warped_image.nii.gz`` when ITK
  (``CompositeTransform`` + ``ResampleImageFilter``) and ANTs (``ants.apply_transforms(fixed, moving, [field,
  affine])``) apply them;
* without networks: a known affine (the world rotation between a fixed image and a copy of it with a rotated
  affine) and a known displacement go through the preprocessing and the writer, and the files hold exactly
  ``T(x) = A(x + u(x))``;
* the affine stage's checks, its error for degenerate keypoints, the ``brain`` alias and the default weights.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from monai_ext.__main__ import main
from monai_ext.cli import _input_error, bundle_path
from monai_ext.data.model_space import model_space_transforms
from monai_ext.data.synthbrain import rotation_about_axis
from monai_ext.demo import write_demo_pair
from monai_ext.engines.affine_deformable import AffineDeformableIteration, AffineFitError, keypoint_affine_checks
from monai_ext.io.affine_deformable_outputs import AffineDeformableWriter
from monai_ext.io.itk_fields import read_itk_affine
from monai_ext.io.validation import InputError
from monai_ext.spatial.sampling import sample

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sitreg_brain_raw"
KEYMORPH_WEIGHTS = REPO / "bundles" / "keymorph_brain_affine" / "models" / "model.pt"
FILES = (
    "affine_itk.mat",
    "deformable_field_itk.nii.gz",
    "warped_image.nii.gz",
    "warped_label.nii.gz",
    "jacobian.nii.gz",
    "metrics.json",
    "qa.png",
    "keypoints_fixed.csv",
    "keypoints_moving.csv",
    "keypoints_aligned.csv",
)
KEYS = ("moving_image", "fixed_image", "moving_label", "fixed_label")


def _rotation_about(centre: np.ndarray, axis, degrees: float, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 world (RAS mm) map: rotation by ``degrees`` about ``axis`` through ``centre``, then a shift (mm)."""
    to_origin, back = np.eye(4), np.eye(4)
    to_origin[:3, 3] = -centre
    back[:3, 3] = centre + np.asarray(shift, dtype=np.float64)
    return back @ rotation_about_axis(axis, degrees) @ to_origin


def _save_moved(source: Path, target: Path, world_map: np.ndarray) -> Path:
    """``source``'s voxels with the affine ``world_map @ affine``: the image moved in world space, not resampled."""
    image = nib.load(str(source))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), world_map @ image.affine), str(target))
    return target


def _brain_centre(label: Path) -> np.ndarray:
    image = nib.load(str(label))
    return (image.affine @ np.append(np.argwhere(np.asarray(image.dataobj) > 0).mean(0), 1.0))[:3]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return write_demo_pair(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def raw_pair(demo, tmp_path_factory) -> dict[str, Path]:
    """The demo pair with the moving brain rotated by 60 degrees about an oblique axis and shifted by 27 mm."""
    folder = tmp_path_factory.mktemp("raw")
    world_map = _rotation_about(_brain_centre(demo["moving_label"]), (1.0, 0.5, 0.3), 60.0, (20.0, -15.0, 10.0))
    return {
        "moving_image": _save_moved(demo["moving_image"], folder / "moving.nii.gz", world_map),
        "moving_label": _save_moved(demo["moving_label"], folder / "moving_label.nii.gz", world_map),
        "fixed_image": demo["fixed_image"],
        "fixed_label": demo["fixed_label"],
    }


@pytest.fixture(scope="module")
def affine_weights(tmp_path_factory) -> list[str]:
    """``--affine_ckpt_path`` to a random KeyMorph of the bundle's architecture while the shipped one is absent."""
    if KEYMORPH_WEIGHTS.is_file():
        return []
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "keymorph_random.pt"
    torch.save({"model": parser.get_parsed_content("affine_network_def").state_dict()}, path)
    return ["--affine_ckpt_path", str(path)]


@pytest.fixture(scope="module")
def registered(raw_pair, affine_weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    labels = ["--moving_label", str(raw_pair["moving_label"]), "--fixed_label", str(raw_pair["fixed_label"])]
    args = ["register", "brain", str(raw_pair["moving_image"]), str(raw_pair["fixed_image"]), str(out), *labels]
    assert main(args + affine_weights) == 0
    return out / "moving__fixed"


def _field_transform(path: Path):
    """``itk.DisplacementFieldTransform[itk.D, 3]`` of a displacement field file (read as double vectors)."""
    reader = itk.ImageFileReader[itk.VectorImage[itk.D, 3]].New(FileName=str(path))
    reader.Update()
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(reader.GetOutput())
    return transform


def _inside_and_range(warped: np.ndarray, ones_resampled: np.ndarray) -> tuple[np.ndarray, float]:
    """Voxels whose whole interpolation stencil lies in the moving image (resampled ones == 1), the intensity range."""
    inside = ones_resampled > 1 - 1e-6
    assert inside.mean() > 0.1, f"only {inside.mean():.2f} of the fixed grid samples the moving image"
    return inside, float(warped.max() - warped.min())


def test_register_brain_writes_every_output(registered, raw_pair):
    assert sorted(p.name for p in registered.iterdir()) == sorted(FILES)
    assert not [p for p in registered.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    fixed = nib.load(str(raw_pair["fixed_image"]))
    for name in ("warped_image.nii.gz", "warped_label.nii.gz", "jacobian.nii.gz"):
        written = nib.load(str(registered / name))
        assert written.shape == fixed.shape and np.allclose(written.affine, fixed.affine, atol=1e-4), name
    metrics = json.loads((registered / "metrics.json").read_text())
    for key in ("dice_before", "dice_affine", "dice", "num_labels", "folding_fraction", "affine_determinant",
                "keypoint_residual_mm", "foreground_dice_affine", "warnings"):  # fmt: skip
        assert key in metrics, key
    assert all(0 <= metrics[key] <= 1 for key in ("dice_before", "dice_affine", "dice"))
    field = itk.imread(str(registered / "deformable_field_itk.nii.gz"))
    assert itk.array_view_from_image(field).shape == (*fixed.shape[::-1], 3)
    with open(registered / "keypoints_moving.csv") as stream:
        rows = list(csv.DictReader(stream))
    num_keypoints = json.loads((BUNDLE / "configs" / "inference.json").read_text())["num_keypoints"]
    assert len(rows) == num_keypoints and set(rows[0]) == {"index", "x_ras", "y_ras", "z_ras", "i", "j", "k"}


def _itk_resample(moving_path: Path, fixed_path: Path, folder: Path, ones: bool = False) -> np.ndarray:
    """The moving image (or ones on its grid) resampled onto the fixed grid by ITK through ``affine_itk.mat`` and
    ``deformable_field_itk.nii.gz``, linear; ``(X, Y, Z)`` array."""
    image_type = itk.Image[itk.F, 3]
    fixed, moving = itk.imread(str(fixed_path), itk.F), itk.imread(str(moving_path), itk.F)
    if ones:
        moving.FillBuffer(1.0)
    composite = itk.CompositeTransform[itk.D, 3].New()
    composite.AddTransform(itk.transformread(str(folder / "affine_itk.mat"))[0])  # applied second to a fixed point
    composite.AddTransform(_field_transform(folder / "deformable_field_itk.nii.gz"))  # applied first
    resampler = itk.ResampleImageFilter[image_type, image_type].New(
        Input=moving, Transform=composite, Interpolator=itk.LinearInterpolateImageFunction[image_type, itk.D].New()
    )
    resampler.SetReferenceImage(fixed)
    resampler.UseReferenceImageOn()
    resampler.SetDefaultPixelValue(0.0)
    resampler.Update()
    return np.asarray(itk.array_from_image(resampler.GetOutput())).transpose(2, 1, 0)


def test_itk_applies_the_affine_and_the_field_like_the_warped_image(registered, raw_pair):
    warped = np.asarray(nib.load(str(registered / "warped_image.nii.gz")).dataobj, dtype=np.float64)
    by_itk = _itk_resample(raw_pair["moving_image"], raw_pair["fixed_image"], registered)
    inside, value_range = _inside_and_range(warped, _itk_resample(raw_pair["moving_image"], raw_pair["fixed_image"], registered, ones=True))
    assert np.abs(by_itk - warped)[inside].max() < 1e-3 * value_range


def test_ants_applies_field_then_affine_like_the_warped_image(registered, raw_pair):
    import ants  # antspyx: a dev dependency (not one of the package)
    fixed, moving = ants.image_read(str(raw_pair["fixed_image"])), ants.image_read(str(raw_pair["moving_image"]))
    transforms = [str(registered / "deformable_field_itk.nii.gz"), str(registered / "affine_itk.mat")]
    by_ants = ants.apply_transforms(fixed, moving, transformlist=transforms, interpolator="linear").numpy()
    ones = ants.apply_transforms(fixed, moving.new_image_like(np.ones(moving.shape, np.float32)), transformlist=transforms).numpy()
    warped = np.asarray(nib.load(str(registered / "warped_image.nii.gz")).dataobj, dtype=np.float64)
    inside, value_range = _inside_and_range(warped, ones)
    assert np.abs(by_ants - warped)[inside].max() < 1e-3 * value_range
    reversed_order = ants.apply_transforms(fixed, moving, transformlist=transforms[::-1]).numpy()
    assert np.abs(reversed_order - warped)[inside].max() > 0.05 * value_range  # the order matters: affine last


def _composition_item(demo: dict[str, Path], folder: Path, degrees: float) -> tuple[dict, np.ndarray]:
    """Engine output for the fixed demo image and a copy of it rotated in world space (affine ``R @ F``), with
    ``A = R`` and a zero model DDF on a small 4 mm grid (as :class:`AffineDeformableIteration` builds it)."""
    rotation = _rotation_about(_brain_centre(demo["fixed_label"]), (0.3, -1.0, 0.6), degrees, (12.0, 4.0, -7.0))
    files = {
        "moving_image": _save_moved(demo["fixed_image"], folder / "moving.nii.gz", rotation),
        "moving_label": _save_moved(demo["fixed_label"], folder / "moving_label.nii.gz", rotation),
        "fixed_image": demo["fixed_image"],
        "fixed_label": demo["fixed_label"],
    }
    loaded = Compose([LoadImaged(KEYS, image_only=True), EnsureChannelFirstd(KEYS)])({k: str(v) for k, v in files.items()})
    loaded["affine_world"] = torch.as_tensor(rotation)
    grids = model_space_transforms(
        KEYS[:2], KEYS[2:], [4.0] * 3, (40, 48, 40), "foreground_percentile", centre="foreground", load=False,
        frame_keys={"moving_image": "affine_world"},
    )(loaded)  # fmt: skip
    keypoints = torch.randn(16, 3, dtype=torch.float64) * 20
    item = {
        **{key: grids[key] for key in KEYS},
        "forward_ddf": torch.zeros(3, 40, 48, 40),
        "affine_world": torch.as_tensor(rotation),
        "keypoints_fixed": keypoints,
        "keypoints_moving": keypoints @ torch.as_tensor(rotation[:3, :3]).T + torch.as_tensor(rotation[:3, 3]),
        "affine_warnings": "",
    }
    return item, rotation


def test_known_affine_and_displacement_compose_exactly(demo, tmp_path):
    item, rotation = _composition_item(demo, tmp_path, 75.0)
    moving_grid, fixed_grid = item["moving_image"], item["fixed_image"]
    assert torch.allclose(moving_grid, fixed_grid, atol=1e-4)  # the moving copy pre-aligned by A is the fixed image
    assert np.allclose(np.asarray(moving_grid.affine), rotation @ np.asarray(fixed_grid.affine), atol=1e-6)
    outputs = ["warped_image", "warped_label", "metrics", "affine_itk", "deformable_field_itk", "keypoints", "forward_field_itk"]
    fixed = nib.load(str(demo["fixed_image"]))
    fixed_array = np.asarray(fixed.dataobj, dtype=np.float64)

    # u = 0: the full map is A, so the rotated copy lands exactly on the fixed image
    folder = AffineDeformableWriter(tmp_path / "zero", outputs).write_pair(item)
    warped = np.asarray(nib.load(str(folder / "warped_image.nii.gz")).dataobj)
    assert np.abs(warped - fixed_array).max() < 1e-4 * fixed_array.max()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["dice"] == pytest.approx(1.0) and metrics["dice_affine"] == pytest.approx(1.0)
    assert metrics["dice_before"] < 0.5 and metrics["warnings"] == []
    assert torch.allclose(read_itk_affine(folder / "affine_itk.mat"), torch.as_tensor(rotation), atol=1e-9)
    with open(folder / "keypoints_aligned.csv") as a, open(folder / "keypoints_fixed.csv") as f:
        aligned, original = ([[float(r[c]) for c in ("x_ras", "y_ras", "z_ras")] for r in csv.DictReader(s)] for s in (a, f))
    assert np.allclose(aligned, original, atol=1e-5)  # the CSVs hold 6 decimals

    # a smooth u (model voxels of the fixed model grid G): T(x) = A(x + G u(G^-1 x)) for every fixed point x
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in (40, 48, 40)], indexing="ij"))
    item["forward_ddf"] = torch.stack([1.5 * torch.sin(grid[1] / 6), torch.cos(grid[2] / 5), 0.8 * torch.sin(grid[0] / 7)])
    folder = AffineDeformableWriter(tmp_path / "smooth", outputs).write_pair(item)
    rng = np.random.default_rng(0)
    voxels = np.stack([rng.integers(8, s - 8, 200) for s in fixed.shape], 1)  # fixed voxels, about the brain
    world = voxels @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    g = np.asarray(fixed_grid.affine, dtype=np.float64)
    model = (world - g[:3, 3]) @ np.linalg.inv(g[:3, :3]).T
    u = sample(item["forward_ddf"][None].double(), torch.from_numpy(model.T)[None], "linear", "border")[0].numpy().T
    expected = (world + u @ g[:3, :3].T) @ rotation[:3, :3].T + rotation[:3, 3]  # A(x + u_world(x)), RAS mm

    lps = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    for transforms in (("affine_itk.mat", "deformable_field_itk.nii.gz"), ("forward_field_itk.nii.gz",)):
        composite = itk.CompositeTransform[itk.D, 3].New()
        for name in transforms:  # ITK applies the transform added last first: the field, then the affine
            is_affine = name.endswith(".mat")
            composite.AddTransform(itk.transformread(str(folder / name))[0] if is_affine else _field_transform(folder / name))
        mapped = np.array([list(composite.TransformPoint((p * lps).tolist())) for p in world]) * lps
        assert np.abs(mapped - expected).max() < 1e-3, transforms  # mm

    # the warped image at x is the moving file sampled at T(x)
    moving = nib.load(str(tmp_path / "moving.nii.gz"))
    moving_voxels = (expected - moving.affine[:3, 3]) @ np.linalg.inv(moving.affine[:3, :3]).T
    moving_array = torch.from_numpy(np.asarray(moving.dataobj, np.float64))[None, None]
    values = sample(moving_array, torch.from_numpy(moving_voxels.T)[None], "linear")[0, 0].numpy()
    warped = np.asarray(nib.load(str(folder / "warped_image.nii.gz")).dataobj)[tuple(voxels.T)]
    assert np.abs(warped - values).max() < 1e-4 * fixed_array.max()


def test_affine_checks_warn_on_scaling_residual_and_overlap():
    keypoints = torch.randn(32, 3, dtype=torch.float64) * 30
    blob = torch.zeros(1, 20, 20, 20)
    blob[:, 5:15, 5:15, 5:15] = 1.0
    identity = torch.eye(4, dtype=torch.float64)
    values, warnings = keypoint_affine_checks(identity, keypoints, keypoints, blob, blob)
    assert warnings == [] and values == {"affine_determinant": 1.0, "keypoint_residual_mm": 0.0, "foreground_dice_affine": 1.0}
    scaled = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64))
    shifted = torch.roll(blob, 10, dims=1)
    values, warnings = keypoint_affine_checks(scaled, keypoints, keypoints, shifted, blob)
    assert values["affine_determinant"] == pytest.approx(27.0) and values["foreground_dice_affine"] == 0.0
    assert len(warnings) == 3
    assert "scales volumes by 27" in warnings[0] and "RMS residual" in warnings[1] and "hardly overlap" in warnings[2]


def test_keypoints_without_an_affine_stop_the_pair_with_a_clear_error():
    class NoAffine(torch.nn.Module):
        def register(self, moving, fixed, alignments):
            raise ValueError("points_moving are coplanar")

    image = MetaTensor(torch.rand(1, 8, 8, 8), meta={"filename_or_obj": "m.nii.gz"})
    iteration = AffineDeformableIteration(NoAffine(), lambda d: d, lambda d: d)
    with pytest.raises(AffineFitError, match=r"m\.nii\.gz -> fixed_image: the keypoints admit no affine .*coplanar"):
        iteration.affine({"moving_image": image, "fixed_image": torch.rand(1, 8, 8, 8)})
    try:  # MONAI wraps errors raised inside a workflow; the command line reports the cause as one line
        try:
            iteration.affine({"moving_image": image, "fixed_image": torch.rand(1, 8, 8, 8)})
        except AffineFitError as err:
            raise RuntimeError("engine run failed") from err
    except RuntimeError as wrapped:
        cause = _input_error(wrapped)
    assert isinstance(cause, InputError) and "admit no affine" in str(cause)


def test_brain_alias_and_help(capsys):
    assert bundle_path("brain") == BUNDLE.resolve()
    assert bundle_path("sitreg_brain_raw") == BUNDLE.resolve() and bundle_path(BUNDLE) == BUNDLE.resolve()
    assert main(["register", "--help"]) == 0
    assert "brain = bundles/sitreg_brain_raw" in capsys.readouterr().out


def test_stages_are_the_sibling_bundles_models():
    """Default weights are the sibling bundles' and the two stages are configured as those bundles configure the
    networks the weights belong to (architecture, model grid, intensity scaling)."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    for key, sibling in (("ckpt_path", "sitreg_brain"), ("affine_ckpt_path", "keymorph_brain_affine")):
        assert Path(parser.get_parsed_content(key)).resolve() == REPO / "bundles" / sibling / "models" / "model.pt"
    raw = parser.get()
    keymorph, sitreg = (json.loads((REPO / "bundles" / b / "configs" / "inference.json").read_text()) for b in ("keymorph_brain_affine", "sitreg_brain"))
    assert raw["affine_backbone"] == keymorph["backbone"] and raw["num_keypoints"] == keymorph["num_keypoints"]
    assert (raw["affine_shape"], raw["affine_spacing"]) == (keymorph["shape"], keymorph["spacing"])
    assert all(raw[key] == sitreg[key] for key in ("shape", "spacing", "network_def", "loss"))
    for stage, sibling in (("affine_preprocessing", keymorph), ("preprocessing", sitreg)):
        for key in ("intensity", "centre"):
            assert raw[stage][key] == sibling["preprocessing"][key], (stage, key)


@pytest.mark.parametrize("centre", ["foreground", "field_of_view"])
def test_model_input_ignores_intensity_offset_and_scale(demo, centre):
    """The brain models' input is the same for a scan, the scan stored with a negative or positive offset (CT-like
    -1024 background, an offset of 200) and the z-scored scan: its background is moved to 0 before any
    resampling pads with 0 and before the percentile scaling (without that, an offset scan read as nearly blank).
    The cropped field of view (4 mm grid larger than the image) makes the padding count."""
    image = nib.load(demo["moving_image"])
    data = image.get_fdata()
    variants = {
        "plain": data,
        "negative offset": data * 1000 - 1024,
        "positive offset": data * 300 + 200,
        "z-scored": (data - data.mean()) / data.std(),
    }
    transform = model_space_transforms(
        ["moving_image"], pixdim=[4.0] * 3, spatial_size=(48, 56, 48), intensity="foreground_percentile",
        centre=centre, load=False,
    )  # fmt: skip
    inputs = {
        name: transform({"moving_image": MetaTensor(torch.as_tensor(values)[None], affine=torch.as_tensor(image.affine))})[
            "moving_image"
        ]
        for name, values in variants.items()
    }
    plain = inputs.pop("plain")
    assert float(plain.max()) == 1.0 and float((plain > 0.05).float().mean()) > 0.05  # a real brain image
    for name, values in inputs.items():
        torch.testing.assert_close(values, plain, rtol=0, atol=1e-4, msg=name)
