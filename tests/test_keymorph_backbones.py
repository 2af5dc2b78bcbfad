"""KeyMorph keypoint backbones, centre-of-mass layer and official checkpoint loading.

Parity against ``../shared/fixtures/keymorph`` (README sections 3, 4.1-4.3, tolerances from its
section 5: a few times the float32-vs-float64 noise floor), plus hand-derivable properties.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import numpy as np
import pytest
import torch
from conftest import fixture_path, load_npz

from monai_ext.checkpoints import convert_keymorph_state_dict, load_keymorph_checkpoint
from monai_ext.networks.keypoints import (
    CenterOfMass,
    ConvKeypointNet,
    KeypointDetector,
    TruncatedUNetKeypointNet,
    power_weights,
)

# (checkpoint, fixture, hooked modules, heatmap atol, keypoint atol); README section 5
BACKBONES = {
    "conv": ("conv_backbone_ckpt.pth.tar", "conv_backbone.npz", 2e-5, 1e-5),
    "truncatedunet": ("truncatedunet_backbone_ckpt.pth.tar", "truncatedunet_backbone.npz", 1e-5, 2e-6),
}


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _normalized(index: int, size: int) -> float:
    """align_corners=True normalisation of a voxel index (README section 2)."""
    return -1 + 2 * index / (size - 1)


@pytest.fixture(scope="module")
def loaded():
    """Backbones built and loaded from the fixture checkpoints (type and K inferred from the keys)."""
    return {
        name: load_keymorph_checkpoint(fixture_path("keymorph", ckpt)) for name, (ckpt, *_rest) in BACKBONES.items()
    }


# --- fixture parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_parity(loaded, name):
    """heatmaps_* and points_* of the reference, for the two 32^3 volumes and the odd, non-cubic one."""
    _, npz, atol_heat, atol_points = BACKBONES[name]
    data = load_npz("keymorph", npz)
    net = loaded[name]
    assert isinstance(net, ConvKeypointNet if name == "conv" else TruncatedUNetKeypointNet)
    assert not net.training
    detector = KeypointDetector(net)
    with torch.no_grad():
        for s in ("f", "m", "odd"):
            image = torch.from_numpy(data[f"img_{s}"])
            heatmaps = net(image)
            np.testing.assert_allclose(heatmaps.numpy(), data[f"heatmaps_{s}"], rtol=1e-5, atol=atol_heat)
            np.testing.assert_allclose(detector(image).numpy(), data[f"points_{s}"], rtol=1e-5, atol=atol_points)
        # batching two images gives each one's result (the reference supports B = 1 only)
        pair = torch.from_numpy(np.concatenate([data["img_f"], data["img_m"]]))
        points = detector(pair).numpy()
    np.testing.assert_allclose(
        points, np.concatenate([data["points_f"], data["points_m"]]), rtol=1e-5, atol=atol_points
    )


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_layer_statistics(loaded, name):
    """debug/*: per-module output statistics on img_f, located with forward hooks.

    stats_f columns (README 4.1): mean, std with the N-1 divisor, min, max, sum of |x|, in float64
    of the float32 outputs. Module outputs are after ReLU and max-pool (conv) / as the module returns.
    """
    _, npz, atol_heat, _ = BACKBONES[name]
    data = load_npz("keymorph", npz)
    net = loaded[name]
    names = [str(n) for n in data["debug/module_names"]]
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        net.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: outputs.__setitem__(n, out.detach().clone())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            net(torch.from_numpy(data["img_f"]))
    finally:
        for hook in hooks:
            hook.remove()
    stats = []
    for n in names:
        x = outputs[n].double()
        stats.append([x.mean(), x.std(unbiased=True), x.min(), x.max(), x.abs().sum()])
        channel_mean = x.mean(dim=[0, *range(2, x.ndim)]).numpy()
        np.testing.assert_allclose(channel_mean, data[f"debug/channel_mean_f/{n}"], rtol=1e-5, atol=1e-6, err_msg=n)
        if f"debug/output_f/{n}" in data:
            np.testing.assert_allclose(
                outputs[n].numpy(), data[f"debug/output_f/{n}"], rtol=1e-5, atol=atol_heat, err_msg=n
            )
    np.testing.assert_allclose(np.array(stats, dtype=np.float64), data["debug/stats_f"], rtol=1e-5, atol=1e-6)
    used = {"debug/module_names", "debug/stats_f"} | {
        k for k in data if k.startswith("debug/") and k.split("/")[-1] in names
    }
    assert used == {k for k in data if k.startswith("debug/")}


def test_center_of_mass_parity():
    """com_layer.npz: ReLU CoM, ij order, and xy order = ij reversed (dead channel -> -1, exact)."""
    data = load_npz("keymorph", "com_layer.npz")
    heatmaps = torch.from_numpy(data["heatmaps"])
    points_ij = CenterOfMass()(heatmaps).numpy()
    np.testing.assert_allclose(points_ij, data["points_ij"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(CenterOfMass(indexing="xy")(heatmaps).numpy(), data["points_xy"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(data["points_xy"], data["points_ij"][..., ::-1])
    np.testing.assert_array_equal(points_ij[:, 1], -1.0)  # channel 1 is strictly negative


def test_power_weights_parity(loaded):
    """full_forward.npz power/points_weights from the masses of the conv heatmaps of img_f, img_m."""
    data = load_npz("keymorph", "conv_backbone.npz")
    expected = load_npz("keymorph", "full_forward.npz")["power/points_weights"]
    detector = KeypointDetector(loaded["conv"], return_mass=True)
    with torch.no_grad():
        _, mass_f = detector(torch.from_numpy(data["img_f"]))
        _, mass_m = detector(torch.from_numpy(data["img_m"]))
    weights = power_weights(mass_f, mass_m)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-5, atol=1e-7)
    # mass is the sum of the (non-negative) heatmaps; 8 voxels of heatmap noise (2e-5) each
    np.testing.assert_allclose(mass_f.numpy(), data["heatmaps_f"].sum(axis=(2, 3, 4)), rtol=1e-5, atol=1.6e-4)


# --- centre-of-mass properties ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 7, 8), (5, 9)])
def test_center_of_mass_single_voxel(shape):
    """A heatmap positive at one voxel only (negative elsewhere) sits exactly on that voxel."""
    generator = torch.Generator().manual_seed(3)
    heatmaps = -torch.rand(2, 4, *shape, generator=generator)
    voxels = [[int(torch.randint(s, (1,), generator=generator)) for s in shape] for _ in range(8)]
    for flat, voxel in enumerate(voxels):
        heatmaps[(flat // 4, flat % 4, *voxel)] = 0.5 + flat
    points = CenterOfMass()(heatmaps)
    expected = torch.tensor([[_normalized(i, s) for i, s in zip(v, shape)] for v in voxels]).reshape(2, 4, len(shape))
    torch.testing.assert_close(points, expected, rtol=0, atol=1e-6)


def test_center_of_mass_translation_equivariance():
    """A compactly supported blob shifted by s voxels moves by 2 s / (N - 1) per axis; its centre
    is the blob centre by symmetry. eps=0 removes the reference's 1e-8 bias (1e-10 relative here)
    so the float64 result is exact to rounding."""
    shape = (12, 14, 16)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    centre = torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64)
    blob = torch.relu(9.0 - ((grid - centre[:, None, None, None]) ** 2).sum(0)) - 0.5  # negative tail: ReLU'd away
    for shift in [(0, 0, 0), (3, 0, 2), (2, 4, 5)]:
        shifted = torch.roll(blob, shifts=shift, dims=(0, 1, 2))[None, None]
        point = CenterOfMass(eps=0.0)(shifted)[0, 0]
        expected = [_normalized(c + s, n) for c, s, n in zip(centre.tolist(), shift, shape)]
        torch.testing.assert_close(point, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_center_of_mass_empty_channels():
    """Empty (no positive value) channels: reference corner -1, centre 0, or an error; never NaN."""
    heatmaps = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0)).abs()
    heatmaps[1, 2] = 0.0  # all-zero heatmap
    heatmaps[0, 1] = -1.0  # constant negative heatmap
    points, mass = CenterOfMass(return_mass=True)(heatmaps)
    assert torch.isfinite(points).all()
    assert (points[1, 2] == -1).all() and (points[0, 1] == -1).all()
    assert mass[1, 2] == 0 and mass[0, 1] == 0 and (mass[0, 0] > 0)
    centred = CenterOfMass(empty="center")(heatmaps)
    assert (centred[1, 2] == 0).all() and (centred[0, 1] == 0).all()
    torch.testing.assert_close(centred[0, 0], points[0, 0])
    torch.testing.assert_close(CenterOfMass(eps=0.0)(heatmaps), points)  # no 0 / 0
    with pytest.raises(ValueError, match=r"\[0, 1\], \[1, 2\]"):
        CenterOfMass(empty="raise")(heatmaps)
    # a constant positive heatmap is the grid centre (up to float32 rounding, README 4.3)
    torch.testing.assert_close(
        CenterOfMass()(torch.full((1, 1, 4, 5, 6), 0.7)), torch.zeros(1, 1, 3), rtol=0, atol=1e-6
    )


def test_center_of_mass_gradient():
    """Finite-difference gradient check (float64, strictly positive heatmaps: away from the ReLU kink)."""
    heatmaps = (torch.rand(1, 2, 3, 4, 5, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(CenterOfMass(), (heatmaps,))


def test_center_of_mass_bad_input():
    with pytest.raises(ValueError, match="heatmaps must have shape"):
        CenterOfMass()(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="non-finite"):
        CenterOfMass()(torch.tensor([[[[float("nan"), 1.0], [0.0, 1.0]]]]))
    with pytest.raises(ValueError, match="indexing"):
        CenterOfMass(indexing="xyz")
    with pytest.raises(ValueError, match="empty"):
        CenterOfMass(empty="nan")


def test_power_weights_properties():
    """Per-item normalisation for B > 1; dead keypoints get weight 0; no live pair -> error."""
    mass_f = torch.tensor([[1.0, 2.0, 0.0], [3.0, 1.0, 1.0]])
    mass_m = torch.tensor([[2.0, 2.0, 5.0], [1.0, 1.0, 1.0]])
    # by hand: products (2, 4, 0) / 6 and (3, 1, 1) / 5
    expected = torch.tensor([[1 / 3, 2 / 3, 0.0], [0.6, 0.2, 0.2]])
    torch.testing.assert_close(power_weights(mass_f, mass_m), expected)
    with pytest.raises(ValueError, match=r"batch items \[1\]"):
        power_weights(mass_f, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        power_weights(mass_f, mass_m[0])


# --- architecture -----------------------------------------------------------------------------


def test_parameter_counts():
    """README 3.2 / 3.3 totals and the parameter counts of the reference's backbones (built on the meta device)."""
    with torch.device("meta"):
        assert _n_params(ConvKeypointNet(num_keypoints=16)) == 7_246_096
        assert _n_params(TruncatedUNetKeypointNet(num_keypoints=16, num_levels=3)) == 873_314
        conv_table = {64: 7_909_696, 128: 8_794_496, 256: 10_564_096, 512: 14_103_296}
        for k, count in conv_table.items():
            assert _n_params(ConvKeypointNet(num_keypoints=k)) == count
        unet_table = {
            "S": (3_978_706, 3_987_026, 4_003_666),
            "M": (16_368_082, 16_376_402, 16_393_042),
            "L": (65_919_442, 65_927_762, 65_944_402),
            "H": (264_112_594, 264_120_914, 264_137_554),
        }
        for size, counts in unet_table.items():
            for k, count in zip((128, 256, 512), counts):
                net = TruncatedUNetKeypointNet(num_keypoints=k, num_levels=size)
                assert net.num_levels == TruncatedUNetKeypointNet.sizes[size]
                assert _n_params(net) == count


@pytest.mark.parametrize("spatial", [(9, 11, 7), (8, 13, 10), (13, 9)])
def test_truncated_unet_half_resolution(spatial):
    """Output at floor half resolution, also for odd sizes and in 2-D."""
    net = TruncatedUNetKeypointNet(num_keypoints=3, spatial_dims=len(spatial), f_maps=8, num_levels=3).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *spatial))
    assert out.shape == (2, 3, *(s // 2 for s in spatial))


def test_conv_net_resolution_2d():
    """floor 1/16 resolution in 2-D; the detector returns (B, K, 2) points inside [-1, 1]."""
    net = ConvKeypointNet(num_keypoints=4, spatial_dims=2).eval()
    with torch.no_grad():
        heatmaps = net(torch.rand(1, 1, 35, 47))
        points = KeypointDetector(net)(torch.rand(1, 1, 35, 47))
    assert heatmaps.shape == (1, 4, 2, 2)
    assert points.shape == (1, 4, 2) and points.abs().max() <= 1


def test_bad_inputs():
    conv = ConvKeypointNet(num_keypoints=2)
    unet = TruncatedUNetKeypointNet(num_keypoints=2, f_maps=8, num_levels=3)
    with pytest.raises(ValueError, match="3 spatial dims"):
        conv(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="1 channel"):
        unet(torch.rand(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="at least 16"):
        conv(torch.rand(1, 1, 15, 32, 32))
    with pytest.raises(ValueError, match="at least one spatial size >= 32"):
        conv(torch.rand(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="at least 4"):
        unet(torch.rand(1, 1, 3, 8, 8))
    with pytest.raises(ValueError, match="non-finite"):
        KeypointDetector(unet)(torch.full((1, 1, 8, 8, 8), float("inf")))
    with pytest.raises(ValueError, match="num_levels"):
        TruncatedUNetKeypointNet(num_levels="XL")
    with pytest.raises(ValueError, match="num_truncated"):
        TruncatedUNetKeypointNet(num_levels=3, num_truncated=3)
    with pytest.raises(ValueError, match="num_groups=8 must divide the 12"):
        TruncatedUNetKeypointNet(in_channels=12)
    with pytest.raises(ValueError, match="spatial_dims"):
        ConvKeypointNet(spatial_dims=1)


# --- checkpoints ------------------------------------------------------------------------------


def _official(name: str) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace, pathlib.PosixPath]):
        return torch.load(fixture_path("keymorph", BACKBONES[name][0]), map_location="cpu")


def test_checkpoint_into_given_network(tmp_path):
    """Loading into a given network or detector, and the `module.backbone.` key form."""
    data = load_npz("keymorph", "conv_backbone.npz")
    detector = KeypointDetector(ConvKeypointNet(num_keypoints=16))
    assert load_keymorph_checkpoint(fixture_path("keymorph", BACKBONES["conv"][0]), detector) is detector
    container = _official("truncatedunet")
    container["state_dict"] = {
        k.replace("module.", "module.backbone.", 1): v for k, v in container["state_dict"].items()
    }
    torch.save(container, tmp_path / "wrapped.pth.tar")
    unet = load_keymorph_checkpoint(
        tmp_path / "wrapped.pth.tar", TruncatedUNetKeypointNet(num_keypoints=16, num_levels=3)
    )
    unet_data = load_npz("keymorph", "truncatedunet_backbone.npz")
    with torch.no_grad():
        np.testing.assert_allclose(detector(torch.from_numpy(data["img_f"])).numpy(), data["points_f"], atol=1e-5)
        heatmaps = unet(torch.from_numpy(unet_data["img_f"])).numpy()
    np.testing.assert_allclose(heatmaps, unet_data["heatmaps_f"], rtol=1e-5, atol=1e-5)


def test_convert_state_dict_names():
    converted = convert_keymorph_state_dict(_official("conv")["state_dict"])
    assert set(converted) == set(ConvKeypointNet(num_keypoints=16).state_dict())
    converted = convert_keymorph_state_dict(_official("truncatedunet")["state_dict"])
    assert "encoders.0.conv1.groupnorm.weight" in converted and "decoders.0.conv2.conv.weight" in converted
    with pytest.raises(ValueError, match="no supported KeyMorph backbone"):
        convert_keymorph_state_dict({"module.block1.norm.running_mean": torch.zeros(32)})


@dataclasses.dataclass
class _Opaque:
    """Stands for an ``args`` entry of a type that weights_only unpickling refuses."""

    value: int = 0


def test_checkpoint_errors(tmp_path):
    conv_ckpt = fixture_path("keymorph", BACKBONES["conv"][0])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_keymorph_checkpoint(tmp_path / "missing.pth.tar")
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a KeyMorph checkpoint"):
        load_keymorph_checkpoint(tmp_path / "foreign.pt")
    torch.save({"state_dict": {"module.layer1.weight": torch.zeros(2)}}, tmp_path / "foreign_keys.pt")
    with pytest.raises(ValueError, match="no supported KeyMorph backbone"):
        load_keymorph_checkpoint(tmp_path / "foreign_keys.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot unpickle .*garbage.pt"):
        load_keymorph_checkpoint(tmp_path / "garbage.pt")
    with pytest.raises(
        ValueError, match=r"block9.conv.conv.weight: checkpoint \(16, 512, 3, 3, 3\) vs model \(8, 512"
    ):
        load_keymorph_checkpoint(conv_ckpt, ConvKeypointNet(num_keypoints=8))
    with pytest.raises(ValueError, match="does not fit TruncatedUNetKeypointNet"):
        load_keymorph_checkpoint(conv_ckpt, TruncatedUNetKeypointNet(num_keypoints=16, num_levels=3))
    with pytest.raises(ValueError, match="does not fit TruncatedUNetKeypointNet"):
        load_keymorph_checkpoint(
            fixture_path("keymorph", BACKBONES["truncatedunet"][0]), TruncatedUNetKeypointNet(num_keypoints=16)
        )
    container = _official("truncatedunet")
    container["args"].extra = _Opaque(1)
    torch.save(container, tmp_path / "opaque.pth.tar")
    with pytest.raises(ValueError, match="trusted=True"):
        load_keymorph_checkpoint(tmp_path / "opaque.pth.tar")
    assert isinstance(load_keymorph_checkpoint(tmp_path / "opaque.pth.tar", trusted=True), TruncatedUNetKeypointNet)
