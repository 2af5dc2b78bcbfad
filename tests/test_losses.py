"""Registration losses: parity with the SITReg fixtures (LNCC, gradient loss, NDV, training-step loss terms)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fixture_path, load_npz
from monai.losses import DiceLoss

from monai_ext.losses.regularization import GradientDeformationLoss, NDVLoss
from monai_ext.losses.similarity import LocalNormalizedCrossCorrelation
from monai_ext.losses.symmetric import SymmetricRegistrationLoss, warped_validity_mask
from monai_ext.spatial.sampling import affine_to_ddf

# ----------------------------------------------------------------------------------------------- LNCC


@pytest.mark.parametrize("window", [7, 11])
@pytest.mark.parametrize("case", ["nomask", "masked", "mask1_only"])
def test_lncc_matches_reference(window, case):
    data = load_npz("sitreg", "components", "lncc.npz")
    image_1, image_2 = torch.from_numpy(data["image_1"]), torch.from_numpy(data["image_2"])
    masks = {"nomask": (), "masked": ("mask_1", "mask_2"), "mask1_only": ("mask_1",)}[case]
    loss = LocalNormalizedCrossCorrelation(window)(image_1, image_2, *(torch.from_numpy(data[m]) for m in masks))
    # our box sums are separable; both reference variants agree with it at float32 rounding (measured <= 3e-7)
    for key in (f"lncc_w{window}_{case}", f"lncc_w{window}_separable_{case}"):
        np.testing.assert_allclose(loss.item(), data[key], rtol=0, atol=2e-6)


def test_lncc_of_image_with_itself_is_minus_one():
    image = torch.rand(2, 1, 12, 13, 14, dtype=torch.float64)
    # cc = var^2 / (var^2 + 1e-5) with window variances ~ 343 / 12: eps changes cc by < 1e-7
    np.testing.assert_allclose(LocalNormalizedCrossCorrelation(7)(image, image).item(), -1.0, atol=1e-6)


def test_lncc_affine_intensity_invariance():
    """cc is invariant to I -> a I + b (a != 0) up to eps wherever the window does not touch the zero
    padding (the reference pads with zeros, which an offset b would move); scaling alone is invariant everywhere."""
    image_1 = torch.rand(1, 1, 14, 15, 16, dtype=torch.float64)
    image_2 = 0.5 * image_1 + 0.5 * torch.rand(1, 1, 14, 15, 16, dtype=torch.float64)
    lncc_map = LocalNormalizedCrossCorrelation(5, reduction="none")
    interior = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    reference = lncc_map(image_1, image_2)
    for scale, offset in ((2.5, -0.7), (-3.0, 4.0)):
        changed = lncc_map(scale * image_1 + offset, image_2)
        torch.testing.assert_close(changed[interior], reference[interior], atol=1e-6, rtol=0)
    loss = LocalNormalizedCrossCorrelation(5)
    torch.testing.assert_close(loss(3.0 * image_1, image_2), loss(image_1, image_2), atol=1e-6, rtol=0)


def test_lncc_gradcheck():
    pred = torch.rand(1, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    target = torch.rand(1, 1, 6, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: LocalNormalizedCrossCorrelation(3)(p, target), (pred,))


def test_lncc_reductions_follow_monai():
    """``mean`` is the loss, ``sum`` and ``none`` are MONAI's ``LossReduction`` of the map ``-cc``."""
    image_1, image_2 = torch.rand(2, 2, 1, 9, 10, 11, dtype=torch.float64)
    lncc_map = LocalNormalizedCrossCorrelation(5, reduction="none")(image_1, image_2)
    assert lncc_map.shape == image_1.shape
    torch.testing.assert_close(LocalNormalizedCrossCorrelation(5)(image_1, image_2), lncc_map.mean())
    torch.testing.assert_close(LocalNormalizedCrossCorrelation(5, reduction="sum")(image_1, image_2), lncc_map.sum())
    assert isinstance(LocalNormalizedCrossCorrelation(5), torch.nn.modules.loss._Loss)


def test_lncc_bad_inputs():
    with pytest.raises(ValueError, match="kernel_size"):
        LocalNormalizedCrossCorrelation(6)
    with pytest.raises(ValueError, match="not a valid value"):  # monai.utils.look_up_option over LossReduction
        LocalNormalizedCrossCorrelation(7, reduction="max")
    with pytest.raises(ValueError, match="pred and target"):
        LocalNormalizedCrossCorrelation()(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 7))
    with pytest.raises(ValueError, match="target_mask"):
        LocalNormalizedCrossCorrelation()(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), None, torch.ones(1, 1, 8))


# ----------------------------------------------------------------------------------------------- soft Dice


def test_monai_dice_is_reference_soft_dice_plus_one():
    """SITReg's soft Dice: per channel (2 sum AB + 1e-5) / (sum A + sum B + 1e-5), loss = -mean; MONAI: 1 - mean."""
    pred = torch.softmax(torch.randn(2, 4, 6, 7, 8), dim=1)
    target = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 6, 7, 8)), 4).movedim(-1, 1).float()
    dims = (2, 3, 4)
    dice = (2 * (pred * target).sum(dims) + 1e-5) / (pred.sum(dims) + target.sum(dims) + 1e-5)
    monai_loss = DiceLoss(smooth_nr=1e-5, smooth_dr=1e-5)(pred, target)
    torch.testing.assert_close(monai_loss - 1, -dice.mean())


# ----------------------------------------------------------------------------------------------- regularisers


@pytest.mark.parametrize("case", ["3d_iso", "3d_aniso", "2d_iso", "2d_aniso"])
def test_gradient_loss_matches_reference(case):
    data = load_npz("sitreg", "components", "gradient_loss.npz")
    loss = GradientDeformationLoss(data[f"{case}_voxel_size"].tolist())(torch.from_numpy(data[f"{case}_ddf"]))
    np.testing.assert_allclose(loss.item(), data[f"{case}_loss"], rtol=1e-6)  # measured 1.2e-7 relative


@pytest.mark.parametrize("voxel_size", [None, (1.0, 1.25, 0.9)])
def test_gradient_loss_of_affine_field(voxel_size):
    """u = (A - I) x + t has exact forward differences du_c/dx_d = (A - I)[c, d], so
    loss = (1/n^2) sum_{c,d} ((A - I)[c, d] s_c / s_d)^2 (mean over c, then over d)."""
    matrix = torch.eye(4, dtype=torch.float64)[None].clone()
    matrix[0, :3] += 0.2 * torch.randn(3, 4, dtype=torch.float64)
    ddf = affine_to_ddf(matrix, (5, 6, 7))
    s = torch.tensor(voxel_size or (1.0, 1.0, 1.0), dtype=torch.float64)
    expected = (((matrix[0, :3, :3] - torch.eye(3, dtype=torch.float64)) * s[:, None] / s[None, :]) ** 2).sum() / 9
    torch.testing.assert_close(GradientDeformationLoss(voxel_size)(ddf), expected)


def test_gradient_loss_bad_inputs():
    with pytest.raises(ValueError, match="voxel_size"):
        GradientDeformationLoss((1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="voxel_size"):
        GradientDeformationLoss((1.0, 1.0))(torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="ddf"):
        GradientDeformationLoss()(torch.zeros(1, 1, 4, 4, 4))


def test_regularizer_reductions_follow_monai():
    """Both regularisers are MONAI ``_Loss``es; their batch reduction is a ``LossReduction`` (defaults unchanged)."""
    ddf = 0.8 * torch.randn(3, 3, 6, 7, 8, dtype=torch.float64)
    per_item = GradientDeformationLoss(reduction="none")(ddf)
    assert per_item.shape == (3,)
    torch.testing.assert_close(GradientDeformationLoss()(ddf), per_item.mean())
    torch.testing.assert_close(GradientDeformationLoss(reduction="sum")(ddf), per_item.sum())
    ndv = NDVLoss(reduction="none")(ddf)
    assert ndv.shape == (3,)
    torch.testing.assert_close(NDVLoss()(ddf), ndv.sum())
    torch.testing.assert_close(NDVLoss(reduction="mean")(ddf), ndv.mean())
    for loss in (GradientDeformationLoss(), NDVLoss()):
        assert isinstance(loss, torch.nn.modules.loss._Loss)
    with pytest.raises(ValueError, match="not a valid value"):
        NDVLoss(reduction="max")


def test_ndv_loss_matches_reference():
    data = load_npz("sitreg", "components", "ndv_jacobian.npz")
    ddf = torch.from_numpy(data["ddf"]).requires_grad_()
    loss = NDVLoss()(ddf)
    np.testing.assert_allclose(loss.item(), data["ndv_loss"], rtol=1e-6)
    loss.backward()
    assert torch.isfinite(ddf.grad).all() and ddf.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- symmetric objective


def _reference_training_step(name: str):
    inputs = load_npz("sitreg", name, "inputs.npz")
    outputs = load_npz("sitreg", name, "outputs.npz")
    voxel_size = json.loads(fixture_path("sitreg", name, "model.json").read_text())["model_config"]["voxel_size"]
    loss = SymmetricRegistrationLoss(
        LocalNormalizedCrossCorrelation(7), {"gradient": (GradientDeformationLoss(voxel_size), 1.0)}
    )
    args = [torch.from_numpy(inputs["image_1"]), torch.from_numpy(inputs["image_2"])]
    args += [torch.from_numpy(outputs["forward_ddf"]), torch.from_numpy(outputs["inverse_ddf"])]
    return loss, args


# number of masked voxels per direction, stated in the fixture README (sections 1 (d) and 2)
MASKED = {"small_even": (1070, 1941), "small_odd_aniso": (2230, 1541)}


@pytest.mark.parametrize("name", ["small_even", "small_odd_aniso"])
def test_symmetric_loss_terms_match_reference(name):
    """Loss terms of one training step (oasis cc_grad_1.0: L = 1/2 NCC + 1/2 NCC + 1/2 G + 1/2 G) from the
    reference's output DDFs; README tolerance for the loss: 1e-5 (measured <= 1.3e-6)."""
    reference = load_npz("sitreg", name, "loss_and_grads.npz")
    loss, (moving, fixed, forward_ddf, inverse_ddf) = _reference_training_step(name)
    terms = loss(moving, fixed, forward_ddf, inverse_ddf)
    assert set(terms) == {"forward_similarity", "inverse_similarity", "forward_gradient", "inverse_gradient", "loss"}
    pairs = {
        "forward_similarity": "term_forward_ncc",
        "inverse_similarity": "term_inverse_ncc",
        "forward_gradient": "term_forward_gradient",
        "inverse_gradient": "term_inverse_gradient",
        "loss": "loss",
    }
    for ours, theirs in pairs.items():
        np.testing.assert_allclose(terms[ours].item(), reference[theirs], rtol=0, atol=1e-5, err_msg=ours)
    np.testing.assert_allclose(terms["loss"].item(), reference["term_loss"], rtol=0, atol=1e-5)
    masked = tuple(int((warped_validity_mask(ddf) == 0).sum()) for ddf in (forward_ddf, inverse_ddf))
    assert masked == MASKED[name]


def test_symmetric_loss_swap_symmetry_and_masks():
    """Swapping the images together with the two DDFs swaps the forward / inverse terms; all-ones masks
    equal no masks; a sequence of regularisers is named regularizer0, ..."""
    loss, (moving, fixed, forward_ddf, inverse_ddf) = _reference_training_step("small_even")
    terms = loss(moving, fixed, forward_ddf, inverse_ddf)
    swapped = loss(fixed, moving, inverse_ddf, forward_ddf)
    for term in ("similarity", "gradient"):
        torch.testing.assert_close(swapped[f"forward_{term}"], terms[f"inverse_{term}"])
        torch.testing.assert_close(swapped[f"inverse_{term}"], terms[f"forward_{term}"])
    ones = torch.ones_like(moving)
    masked = loss(moving, fixed, forward_ddf, inverse_ddf, moving_mask=ones, fixed_mask=ones)
    torch.testing.assert_close(masked["loss"], terms["loss"])
    unnamed = SymmetricRegistrationLoss(LocalNormalizedCrossCorrelation(7), [(GradientDeformationLoss(), 2.0)])
    out = unnamed(moving, fixed, forward_ddf, inverse_ddf)
    expected = 0.5 * (out["forward_similarity"] + out["inverse_similarity"])
    expected = expected + 0.5 * 2.0 * (out["forward_regularizer0"] + out["inverse_regularizer0"])
    torch.testing.assert_close(out["loss"], expected)


def test_symmetric_loss_moving_mask_and_gradients():
    """A moving mask removes the voxels whose sample point touches the mask's zeros; the loss is differentiable
    w.r.t. both DDFs."""
    torch.manual_seed(1)
    moving, fixed = torch.rand(1, 1, 10, 11, 12), torch.rand(1, 1, 10, 11, 12)
    forward_ddf = (0.5 * torch.randn(1, 3, 10, 11, 12)).requires_grad_()
    inverse_ddf = (0.5 * torch.randn(1, 3, 10, 11, 12)).requires_grad_()
    moving_mask = torch.ones(1, 1, 10, 11, 12)
    moving_mask[..., :5, :, :] = 0
    mask = warped_validity_mask(forward_ddf.detach(), moving_mask)
    assert mask.shape == (1, 1, 10, 11, 12) and mask.any()
    sample_axis0 = torch.arange(10.0).view(1, 10, 1, 1) + forward_ddf.detach()[:, 0]
    # linear sampling of the mask is >= 1 - 1e-3 only at sample points >= 5 - 1e-3 along axis 0 (and in the FOV)
    assert not mask[:, 0][sample_axis0 < 4.99].any()
    loss = SymmetricRegistrationLoss(LocalNormalizedCrossCorrelation(5), {"gradient": (GradientDeformationLoss(), 1.0)})
    terms = loss(moving, fixed, forward_ddf, inverse_ddf, moving_mask=moving_mask)
    terms["loss"].backward()
    assert forward_ddf.grad.abs().sum() > 0 and inverse_ddf.grad.abs().sum() > 0


def test_symmetric_loss_bad_inputs():
    loss = SymmetricRegistrationLoss(LocalNormalizedCrossCorrelation(3), {"gradient": (GradientDeformationLoss(), 1.0)})
    image, ddf = torch.rand(1, 1, 6, 6, 6), torch.zeros(1, 3, 6, 6, 6)
    with pytest.raises(ValueError, match="inverse_ddf"):
        loss(image, image, ddf, torch.zeros(1, 3, 6, 6, 5))
    with pytest.raises(ValueError, match="fixed"):
        loss(image, torch.rand(1, 1, 6, 6, 5), ddf, ddf)
    with pytest.raises(ValueError, match="moving_mask"):
        loss(image, image, ddf, ddf, moving_mask=torch.ones(1, 2, 6, 6, 6))
    with pytest.raises(ValueError, match="forward_ddf"):
        loss(image, image, torch.full_like(ddf, float("inf")), ddf)
    with pytest.raises(ValueError, match="pair"):
        SymmetricRegistrationLoss(LocalNormalizedCrossCorrelation(3), {"gradient": GradientDeformationLoss()})
    with pytest.raises(ValueError, match="reserved"):
        SymmetricRegistrationLoss(LocalNormalizedCrossCorrelation(3), {"loss": (GradientDeformationLoss(), 1.0)})


@pytest.mark.parametrize("shape, width", [((1, 2, 9, 8, 7), 5), ((2, 3, 11, 6), 7), ((1, 1, 4, 5, 6), 11)])
def test_box_sums_equal_monai_separable_box_filtering(shape, width):
    """The LNCC window sums (shifted views) are MONAI's separable box filter with zero padding, windows wider than
    the image included."""
    from monai.networks.layers import separable_filtering

    from monai_ext.losses.similarity import _box_sums

    volume = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    expected = separable_filtering(volume, [torch.ones(width, dtype=torch.float64)] * (volume.ndim - 2))
    torch.testing.assert_close(_box_sums(volume, width), expected, rtol=0, atol=1e-12)
    small = volume[:1, :1, :5, :4].clone().requires_grad_(True)  # its own backward (the map is symmetric)
    assert torch.autograd.gradcheck(lambda v: _box_sums(v, width), (small,))
