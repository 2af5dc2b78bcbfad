"""Factories that keep the SITReg and brain bundle configs composing instead of computing, and the configs using them.

Each replaces a ``$`` expression that held a comprehension, an inline conditional on a config value or list
arithmetic (``scripts/check_bundles.py``'s ``expressions`` check); every test pins the value of the former
expression:

* :func:`monai_ext.io.outputs.pair_label_keys` (``[k for k in (...) if k in @dataset#data[0]]``);
* :func:`monai_ext.data.model_space.model_space_transforms` with a number as ``pixdim`` (``[@spacing] * 3``) and
  :func:`~monai_ext.data.model_space.loading_transforms` (``LoadImaged`` on ``@image_keys + @label_keys``);
* :func:`monai_ext.data.lumir.lumir_label_keys`, the ``download`` flag of the ``download_*`` functions;
* :class:`monai_ext.engines.registration.RegistrationTrainIteration` ``ignore_masks``,
  :func:`~monai_ext.engines.registration.lower_is_better`, :func:`monai_ext.engines.resume.pretrained_load_dict` and
  :func:`~monai_ext.engines.resume.start_at_epoch`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from monai_ext.data import lumir, lung250m, nlst, oasis
from monai_ext.data.lumir import lumir_label_keys
from monai_ext.data.model_space import ForegroundCentredGridd, loading_transforms, model_space_transforms
from monai_ext.engines.registration import RegistrationTrainIteration, lower_is_better
from monai_ext.engines.resume import pretrained_load_dict, start_at_epoch
from monai_ext.io.outputs import pair_label_keys
from monai_ext.losses.consistency import LUMIR_CONSISTENCY_SCHEDULE

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SHAPE = (14, 12, 10)
LABELS = ["moving_label", "fixed_label"]


def _write(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.2, 1.0, 0.9, 1.0]) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, str]:
    """A pair dict of two images with label maps (blobs, so that the foreground grid has a centre)."""
    root = tmp_path_factory.mktemp("pair")
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij"), -1)
    out = {}
    for side, centre in (("moving", (7.0, 5.0, 5.0)), ("fixed", (6.0, 6.0, 4.0))):
        image = np.exp(-(((grid - np.array(centre)) / 3.0) ** 2).sum(-1)).astype(np.float32)
        out[f"{side}_image"] = _write(root / f"{side}.nii.gz", image)
        out[f"{side}_label"] = _write(root / f"{side}_seg.nii.gz", (image > 0.3).astype(np.int16))
    return out


def _parser(bundle: str, *configs: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in configs])
    parser.update(overrides)
    return parser


# ------------------------------------------------------------------------------------------------ label keys


def test_pair_label_keys_follow_the_first_pair(pair):
    without = {k: v for k, v in pair.items() if k not in LABELS}
    assert pair_label_keys([pair]) == LABELS and pair_label_keys([without, pair]) == []
    assert pair_label_keys([pair], keys=("fixed_label", "moving_mask")) == ["fixed_label"]
    with pytest.raises(ValueError, match="at least one pair"):
        pair_label_keys([])


@pytest.mark.parametrize(
    ("bundle", "key"),
    [
        ("keymorph_brain_affine", "preprocessing#label_keys"),
        ("sitreg_brain_raw", "label_keys"),
        ("sitreg_lpba40", "preprocessing#label_keys"),
        ("sitreg_lumir", "preprocessing#label_keys"),
        ("sitreg_oasis", "preprocessing#label_keys"),
        ("sitreg_oasis_raw", "preprocessing#label_keys"),
    ],
)
def test_inference_label_keys_are_those_the_pairs_carry(bundle, key, pair, tmp_path):
    without = {k: v for k, v in pair.items() if k not in LABELS}
    for pairs, expected in (([pair], LABELS), ([without], [])):
        parser = _parser(bundle, "inference.json", pairs=pairs, output_dir=str(tmp_path / "out"))
        assert parser.get_parsed_content(key) == expected


def test_lumir_label_keys_by_division():
    assert lumir_label_keys("validate") == [] and lumir_label_keys("sanity_check") == LABELS
    for division in ("validate", "sanity_check"):
        parser = _parser("sitreg_lumir", "train.json", val_division=division)
        assert parser.get_parsed_content("val_label_keys") == lumir_label_keys(division)


# ------------------------------------------------------------------------------------------------ model space


@pytest.mark.parametrize("centre", ["foreground", "field_of_view"])
def test_a_number_as_pixdim_is_isotropic(pair, centre):
    kwargs = {"spatial_size": (8, 8, 8), "intensity": "foreground_percentile", "centre": centre}
    number = model_space_transforms(["moving_image"], ["moving_label"], pixdim=2.0, **kwargs)(dict(pair))
    listed = model_space_transforms(["moving_image"], ["moving_label"], pixdim=[2.0] * 3, **kwargs)(dict(pair))
    for key in ("moving_image", "moving_label"):
        assert torch.equal(number[key], listed[key]) and torch.equal(number[key].affine, listed[key].affine)
    assert np.allclose(np.linalg.norm(np.asarray(number["moving_image"].affine)[:3, :3], axis=0), 2.0)


def test_loading_transforms_are_the_loading_steps_of_model_space_transforms(pair):
    loaded = loading_transforms(["moving_image", "fixed_image"], LABELS)(dict(pair))
    assert all(tuple(loaded[k].shape) == (1, *SHAPE) for k in (*LABELS, "moving_image", "fixed_image"))
    direct = model_space_transforms(["moving_image", "fixed_image"], LABELS, pixdim=[2.0] * 3, spatial_size=(8,) * 3)
    after = model_space_transforms(
        ["moving_image", "fixed_image"], LABELS, pixdim=[2.0] * 3, spatial_size=(8,) * 3, load=False
    )
    expected, got = direct(dict(pair)), after(loaded)
    assert all(torch.equal(expected[k], got[k]) for k in expected if isinstance(expected[k], torch.Tensor))


def test_brain_configs_take_the_scalar_spacing(pair, tmp_path):
    parser = _parser("keymorph_brain_affine", "inference.json", pairs=[pair], output_dir=str(tmp_path / "a"))
    transforms = parser.get_parsed_content("preprocessing").transforms
    (grid,) = [t for t in transforms if isinstance(t, ForegroundCentredGridd)]
    assert grid.pixdim == parser["spacing"] and grid.label_of == dict(zip(["moving_image", "fixed_image"], LABELS))
    assert parser.get_parsed_content("network_def#alignment") == parser["alignments"][0]
    parser = _parser("sitreg_brain_raw", "inference.json", pairs=[pair], output_dir=str(tmp_path / "b"))
    for key, spacing in (("affine_preprocessing", "affine_spacing"), ("preprocessing", "spacing")):
        (grid,) = [t for t in parser.get_parsed_content(key).transforms if isinstance(t, ForegroundCentredGridd)]
        assert grid.pixdim == parser[spacing]
    loading = parser.get_parsed_content("loading")
    keys = ["moving_image", "fixed_image"]
    assert [list(t.keys) for t in loading.transforms] == [[*keys, *LABELS]] * 2 + [keys]  # NaN fill: images only


# ------------------------------------------------------------------------------------------------ downloads


@pytest.mark.parametrize("function", [lumir.download_lumir, oasis.download_oasis, nlst.download_nlst,
                                      lung250m.download_lung250m])  # fmt: skip
def test_download_false_fetches_nothing(function, tmp_path):
    target = tmp_path / "data"
    assert function(target, "http://127.0.0.1:9/unreachable", download=False) == target
    assert not target.exists()


@pytest.mark.parametrize(
    ("bundle", "function"),
    [("sitreg_lumir", "lumir.download_lumir"), ("sitreg_oasis", "oasis.download_oasis"),
     ("sitreg_oasis_raw", "oasis.download_oasis"), ("sitreg_nlst", "nlst.download_nlst"),
     ("sitreg_lung250m_4b", "lung250m.download_lung250m")],
)  # fmt: skip
def test_train_initialize_downloads_only_when_asked(bundle, function, tmp_path, monkeypatch):
    target = tmp_path / "data"
    parser = _parser(bundle, "train.json", dataset_dir=str(target), download=False)
    (step,) = [f"initialize#{i}" for i, s in enumerate(parser["initialize"]) if isinstance(s, dict)]
    assert parser.get_parsed_content(step) == target and not target.exists()  # the real function: nothing fetched
    calls = []
    module, name = function.split(".")
    monkeypatch.setattr(globals()[module], name, lambda dataset_dir, **kw: calls.append((dataset_dir, kw)))
    parser["download"] = True
    parser.get_parsed_content(step, lazy=False)
    assert calls == [(str(target), {"download": True})]


# ------------------------------------------------------------------------------------------------ engines


def test_ignore_masks_drops_the_mask_keys():
    keys = ("moving_image", "fixed_image", "moving_mask", "fixed_mask")
    assert RegistrationTrainIteration(*keys).keys == keys
    assert RegistrationTrainIteration(*keys, ignore_masks=True).keys == (*keys[:2], None, None)


@pytest.mark.parametrize("bundle", ["sitreg_nlst", "sitreg_lung250m_4b"])
def test_lung_train_configs_mask_switch_and_metric_comparison(bundle):
    for ignore, masks in ((False, ("moving_mask", "fixed_mask")), (True, (None, None))):
        parser = _parser(bundle, "train.json", ignore_mask=ignore)
        assert parser.get_parsed_content("train#trainer#iteration_update").keys[2:] == masks
    assert parser.get_parsed_content("validate#evaluator#metric_cmp_fn") is lower_is_better


def test_lower_is_better_starts_from_no_best():
    assert lower_is_better(3.0, -1) and lower_is_better(2.0, 3.0)
    assert not lower_is_better(3.0, 2.0) and not lower_is_better(2.0, 2.0)


def test_pretrained_load_dict_and_start_at_epoch():
    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(network.parameters())
    assert pretrained_load_dict(network, optimizer) == {"network": network}
    assert pretrained_load_dict(network, optimizer, True) == {"network": network, "optimizer": optimizer}
    engine = SimpleNamespace(state=SimpleNamespace(epoch=0, iteration=0, epoch_length=7))
    start_at_epoch(engine, 3)
    assert (engine.state.epoch, engine.state.iteration) == (3, 21)


def test_lumir_finetune_schedule_is_the_reference_one():
    parser = _parser("sitreg_lumir", "train.json", "multi_gpu_train.json", "finetune_group_consistency.json")
    assert list(parser.get_parsed_content("consistency_schedule")) == [0.0] * 31 + [40.0]
    assert tuple(LUMIR_CONSISTENCY_SCHEDULE) == (0.0,) * 31 + (40.0,)
    load_dict = parser["train#pretrained"]["load_dict"]
    assert load_dict["_target_"] == "monai_ext.engines.resume.pretrained_load_dict"
    assert load_dict["load_optimizer_state"] == "@load_optimizer_state"
