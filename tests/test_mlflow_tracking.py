"""MLflow tracking (monai_ext.tracking) on a tiny sitreg_oasis training, read back through MlflowClient."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from monai.bundle import ConfigWorkflow
from monai.utils import path_to_sqlite_uri

from monai_ext.data.synthesis import write_synthetic_oasis  # noqa: E402
from monai_ext.tracking import TrackingHandler, config_params, settings, write_settings  # noqa: E402

from http_server import closed_port_url  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "sitreg_oasis"
TINY = {
    "device": "$torch.device('cpu')",
    "crop": None,
    "divisions": {"train": [0, 2], "validate": [2, 4], "test": [2, 4]},
    "max_epochs": 2,
    "pairs_per_epoch": 2,
    "num_workers": 0,
    "resume": False,
    "network_def#features": [4, 4],
    "network_def#feature_convolutions": [1, 1],
    "network_def#deformation_features": [4, 4],
    "network_def#deformation_convolutions": [1, 1],
}


def _train(tmp_path: Path, tracking, evaluate: bool = False) -> Path:
    bundle = tmp_path / "bundle"
    if not bundle.exists():
        shutil.copytree(BUNDLE / "configs", bundle / "configs")
    data = tmp_path / "data"
    if not data.exists():
        write_synthetic_oasis(data, num_subjects=4, shape=(16, 16, 16), num_labels=3)
    configs = ["train.json", "evaluate.json"] if evaluate else ["train.json"]
    workflow = ConfigWorkflow(
        config_file=[str(bundle / "configs" / c) for c in configs],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type="train",
        tracking=tracking,
        bundle_root=str(bundle),
        dataset_dir=str(data),
        **TINY,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return bundle


def test_tiny_training_is_tracked(tmp_path):
    """Params (hyper-parameters + network), per-iteration loss, per-epoch validation metrics, artifacts."""
    settings_file = write_settings(tmp_path / "tracking.json", experiment_name="tiny")  # the CLI route
    bundle = _train(tmp_path, str(settings_file))
    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(str(bundle / "eval" / "mlruns.db")))
    experiment = client.get_experiment_by_name("tiny")
    assert experiment is not None and experiment.artifact_location.endswith("eval/mlruns")
    (run,) = client.search_runs([experiment.experiment_id])  # trainer and validator share one run
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("run_")
    params = run.data.params
    assert params["max_epochs"] == "2" and params["pairs_per_epoch"] == "2"
    assert params["learning_rate"] == "0.0001" and params["seed"] == "123456789"
    assert params["network_def.features"] == "[4, 4]" and params["network_def.groups"] == "2"
    # 2 epochs x 2 pairs: one loss per iteration, steps 1..4; one validation metric per epoch, steps 1..2
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    dice = client.get_metric_history(run.info.run_id, "val_mean_dice")
    assert sorted(m.step for m in dice) == [1, 2] and all(0 <= m.value <= 1 for m in dice)
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "model.pt" in top and any(p.startswith("config_") and p.endswith(".json") for p in top)
    validation = {a.path for a in client.list_artifacts(run.info.run_id, "validation")}
    assert {"validation/per_pair.csv", "validation/summary.csv", "validation/summary.json"} <= validation
    local = Path(client.download_artifacts(run.info.run_id, "validation/summary.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text()) == json.loads((bundle / "eval" / "validation" / "summary.json").read_text())

    # an evaluation (train.json + evaluate.json: validate#evaluator alone) opens, fills and finishes its own run
    _train(tmp_path, str(settings_file), evaluate=True)
    runs = client.search_runs([experiment.experiment_id])
    (evaluation,) = [r for r in runs if r.info.run_id != run.info.run_id]
    assert evaluation.info.status == "FINISHED" and evaluation.data.params["eval_division"] == "test"
    assert [m.step for m in client.get_metric_history(evaluation.info.run_id, "val_mean_dice")] == [1]
    test_files = {a.path for a in client.list_artifacts(evaluation.info.run_id, "test")}
    assert {"test/per_pair.csv", "test/summary.csv", "test/summary.json"} <= test_files


def test_unreachable_server_keeps_training(tmp_path):
    with pytest.warns(RuntimeWarning, match="switched off"):
        bundle = _train(tmp_path, settings(tracking_uri=closed_port_url(""), connect_timeout=1.0))
    assert (bundle / "models" / "model.pt").is_file()  # training and validation ran to the end
    assert not (bundle / "eval" / "mlruns.db").exists()


def test_config_params_literals_only(tmp_path):
    config = {
        "imports": ["$import torch"],
        "lr": 0.1,
        "epochs": "@max_epochs",
        "max_epochs": 3,
        "device": "$torch.device('cpu')",
        "crop": [[0, 0], [1, 1]],
        "network_def": {"_target_": "X", "features": [4, 8], "act": "@act", "norm": None},
        "optimizer": {"_target_": "torch.optim.Adam", "lr": "@lr"},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert config_params(path) == {
        "lr": "0.1",
        "epochs": "3",
        "max_epochs": "3",
        "crop": "[[0, 0], [1, 1]]",
        "network_def.features": "[4, 8]",
        "network_def.norm": "None",
    }
    assert config_params(None) == {}


def test_file_uri_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="file store"):
        TrackingHandler(tracking_uri=(tmp_path / "mlruns").as_uri())


def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_run_is_ended_and_linked_to_the_resumed_one(tmp_path):
    """A run left RUNNING by a killed process of the same output folder becomes KILLED, linked both ways by tags;
    a RUNNING run of a live process or of another folder is left alone."""
    import os
    import socket

    from monai_ext.tracking import RESUMED_BY, RESUMED_FROM, TAGS

    uri = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    out = tmp_path / "eval"
    out.mkdir()
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("resume", artifact_location=(tmp_path / "mlruns").as_uri())

    def run(pid, folder=out):
        tags = {TAGS["host"]: socket.gethostname(), TAGS["pid"]: str(pid), TAGS["output_dir"]: str(folder.resolve())}
        return client.create_run(experiment, run_name=f"run_{pid}_{folder.name}", tags=tags).info.run_id

    killed, alive, elsewhere = run(_dead_pid()), run(os.getppid()), run(_dead_pid(), tmp_path / "other")
    handler = TrackingHandler(tracking_uri=uri, experiment_name="resume", artifact_root=str(out))
    handler._open_run()
    resumed = handler.cur_run.info.run_id
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(killed).data.tags[RESUMED_BY] == resumed
    assert client.get_run(resumed).data.tags[RESUMED_FROM] == killed
    assert client.get_run(resumed).data.tags[TAGS["pid"]] == str(os.getpid())
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(elsewhere).info.status == "RUNNING"
    handler.close()
    assert client.get_run(resumed).info.status == "FINISHED"


def test_a_training_killed_mid_epoch_resumes_without_repeated_steps(tmp_path):
    """``os._exit`` at iteration 3 (inside epoch 2 of 2 x 2 pairs): the killed run holds epoch 1 only (steps 1, 2)
    and ends KILLED; the resumed run (resuming from the epoch-1 checkpoint) holds steps 3, 4: no step twice."""
    import subprocess
    import sys

    from monai_ext.tracking import RESUMED_FROM

    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    write_synthetic_oasis(tmp_path / "data", num_subjects=4, shape=(16, 16, 16), num_labels=3)
    kill = bundle / "configs" / "kill.json"
    kill.write_text(json.dumps({"run": [
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once=3), lambda e: os._exit(9))",
        "$@train#checkpoint.attach(@train#trainer)",
        "$@train#trainer.run()",
    ], "imports": ["$import os", "$import ignite", "$import torch", "$import monai_ext"]}))
    settings_file = write_settings(tmp_path / "tracking.json", experiment_name="killed")
    overrides = {**TINY, "resume": True, "bundle_root": str(bundle), "dataset_dir": str(tmp_path / "data")}
    (bundle / "configs" / "tiny.json").write_text(json.dumps(overrides))

    def train(*configs: str) -> int:
        files = json.dumps([str(bundle / "configs" / c) for c in ("train.json", "tiny.json", *configs)])
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--tracking", str(settings_file)]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True).returncode

    assert train("kill.json") == 9
    assert train() == 0
    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(str(bundle / "eval" / "mlruns.db")))
    experiment = client.get_experiment_by_name("killed")
    resumed, killed = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert killed.info.status == "KILLED" and resumed.info.status == "FINISHED"
    assert resumed.data.tags[RESUMED_FROM] == killed.info.run_id
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "train_loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "train_loss")] == [3, 4]
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "val_mean_dice")] == [1]
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "val_mean_dice")] == [2]
