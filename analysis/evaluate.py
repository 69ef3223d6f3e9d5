"""The evaluation stage: the metric suite and UDR computed from the representations a sweep's trials stored,
as Ray tasks, into the same MLflow runs (docs/architecture.md §8.1, §4).

disentanglement_lib's pipeline inside the service: a trial trains and stores its representation at every
stage end (``representation/stage<s>.npz``); here any metric is computed from what is stored, so a metric
added later needs no retraining. One Ray task per run and stage scores the suite
(``provlae.metrics.scoring.score``); one per cell (the runs of one parent that differ only in their seed)
and stage compares the seeds (UDR). The driver reads the stored files, hands the tasks plain arrays and logs
each result into its run at the stage's step, in one batch with the tag ``provlae.evaluated.stage<s>`` that
names what is done: a rerun computes only what is missing, ``force`` everything again. Each cell's pairwise
UDR matrix goes to its parent run (``udr/<cell>_stage<s>.json``).

Bad input (an unknown metric, experiment or sweep, a stage no run stored) is an AnalysisError before
anything starts. A run without a representation (logged before they were stored) is listed once and
skipped; a damaged or foreign file is one line naming the run, which is skipped with nothing logged.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.record import (
    REPRESENTATION_DIR,
    evaluated_tag,
    representation_path,
    representation_stage,
    udr_path,
)
from analysis.runs import client_for, fetch_artifact, load_runs, run_artifacts
from provlae.metrics.names import SUITE, UDR, check_names
from provlae.representation import Representation, RepresentationError, read
from provlae.text import last_line

STAGES = ("last", "all")  # or one stage's number
MAX_NAMED = 10  # runs named in one line; the rest counted
CELL_FIXED = ("seed",)  # the params a cell's runs may differ in


@dataclass
class Job:
    """One run's representation at one stage, and what is still to compute from it."""

    run_id: str
    run_name: str
    seed: int | None
    stage: int
    cell: tuple  # (parent run, cell label): the runs UDR compares
    done: set[str]  # metric names already logged for this stage
    suite: tuple[str, ...] = ()  # the suite's metrics still to compute
    rep: Representation | None = None
    failed: str = ""  # why nothing was logged


@dataclass
class Outcome:
    """What one evaluation did: jobs scored, UDR cells compared, jobs up to date, failures (one line each)."""

    scored: int = 0
    cells: int = 0
    up_to_date: int = 0
    skipped_runs: list[str] = field(default_factory=list)  # no representation stored
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.scored} run-stage(s) scored", f"{self.cells} UDR cell(s) compared",
                 f"{self.up_to_date} already up to date"]
        if self.skipped_runs:
            parts.append(f"{len(self.skipped_runs)} run(s) without a representation skipped")
        if self.failures:
            parts.append(f"{len(self.failures)} failed")
        return "evaluation: " + ", ".join(parts)

    def report(self) -> int:
        """Print the summary and each failure on its own line; the exit status (1 when a run failed)."""
        print(self.summary())
        for line in self.failures:
            print(f"  {line}")
        return 1 if self.failures else 0


def parse_stage(stage) -> str | int:
    """"last", "all" or a stage's number (>= 0); AnalysisError otherwise."""
    text = str(stage).strip()
    if text in STAGES:
        return text
    if text.isdigit():
        return int(text)
    raise AnalysisError(f"--stage must be last, all or a stage's number (0, 1, ...), got {stage!r}")


def parse_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    """A comma-separated list (or a sequence) of metric names, ``all`` for every one; AnalysisError naming an
    unknown one."""
    try:
        return check_names(metrics)
    except ValueError as e:
        raise AnalysisError(f"--metrics: {e}") from None


def evaluate(experiment: str, tracking_uri: str | None = None, sweep: str | None = None,
             metrics: str | Sequence[str] = "all", stage: str | int = "last", force: bool = False,
             address: str | None = None, seed: int = 0, say: Callable[[str], None] = print) -> Outcome:
    """Compute ``metrics`` for every FINISHED trial run of ``experiment`` (``sweep``'s only, when given) that
    stores a representation, at its last stored stage, every stage, or stage ``stage``; log them into the
    runs. Joins Ray at ``address`` (or the one already up, else a local Ray it stops at the end). ``say``
    gets one progress line per run and per cell."""
    names = parse_metrics(metrics)
    wanted = parse_stage(stage)
    runs = load_runs(experiment, tracking_uri, sweep=sweep)
    uri = runs.attrs["tracking_uri"]
    outcome = Outcome()
    stored = {row.run_id: _stored_stages(row.run_id, uri) for row in runs.itertuples()}
    outcome.skipped_runs = [name for name, rid in zip(runs["run_name"], runs["run_id"]) if not stored[rid]]
    if len(outcome.skipped_runs) == len(runs):
        raise AnalysisError(f"no run of {_where(experiment, sweep)} stores a representation (runs logged "
                            f"before representations were stored: rerun their trials to store one)")
    jobs = plan(runs, stored, names, wanted, force)
    if outcome.skipped_runs:
        say(f"{len(outcome.skipped_runs)} run(s) store no representation (logged before representations were "
            f"stored), skipped: {_names(outcome.skipped_runs)}")
    if isinstance(wanted, int):
        without = [n for n, rid in zip(runs["run_name"], runs["run_id"]) if stored[rid] and wanted not in stored[rid]]
        if without:
            say(f"{len(without)} run(s) store no stage {wanted} (fewer stages), skipped: {_names(without)}")
    todo = [j for j in jobs if j.suite]
    cells = udr_cells(jobs, force) if UDR in names else {}
    in_cells = {id(j) for members in cells.values() for j in members}  # by identity: a Job holds arrays
    outcome.up_to_date = sum(1 for j in jobs if not j.suite and id(j) not in in_cells)
    if not todo and not cells:
        say(f"nothing to compute: {len(jobs)} run-stage(s) already hold {', '.join(names)} (--force recomputes)")
        return outcome
    with _ray(address), tempfile.TemporaryDirectory(prefix="provlae-evaluate-") as folder:
        _run(todo, cells, uri, folder, seed, outcome, say)
    return outcome


# -------------------------------------------------------------------------------------------- planning


def _stored_stages(run_id: str, uri: str) -> list[int]:
    paths = run_artifacts(run_id, REPRESENTATION_DIR, uri)
    return sorted(s for s in map(representation_stage, paths) if s is not None)


def plan(runs: pd.DataFrame, stored: dict[str, list[int]], names: tuple[str, ...], wanted: str | int,
         force: bool) -> list[Job]:
    """One Job per run and chosen stage; AnalysisError when a stage number is one no run stored."""
    if isinstance(wanted, int) and not any(wanted in s for s in stored.values()):
        every = sorted({s for stages in stored.values() for s in stages})
        raise AnalysisError(f"--stage {wanted} is out of range: the runs store stage(s) "
                            f"{', '.join(map(str, every))}")
    labels = cell_labels(runs)
    jobs = []
    for row in runs.itertuples():
        stages = stored[row.run_id]
        chosen = stages if wanted == "all" else stages[-1:] if wanted == "last" else [s for s in stages
                                                                                       if s == wanted]
        for s in chosen:
            column = evaluated_tag(s)
            tag = runs.at[row.Index, column] if column in runs.columns else None
            done = set(filter(None, tag.split(","))) if isinstance(tag, str) else set()
            jobs.append(Job(run_id=row.run_id, run_name=row.run_name, seed=_int(getattr(row, "seed", None)),
                            stage=s, cell=labels[row.Index], done=done,
                            suite=tuple(n for n in names if n in SUITE and (force or n not in done))))
    return jobs


def cell_labels(runs: pd.DataFrame) -> dict:
    """Per row: (parent run, label) of its cell, the runs of one parent whose params differ only in
    ``CELL_FIXED``. The label is ``<dataset>_<family>_beta<β>``, with a short hash of the other params where
    one parent has several cells of that name (a search's configurations)."""
    params = [p for p in runs.attrs.get("params", ()) if p in runs.columns and p not in CELL_FIXED]
    keys = {i: (runs.at[i, "parent_run_id"], tuple(str(runs.at[i, p]) for p in params)) for i in runs.index}
    names = {i: f"{runs.at[i, 'dataset']}_{runs.at[i, 'family']}_beta{_beta(runs.at[i, 'beta'])}"
             for i in runs.index}
    per_name: dict[tuple, set] = {}
    for i in runs.index:
        per_name.setdefault((keys[i][0], names[i]), set()).add(keys[i])
    labels = {}
    for i in runs.index:
        label = names[i]
        if len(per_name[(keys[i][0], label)]) > 1:
            label += "_" + hashlib.sha256(repr(keys[i][1]).encode()).hexdigest()[:8]
        labels[i] = (keys[i][0], label)
    return labels


def udr_cells(jobs: list[Job], force: bool) -> dict[tuple, list[Job]]:
    """The (cell, stage) groups whose UDR is to compute: two runs or more, and one of them without it."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.cell, job.stage), []).append(job)
    return {key: members for key, members in groups.items()
            if len(members) >= 2 and (force or any(UDR not in j.done for j in members))}


def _load(job: Job, uri: str, folder: str, outcome: Outcome, say) -> None:
    try:
        path = fetch_artifact(job.run_id, representation_path(job.stage), Path(folder, job.run_id), uri)
        job.rep = read(path)
    except (RepresentationError, AnalysisError) as e:
        job.failed = str(e).replace(str(Path(folder, job.run_id)) + "/", "")
        line = f"run {job.run_name} ({job.run_id}) stage {job.stage}: {job.failed}"
        outcome.failures.append(line)
        say(f"skipped {line}; nothing logged")


# ---------------------------------------------------------------------------------------------- running


class _ray:
    """Ray for the tasks: the one already up, else ``address`` joined or a local Ray, stopped at the end."""

    def __init__(self, address: str | None):
        self.address = address

    def __enter__(self):
        import ray

        from analysis.ray_cluster import init_ray

        self.started = not ray.is_initialized()
        init_ray(self.address)

    def __exit__(self, *exc):
        import ray

        if self.started:
            ray.shutdown()


def _score_task(codes: np.ndarray, factors: np.ndarray, metrics: tuple[str, ...], seed: int) -> dict:
    from provlae.metrics.scoring import score

    return score(codes, factors, metrics, seed=seed)


def _udr_task(means: list, kls: list, indices: list, seed: int) -> dict:
    from provlae.metrics.scoring import udr_scores

    start = time.perf_counter()
    return {**udr_scores(means, kls, indices, seed=seed), "seconds": time.perf_counter() - start}


def _run(todo: list[Job], cells: dict[tuple, list[Job]], uri: str, folder: str, seed: int, outcome: Outcome,
         say) -> None:
    """Read each representation and submit its tasks at once (a cell's UDR once its last run is read), so
    the tasks compute while the driver reads on; log each result as it comes back."""
    import ray

    client, _ = client_for(uri)
    score_remote = ray.remote(num_cpus=1)(_score_task)
    udr_remote = ray.remote(num_cpus=1)(_udr_task)
    unread = {key: len(members) for key, members in cells.items()}
    cells_of: dict[int, list[tuple]] = {}
    for key, members in cells.items():
        for job in members:
            cells_of.setdefault(id(job), []).append(key)
    order = {id(j): j for j in [*todo, *(j for c in cells.values() for j in c)]}.values()
    pending, progress = {}, [0, len(todo) + len(cells)]  # [done, expected]
    for job in sorted(order, key=lambda j: (j.cell[1], j.stage, j.seed is None, j.seed or 0)):
        _load(job, uri, folder, outcome, say)
        if job.suite:
            if job.rep is None:
                progress[1] -= 1
            else:
                pending[score_remote.remote(job.rep.codes, job.rep.factors, job.suite, seed)] = ("suite", job)
        for key in cells_of.get(id(job), []):
            unread[key] -= 1
            if unread[key] == 0:
                loaded = [j for j in cells[key] if j.rep is not None]
                if len(loaded) < 2:
                    progress[1] -= 1
                    say(f"udr {key[0][1]} stage {key[1]}: fewer than two runs with a readable representation; "
                        f"no UDR")
                    continue
                loaded.sort(key=lambda j: (j.seed is None, j.seed or 0))
                ref = udr_remote.remote([j.rep.codes for j in loaded], [j.rep.kl[j.rep.in_use] for j in loaded],
                                        [j.rep.index for j in loaded], seed)
                pending[ref] = ("udr", (key[0], key[1], loaded))
        _collect(pending, client, outcome, progress, say, block=False)
    _collect(pending, client, outcome, progress, say, block=True)


def _collect(pending: dict, client, outcome: Outcome, progress: list[int], say, block: bool) -> None:
    """Log the results of the finished tasks (``block``: of every task, waiting for them)."""
    import ray

    while pending:
        done, _ = ray.wait(list(pending), num_returns=len(pending) if not block else 1,
                           timeout=None if block else 0)
        if not done:
            return
        for ref in done:
            _report(ref, *pending.pop(ref), client, outcome, progress, say)


def _report(ref, kind: str, what, client, outcome: Outcome, progress: list[int], say) -> None:
    import ray

    progress[0] += 1
    count = f"[{progress[0]}/{progress[1]}]"
    try:
        result = ray.get(ref)
    except Exception as e:  # the task's error: its run (or cell) is left as it was
        name = what.run_name if kind == "suite" else what[0][1]
        outcome.failures.append(f"{kind} {name}: {last_line(str(e))}")
        say(f"{count} {name}: failed ({last_line(str(e))}); nothing logged")
        return
    if kind == "suite":
        _log_suite(client, what, result)
        outcome.scored += 1
        values = ", ".join(f"{k} {v:.3g}" for k, v in result["values"].items())
        notes = f" [{'; '.join(result['notes'])}]" if result["notes"] else ""
        say(f"{count} {what.run_name} stage {what.stage}: {values or 'no value'}{notes} "
            f"({sum(result['seconds'].values()):.1f} s)")
    else:
        cell, stage, members = what
        _log_udr(client, cell, stage, members, result)
        outcome.cells += 1
        scores = ", ".join(f"{_seed_name(j)} {s:.3g}" for j, s in zip(members, result["model_scores"]))
        say(f"{count} udr {cell[1]} stage {stage}: {scores} ({result['points']} images; "
            f"{result['seconds']:.1f} s)")


def _log_suite(client, job: Job, result: dict) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, job.rep.step) for key, value in result["values"].items()]
    job.done |= set(job.suite)
    _log(client, job, metrics)


def _log_udr(client, cell: tuple, stage: int, members: list[Job], result: dict) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    for job, value in zip(members, result["model_scores"]):
        job.done.add(UDR)
        _log(client, job, [Metric(UDR, float(value), now, job.rep.step)])
    parent, label = cell
    if parent is None or (isinstance(parent, float) and np.isnan(parent)):
        return
    record = {"cell": label, "stage": stage, "correlation": "lasso", "points": result["points"],
              "notes": result["notes"],
              "runs": [{"run_id": j.run_id, "run_name": j.run_name, "seed": j.seed, "step": j.rep.step, UDR: s}
                       for j, s in zip(members, result["model_scores"])],
              "pairwise": np.asarray(result["pairwise"]).tolist()}
    path = udr_path(label, stage)
    with tempfile.TemporaryDirectory(prefix="provlae-udr-") as folder:
        local = Path(folder, path.rsplit("/", 1)[-1])
        local.write_text(json.dumps(record, indent=1))
        client.log_artifact(parent, str(local), path.rsplit("/", 1)[0])


def _log(client, job: Job, metrics: list) -> None:
    """The values and the stage's evaluated tag in one batch: both land, or neither."""
    from mlflow.entities import RunTag

    tag = RunTag(evaluated_tag(job.stage), ",".join(sorted(job.done)))
    client.log_batch(job.run_id, metrics=metrics, tags=[tag])


# ---------------------------------------------------------------------------------------------- helpers


def _where(experiment: str, sweep: str | None) -> str:
    return f"sweep {sweep!r} of experiment {experiment!r}" if sweep else f"experiment {experiment!r}"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")


def _beta(value) -> str:
    return f"{float(value):g}" if pd.notna(value) else "none"


def _int(value) -> int | None:
    return int(value) if value is not None and pd.notna(value) else None


def _seed_name(job: Job) -> str:
    return f"seed {job.seed}" if job.seed is not None else job.run_name
