"""How a sweep keeps its MLflow record (docs/architecture.md §4; the names in ``analysis.record``).

- experiment: ``--experiment``, tagged ``mlflow.experimentKind`` = ``custom_model_development`` (MLflow's
  kind for model training, as opposed to GenAI development).
- one parent run per sweep, tagged ``provlae.role=sweep`` and ``sweep=<name>``, found again by those tags
  when the sweep is resumed; at the end it holds the study report, ``report/index.html``.
- one child run per trial, named ``cfg.run_name``, tagged ``mlflow.parentRunId``, ``provlae.role=trial``,
  ``family``, ``dataset``, ``sweep``, ``ray_trial_id``, ``hardware``, ``ray_node_id``, ``ray_node_ip`` (the
  node of the trial's latest attempt), ``data_source`` (the file it trained on, or ``procedural``) and
  ``data_sha256`` (that file's checksum); params = every TrialConfig field;
  metrics with step = global training step; artifacts ``config.json``, ``figures/stage<s>/*.png`` at each
  stage end and ``figures/*.png`` at the end.

Exactly one run per trial: the trial itself (in its Ray worker) finds its run by a deterministic key
(tag ``provlae.trial_key``: sweep name + resolved config) or creates it, so retries, worker deaths and
sweep restores all land in the same run. A create that MLflow's client retried (a 5xx or a timeout after
the server had committed it) leaves a second run: after each create the runs of that key (or that sweep's
parent) are read back and one is kept, the others deleted (``keep_one``). No metric step is logged
twice: a resumed trial replays the same events bitwise, so steps at or below the last step already stored
for a metric are skipped. Reaching the store, and waiting out an outage, is ``sweeps.store``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis import record
from analysis.record import (
    DATA_TAGS,
    DUPLICATE_TAG,
    ERROR_TAG,
    HARDWARE_TAG,
    KEY_TAG,
    KIND_TAG,
    PARENT_TAG,
    REPRESENTATION_DIR,
    RESUMED_TAG,
    ROLE_TAG,
    SWEEP_ROLE,
    SWEEP_TAG,
    TRAINING_KIND,
    TRIAL_ROLE,
    run_preference,
)
from provlae.config import TrialConfig
from sweeps.store import (  # noqa: F401  (tracking.<name> for the sweep's modules)
    PATIENCE,
    TrackingError,
    check_reachable,
    client,
    normalize_uri,
    patient_client,
    sqlite_path,
    unreachable,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

FLUSH_METRICS = 500  # buffered metric values that force a flush
FLUSH_SECONDS = 15.0  # ... or the time since the last flush
BATCH_LIMIT = 1000  # MLflow's log_batch limit on metrics per request
TAG_VALUE_LIMIT = 5000
MAX_CANDIDATES = 100  # runs read back for one trial key or one sweep's parent



def end_running(mlflow: "MlflowClient", experiment_id: str, sweep: str, status: str = "KILLED") -> int:
    """End every run of ``sweep`` still RUNNING (its parent included) with ``status``; how many. Called by
    the driver holding the sweep's lease, when no trial of it runs: after its Tuner returned unfinished
    (interrupted), and before it starts (runs a driver killed outright left RUNNING)."""
    where = f"tags.{SWEEP_TAG} = '{sweep}' and attributes.status = 'RUNNING'"
    runs = mlflow.search_runs([experiment_id], where, max_results=10000)
    for run in runs:
        mlflow.set_terminated(run.info.run_id, status)
    return len(runs)


def check_experiment(mlflow: "MlflowClient", name: str) -> None:
    """Refuse an experiment that was deleted (in the UI, say) before anything is created."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {name!r} is deleted: restore it or pick another --experiment")


def open_experiment(mlflow: "MlflowClient", name: str) -> str:
    """The experiment's id, created if needed (artifacts beside a sqlite store, never in the cwd) and
    tagged as model training; an existing experiment without a kind gets that tag too."""
    from mlflow.exceptions import MlflowException

    check_experiment(mlflow, name)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if KIND_TAG not in exp.tags:  # made by an earlier version, or by hand: a kind a user set stays
            mlflow.set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING_KIND)
        return exp.experiment_id
    uri = mlflow.tracking_uri
    location = None
    if uri.startswith("sqlite:"):
        location = (sqlite_path(uri).parent / "mlartifacts" / name).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location, tags={KIND_TAG: TRAINING_KIND})
    except MlflowException:  # created meanwhile by someone else
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_or_create_parent(mlflow: "MlflowClient", experiment_id: str, sweep: str,
                          params: dict[str, Any]) -> str:
    """The sweep's parent run (created once; set RUNNING again when the sweep resumes)."""
    where = f"tags.`{ROLE_TAG}` = '{SWEEP_ROLE}' and tags.{SWEEP_TAG} = '{sweep}'"
    run = keep_one(mlflow, experiment_id, where)
    if run is None:  # a retried create may have made two: keep one
        tags = {ROLE_TAG: SWEEP_ROLE, SWEEP_TAG: sweep}
        created = mlflow.create_run(experiment_id, run_name=sweep, tags=tags)
        run = keep_one(mlflow, experiment_id, where) or created
    if not run.data.params:  # a fresh run, or one whose driver died before describing it
        _log_params(mlflow, run.info.run_id, params)
    if run.info.status != "RUNNING":
        mlflow.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def end_parent(mlflow: "MlflowClient", run_id: str, failed: int) -> None:
    mlflow.set_terminated(run_id, "FAILED" if failed else "FINISHED")


# ------------------------------------------------------------------------------------- trial runs


@dataclass(frozen=True)
class TrackingContext:
    """What a trial needs to find its run: small, picklable, sent to every trial."""

    tracking_uri: str
    experiment_id: str
    sweep: str
    parent_run_id: str
    tags: tuple[tuple[str, str], ...] = ()  # extra tags on every trial run, e.g. (("search", "optuna"),)
    patience: float = PATIENCE  # seconds a trial waits for an unreachable tracking server

    def trial_key(self, cfg: TrialConfig, trial_id: str = "") -> str:
        """The key of ``cfg``'s run (``analysis.record.trial_key``). ``trial_id`` names nothing: a trial is
        its config, whichever Tune trial runs it (the argument is accepted for the callers that pass it)."""
        return record.trial_key(self.sweep, cfg)


def find_trial_run(mlflow: "MlflowClient", experiment_id: str, key: str):
    """The run of trial ``key``, or None. Where a store holds duplicates (a retried create, before
    ``keep_one`` existed), the one ``keep_one`` would keep: FINISHED, else holding metrics, else the earliest."""
    runs = mlflow.search_runs([experiment_id], _key_filter(key), max_results=MAX_CANDIDATES)
    return min(runs, key=run_preference, default=None)


def _key_filter(key: str) -> str:
    return f"tags.`{KEY_TAG}` = '{key}'"


def keep_one(mlflow: "MlflowClient", experiment_id: str, where: str):
    """The one active run matching ``where`` (a trial key, or a sweep's parent tags), or None.

    MLflow's client retries ``runs/create`` on a 5xx or a timeout, so a create the server had already
    committed leaves a second run. Of several matches, one is kept (``analysis.record.run_preference``: the
    run the analysis counts); each other that
    holds no metrics (a ghost) is tagged ``provlae.duplicate_of=<kept run id>`` and deleted. Two that both
    hold metrics are both left, and only the kept one is ever logged into. Concurrent creators agree on
    the run they keep, and deleting twice is harmless."""
    from mlflow.exceptions import MlflowException

    runs = sorted(mlflow.search_runs([experiment_id], where, max_results=MAX_CANDIDATES), key=run_preference)
    if not runs:
        return None
    kept = runs[0]
    for ghost in (run for run in runs[1:] if not run.data.metrics):
        try:
            mlflow.set_tag(ghost.info.run_id, DUPLICATE_TAG, kept.info.run_id)
            mlflow.delete_run(ghost.info.run_id)
        except MlflowException:  # deleted meanwhile by a concurrent creator
            pass
    return kept


def data_tags(cfg: TrialConfig) -> dict[str, str]:
    """Which file the trial reads (as this node sees it) and its checksum; procedural data has none."""
    if cfg.data_path is None:
        return {DATA_TAGS[0]: "procedural"}
    from provlae.data.files import checksum

    return {DATA_TAGS[0]: cfg.data_path, DATA_TAGS[1]: checksum(cfg.data_path)}


@dataclass
class TrialRun:
    """One trial's MLflow run: found or created on open, metrics buffered and deduplicated."""

    mlflow: "MlflowClient"
    run_id: str
    status: str
    last_step: dict[str, int] = field(default_factory=dict)  # metric -> highest step stored
    previous_error: str = ""  # the error tag an earlier attempt of this trial left
    _buffer: list = field(default_factory=list)
    _last_flush: float = field(default_factory=time.monotonic)

    @classmethod
    def open(cls, ctx: TrackingContext, cfg: TrialConfig, trial_id: str) -> "TrialRun":
        mlflow = patient_client(ctx.tracking_uri, ctx.patience)
        key = ctx.trial_key(cfg, trial_id)
        found = keep_one(mlflow, ctx.experiment_id, _key_filter(key))
        if found is None:  # a retried create may have made two: keep one
            tags = {**dict(ctx.tags), PARENT_TAG: ctx.parent_run_id, ROLE_TAG: TRIAL_ROLE, KEY_TAG: key,
                    "family": cfg.family, "dataset": cfg.dataset, SWEEP_TAG: ctx.sweep,
                    "ray_trial_id": trial_id, HARDWARE_TAG: hardware(cfg.device), **ray_node_tags(),
                    **data_tags(cfg)}
            created = mlflow.create_run(ctx.experiment_id, run_name=cfg.run_name, tags=tags)
            found = keep_one(mlflow, ctx.experiment_id, _key_filter(key)) or created
        trial = cls(mlflow, found.info.run_id, found.info.status,
                    previous_error=found.data.tags.get(ERROR_TAG, ""))
        if found.info.status == "FINISHED":
            return trial
        if not found.data.params:  # a fresh run, or one whose attempt died before describing it
            trial._describe(cfg)
        _set_tags(mlflow, trial.run_id, {"ray_trial_id": trial_id, HARDWARE_TAG: hardware(cfg.device),
                                         **ray_node_tags()})  # where this attempt runs
        if found.info.status != "RUNNING":
            mlflow.update_run(trial.run_id, status="RUNNING")
        trial.status = "RUNNING"
        for metric in found.data.metrics:
            history = mlflow.get_metric_history(trial.run_id, metric)
            trial.last_step[metric] = max((m.step for m in history), default=-1)
        return trial

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    def final_metrics(self) -> dict[str, float]:
        return dict(self.mlflow.get_run(self.run_id).data.metrics)

    def _describe(self, cfg: TrialConfig) -> None:
        _log_params(self.mlflow, self.run_id, cfg.to_dict())
        self.mlflow.log_dict(self.run_id, cfg.to_dict(), "config.json")

    # ---------------------------------------------------------------- metrics
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer the values not stored yet for this step; flush when the buffer is large or old."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step > self.last_step.get(key, -1):
                self._buffer.append(Metric(key, float(value), now, step))
                self.last_step[key] = step
        if len(self._buffer) >= FLUSH_METRICS or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self._buffer), BATCH_LIMIT):
            self.mlflow.log_batch(self.run_id, metrics=self._buffer[start:start + BATCH_LIMIT])
        self._buffer.clear()
        self._last_flush = time.monotonic()

    # ---------------------------------------------------------------- endings
    def resumed_at(self, step: int) -> None:
        self.mlflow.set_tag(self.run_id, RESUMED_TAG, str(step))

    def log_figures(self, figures_dir: Path) -> None:
        """The files under ``figures_dir`` as the run's artifacts under ``figures/`` (same paths replaced)."""
        if any(Path(figures_dir).iterdir()):
            self.mlflow.log_artifacts(self.run_id, str(figures_dir), "figures")

    def log_representation(self, folder: Path) -> None:
        """The stage-end representations under ``folder`` as the run's artifacts under ``representation/``."""
        self.mlflow.log_artifacts(self.run_id, str(folder), REPRESENTATION_DIR)

    def finish(self, figures_dir: Path | None = None) -> None:
        self.flush()
        if figures_dir is not None:
            self.log_figures(figures_dir)
        if ERROR_TAG in self.mlflow.get_run(self.run_id).data.tags:  # an earlier attempt failed
            self.mlflow.delete_tag(self.run_id, ERROR_TAG)
        self.mlflow.set_terminated(self.run_id, "FINISHED")
        self.status = "FINISHED"

    def fail(self, error: BaseException | str) -> None:
        if isinstance(error, TrackingError):  # the server is away: the next attempt, or the rerun, records it
            self.status = "FAILED"
            return
        try:
            self.flush()
        finally:
            mark_failed(self.mlflow, self.run_id, error)
            self.status = "FAILED"


def _set_tags(mlflow: "MlflowClient", run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    mlflow.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def ray_node_tags() -> dict[str, str]:
    """The Ray node this process runs on (``ray_node_id``, ``ray_node_ip``); {} outside Ray."""
    try:
        import ray
    except ImportError:
        return {}
    if not ray.is_initialized():
        return {}
    return {"ray_node_id": ray.get_runtime_context().get_node_id(), "ray_node_ip": ray.util.get_node_ip_address()}


def hardware(device: str) -> str:
    """What this process trains on, for the run's ``hardware`` tag: the GPU's name, or the CPU's and the
    threads torch uses, and the host."""
    import platform
    import socket

    import torch

    host = socket.gethostname()
    if device != "cpu" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()} ({host})"
    return f"cpu: {_cpu_name() or platform.machine()}, {torch.get_num_threads()} threads ({host})"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        return ""
    return names[0] if names else ""


def mark_failed(mlflow: "MlflowClient", run_id: str, error: BaseException | str) -> None:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    mlflow.set_tag(run_id, ERROR_TAG, text[:TAG_VALUE_LIMIT])
    mlflow.set_terminated(run_id, "FAILED")


def _log_params(mlflow: "MlflowClient", run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's log_batch limit on params per request
        mlflow.log_batch(run_id, params=items[start:start + 100])

