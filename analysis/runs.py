"""A sweep's trial runs, read back from MLflow into one typed DataFrame (docs/architecture.md §4).

The sweep logs one parent run per sweep and one child run per trial. MLflow hands params back as
strings; here they are cast to the types ``TrialConfig`` declares (``analysis.record.cast_param``). Metrics
are the latest value of each key, which is the final evaluation. A trial that a store holds more than
once (a create retried by an older sweep) is one row (``unique_trials``).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from collections import Counter
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from analysis.errors import AnalysisError
from analysis.record import PARENT_TAG, ROLE_TAG, SWEEP_ROLE, SWEEP_TAG, cast_param, guess, unique_trials
from provlae.paths import default_tracking_uri
from provlae.text import first_line

FIRST_COLUMNS = ("run_id", "run_name", "sweep", "status", "start_time", "end_time",
                 "family", "dataset", "beta", "seed")
PAGE_SIZE = 1000
NO_MESSAGE = "unknown MLflow error"  # an MlflowException's message when it has none
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_MI_KEY = re.compile(r"mi_z(\d+)")


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The URI given, else ``$MLFLOW_TRACKING_URI``, else the sqlite store under the data home."""
    return tracking_uri or default_tracking_uri()


def client_for(tracking_uri: str | None = None) -> tuple[MlflowClient, str]:
    """An MlflowClient and its URI; a sqlite file that does not exist is an error, not a new store."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise AnalysisError(f"no MLflow store at {path} (tracking URI {uri})")
    return MlflowClient(tracking_uri=uri), uri


def load_runs(experiment: str, tracking_uri: str | None = None, include_failed: bool = False,
              sweep: str | None = None) -> pd.DataFrame:
    """One row per trial run of ``experiment``: ids, sweep, status, start/end time, typed params, final metrics.

    Parent (sweep) runs are left out: those tagged ``provlae.role=sweep`` and any run that is the
    parent of another. Each trial counts once, however many runs the store holds of it
    (``unique_trials``). ``sweep``: only that sweep's runs (column ``sweep``, None where untagged);
    without it every sweep of the experiment is pooled. Only FINISHED runs unless ``include_failed``
    (then every status, and the ``error`` tag of failed ones). ``df.attrs`` names the experiment, URI,
    param and metric columns.
    """
    client, uri = client_for(tracking_uri)
    try:
        exp_id = _experiment_id(client, experiment, uri)
        runs = _search_all(client, exp_id)
    except MlflowException as e:
        raise AnalysisError(f"cannot read MLflow at {uri}: {first_line(e.message, NO_MESSAGE)}") from None
    parents = {r.data.tags.get(PARENT_TAG) for r in runs}
    trials = [r for r in runs if r.data.tags.get(ROLE_TAG) != SWEEP_ROLE and r.info.run_id not in parents]
    if not trials:
        raise AnalysisError(f"experiment {experiment!r} has no trial runs")
    trials = unique_trials(trials)
    where = f"experiment {experiment!r}"
    if sweep is not None:
        check_sweep(experiment, {r.data.tags.get(SWEEP_TAG) for r in trials}, sweep)
        trials = [r for r in trials if r.data.tags.get(SWEEP_TAG) == sweep]
        where = f"sweep {sweep!r} of {where}"
    kept = trials if include_failed else [r for r in trials if r.info.status == "FINISHED"]
    if not kept:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(Counter(r.info.status for r in trials).items()))
        raise AnalysisError(f"{where} has no FINISHED trial runs ({counts})")
    frame = _frame(kept)
    frame.attrs.update(experiment=experiment, experiment_id=exp_id, tracking_uri=uri)
    return frame


def check_sweep(experiment: str, names: set, sweep: str) -> None:
    """AnalysisError naming the sweeps there unless ``sweep`` is one of ``names`` (None: untagged runs)."""
    if sweep not in names:
        known = ", ".join(sorted(n for n in names if n is not None)) or "none tagged"
        raise AnalysisError(f"experiment {experiment!r} has no runs of sweep {sweep!r} (sweeps: {known})")


def select_sweep(trials: pd.DataFrame, sweep: str | None) -> pd.DataFrame:
    """Only ``sweep``'s rows of ``load_runs`` (all rows when None); AnalysisError naming the sweeps there."""
    if sweep is None:
        return trials
    check_sweep(trials.attrs.get("experiment"), set(trials.get("sweep", pd.Series(dtype=object)).dropna()), sweep)
    return trials[trials["sweep"] == sweep]


def sweep_counts(trials: pd.DataFrame) -> dict[str | None, int]:
    """Rows of a ``load_runs`` frame per sweep, sweeps by name, untagged runs (key None) last."""
    counts = Counter(None if _missing(s) else s for s in trials.get("sweep", pd.Series([None] * len(trials))))
    return dict(sorted(counts.items(), key=lambda item: (item[0] is None, item[0] or "")))


def load_sweeps(experiment: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per sweep (parent) run of ``experiment``, tagged ``provlae.role=sweep``: ``run_id``,
    ``sweep``, ``status``, ``start_time``, ``end_time`` and the params the sweep described itself with
    (preset, axes, trial count, ...), cast as in load_runs. Empty (with those columns) when there is none."""
    client, uri = client_for(tracking_uri)
    try:
        exp_id = _experiment_id(client, experiment, uri)
        runs = _search_all(client, exp_id, f"tags.`{ROLE_TAG}` = '{SWEEP_ROLE}'")
    except MlflowException as e:
        raise AnalysisError(f"cannot read MLflow at {uri}: {first_line(e.message, NO_MESSAGE)}") from None
    rows = [{"run_id": r.info.run_id, "sweep": r.data.tags.get(SWEEP_TAG) or r.info.run_name,
             "status": r.info.status, "start_time": r.info.start_time, "end_time": r.info.end_time,
             **{k: guess(v) for k, v in r.data.params.items()}} for r in runs]
    empty = ["run_id", "sweep", "status", "start_time", "end_time"]
    frame = pd.DataFrame(rows, columns=None if rows else empty)
    for column in ("start_time", "end_time"):
        frame[column] = pd.to_datetime(frame[column].astype(float), unit="ms", utc=True)
    frame = frame.sort_values("start_time", kind="stable").reset_index(drop=True)
    frame.attrs.update(experiment=experiment, experiment_id=exp_id, tracking_uri=uri)
    return frame


def run_artifacts(run_id: str, folder: str = "figures", tracking_uri: str | None = None) -> list[str]:
    """Paths of every file logged under ``folder`` of a run's artifacts, sub-folders included."""
    client, uri = client_for(tracking_uri)
    paths, todo = [], [folder]
    try:
        while todo:
            for item in client.list_artifacts(run_id, todo.pop()):
                (todo if item.is_dir else paths).append(item.path)
    except MlflowException as e:
        raise AnalysisError(f"cannot list the artifacts of run {run_id} at {uri}: "
                            f"{first_line(e.message, NO_MESSAGE)}") from None
    return sorted(paths)


def fetch_artifact(run_id: str, path: str, out_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """Download one artifact file of a run to ``out_dir/<path>`` (its folders kept: runs hold files of the
    same name in several folders); the local path."""
    client, uri = client_for(tracking_uri)
    folder = Path(out_dir, path).parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _no_progress_bar():
            return Path(client.download_artifacts(run_id, path, str(folder)))
    except (MlflowException, OSError) as e:
        message = first_line(e.message, NO_MESSAGE) if isinstance(e, MlflowException) else str(e)
        raise AnalysisError(f"cannot fetch artifact {path} of run {run_id} at {uri}: {message}") from None


@contextlib.contextmanager
def _no_progress_bar():
    """MLflow draws a progress bar per download on stderr; a report fetches a dozen files."""
    before = os.environ.get(PROGRESS_BAR)
    os.environ[PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROGRESS_BAR, None)
        else:
            os.environ[PROGRESS_BAR] = before


def export_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a load_runs() frame to parquet (pyarrow). Object columns that mix types (a param that
    is an int in one run and text in another) are written as text so that every row survives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = df.copy()
    for name in table.columns[table.dtypes == object]:
        kinds = {type(v) for v in table[name] if not _missing(v)}
        if kinds <= {int, float} and len(kinds) == 2:
            table[name] = table[name].astype(float)
        elif len(kinds) > 1:
            table[name] = table[name].map(lambda v: v if v is None else str(v))
    table.to_parquet(path, engine="pyarrow", index=False)
    return path


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        known = sorted(e.name for e in client.search_experiments())
        raise AnalysisError(f"no MLflow experiment named {name!r} at {uri} (experiments: {', '.join(known)})")
    return exp.experiment_id


def _search_all(client: MlflowClient, exp_id: str, filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=PAGE_SIZE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _frame(runs: list) -> pd.DataFrame:
    """Columns: FIRST_COLUMNS, params, user tags not already a column, parent_run_id, metrics (float)."""
    params = sorted({k for r in runs for k in r.data.params})
    metrics = sorted({k for r in runs for k in r.data.metrics})
    taken = set(params) | set(metrics) | set(FIRST_COLUMNS)
    tags = sorted({k for r in runs for k in r.data.tags if not k.startswith("mlflow.")} - taken - {ROLE_TAG})
    rows = [_row(r, tags) for r in runs]
    columns = {}
    for name in [*FIRST_COLUMNS, *params, *tags, "parent_run_id"]:
        if name in columns:
            continue
        values = pd.Series([row.get(name) for row in rows], dtype=object)
        columns[name] = values if values.isna().any() else values.infer_objects()
    for name in metrics:
        columns[name] = pd.Series([r.data.metrics.get(name) for r in runs], dtype=float)
    columns["start_time"] = pd.to_datetime(columns["start_time"].astype(float), unit="ms", utc=True)
    columns["end_time"] = pd.to_datetime(columns["end_time"].astype(float), unit="ms", utc=True)
    frame = pd.DataFrame(columns)
    frame.attrs.update(params=params, metrics=metrics)
    return frame


def _row(run, tags: list[str]) -> dict:
    info, data = run.info, run.data
    name = info.run_name or data.tags.get("mlflow.runName")
    row = {key: data.tags.get(key) for key in ("family", "dataset", SWEEP_TAG)}  # params override these below
    row.update({key: data.tags.get(key) for key in tags})
    row.update({key: cast_param(name, key, text) for key, text in data.params.items()})
    row.update(run_id=info.run_id, run_name=name, status=info.status,
               start_time=info.start_time, end_time=info.end_time, parent_run_id=data.tags.get(PARENT_TAG))
    return row


def stage_information(run_id: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """I(x; z_l) at the end of each progressive stage of one run (paper Fig. 5), from metric history.

    One row per stage (index ``stage``): ``step`` of the evaluation, ``mi_z1..mi_zL`` and, where
    logged, ``mi_total`` and ``mi_over``. A stage evaluated twice (stage end, then end of training)
    keeps its last evaluation.
    """
    client, uri = client_for(tracking_uri)
    try:
        run = client.get_run(run_id)
        levels = sorted(int(m.group(1)) for key in run.data.metrics if (m := _MI_KEY.fullmatch(key)))
        if not levels:
            raise AnalysisError(f"run {run_id} has no mi_z<l> metrics logged")
        keys = [f"mi_z{l}" for l in levels] + [k for k in ("mi_total", "mi_over") if k in run.data.metrics]
        history = {key: _last_per_step(client.get_metric_history(run_id, key)) for key in keys}
        stage_log = client.get_metric_history(run_id, "stage") if "stage" in run.data.metrics else []
    except MlflowException as e:
        raise AnalysisError(f"cannot read run {run_id} at {uri}: {first_line(e.message, NO_MESSAGE)}") from None
    steps = sorted(set().union(*(history[f"mi_z{l}"] for l in levels)))
    labels = label_stages(steps, [(m.step, m.timestamp, m.value) for m in stage_log])
    by_stage = {label: step for step, label in zip(steps, labels)}  # later evaluations win
    rows = [{"stage": s, "step": t, **{k: history[k].get(t, float("nan")) for k in keys}}
            for s, t in sorted(by_stage.items())]
    return pd.DataFrame(rows).set_index("stage")


def label_stages(eval_steps: list[int], stage_log: list[tuple[int, int, float]]) -> list[int]:
    """The progressive stage that each evaluation step (sorted) closes.

    Evaluations run at each stage end and once more at the end of training, usually at the same step
    as the last stage end. When there are no more distinct evaluation steps than stages, the i-th
    closes the i-th stage: no guess is needed about whether the ``stage`` value logged at a boundary
    step is the old stage or the new one. Otherwise an evaluation belongs to the stage last logged
    at or before its step. ``stage_log`` holds (step, timestamp, value).
    """
    stages = sorted({int(value) for _, _, value in stage_log})
    if not stages:
        return list(range(len(eval_steps)))
    if len(eval_steps) <= len(stages):
        return stages[: len(eval_steps)]
    ordered = sorted(stage_log)
    labels = []
    for step in eval_steps:
        before = [value for s, _, value in ordered if s <= step]
        labels.append(int(before[-1]) if before else stages[0])
    return labels


def _last_per_step(history: list) -> dict[int, float]:
    last = {}
    for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
        last[m.step] = m.value
    return last

