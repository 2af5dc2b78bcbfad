"""The factories that keep the KeyMorph bundle configs free of mode switches, and the groupwise override config.

* :mod:`monai_ext.data.keymorph`: ``keymorph_pair_transforms`` / ``keymorph_image_transforms`` (which keys are
  loaded follows from ``labels`` / ``consistency``), ``consistency_subject_pairs`` and the pretraining's
  ``keymorph_images`` / ``pretrain_epoch_length`` (``pretrain.json`` parsed to what its former expressions gave);
* :mod:`monai_ext.engines.keymorph`: ``keymorph_train_loss`` and ``keymorph_train_iteration`` (supervised or not,
  with or without the consistency step);
* :class:`monai_ext.io.keymorph_outputs.KeyMorphWriter` ``qa_png``;
* the configs themselves (no ``... if ... else ...`` but the device choice) and ``configs/groupwise.json``, also
  through ``python -m monai_ext register ... --groupwise true``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import fixture_path
from monai.bundle import ConfigParser

import monai_ext.cli as cli
from monai_ext.cli import InputError, main
from monai_ext.data.keymorph import (
    CONSISTENCY_IMAGE_KEYS,
    consistency_subject_pairs,
    keymorph_image_transforms,
    keymorph_images,
    keymorph_pair_transforms,
    keymorph_subjects,
    keymorph_transforms,
    pretrain_epoch_length,
    same_subject_pairs,
)
from monai_ext.engines.keymorph import KeyMorphTrainIteration, keymorph_train_iteration, keymorph_train_loss
from monai_ext.io.keymorph_outputs import KeyMorphWriter

REPO = Path(__file__).resolve().parents[1]
BUNDLES = [REPO / "bundles" / name for name in ("keymorph_foundation", "keymorph_ixi_half")]
SHAPE = (12, 12, 12)
MODEL = {"pixdim": (1.0, 1.0, 1.0), "spatial_size": SHAPE}


def _write(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return str(path)


def _image(rng: np.random.Generator) -> np.ndarray:
    return rng.random(SHAPE).astype(np.float32)


def _label(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 3, SHAPE).astype(np.int16)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    out = {}
    for key in ("moving_image", "fixed_image", *CONSISTENCY_IMAGE_KEYS, "image"):
        out[key] = _write(root / f"{key}.nii.gz", _image(rng))
    for key in ("moving_label", "fixed_label", "label"):
        out[key] = _write(root / f"{key}.nii.gz", _label(rng))
    return out


def _pair(files: dict[str, str], *keys: str) -> dict[str, str]:
    return {k: files[k] for k in ("moving_image", "fixed_image", *keys)}


def _missing_key(call, item: dict) -> str:
    """The key whose absence made ``call(item)`` fail (MONAI wraps the ``KeyError`` of a transform)."""
    with pytest.raises(Exception) as info:
        call(item)
    error = info.value
    while not isinstance(error, KeyError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, KeyError), info.value
    (key,) = re.findall(r"Key `(\w+)`", str(error.args[0])) or [str(error.args[0])]
    return key


# ------------------------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize("labels", [True, "moving_seg.nii.gz", Path("labels")])
def test_pair_transforms_load_labels_when_asked(files, labels):
    item = keymorph_pair_transforms(labels, **MODEL)(_pair(files, "moving_label", "fixed_label"))
    for key in ("moving_image", "fixed_image", "moving_label", "fixed_label"):
        assert isinstance(item[key], torch.Tensor) and tuple(item[key].shape) == (1, *SHAPE), key
    assert item["moving_label"].dtype == torch.int64 and set(item["moving_label"].unique().tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("labels", [False, None, ""])
def test_pair_transforms_leave_labels_alone_otherwise(files, labels):
    transform = keymorph_pair_transforms(labels, **MODEL)
    item = transform(_pair(files, "moving_label", "fixed_label"))  # label paths present but not wanted
    assert isinstance(item["moving_image"], torch.Tensor) and item["moving_label"] == files["moving_label"]
    assert set(transform(_pair(files))) == {"moving_image", "fixed_image"}  # and no label needed


def test_pair_transforms_without_labels_need_no_label_keys_but_with_labels_do(files):
    assert _missing_key(keymorph_pair_transforms(True, **MODEL), _pair(files)) in ("moving_label", "fixed_label")


@pytest.mark.parametrize("consistency", [True, 10.0])
def test_pair_transforms_load_the_consistency_images_for_a_positive_weight(files, consistency):
    item = keymorph_pair_transforms(False, consistency, **MODEL)(_pair(files, *CONSISTENCY_IMAGE_KEYS))
    for key in CONSISTENCY_IMAGE_KEYS:
        assert isinstance(item[key], torch.Tensor) and tuple(item[key].shape) == (1, *SHAPE)
        assert 0 <= float(item[key].min()) and float(item[key].max()) <= 1  # min-max scaled like the pair
    assert _missing_key(keymorph_pair_transforms(False, consistency, **MODEL), _pair(files)) in CONSISTENCY_IMAGE_KEYS


@pytest.mark.parametrize("consistency", [False, 0.0])
def test_pair_transforms_skip_the_consistency_images_otherwise(files, consistency):
    item = keymorph_pair_transforms(False, consistency, **MODEL)(_pair(files))
    assert not any(key in item for key in CONSISTENCY_IMAGE_KEYS)


def test_image_transforms_with_and_without_labels(files):
    item = {"image": files["image"], "label": files["label"]}
    loaded = keymorph_image_transforms("labels_folder", **MODEL)(dict(item))
    assert isinstance(loaded["label"], torch.Tensor) and loaded["label"].dtype == torch.int64
    plain = keymorph_image_transforms(None, **MODEL)(dict(item))
    assert isinstance(plain["image"], torch.Tensor) and plain["label"] == files["label"]


def test_swap_hw_reaches_the_pair_transforms(files):
    plain = keymorph_pair_transforms(False, pixdim=(1.0, 1.0, 1.0), spatial_size=(12, 10, 8))(_pair(files))
    swapped = keymorph_pair_transforms(False, pixdim=(1.0, 1.0, 1.0), spatial_size=(12, 10, 8), swap_hw=True)(
        _pair(files)
    )
    assert tuple(plain["moving_image"].shape[1:]) == (12, 10, 8)
    assert tuple(swapped["moving_image"].shape[1:]) == (12, 8, 10)


# ------------------------------------------------------------------------------------------------ consistency


def test_consistency_subject_pairs_off_reads_nothing(tmp_path):
    assert consistency_subject_pairs(0.0, "ixi", tmp_path / "missing") is None
    assert consistency_subject_pairs(-1.0, "ixi", tmp_path / "missing") is None


def test_consistency_subject_pairs_on_are_the_same_subject_pairs(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("IXI000-A", "IXI001-B"):
        for mod in ("T1", "T2"):
            _write(tmp_path / mod / f"{name}-{mod}.nii.gz", _image(rng))
    got = consistency_subject_pairs(10.0, "ixi", tmp_path, "all", ["T1", "T2"])
    expected = same_subject_pairs(keymorph_subjects("ixi", tmp_path, "all", ["T1", "T2"]))
    assert got == expected and len(got) == 2
    with pytest.raises(FileNotFoundError):
        consistency_subject_pairs(1.0, "ixi", tmp_path / "missing", "all", ["T1"])


# ------------------------------------------------------------------------------------------------ pretraining


@pytest.fixture(scope="module")
def ixi_root(tmp_path_factory) -> Path:
    """IXI layout: T1 and T2 of 3 subjects (12^3 images)."""
    root = tmp_path_factory.mktemp("ixi")
    rng = np.random.default_rng(3)
    for i in range(3):
        for mod in ("T1", "T2"):
            _write(root / mod / f"IXI{i:03d}-{mod}.nii.gz", _image(rng))
    return root


def test_keymorph_images_flatten_the_subjects_modality_by_modality(ixi_root):
    subjects = keymorph_subjects("ixi", ixi_root, "all", ["T2", "T1"])
    images = keymorph_images("ixi", ixi_root, "all", ["T2", "T1"])
    assert images == [s for per_modality in subjects.values() for s in per_modality]  # the former expression
    assert [i["modality"] for i in images] == ["T2"] * 3 + ["T1"] * 3
    assert [i["subject"] for i in images[:3]] == ["IXI000", "IXI001", "IXI002"]
    assert set(images[0]) == {"image", "name", "modality", "subject"}


def test_pretrain_epoch_length_is_capped_by_the_dataset():
    assert pretrain_epoch_length(list(range(6)), 32) == 6
    assert pretrain_epoch_length(list(range(6)), 4) == 4
    assert isinstance(pretrain_epoch_length(range(6), 4.0), int)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_pretrain_config_parses_to_what_its_expressions_gave(bundle, ixi_root):
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "train.json"), str(bundle / "configs" / "pretrain.json")])
    parser.update({"data_path": str(ixi_root), "modalities": ["T1", "T2"], "pixdim": [1.0, 1.0, 1.0],
                   "spatial_size": list(SHAPE), "pairs_per_epoch": 4})  # fmt: skip
    subjects = keymorph_subjects("ixi", ixi_root, "train", ["T1", "T2"])
    images = parser.get_parsed_content("pretrain#images")
    assert images == [s for per_modality in subjects.values() for s in per_modality]
    assert parser.get_parsed_content("pretrain#trainer#epoch_length") == min(4, len(images)) == 4
    assert isinstance(parser.get_parsed_content("pretrain#trainer#loss_function"), torch.nn.MSELoss)
    swap = parser["swap_hw"]
    item = parser.get_parsed_content("pretrain#dataset")[0]
    expected = keymorph_transforms(["image"], [], [1.0, 1.0, 1.0], SHAPE, swap)(dict(images[0]))
    assert set(item) == set(expected) and torch.equal(item["image"], expected["image"])
    assert np.allclose(item["image"].affine, expected["image"].affine)
    parser["pairs_per_epoch"] = 32
    assert parser.get_parsed_content("pretrain#trainer#epoch_length", lazy=False) == len(images) == 6


# ------------------------------------------------------------------------------------------------ training


def test_train_loss_supervised_is_dice_only():
    loss = keymorph_train_loss(True, "lncc")
    assert loss.image_loss is None and loss.label_loss == "dice" and loss.needs_labels


@pytest.mark.parametrize("image_loss", ["mse", "lncc"])
def test_train_loss_unsupervised_is_the_image_term_only(image_loss):
    loss = keymorph_train_loss(False, image_loss)
    assert loss.image_loss == image_loss and loss.label_loss is None and not loss.needs_labels
    a, b = torch.rand(1, 1, *SHAPE), torch.rand(1, 1, *SHAPE)
    assert float(loss(a, a)["loss"]) < float(loss(a, b)["loss"])


def test_train_iteration_modes():
    plain = keymorph_train_iteration(max_params=(0.1, 0.1, 0.1, 0.1), affine_slope=5, seed=3, alignment="affine")
    assert isinstance(plain, KeyMorphTrainIteration)
    assert plain.keys == ("moving_image", "fixed_image", None, None)
    assert plain.consistency_keys is None and plain.consistency_weight == 0 and plain.alignment == "affine"
    full = keymorph_train_iteration(True, 10.0, max_train_seg_channels=4, num_labels=5)
    assert full.keys == ("moving_image", "fixed_image", "moving_label", "fixed_label")
    assert full.consistency_keys == CONSISTENCY_IMAGE_KEYS and full.consistency_weight == 10.0
    assert full.max_train_seg_channels == 4 and full.num_labels == 5
    with pytest.raises(ValueError, match="consistency_weight"):
        keymorph_train_iteration(consistency_weight=-1.0)


# ------------------------------------------------------------------------------------------------ writer


def test_writer_qa_png_adds_the_qa_pictures(tmp_path):
    assert {"qa", "keypoints_qa"} <= set(KeyMorphWriter(tmp_path, ["metrics"], qa_png=True).outputs) | set(
        KeyMorphWriter(tmp_path, ["metrics"], qa_png=True).extra_outputs
    )
    writer = KeyMorphWriter(tmp_path, ["metrics", "keypoints"])
    assert "qa" not in writer.outputs and "keypoints_qa" not in writer.extra_outputs
    again = KeyMorphWriter(tmp_path, ["metrics", "qa"], qa_png=True)  # no duplicate
    assert again.outputs.count("qa") == 1


# ------------------------------------------------------------------------------------------------ configs

_SWITCH = re.compile(r"\bif\b.*\belse\b")
_DEVICE = "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')"


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_configs_have_no_mode_switches(bundle):
    for path in sorted((bundle / "configs").glob("*.json")):
        for text in _strings(json.loads(path.read_text())):
            if text.startswith("$") and text != _DEVICE:
                assert not _SWITCH.search(text), f"{path.name}: {text}"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_groupwise_override_replaces_pairs_and_run(bundle):
    configs = bundle / "configs"
    pairwise = ConfigParser()
    pairwise.read_config(str(configs / "inference.json"))
    assert pairwise["run"] == ["$@evaluator.run()"] and "groupwise" not in pairwise
    merged = ConfigParser()
    merged.read_config([str(configs / "inference.json"), str(configs / "groupwise.json")])
    merged["moving"] = str(configs)  # any folder: the images are read only when the run starts
    assert merged.get_parsed_content("pairs") == []
    (step,) = merged["run"]
    assert step["_target_"] == "monai_ext.io.keymorph_outputs.write_groupwise" and merged["groupwise_iterations"] == 5
    pairwise.resolve_macro_and_relative_ids()  # parsing normalised merged's references (@a#0 -> @a::0)
    assert merged["evaluator"] == pairwise["evaluator"]  # only the mode's ids change


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """moving/ and fixed/ folders of 32^3 blob images paired by name."""
    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(2)
    grid = np.stack(np.meshgrid(*[np.arange(32.0)] * 3, indexing="ij"), -1)
    for side in ("moving", "fixed"):
        for name in ("a", "b"):
            centre = 16 + rng.uniform(-3, 3, 3)
            image = np.exp(-(((grid - centre) / np.array([7.0, 9.0, 8.0])) ** 2).sum(-1))
            for _ in range(3):
                image += 0.5 * np.exp(-((grid - rng.uniform(6, 26, 3)) ** 2).sum(-1) / 10.0)
            _write(root / side / f"{name}.nii.gz", (image + 0.05 * rng.random((32,) * 3)).astype(np.float32))
    return root


@pytest.fixture
def captured(monkeypatch) -> list[tuple[list[str], dict]]:
    """The config files and overrides ``register`` hands to :func:`monai_ext.cli.run_bundle` (which is not run)."""
    calls: list[tuple[list[str], dict]] = []

    def run_bundle(bundle, configs, override, **kw):
        calls.append((list(configs), dict(override)))
        return []

    monkeypatch.setattr(cli, "run_bundle", run_bundle)
    return calls


@pytest.mark.parametrize(
    ("word", "configs"), [("true", ["inference.json", "groupwise.json"]), ("no", ["inference.json"])]
)
def test_cli_groupwise_flag_selects_the_override_config(folders, tmp_path, captured, word, configs):
    args = ["keymorph_foundation", str(folders / "moving"), str(folders / "fixed"), str(tmp_path / "out")]
    extra = {"groupwise_iterations": 3} if len(configs) == 2 else {}  # an id of groupwise.json: known with it only
    cli.register(*args, groupwise=word, **extra)
    ((got, override),) = captured
    assert got == configs and "groupwise" not in override
    if word == "no":
        return
    with pytest.raises(InputError, match="--groupwise takes true or false"):
        cli.register(*args, groupwise="maybe")


def test_cli_groupwise_flag_is_unknown_where_no_bundle_override_exists(folders, tmp_path, captured):
    args = ["sitreg_oasis", str(folders / "moving"), str(folders / "fixed"), str(tmp_path / "out")]
    with pytest.raises(InputError, match="unknown flag --groupwise"):
        cli.register(*args, groupwise=True)
    with pytest.raises(InputError, match="unknown flag --groupwise_iterations"):
        cli.register("keymorph_foundation", *args[1:], groupwise_iterations=3)  # a groupwise.json id: not pairwise
    assert captured == []


def test_cli_register_groupwise_end_to_end(folders, tmp_path, capsys):
    out = tmp_path / "out"
    weights = str(fixture_path("keymorph", "conv_backbone_ckpt.pth.tar"))
    tiny = ["--spatial_size", "[32,32,32]", "--pixdim", "[1.0,1.0,1.0]", "--num_keypoints", "16"]
    tiny += ["--chunk_size", "4096"]
    args = ["register", "keymorph_ixi_half", str(folders / "moving"), str(folders / "fixed"), str(out)]
    code = main([*args, "--weights", weights, *tiny, "--groupwise", "true", "--alignments", "['affine']"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "groupwise" / "affine" / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and sorted(metrics["folding_fraction"]) == ["a", "b"]
    assert (out / "groupwise" / "affine" / "a_warped.nii.gz").is_file()
    assert [p.name for p in out.iterdir()] == ["groupwise"]  # no pairwise outputs
