"""MLflow experiment tracking for every bundle of this package (``--tracking``).

MONAI's ``--tracking mlflow`` (``monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS``) logs the executed config
and the loss / metric curves only, starts a run named by the second (so an unfinished run of the
experiment is silently reused: ``MLFlowHandler`` given no ``run_name`` logs into any unfinished run of the
experiment) and stops the workflow when the tracking server cannot be reached. :func:`settings` builds a
settings dict of the same shape (same engine ids) that

* logs the hyper-parameters of the executed config as MLflow params (:func:`config_params`),
* logs, when the engine completes, the best checkpoint ``models/model.pt`` and the metric files
  ``*.csv`` / ``summary*.json`` under ``output_dir`` as artifacts (kept in their sub-folders),
* names every run uniquely (:func:`unique_run_name`) unless a ``run_name`` is given,
* uses :class:`TrackingHandler`, an ``MLFlowHandler`` that turns tracking failures (unreachable
  server, rejected request) into one warning and lets the workflow go on untracked.

Use it from Python as ``monai.bundle.run(..., tracking=settings())`` or on the command line through a
settings file::

    python -m monai_ext.tracking eval/tracking.json [--experiment_name NAME]
    python -m monai.bundle run --config_file configs/train.json --tracking eval/tracking.json \\
        [--tracking_uri http://host:5000] [--run_name NAME]

The store defaults to SQLite at ``<output_dir>/mlruns.db`` with artifacts in ``<output_dir>/mlruns``
(MONAI 1.6 refuses ``file:`` URIs); ``--tracking_uri``/``--experiment_name``/``--run_name`` given on
the command line win over the settings (MONAI adds settings keys only when the config lacks them).

Interrupted runs: every run is tagged with its output folder, host and process id (:data:`TAGS`). A process
killed without notice (``kill -9``, a crash) leaves its run RUNNING; when a later workflow of the same output
folder (a resumed training) opens its run, :func:`end_interrupted_runs` ends every such run whose process is
gone as ``KILLED`` and links the runs both ways: ``monai_ext.resumed_from`` on the new run,
``monai_ext.resumed_by`` on the interrupted one. Metrics are committed to MLflow at epoch boundaries only (when
the next epoch starts, i.e. after the epoch's checkpoint was saved, and when the engine completes), so the steps
an interrupted epoch had done are never logged by the interrupted run: the resumed run logs them, once.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from monai.bundle.utils import DEFAULT_HANDLERS_ID, DEFAULT_MLFLOW_SETTINGS
from ignite.engine import Events
from mlflow.entities import Metric
from monai.handlers import MLFlowHandler
from monai.utils import flatten_dict

__all__ = [
    "TAGS",
    "TrackingHandler",
    "config_params",
    "end_interrupted_runs",
    "unique_run_name",
    "settings",
    "write_settings",
]

#: run tags identifying the process that owns a run: output folder, host name, process id
TAGS = {"output_dir": "monai_ext.output_dir", "host": "monai_ext.host", "pid": "monai_ext.pid"}
#: tags linking an interrupted run and the run that followed it in the same output folder
RESUMED_FROM, RESUMED_BY = "monai_ext.resumed_from", "monai_ext.resumed_by"

#: artifacts logged when a training completes: the executed config, the best checkpoint, the metric files
TRAIN_ARTIFACTS = (
    "@save_execute_config",
    "$@bundle_root + '/models/model.pt'",
    "$@output_dir + '/**/*.csv'",
    "$@output_dir + '/**/summary*.json'",
)
#: artifacts logged when an evaluation completes: the executed config and the metric files
EVAL_ARTIFACTS = (
    "@save_execute_config",
    "$@output_dir + '/**/*.csv'",
    "$@output_dir + '/**/summary*.json'",
)


#: metrics per MLflow ``log_batch`` request (the REST API accepts at most 1000)
_BATCH = 1000
_OPEN_RUNS: set[str] = set()  # ids of the runs opened by a TrackingHandler of this process and not yet closed


def _literal(value: Any) -> bool:
    """A config value that is a plain setting: no reference, expression or component."""
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, (list, tuple)):
        return all(_literal(v) for v in value)
    return value is None or isinstance(value, (bool, int, float))


def config_params(
    config_file: str | os.PathLike | None, components: Sequence[str] = ("network_def",)
) -> dict[str, str]:
    """Hyper-parameters of an executed bundle config (the JSON MONAI writes for ``save_execute_config``).

    Returns ``{key: str(value)}`` for every top-level item that is a literal (numbers, strings, lists,
    ``null``; a plain reference ``"@key"`` to such an item is resolved), and ``"<component>.<arg>"`` for
    the literal arguments of each named component (default: the network). Expressions, components and
    references to them are skipped: the full config is logged as an artifact. ``None`` gives ``{}``
    (``save_execute_config`` disabled).
    """
    if config_file is None:
        return {}
    config = json.loads(Path(config_file).read_text())

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("@") and value[1:] in config:
            return config[value[1:]]
        return value

    params = {}
    for key, value in config.items():
        value = resolve(value)
        if key not in ("imports", "_meta_") and _literal(value):
            params[key] = str(value)
    for name in components:
        component = config.get(name)
        if isinstance(component, Mapping):
            for arg, value in component.items():
                value = resolve(value)
                if not arg.startswith("_") and _literal(value):
                    params[f"{name}.{arg}"] = str(value)
    return params


def unique_run_name(prefix: str = "run") -> str:
    """``<prefix>_<YYYYmmdd_HHMMSS>_<6 hex>``: a new MLflow run per workflow, never an unfinished older one."""
    return f"{prefix}_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"


def _server_unreachable(uri: str, timeout: float) -> str | None:
    """Why a ``http(s)://`` tracking server cannot be reached within ``timeout`` s (``None``: reachable or not HTTP)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{parsed.hostname}:{port}: {err}"


def _process_gone(tags: Mapping[str, str]) -> bool:
    """Whether the process named by a run's :data:`TAGS` has ended (only decidable on its own host)."""
    if tags.get(TAGS["host"]) != socket.gethostname() or not str(tags.get(TAGS["pid"], "")).isdigit():
        return False
    pid = int(tags[TAGS["pid"]])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def end_interrupted_runs(client: Any, experiment_id: str, run_id: str, output_dir: str | os.PathLike) -> list[str]:
    """End the runs of ``output_dir`` that an ended process left RUNNING, and link them to the run ``run_id``.

    A run counts when its :data:`TAGS` name ``output_dir`` and a process of this host that no longer exists (a run
    of a live process, or of another host, is left alone). Each is terminated as ``KILLED`` and tagged
    ``monai_ext.resumed_by = run_id``; the run ``run_id`` gets ``monai_ext.resumed_from`` = the latest of them
    (by start time). Returns their ids, latest first.
    """
    folder = str(Path(output_dir).resolve())
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'")
    interrupted = [
        run
        for run in runs
        if run.info.run_id != run_id
        and run.info.run_id not in _OPEN_RUNS
        and run.data.tags.get(TAGS["output_dir"]) == folder
        and _process_gone(run.data.tags)
    ]
    interrupted.sort(key=lambda run: run.info.start_time or 0, reverse=True)
    for run in interrupted:
        client.set_terminated(run.info.run_id, status="KILLED")
        client.set_tag(run.info.run_id, RESUMED_BY, run_id)
    if interrupted:
        client.set_tag(run_id, RESUMED_FROM, interrupted[0].info.run_id)
    return [run.info.run_id for run in interrupted]


class TrackingHandler(MLFlowHandler):
    """``monai.handlers.MLFlowHandler`` that never stops the workflow and logs files, folders or globs.

    Args:
        artifacts: files, folders (logged recursively) or glob patterns (``**`` allowed), resolved when the
            engine completes; entries that match nothing are skipped. A file under ``artifact_root`` keeps its
            relative folder in the run (``validation/summary.csv``), others go to the run's top level.
        artifact_root: folder that relative artifact paths are kept against (default: none).
        connect_timeout: seconds to wait when probing an ``http(s)`` tracking server at start.
        kwargs: the other ``MLFlowHandler`` arguments (``tracking_uri``, ``experiment_name``, ...).

    Runs: a handler joins the run of the same ``run_name`` that another ``TrackingHandler`` of this process
    opened and has not closed (the trainer's, for the validator), otherwise it creates a new run and owns it;
    runs left unfinished by earlier processes are never reused (unlike ``MLFlowHandler``). Only the owner logs
    ``experiment_param`` and ``artifacts`` and, with ``close_on_complete``, finishes the run. A new run is tagged
    with :data:`TAGS` (``artifact_root`` as its output folder); the runs of that folder left RUNNING by a killed
    process are then ended as ``KILLED`` and linked to it (:func:`end_interrupted_runs`).

    Any exception raised by MLflow (server unreachable, request rejected, store error) is reported once as a
    ``RuntimeWarning`` and the handler then does nothing for the rest of the workflow; the engine continues.
    An unreachable ``http(s)`` server is detected with a socket probe before MLflow's own retries (which can
    take minutes). A ``file:`` or plain-path ``tracking_uri`` still raises ``ValueError`` at construction
    (a configuration error, see ``MLFlowHandler``).
    """

    def __init__(
        self,
        artifacts: str | Sequence[str] | None = None,
        artifact_root: str | os.PathLike | None = None,
        connect_timeout: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(artifacts=artifacts, **kwargs)
        self.artifact_root = None if artifact_root is None else Path(artifact_root).resolve()
        self.connect_timeout = connect_timeout
        self.disabled_reason: str | None = None
        self.owner = False
        self._pending: list[Metric] = []

    def _guard(self, action: Callable[..., None], *args: Any) -> None:
        if self.disabled_reason is not None:
            return
        try:
            action(*args)
        except Exception as err:  # noqa: BLE001 (tracking must never stop training)
            self._disable(f"{type(err).__name__}: {err}")

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        self.cur_run = None
        warnings.warn(
            f"MLflow tracking to {self.client.tracking_uri!r} failed and is switched off for this workflow, "
            f"which continues untracked ({reason})",
            RuntimeWarning,
            stacklevel=2,
        )

    def _open_run(self) -> None:
        """Join the run this process opened under ``run_name`` (trainer + validator share one), else create one."""
        self._set_experiment()
        name = self.run_name or unique_run_name()
        runs = self.client.search_runs(
            [self.experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'"
        )
        joined = [r for r in runs if r.info.run_id in _OPEN_RUNS]
        if joined:
            self.cur_run = self.client.get_run(joined[0].info.run_id)
        else:
            tags = {TAGS["host"]: socket.gethostname(), TAGS["pid"]: str(os.getpid())}
            if self.artifact_root is not None:
                tags[TAGS["output_dir"]] = str(self.artifact_root)
            self.cur_run = self.client.create_run(
                experiment_id=self.experiment.experiment_id, run_name=name, tags=tags
            )
            _OPEN_RUNS.add(self.cur_run.info.run_id)
            self.owner = True
            if self.artifact_root is not None:
                run_id = self.cur_run.info.run_id
                end_interrupted_runs(self.client, self.experiment.experiment_id, run_id, self.artifact_root)

    def start(self, engine: Any) -> None:
        if self.disabled_reason is None:
            reason = _server_unreachable(str(self.client.tracking_uri), self.connect_timeout)
            if reason is not None:
                self._disable(f"server unreachable, {reason}")
        if self.cur_run is None:
            self._guard(self._open_run)
        if not self.owner:
            self.experiment_param = None  # the owner logs the params once
        self._guard(super().start, engine)

    def attach(self, engine: Any) -> None:
        super().attach(engine)
        if not engine.has_event_handler(self.commit, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self.commit)

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Hold the metrics of ``step`` until :meth:`commit` (``MLFlowHandler`` sends them at once)."""
        timestamp = int(time.time() * 1000)
        self._pending.extend(Metric(key, value, timestamp, step or 0) for key, value in flatten_dict(metrics).items())

    def commit(self) -> None:
        """Send the held metrics: called when an epoch starts (every handler of the previous epoch end, the
        checkpoint saver included, has run) and when the engine completes."""
        pending, self._pending = self._pending, []
        if pending and self.cur_run is not None:
            for begin in range(0, len(pending), _BATCH):
                batch = pending[begin : begin + _BATCH]
                self._guard(self.client.log_batch, self.cur_run.info.run_id, batch, [], [])

    def iteration_completed(self, engine: Any) -> None:
        self._guard(super().iteration_completed, engine)

    def epoch_completed(self, engine: Any) -> None:
        self._guard(super().epoch_completed, engine)

    def close(self) -> None:
        """Terminate the run (FINISHED) if this handler opened it; a joined run is left to its owner."""
        if self.owner:
            if self.cur_run is not None:
                _OPEN_RUNS.discard(self.cur_run.info.run_id)
            self._guard(super().close)

    def _parse_artifacts(self) -> list[str]:
        files: dict[str, None] = {}  # ordered, without duplicates
        for entry in self.artifacts:
            if not entry:
                continue
            entry = os.fspath(entry)
            matches = sorted(glob.glob(entry, recursive=True)) if glob.has_magic(entry) else [entry]
            for match in matches:
                if os.path.isfile(match):
                    files[match] = None
                elif os.path.isdir(match):
                    for root, _, names in sorted(os.walk(match)):
                        files.update((os.path.join(root, name), None) for name in sorted(names))
        return list(files)

    def _artifact_path(self, file: str) -> str | None:
        if self.artifact_root is None:
            return None
        try:
            folder = Path(file).resolve().parent.relative_to(self.artifact_root)
        except ValueError:
            return None
        return None if folder == Path(".") else folder.as_posix()

    def _log_artifacts(self) -> None:
        store = self.artifact_location and urlparse(self.artifact_location).path
        for file in self._parse_artifacts():
            if store and Path(file).resolve().is_relative_to(Path(store).resolve()):
                continue  # never log the tracking store's own files
            self.client.log_artifact(self.cur_run.info.run_id, file, self._artifact_path(file))

    def complete(self) -> None:
        """Send the held metrics; log the artifacts if this handler opened the run (globs, sub-folders kept, the
        store excluded)."""
        self.commit()
        if self.owner and self.artifacts and self.cur_run:
            self._guard(self._log_artifacts)


def settings(
    experiment_name: str = "monai_registration",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    train_artifacts: Sequence[str] = TRAIN_ARTIFACTS,
    eval_artifacts: Sequence[str] = EVAL_ARTIFACTS,
    connect_timeout: float = 5.0,
) -> dict[str, Any]:
    """Tracking settings for ``ConfigWorkflow(tracking=...)`` / ``monai.bundle.run(tracking=...)``.

    Same engine ids as MONAI's ``DEFAULT_MLFLOW_SETTINGS`` (``train#trainer`` + ``train#handlers``,
    ``validate#evaluator`` + ``validate#handlers``, ``evaluator`` + ``handlers``), with :class:`TrackingHandler`
    in place of ``MLFlowHandler``. The trainer logs the loss per iteration, the validator the metrics per epoch
    (step = training epoch) into the trainer's run. The handler that opens the run (the trainer in training,
    ``validate#evaluator`` or ``evaluator`` in an evaluation) logs the params of :func:`config_params`, its
    artifacts (config items or ``$`` expressions resolving to paths / globs) when its engine completes, and
    finishes the run.

    Args:
        experiment_name: MLflow experiment.
        run_name: run name; ``None`` gives a fresh :func:`unique_run_name` for each workflow.
        tracking_uri: ``sqlite:///...``, ``http(s)://...`` or ``databricks``; ``None``: SQLite at
            ``<output_dir>/mlruns.db`` (artifacts in ``<output_dir>/mlruns``).
        train_artifacts, eval_artifacts: artifacts of training / evaluation runs.
        connect_timeout: seconds of the reachability probe of an ``http(s)`` server.
    """
    result = copy.deepcopy(DEFAULT_MLFLOW_SETTINGS)
    result["handlers_id"] = copy.deepcopy(DEFAULT_HANDLERS_ID)
    configs = result["configs"]
    configs["experiment_name"] = experiment_name
    configs["run_name"] = {"_target_": "monai_ext.tracking.unique_run_name"} if run_name is None else run_name
    if tracking_uri is not None:
        configs["tracking_uri"] = tracking_uri
    configs["tracking_params"] = {"_target_": "monai_ext.tracking.config_params", "config_file": "@save_execute_config"}
    engines = (("trainer", train_artifacts), ("validator", eval_artifacts), ("evaluator", eval_artifacts))
    for engine, artifacts in engines:
        configs[engine].update(
            _target_="monai_ext.tracking.TrackingHandler",
            artifacts=list(artifacts),
            artifact_root="@output_dir",
            experiment_param="@tracking_params",
            close_on_complete=True,
            connect_timeout=connect_timeout,
        )
    return result


def write_settings(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write :func:`settings` (``kwargs``) as JSON to ``path`` for ``python -m monai.bundle run --tracking <path>``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings(**kwargs), indent=4) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the tracking settings JSON for `monai.bundle run --tracking`.")
    parser.add_argument("path", help="settings file to write, e.g. eval/tracking.json")
    parser.add_argument("--experiment_name", default="monai_registration")
    parser.add_argument("--run_name", default=None, help="default: a unique name per workflow")
    parser.add_argument("--tracking_uri", default=None, help="default: SQLite at <output_dir>/mlruns.db")
    args = parser.parse_args(argv)
    path = write_settings(
        args.path, experiment_name=args.experiment_name, run_name=args.run_name, tracking_uri=args.tracking_uri
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
