"""Export (monai_ext.export): traced TorchScript / ONNX reproduce the eager networks where the operations allow.

SITReg's inversion stops adaptively: a trace freezes the iteration counts of its example (shown on the
inversion itself: a small DDF converges in fewer iterations than a large one), and a fixed-iteration copy
traces validly for every input of the traced shape.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from monai_ext.data.synthesis import random_ddf
from monai_ext.export import ExportMismatchError, export_onnx, trace_network, traceable_inversions
from monai_ext.networks.keymorph import KeyMorph
from monai_ext.networks.keypoints import ConvKeypointNet, KeypointDetector, TruncatedUNetKeypointNet
from monai_ext.networks.sitreg import SITReg
from monai_ext.spatial.inversion import DDFInversion
from monai_ext.spatial.sampling import compose

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


def _detector(spatial_dims: int = 2) -> KeypointDetector:
    return KeypointDetector(ConvKeypointNet(in_channels=1, num_keypoints=4, spatial_dims=spatial_dims)).eval()


def _sitreg() -> SITReg:
    return SITReg(2, 1, features=[4, 4], feature_convolutions=[1, 1], deformation_features=[4, 4],
                  deformation_convolutions=[1, 1], groups=2).eval()  # fmt: skip


def test_keypoint_detector_trace_saved_and_reloaded(tmp_path):
    detector = _detector()
    x1 = torch.rand(1, 1, 32, 32)
    path = tmp_path / "detector.ts"
    trace_network(detector, x1, [torch.rand(1, 1, 32, 32)], filepath=path)
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x1), detector(x1), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(loaded(x1), loaded(torch.rand(1, 1, 32, 32)))  # not a constant


def test_keypoint_detector_onnx(tmp_path):  # onnx comes with the dev extra
    detector = _detector()
    path = export_onnx(detector, torch.rand(1, 1, 32, 32), tmp_path / "detector.onnx", [torch.rand(1, 1, 32, 32)])
    assert path.is_file() and path.stat().st_size > 0


@pytest.mark.parametrize(
    "backbone, shape",
    [
        (lambda: ConvKeypointNet(in_channels=1, num_keypoints=4, spatial_dims=2), (1, 1, 64, 64)),
        (lambda: TruncatedUNetKeypointNet(1, 8, 3, f_maps=4, num_levels=3, num_groups=2), (1, 1, 16, 16, 16)),
    ],
    ids=["conv-2d", "truncated-unet-3d"],
)
def test_keypoint_detector_onnx_runs_under_onnxruntime(tmp_path, backbone, shape):
    """The exported graph, run by onnxruntime on inputs other than the export example, gives the eager
    keypoints ``(B, K, n)`` and heatmap masses ``(B, K)`` within 1e-5 (masses relative; onnxruntime comes with the
    dev extra). The heatmaps of the two runtimes differ by float32 rounding (a few 1e-6 of their range, each as far
    from a float64 run as the other); a keypoint is a ratio of heatmap sums, so the heatmaps must not be tiny:
    the 2-D net pools 64^2 to 4^2 (from 32^2 to 2^2 the float32 keypoints of either runtime move by ~1e-5)."""
    import onnxruntime

    torch.manual_seed(0)
    detector = KeypointDetector(backbone(), return_mass=True).eval()
    path = export_onnx(detector, torch.rand(shape), tmp_path / "detector.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (input_name,) = [i.name for i in session.get_inputs()]
    for _ in range(3):
        image = torch.rand(shape)
        with torch.no_grad():
            expected = detector(image)
        actual = session.run(None, {input_name: image.numpy()})
        assert len(actual) == len(expected) == 2
        (points, masses), (onnx_points, onnx_masses) = expected, (torch.from_numpy(a) for a in actual)
        assert onnx_points.shape == points.shape and onnx_masses.shape == masses.shape
        # keypoints: normalised coordinates in [-1, 1], absolute error; masses: sums of a heatmap (hundreds here),
        # float32 sums in another order, relative error
        assert float((onnx_points - points).abs().max()) <= 1e-5
        assert float(((onnx_masses - masses).abs() / masses.abs().clamp_min(1.0)).max()) <= 1e-5


def test_keymorph_affine_aligner_traces():
    model = KeyMorph(_detector(), alignment="affine").eval()
    x1, x2 = torch.rand(1, 2, 32, 32), torch.rand(1, 2, 32, 32)
    traced = trace_network(model, x1, [x2], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert traced(x2).shape == (1, 2, 32, 32)


def test_inversion_trace_freezes_iteration_count():
    inversion = DDFInversion()
    small = 0.3 * random_ddf((16, 16), 2.0, seed=1)[None]
    large = 1.5 * random_ddf((16, 16), 2.0, seed=2)[None]
    counts = []
    for ddf in (small, large):
        inversion(ddf)
        counts.append(inversion.forward_solver.last_iterations)
    assert counts[0] < counts[1], counts  # the count is data dependent
    traceable = traceable_inversions(torch.nn.Sequential(inversion))
    with pytest.raises(ExportMismatchError, match="input 1"):
        trace_network(traceable, small, [large], rtol=1e-4, atol=1e-4)
    traced = torch.jit.trace(traceable, small, check_trace=False)
    with torch.no_grad():
        eager_error = compose(large, inversion(large)).abs().max()  # forward o inverse = identity (0 field)
        traced_error = compose(large, traced(large)).abs().max()
    assert eager_error < 0.05 < traced_error, (eager_error, traced_error)


def test_sitreg_fixed_iteration_trace_valid_for_other_inputs(tmp_path):
    network = _sitreg()
    fixed = traceable_inversions(network, iterations=6)
    x1, x2 = torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16, 16)
    path = tmp_path / "sitreg.ts"
    trace_network(fixed, x1, [x2], filepath=path, rtol=1e-4, atol=1e-5)
    loaded = torch.jit.load(str(path))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(loaded(x2), fixed(x2), rtol=1e-4, atol=1e-5)
        # the fixed-iteration network approximates the adaptive one to the solver tolerance (1e-2 voxels)
        assert (loaded(x2) - network(x2)).abs().max() < 1e-2


def test_adaptive_sitreg_trace_cannot_be_saved():
    network = _sitreg()
    traced = torch.jit.trace(network, torch.rand(1, 2, 16, 16), check_trace=False)
    with pytest.raises(RuntimeError, match="(?i)python"):
        torch.jit.save(traced, "/dev/null")


def test_bad_arguments():
    with pytest.raises(ValueError, match="iterations"):
        traceable_inversions(_sitreg(), iterations=0)
    with pytest.raises(ValueError, match="DDFInversion"):
        traceable_inversions(_detector())
    with pytest.raises(ValueError, match="example"):
        trace_network(_detector(), torch.rand(4, 4))
