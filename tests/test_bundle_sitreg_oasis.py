"""The ``bundles/sitreg_oasis`` bundle end to end through ``monai.bundle.ConfigWorkflow`` (in process), tiny sizes.

Data: :func:`monai_ext.data.synthesis.write_synthetic_oasis` (neurite-oasis layout, 12^3 voxels, 4 subjects); the
network is shrunk through config overrides (2 levels of 4 / 8 features), the OASIS crop switched off.
"""

from __future__ import annotations

import json
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.handlers import from_engine

from monai_ext.data.synthesis import make_synthetic_pair, write_synthetic_oasis
from monai_ext.io.itk_fields import read_displacement_field
from monai_ext.io.outputs import OUTPUTS
from monai_ext.networks.sitreg import SITReg

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sitreg_oasis"
CONFIGS = BUNDLE / "configs"
TINY = {
    "network_def#features": [4, 8],
    "network_def#feature_convolutions": [1, 1],
    "network_def#deformation_features": [4, 8],
    "network_def#deformation_convolutions": [1, 1],
    "crop": [[0, 0], [0, 0], [0, 0]],
    "num_workers": 0,
}
DIVISIONS = {"train": [0, 2], "validate": [2, 4], "test": [2, 4]}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return write_synthetic_oasis(tmp_path_factory.mktemp("oasis"), num_subjects=4, shape=(12, 12, 12), num_labels=4)


def _workflow(configs, workflow_type, bundle_root, **overrides) -> ConfigWorkflow:
    files = [str(CONFIGS / c) for c in configs]
    workflow = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        **{**TINY, **overrides},
    )
    workflow.initialize()
    return workflow


def _train(bundle_root, dataset_dir, max_epochs, **overrides) -> tuple[ConfigWorkflow, dict]:
    overrides = {"dataset_dir": str(dataset_dir), "divisions": DIVISIONS, "pairs_per_epoch": 2, **overrides}
    workflow = _workflow(["train.json"], "train", bundle_root, max_epochs=max_epochs, **overrides)
    assert workflow.check_properties() == []
    trainer = workflow.parser.get_parsed_content("train#trainer")
    seen = {"epochs": [], "losses": []}
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen["epochs"].append(e.state.epoch))
    loss = from_engine(["loss"], first=True)  # the decollated output holds the batch's loss in every item
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen["losses"].append(float(loss(e.state.output))))
    workflow.run()
    workflow.finalize()
    return workflow, seen


def _chain(err: BaseException) -> str:
    """All messages of an exception and its causes (MONAI wraps config errors in RuntimeError)."""
    messages = []
    while err is not None:
        messages.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "\n".join(messages)


def test_train_resume_and_evaluate(dataset_dir, tmp_path):
    root = tmp_path / "bundle"
    _, first = _train(root, dataset_dir, max_epochs=1)
    epochs = root / "models" / "epochs"
    assert first["epochs"] == [1] and (epochs / "checkpoint_epoch=1.pt").is_file()
    assert (root / "models" / "model.pt").is_file()
    # "interrupted" after epoch 1: the next run with max_epochs 2 resumes at epoch 2 and does not redo epoch 1
    _, second = _train(root, dataset_dir, max_epochs=2)
    assert second["epochs"] == [2] and len(second["losses"]) == 2
    assert (epochs / "checkpoint_epoch=2.pt").is_file()
    saved = torch.load(epochs / "checkpoint_epoch=2.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 4  # 2 epochs of 2 pairs

    workflow = _workflow(
        ["train.json", "evaluate.json"], "train", root, dataset_dir=str(dataset_dir), divisions=DIVISIONS
    )
    workflow.run()
    summary = json.loads((root / "eval" / "test" / "summary.json").read_text())
    assert summary["num_pairs"] == 1
    assert 0 < summary["metrics"]["dice"]["mean"] <= 1
    assert {"dice_before", "hd95", "folding_fraction", "sdlogj", "ic_mse"} <= set(summary["metrics"])
    assert (root / "eval" / "test" / "per_pair.csv").is_file()


def test_loss_decreases_on_one_repeated_pair(dataset_dir, tmp_path):
    # train = 2 subjects: every sampled pair is the same pair in one order or the other, and SITReg's symmetric
    # loss is the same for both orders; 6 Adam steps at lr 1e-3 from the seeded initialisation
    _, seen = _train(tmp_path / "b", dataset_dir, max_epochs=1, pairs_per_epoch=6, learning_rate=1e-3, val_interval=10)
    losses = seen["losses"]
    assert len(losses) == 6
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def _nifti_pair(folder: Path) -> dict[str, str]:
    """A synthetic pair as NIfTI files with rotated, anisotropic, different affines."""
    pair = make_synthetic_pair((12, 12, 12), seed=5, num_labels=4, max_displacement=1.5)
    angle = np.deg2rad(12.0)
    oblique = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affines = {"moving": np.eye(4), "fixed": np.eye(4)}
    affines["moving"][:3] = np.c_[oblique @ np.diag([1.2, 0.9, 1.5]), [20, -8, 4]]  # oblique, anisotropic
    affines["fixed"][:3] = np.c_[np.array([[0, -1.1, 0], [1.0, 0, 0], [0, 0, 1.4]]), [18, -6, 5]]  # axes swapped
    files = {}
    for side in ("moving", "fixed"):
        for kind, dtype in (("image", np.float32), ("label", np.int16)):
            path = folder / f"{side}_{kind}.nii.gz"
            nib.save(nib.Nifti1Image(pair[f"{side}_{kind}"][0].numpy().astype(dtype), affines[side]), str(path))
            files[f"{side}_{kind}"] = str(path)
    return files


def test_inference_writes_every_output_on_the_native_grid(dataset_dir, tmp_path):
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    torch.manual_seed(1)  # weights as CheckpointSaver stores them ({"model": state_dict}) for the tiny network_def
    network = SITReg(3, features=[4, 8], feature_convolutions=[1, 1], deformation_features=[4, 8],
                     deformation_convolutions=[1, 1])  # fmt: skip
    torch.save({"model": network.state_dict()}, root / "models" / "model.pt")
    files = _nifti_pair(tmp_path)
    workflow = _workflow(["inference.json"], "infer", root, dataset_dir=str(dataset_dir), pairs=[files], crop=None)
    assert workflow.check_properties() == []
    workflow.run()
    loaded = workflow.parser.get_parsed_content("network").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in network.state_dict().items())
    folder = root / "inference" / "moving_image__fixed_image"
    expected = {f"{n}.nii.gz" for n in OUTPUTS if n not in ("metrics", "qa")} | {"metrics.json", "qa.png"}
    assert {p.name for p in folder.iterdir()} == expected
    fixed_affine = nib.load(files["fixed_image"]).affine
    moving_affine = nib.load(files["moving_image"]).affine
    voxel_ddf = nib.load(str(folder / "forward_ddf.nii.gz"))
    np.testing.assert_allclose(voxel_ddf.affine, fixed_affine, atol=1e-6)
    # the ITK field read back with ITK: geometry = fixed grid in LPS, vectors = the voxel DDF mapped to LPS mm
    field = itk.imread(str(folder / "forward_field_itk.nii.gz"))
    np.testing.assert_allclose(np.asarray(field.GetSpacing()), np.linalg.norm(fixed_affine[:3, :3], axis=0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(field.GetOrigin()), fixed_affine[:3, 3] * [-1, -1, 1], atol=1e-5)
    ddf = np.asarray(voxel_ddf.dataobj, dtype=np.float64)  # (X, Y, Z, 3) voxels
    lps = (ddf @ moving_affine[:3, :3].T + np.einsum("ij,...j->...i", moving_affine[:3, :3] - fixed_affine[:3, :3],
                                                   np.indices(ddf.shape[:3]).transpose(1, 2, 3, 0))
           + (moving_affine[:3, 3] - fixed_affine[:3, 3])) * [-1, -1, 1]  # fmt: skip
    np.testing.assert_allclose(itk.array_from_image(field).transpose(2, 1, 0, 3), lps, atol=1e-4)
    back, _ = read_displacement_field(folder / "forward_field_itk.nii.gz", moving_affine=moving_affine)
    np.testing.assert_allclose(back[0].permute(1, 2, 3, 0).numpy(), ddf, atol=1e-4)
    # ITK's own DisplacementFieldTransform + linear resampling of the moving file reproduces warped_image
    # everywhere, border included (both: border-replicated within half a voxel outside the moving grid, 0 beyond)
    reader = itk.ImageFileReader[itk.VectorImage[itk.D, 3]].New(FileName=str(folder / "forward_field_itk.nii.gz"))
    reader.Update()
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(reader.GetOutput())
    resampled = itk.resample_image_filter(
        itk.imread(files["moving_image"], itk.F), transform=transform, use_reference_image=True,
        reference_image=itk.imread(files["fixed_image"], itk.F),
    )  # fmt: skip
    mapped = ddf + np.indices(ddf.shape[:3]).transpose(1, 2, 3, 0)
    inside = np.all((mapped >= 0) & (mapped <= np.array(nib.load(files["moving_image"]).shape) - 1), axis=-1)
    assert inside.sum() > 200
    assert not inside.all()  # the comparison covers points mapped outside the moving image too
    ours = np.asarray(nib.load(str(folder / "warped_image.nii.gz")).dataobj)
    np.testing.assert_allclose(itk.array_from_image(resampled).transpose(2, 1, 0), ours, atol=1e-5)
    label = nib.load(str(folder / "warped_label.nii.gz"))
    assert np.issubdtype(label.get_data_dtype(), np.integer)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0 < metrics["dice"] <= 1 and metrics["folding_fraction"] == 0.0

    # instance optimisation from random weights, no checkpoint needed
    workflow = _workflow(
        ["inference.json"], "infer", tmp_path / "random", dataset_dir=str(dataset_dir), pairs=[files], crop=None,
        load_pretrained=False, instance_optimization_steps=2, instance_optimization_lr=1e-3, outputs=["metrics"],
    )  # fmt: skip
    workflow.run()
    assert [p.name for p in (tmp_path / "random" / "inference" / "moving_image__fixed_image").iterdir()] == [
        "metrics.json"
    ]
    assert len(workflow.parser.get_parsed_content("iteration").losses) == 2


def _restored(path: str, out: Path) -> str:
    """The image of ``path`` stored another way: first axis flipped, last two swapped, affine adjusted (the same
    anatomy at the same world positions)."""
    image = nib.load(path)
    array = np.asarray(image.dataobj)
    shape = array.shape
    # voxel j of the new array is voxel (n0 - 1 - j0, j2, j1) of the old one
    to_old = np.array([[-1, 0, 0, shape[0] - 1], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    nib.save(nib.Nifti1Image(array[::-1].transpose(0, 2, 1).copy(), image.affine @ to_old), str(out))
    return str(out)


def test_moving_storage_orientation_does_not_change_the_world_space_result(dataset_dir, tmp_path):
    """A voxel-space task bundle stores the moving image in the fixed image's orientation first, so the same
    moving anatomy saved in another orientation (axes flipped and swapped) gives the same registration in world
    space: the same warped image and label map on the fixed grid and the same Dice."""
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    torch.manual_seed(2)
    network = SITReg(3, features=[4, 8], feature_convolutions=[1, 1], deformation_features=[4, 8],
                     deformation_convolutions=[1, 1])  # fmt: skip
    torch.save({"model": network.state_dict()}, root / "models" / "model.pt")
    files = _nifti_pair(tmp_path)
    restored = dict(
        files,
        moving_image=_restored(files["moving_image"], tmp_path / "moving_image_restored.nii.gz"),
        moving_label=_restored(files["moving_label"], tmp_path / "moving_label_restored.nii.gz"),
    )
    assert nib.aff2axcodes(nib.load(restored["moving_image"]).affine) != nib.aff2axcodes(
        nib.load(files["moving_image"]).affine
    )
    results = []
    for name, pair in (("original", files), ("restored", restored)):
        output = tmp_path / name
        _workflow(["inference.json"], "infer", root, dataset_dir=str(dataset_dir), pairs=[pair], crop=None,
                  output_dir=str(output)).run()  # fmt: skip
        (folder,) = output.iterdir()
        results.append({
            kind: np.asarray(nib.load(str(folder / f"{kind}.nii.gz")).dataobj) for kind in ("warped_image", "warped_label")
        } | {"dice": json.loads((folder / "metrics.json").read_text())["dice"]})  # fmt: skip
    original, other = results
    scale = np.abs(original["warped_image"]).max()
    np.testing.assert_allclose(other["warped_image"], original["warped_image"], rtol=0, atol=1e-4 * scale)
    assert (other["warped_label"] != original["warped_label"]).mean() < 1e-3
    assert other["dice"] == pytest.approx(original["dice"], abs=1e-3)


def test_bad_inputs_fail_clearly_without_outputs(dataset_dir, tmp_path):
    files = _nifti_pair(tmp_path)
    root = tmp_path / "bundle"
    common = {"dataset_dir": str(dataset_dir), "crop": None}
    # a missing input file: named in the error, nothing written
    missing = {**files, "fixed_image": str(tmp_path / "nope.nii.gz")}
    workflow = _workflow(["inference.json"], "infer", root, pairs=[missing], load_pretrained=False, **common)
    with pytest.raises(Exception) as info:
        workflow.run()
    assert "file not found" in _chain(info.value) and "nope.nii.gz" in _chain(info.value)
    assert not (root / "inference").exists()
    # no checkpoint while load_pretrained is true
    workflow = _workflow(["inference.json"], "infer", root, pairs=[files], **common)
    with pytest.raises(Exception) as info:
        workflow.run()
    assert "checkpoint not found" in _chain(info.value) and "model.pt" in _chain(info.value)
    # a checkpoint of another architecture (the default, full-size SITReg vs the tiny configured one)
    (root / "models").mkdir(parents=True)
    other = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3))
    torch.save({"model": other.state_dict()}, root / "models" / "model.pt")
    workflow = _workflow(["inference.json"], "infer", root, pairs=[files], **common)
    with pytest.raises(Exception) as info:
        workflow.run()
    assert "does not fit SITReg" in _chain(info.value) and "model.pt" in _chain(info.value)
    assert not (root / "inference").exists()


def test_multi_gpu_train_runs_under_torchrun_with_gloo(dataset_dir, tmp_path):
    """multi_gpu_train.json on the CPU: 2 processes (gloo), DistributedSampler, rank-0 checkpoints and model.pt."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = {**TINY, "divisions": DIVISIONS, "max_epochs": 1, "pairs_per_epoch": 2}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
        "-m", "monai.bundle", "run",
        "--config_file", str([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")]),
        "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
        "--bundle_root", str(tmp_path), "--dataset_dir", str(dataset_dir),
        *[item for key, value in overrides.items() for item in (f"--{key}", json.dumps(value))],
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "models" / "epochs").glob("*.pt")) == ["checkpoint_epoch=1.pt"]
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)  # a plain state dict (one entry saved)
    assert set(state) == set(SITReg(3, features=[4, 8], feature_convolutions=[1, 1], deformation_features=[4, 8],
                                    deformation_convolutions=[1, 1]).state_dict())  # fmt: skip  (single-device keys)
