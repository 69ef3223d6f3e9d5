"""The study report: one self-contained HTML page that answers a sweep's questions (DESIGN §3.4).

    write_report("demo", "report/")                      # every sweep of the experiment, pooled
    write_report("demo", "report/", sweep="full_grid-demo")

``report/index.html`` holds, from top to bottom: what was run (sweeps, preset, axes, trial counts,
hardware, wall time), the top-k table per dataset, Fig. 2 and Fig. 3 per dataset, the family comparison
(who leads each metric at its best β, by how much, and whether the paper's pro-VLAE > VLAE > β-VAE
ordering on MIG and MIG-sup holds), and for the best run of each family its Fig. 5 panels and final
traversal, fetched from the run's artifacts, with links into the MLflow UI.

Every image is inlined (a ``data:`` URI), so the page renders on its own and as an MLflow artifact (the
UI shows HTML artifacts from a blob URL, where relative links resolve to nothing); the same PNG files
are also written beside it under ``images/``. The page is built in a temporary folder next to ``out``
and moved into place only when complete: bad input leaves nothing half-written.
"""
from __future__ import annotations

import base64
import html
import numbers
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, urlparse

import pandas as pd

from analysis.errors import AnalysisError
from analysis.figures import LABELS, write_figures, write_stage_figure
from analysis.runs import fetch_artifact, load_runs, load_sweeps, run_artifacts, select_sweep, stage_information
from analysis.topk import (
    LOWER_IS_BETTER,
    METRICS,
    PAPER_ORDER,
    available_metrics,
    check_metric,
    compare,
    finished,
    paper_ordering,
    top_k,
    wide,
)
from provlae.models.families import family_names

ORDERING_WORDS = {True: "holds", False: "does not hold", None: "cannot be checked"}
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local (sqlite / file) store by default
# MLflow 3's UI opens on its GenAI side ("Overview": traces, tokens) unless told otherwise, whatever the
# experiment's kind tag; this query selects its "Model training" side (older UIs ignore it).
TRAINING_VIEW = "?workflowType=machine_learning"
DEFAULT_BEST_BY = "mig_sup"  # the paper's proposed metric picks each family's best run
SWEEP_AXES = ("preset", "datasets", "families", "betas", "seeds", "overrides", "fuse")
STAGE_FIGURE = re.compile(r"figures/stage(\d+)/(information|traversal)\.png")
LEVEL_FIGURE = re.compile(r"figures/(traversal|prior)_z(\d+)\.png")


# ------------------------------------------------------------------------------------------ links


def ui_base(tracking_uri: str, ui_url: str | None = None) -> str:
    """The MLflow UI's address: ``ui_url``, else a tracking server's own URL, else `mlflow ui`'s default."""
    if ui_url:
        return ui_url.rstrip("/")
    return tracking_uri.rstrip("/") if urlparse(tracking_uri).scheme in ("http", "https") else LOCAL_UI


def runs_table_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table, in the UI's model-training view."""
    return f"{base}/#/experiments/{quote(str(experiment_id))}/runs{TRAINING_VIEW}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{quote(str(experiment_id))}/runs/{quote(run_id)}{TRAINING_VIEW}"


# ------------------------------------------------------------------------------------- the study


@dataclass
class Study:
    """What the page shows, read from MLflow before anything is written (the figure files themselves
    are fetched into the page's temporary folder while it is built)."""

    experiment: str
    experiment_id: str
    tracking_uri: str
    ui: str
    sweeps: list[str]  # the sweeps pooled (tag ``sweep`` of the trial runs)
    trials: pd.DataFrame  # every trial run of those sweeps, any status
    parents: pd.DataFrame  # their parent runs (load_sweeps), where logged
    top: pd.DataFrame  # top_k of the FINISHED runs
    k: int
    rank_by: str | None
    best_by: str
    artifacts: dict[str, list[str]] = field(default_factory=dict)  # run_id -> figure artifact paths

    @property
    def done(self) -> pd.DataFrame:
        return finished(self.trials)


def gather(experiment: str, tracking_uri: str | None = None, sweep: str | None = None, k: int = 3,
           rank_by: str | None = None, best_by: str | None = None, ui_url: str | None = None) -> Study:
    """Read the study of ``experiment`` (only ``sweep``'s runs if given); AnalysisError on bad input."""
    trials = load_runs(experiment, tracking_uri, include_failed=True)
    uri = trials.attrs["tracking_uri"]
    trials = select_sweep(trials, sweep)
    names = sorted({s for s in trials.get("sweep", pd.Series(dtype=object)).dropna()})
    if finished(trials).empty:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(trials["status"].value_counts().items()))
        where = f"sweep {sweep!r}" if sweep else f"experiment {experiment!r}"
        raise AnalysisError(f"{where} has no FINISHED trial runs ({counts})")
    top = top_k(trials, k=k, rank_by=rank_by)
    best_by = check_metric(trials, best_by or rank_by or _default_best_by(trials), "best-by metric")
    parents = load_sweeps(experiment, uri)
    parents = parents[parents["sweep"].isin(names)]
    study = Study(experiment, trials.attrs["experiment_id"], uri, ui_base(uri, ui_url), names, trials,
                  parents, top, k, rank_by, best_by)
    for run in best_runs(study).itertuples():
        study.artifacts[run.run_id] = run_artifacts(run.run_id, "figures", uri)
    return study


def _default_best_by(trials: pd.DataFrame) -> str:
    available = available_metrics(trials)
    return DEFAULT_BEST_BY if DEFAULT_BEST_BY in available else next(
        (m for m in METRICS if m in available), DEFAULT_BEST_BY)


def best_runs(study: Study) -> pd.DataFrame:
    """The best FINISHED run of each (dataset, family) by ``study.best_by``, in the families' display order."""
    runs = study.done[study.done[study.best_by].notna()]
    lower = study.best_by in LOWER_IS_BETTER
    ordered = runs.sort_values([study.best_by, "seed"], ascending=[lower, True], kind="stable")
    best = ordered.drop_duplicates(["dataset", "family"])
    return best.sort_values(["dataset", "family"], key=_family_key, kind="stable").reset_index(drop=True)


def _family_key(column: pd.Series) -> pd.Series:
    """Sort key: registered families in display order (others after them, by name); other columns as
    they are."""
    if column.name != "family":
        return column
    known = family_names()
    return column.map(lambda f: f"{known.index(f) if f in known else len(known):03d} {f}")


# ------------------------------------------------------------------------------- writing the page


def write_report(experiment: str, out: str | Path, tracking_uri: str | None = None, sweep: str | None = None,
                 k: int = 3, rank_by: str | None = None, best_by: str | None = None,
                 ui_url: str | None = None) -> Path:
    """Write ``out/index.html`` (and ``out/images/``); returns the page's path. ``out`` may hold an
    earlier report, which is replaced whole; any other existing content is refused."""
    out = Path(out).expanduser().absolute()
    _check_out(out)
    study = gather(experiment, tracking_uri, sweep, k, rank_by, best_by, ui_url)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.with_name(f".{out.name}-{secrets.token_hex(4)}")  # same filesystem: moved in one rename
    building.mkdir()
    try:
        page = Page(building)
        (building / "index.html").write_text(render(study, page), encoding="utf-8")
        _publish(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out / "index.html"


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "index.html").is_file())):
        raise AnalysisError(f"--out {out} exists and is not a report folder (no index.html): pick another")


def _publish(building: Path, out: Path) -> None:
    """Move the finished folder into place; an earlier report there is replaced."""
    _check_out(out)
    if not out.exists():
        building.rename(out)
        return
    old = out.with_name(f".{out.name}-old-{os.getpid()}")
    out.rename(old)
    building.rename(out)
    shutil.rmtree(old, ignore_errors=True)


class Page:
    """Images of the page: written under ``root/images`` and inlined as data URIs."""

    def __init__(self, root: Path):
        self.root = root
        self.images = root / "images"
        self.images.mkdir()

    def img(self, path: Path, alt: str, source: str = "") -> str:
        """An <img> of the PNG at ``path`` (already under images/), inlined; ``source`` names its origin."""
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        rel = path.relative_to(self.root).as_posix()
        origin = f' data-artifact="{_e(source)}"' if source else ""
        return (f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}" data-file="{_e(rel)}"{origin}>')

    def figure(self, path: Path, caption: str, source: str = "", wide: bool = False) -> str:
        cls = ' class="wide"' if wide else ""
        image = self.img(path, caption, source)
        return f"<figure{cls}>{image}<figcaption>{_e(caption)}</figcaption></figure>"


def render(study: Study, page: Page) -> str:
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    scope = (f"sweep {study.sweeps[0]}" if len(study.sweeps) == 1 else
             f"{len(study.sweeps)} sweeps pooled" if study.sweeps else "untagged runs")
    table_url = runs_table_url(study.ui, study.experiment_id)
    body = [
        f"<h1>provlae study report: {_e(study.experiment)} <small>({_e(scope)})</small></h1>",
        f'<p class="meta">Generated {_e(generated)} from {_e(study.tracking_uri)}. '
        f'<a href="{_e(table_url)}">Runs table in the MLflow UI</a> ({_e(table_url)}).</p>',
        section_summary(study),
        section_what_was_run(study),
        section_top_k(study),
        section_figures(study, page),
        section_comparison(study),
        section_best_runs(study, page),
    ]
    return _document(_e(f"provlae report: {study.experiment}"), "\n".join(body))


# ------------------------------------------------------------------------------------- summary


def section_summary(study: Study) -> str:
    """The answer first: per dataset, who leads each metric and whether the paper's ordering holds."""
    done, total = len(study.done), len(study.trials)
    items = []
    comparison, ordering = compare(study.top), paper_ordering(study.top)
    for dataset, group in comparison.groupby("dataset", sort=True):
        leads = "; ".join(f"{LABELS.get(r.metric, r.metric)}: {r.leader} (β={r.leader_beta:g}, "
                          f"{r.leader_value:.4g})" for r in group.itertuples())
        verdicts = "; ".join(f"on {LABELS.get(r.metric, r.metric)} {ORDERING_WORDS[r.holds]}"
                             for r in ordering[ordering["dataset"] == dataset].itertuples())
        items.append(f"<li><b>{_e(dataset)}</b>: leaders at their best β: {_e(leads)}. The paper's ordering "
                     f"{_e(' > '.join(PAPER_ORDER))} {_e(verdicts)}.</li>")
    incomplete = int(wide(study.top)["incomplete"].sum())
    note = (f" {incomplete} cell(s) have fewer than {study.k} finished seeds: their numbers are less certain."
            if incomplete else "")
    return (f'<div class="summary" id="summary"><p>{done} of {total} trial runs finished.{_e(note)}</p>'
            f"<ul>{''.join(items)}</ul></div>")


# --------------------------------------------------------------------------------- what was run


def section_what_was_run(study: Study) -> str:
    """One column per sweep: its description (the parent run's params), trial and cell counts, hardware,
    wall time and compute time; then the failed runs' errors."""
    pooled = ", ".join(study.sweeps) if study.sweeps else "runs without a sweep tag"
    columns = [_sweep_column(study, name) for name in study.sweeps]
    if _untagged(study.trials).any():
        columns.append(_sweep_column(study, None))
    names = [c.pop("_name") for c in columns]
    rows = [[f"<th>{_e(field)}</th>", *(c[field] for c in columns)] for field in columns[0]]
    head = ["sweep", *names]
    parts = [f"<h2>What was run</h2><p>Pooled: {_e(pooled)}. Cells are (dataset, family, β); a cell is "
             f"complete with {study.k} finished seeds.</p>", _table(head, rows, cls="sweeps", id_="sweeps")]
    failed = study.trials[study.trials["status"] == "FAILED"]
    if not failed.empty:
        items = [f"<li>{_e(r.run_name)}: {_e(_first(getattr(r, 'error', None)))}</li>"
                 for r in failed.head(20).itertuples()]
        more = f"<li>... and {len(failed) - 20} more</li>" if len(failed) > 20 else ""
        parts.append(f"<details><summary>{len(failed)} failed trial run(s)</summary><ul>{''.join(items)}"
                     f"{more}</ul></details>")
    return "\n".join(parts)


def _sweep_column(study: Study, name: str | None) -> dict[str, str]:
    """Field -> HTML cell of one sweep (``name`` None: the runs without a sweep tag)."""
    mine = _untagged(study.trials) if name is None else study.trials["sweep"] == name
    trials = study.trials[mine]
    parent = study.parents[study.parents["sweep"] == name].head(1) if name else study.parents.head(0)
    described = parent.iloc[0].to_dict() if len(parent) else {}
    status = trials["status"].value_counts()
    planned = described.get("trials")
    n_done, n_failed = int(status.get("FINISHED", 0)), int(status.get("FAILED", 0))
    cells = _cell_counts(trials, study.k)
    column = {"_name": name or "(no sweep tag)"}
    column.update({axis: _e(_text(described.get(axis))) for axis in SWEEP_AXES})
    column.update({
        "trials planned": _e(_text(planned)),
        "trial runs": _num(len(trials), "n_runs"),
        "finished": _num(n_done, "n_finished"),
        "failed": _num(n_failed, "n_failed"),
        "running / killed": _num(len(trials) - n_done - n_failed, "n_other"),
        "not started": _e(_text(max(int(planned) - len(trials), 0) if _is_number(planned) else None)),
        "cells": _num(cells[0], "n_cells"),
        f"incomplete cells (1 to {study.k - 1} finished seeds)": _num(cells[1], "n_incomplete_cells"),
        "cells with none finished": _num(cells[2], "n_empty_cells"),
        "hardware": _e(_hardware(trials)),
        "wall time": _wall_time(trials, described),
        "compute (sum over trial runs)": _seconds_cell(_seconds(trials).sum()),
        "parent run": (f'<a href="{_e(run_url(study.ui, study.experiment_id, described["run_id"]))}">'
                       f'{_e(described["status"])}</a>') if described else "-",
    })
    return column


def _untagged(trials: pd.DataFrame) -> pd.Series:
    return trials["sweep"].isna() if "sweep" in trials else pd.Series(True, index=trials.index)


def _cell_counts(trials: pd.DataFrame, k: int) -> tuple[int, int, int]:
    """(cells, cells with 1..k-1 finished seeds, cells with none finished) of these trial runs."""
    if trials.empty:
        return 0, 0, 0
    done = (trials["status"] == "FINISHED").groupby([trials[c] for c in ("dataset", "family", "beta")]).sum()
    return len(done), int(((done > 0) & (done < k)).sum()), int((done == 0).sum())


def _hardware(trials: pd.DataFrame) -> str:
    if "hardware" in trials and trials["hardware"].notna().any():
        kinds = trials["hardware"].dropna().value_counts()
    else:  # runs logged before the hardware tag: the device param is all there is
        kinds = (("device " + trials["device"].astype(str)).value_counts() if "device" in trials
                 else pd.Series(dtype=int))
    if len(kinds) == 1:
        return str(kinds.index[0])
    return "; ".join(f"{name} ({n} runs)" for name, n in kinds.items()) or "-"


def _wall_time(trials: pd.DataFrame, parent: dict) -> str:
    """The parent run's start to end; the trial runs' first start and last end where it has none."""
    start, end = parent.get("start_time"), parent.get("end_time")
    start = start if start is not None and pd.notna(start) else trials["start_time"].min()
    end = end if end is not None and pd.notna(end) else trials["end_time"].max()
    if pd.isna(start) or pd.isna(end):
        return "-"
    return _seconds_cell((end - start).total_seconds(), f" (from {start:%Y-%m-%d %H:%M} UTC)")


def _seconds_cell(seconds: float, suffix: str = "") -> str:
    value = "" if pd.isna(seconds) else f' data-seconds="{seconds:.3f}"'
    return f"<td{value}>{_e(_duration(seconds) + suffix)}</td>"


def _seconds(trials: pd.DataFrame) -> pd.Series:
    return (trials["end_time"] - trials["start_time"]).dt.total_seconds().dropna()


def _duration(seconds: float) -> str:
    if pd.isna(seconds):
        return "-"
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


# ---------------------------------------------------------------------------------- the top-k table


def section_top_k(study: Study) -> str:
    ranked = f"seeds picked by {study.rank_by}" if study.rank_by else "each metric ranked by itself"
    parts = [f"<h2>Top-{study.k} per dataset</h2>",
             f"<p>Mean ± sample std of the {study.k} best seeds per (family, β) cell ({_e(ranked)}), "
             f"as the paper reports; FINISHED runs only. Ranking metric: "
             f"<b>{_e(study.rank_by or 'each metric itself')}</b>. Bold: the best cell of a column "
             f"(↑ higher is better, ↓ lower).</p>"]
    cells = wide(study.top)
    runs = study.top.groupby(["dataset", "family", "beta"])["n_runs"].max()
    for dataset, group in cells.groupby("dataset", sort=True):
        group = group.sort_values(["family", "beta"], key=_family_key, kind="stable")
        metrics = [m for m in METRICS if m in group and group[m].notna().any()]
        best = {m: (group[m].min() if m in LOWER_IS_BETTER else group[m].max()) for m in metrics}
        arrows = {m: "↓" if m in LOWER_IS_BETTER else "↑" for m in metrics}
        head = ["family", "β", *(f"{LABELS.get(m, m)} {arrows[m]}" for m in metrics), "finished runs", "note"]
        rows = []
        for cell in group.to_dict("records"):
            n = int(runs.get((dataset, cell["family"], cell["beta"]), 0))
            rows.append([_e(cell["family"]), _e(f"{cell['beta']:g}"),
                         *(_metric_cell(m, cell[m], cell[f"{m}_std"], cell[m] == best[m]) for m in metrics),
                         _e(n), "incomplete" if cell["incomplete"] else ""])
        parts.append(f"<h3>{_e(dataset)}</h3>")
        parts.append(_table(head, rows, cls="topk", id_=f"topk-{dataset}", data={"dataset": dataset}))
    return "\n".join(parts)


def _metric_cell(metric: str, mean: float, std: float, best: bool) -> str:
    if pd.isna(mean):
        return "-"
    text = f"{mean:.4g} ± {std:.2g}" if pd.notna(std) else f"{mean:.4g}"
    std_attr = f' data-std="{std!r}"' if pd.notna(std) else ""
    inner = f"<b>{_e(text)}</b>" if best else _e(text)
    return f'<td data-metric="{metric}" data-mean="{mean!r}"{std_attr}>{inner}</td>'


# ------------------------------------------------------------------------------------- figures


def section_figures(study: Study, page: Page) -> str:
    paths = write_figures(study.top, page.images)
    parts = ["<h2>Fig. 2 and Fig. 3</h2>",
             f"<p>Each point a (family, β) cell's top-{study.k} mean with its std as error bars, labelled "
             f"by β; hollow points have fewer than {study.k} seeds. Fig. 2: reconstruction error against "
             f"each disentanglement metric; Fig. 3: MIG against MIG-sup (better is top right).</p>"]
    for path in paths:
        kind, dataset = path.stem.split("_", 1)
        caption = {"fig2": "Fig. 2", "fig3": "Fig. 3"}.get(kind, kind) + f": {dataset}"
        parts.append(page.figure(path, caption, wide=kind == "fig2"))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------- comparison


def section_comparison(study: Study) -> str:
    parts = ["<h2>Family comparison</h2>",
             f"<p>Each family at its best β (top-{study.k} mean); the leader of each metric and its margin "
             f"over the runner-up.</p>"]
    comparison = compare(study.top)
    ordering = paper_ordering(study.top)
    for dataset, group in comparison.groupby("dataset", sort=True):
        head = ["metric", "leader", "β", "value", "runner-up", "β", "value", "margin"]
        rows = [[_e(LABELS.get(r.metric, r.metric)), _e(r.leader), _e(f"{r.leader_beta:g}"),
                 _e(f"{r.leader_value:.4g}"), _e(r.runner_up or "-"), _e(_fmt(r.runner_up_beta, "g")),
                 _e(_fmt(r.runner_up_value)), _e(_fmt(r.margin, ".3g"))] for r in group.itertuples()]
        parts.append(f"<h3>{_e(dataset)}</h3>")
        parts.append(_table(head, rows, cls="compare", id_=f"compare-{dataset}", data={"dataset": dataset}))
        parts.append("<ul>" + "".join(f"<li>{_e(_leader_sentence(r, study.k))}</li>"
                                      for r in group.itertuples()) + "</ul>")
        parts.append(_ordering_list(ordering[ordering["dataset"] == dataset], study.k))
    return "\n".join(parts)


def _leader_sentence(row, k: int) -> str:
    name = LABELS.get(row.metric, row.metric)
    text = f"{name}: {row.leader} leads at β={row.leader_beta:g} ({row.leader_value:.4g})"
    if row.runner_up is None:
        text += ", the only family with this metric"
    else:
        better = "lower" if row.metric in LOWER_IS_BETTER else "higher"
        text += (f", {row.margin:.3g} {better} than {row.runner_up} at β={row.runner_up_beta:g} "
                 f"({row.runner_up_value:.4g})")
    return text + (f" [fewer than {k} seeds]" if row.leader_incomplete else "") + "."


def _ordering_list(rows: pd.DataFrame, k: int) -> str:
    """The paper's ordering, one line per metric: holds / does not hold / cannot be checked."""
    items = []
    order = " > ".join(PAPER_ORDER)
    for r in rows.itertuples():
        name = LABELS.get(r.metric, r.metric)
        chain = " > ".join(f"{f} {v:.4g} (β={b:g})" for f, (b, v) in r.values.items())
        if r.holds is None:
            verdict, text = "unknown", f"cannot be checked: no finished {', '.join(r.missing)} runs report it"
        elif r.holds:
            verdict, text = "holds", f"holds here: {chain}"
        else:
            ranked = sorted(r.values.items(), key=lambda item: -item[1][1])
            verdict = "fails"
            text = "does not hold here: " + " > ".join(f"{f} {v:.4g} (β={b:g})" for f, (b, v) in ranked)
        items.append(f'<li class="ordering {verdict}" data-dataset="{_e(r.dataset)}" '
                     f'data-metric="{_e(r.metric)}" data-holds="{verdict}">'
                     f"The paper's ordering {_e(order)} on {_e(name)} {_e(text)}.</li>")
    note = f"<p class=\"note\">Cells with fewer than {k} seeds count as they are; see the table's notes.</p>"
    return f"<ul>{''.join(items)}</ul>{note}" if items else ""


# --------------------------------------------------------------------------------- best runs


def section_best_runs(study: Study, page: Page) -> str:
    parts = ["<h2>Best run of each family</h2>",
             f"<p>Per dataset, each family's FINISHED run with the best "
             f"{_e(LABELS.get(study.best_by, study.best_by))}: "
             f"its Fig. 5 panels (images sampled from each level's prior, I(x; z_l) beside them, per "
             f"progressive stage), I(x; z_l) per stage from its logged metrics, and its final traversal "
             f"(Fig. 4), from the run's artifacts.</p>"]
    for run in best_runs(study).to_dict("records"):
        parts.append(_best_run(study, page, run))
    return "\n".join(parts)


def _best_run(study: Study, page: Page, run: dict) -> str:
    url = run_url(study.ui, study.experiment_id, run["run_id"])
    metrics = ", ".join(f"{LABELS.get(m, m)} {run[m]:.4g}" for m in METRICS if m in run and pd.notna(run[m]))
    parts = [f'<section class="run" data-run-id="{_e(run["run_id"])}" data-dataset="{_e(run["dataset"])}" '
             f'data-family="{_e(run["family"])}">',
             f"<h3>{_e(run['dataset'])}: {_e(run['family'])} &mdash; "
             f'<a href="{_e(url)}">{_e(run["run_name"])}</a></h3>',
             f"<p>β={_e(format(run['beta'], 'g'))}, seed {_e(run['seed'])}: {_e(metrics)}. "
             f'<a href="{_e(url)}">Open the run in the MLflow UI</a>.</p>']
    folder = page.images / "runs" / _safe(run["run_name"])
    chosen = pick_figures(study.artifacts.get(run["run_id"], []))
    figures = [page.figure(fetch_artifact(run["run_id"], path, folder, study.tracking_uri), caption, path)
               for path, caption in chosen["information"]]
    measured = any(k.startswith("mi_z") and pd.notna(v) for k, v in run.items())
    info = stage_information(run["run_id"], study.tracking_uri) if measured else None
    if info is not None and not info.empty:
        drawn = write_stage_figure(info, run["run_name"], folder / "fig5_from_metrics.png")
        figures.append(page.figure(drawn, "I(x; z_l) at each stage end, from the run's mi_z<l> metrics"))
    figures += [page.figure(fetch_artifact(run["run_id"], path, folder, study.tracking_uri), caption, path)
                for path, caption in chosen["traversal"]]
    if not figures:
        figures.append('<p class="note">This run logged no figures.</p>')
    return "\n".join([*parts, '<div class="figures">', *figures, "</div></section>"])


def pick_figures(paths: list[str]) -> dict[str, list[tuple[str, str]]]:
    """The artifacts to show of one run: {"information": [(path, caption)], "traversal": [...]}.

    Newer runs hold, per stage s, ``figures/stage<s>/information.png`` (Fig. 5: per level, prior samples
    with I(x; z_l) beside them) and ``figures/stage<s>/traversal.png`` (Fig. 4), the last stage's also
    as ``figures/information.png`` and ``figures/traversal.png``. Older runs hold
    ``figures/information_per_stage.png``, ``figures/prior_z<l>.png`` and ``figures/traversal_z<l>.png``.
    The newer names win; each falls back to the older ones.
    """
    present = set(paths)
    stages = {kind: sorted((int(m.group(1)), p) for p in paths if (m := STAGE_FIGURE.fullmatch(p))
                           and m.group(2) == kind) for kind in ("information", "traversal")}
    levels = {kind: sorted((int(m.group(2)), p) for p in paths if (m := LEVEL_FIGURE.fullmatch(p))
                           and m.group(1) == kind) for kind in ("traversal", "prior")}
    if stages["information"]:
        information = [(p, f"Fig. 5, stage {s}: prior samples and I(x; z_l) per level")
                       for s, p in stages["information"]]
    elif "figures/information.png" in present:
        information = [("figures/information.png",
                        "Fig. 5, final stage: prior samples and I(x; z_l) per level")]
    else:
        information = ([("figures/information_per_stage.png", "I(x; z_l) per level at each stage end")]
                       if "figures/information_per_stage.png" in present else [])
        information += [(p, f"z{l} sampled from the prior, the other levels fixed")
                        for l, p in levels["prior"]]
    if "figures/traversal.png" in present:
        traversal = [("figures/traversal.png", "Fig. 4: traversals of every level, final model")]
    elif stages["traversal"]:
        s, p = stages["traversal"][-1]
        traversal = [(p, f"Fig. 4: traversals of every level, stage {s}")]
    else:
        traversal = [(p, f"traversal of z{l} (-2.5 .. 2.5), final model") for l, p in levels["traversal"]]
    return {"information": information, "traversal": traversal}


# ---------------------------------------------------------------------------------- html helpers


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table(head: list[str], rows: list[list[str]], cls: str, id_: str, data: dict | None = None) -> str:
    """Rows hold HTML already escaped: plain cells, or whole ``<td>`` / ``<th>`` elements."""
    attrs = "".join(f' data-{k}="{_e(v)}"' for k, v in (data or {}).items())
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(c if c.startswith(("<td", "<th")) else f"<td>{c}</td>" for c in row)
                   + "</tr>" for row in rows)
    return (f'<table class="{cls}" id="{_e(id_)}"{attrs}><thead><tr>{header}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _num(value: int, name: str) -> str:
    return f'<td data-count="{name}">{_e(value)}</td>'


def _text(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value == "":
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fmt(value, spec: str = ".4g") -> str:
    return "-" if value is None or pd.isna(value) else format(value, spec)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and pd.notna(value)


def _first(text) -> str:
    lines = [s for s in str(text or "").strip().splitlines() if s.strip()]
    return lines[-1][:300] if lines else "unknown error"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(name)) or "run"


def _document(title: str, body: str) -> str:
    """The page around ``body`` (both escaped already)."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


CSS = """
body { font-family: system-ui, -apple-system, "DejaVu Sans", sans-serif; margin: 1.5rem auto;
       max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.4; }
h1 small { font-weight: normal; color: #666; font-size: 60%; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: 90%; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
table.wide { display: block; overflow-x: auto; }
td[data-metric] { font-variant-numeric: tabular-nums; white-space: nowrap; }
.meta, .note { color: #555; font-size: 90%; }
li.holds::marker { content: "✔ "; color: #1a7f37; }
li.fails::marker { content: "✘ "; color: #cf222e; }
li.unknown::marker { content: "? "; color: #888; }
figure { display: inline-block; margin: .5rem 1rem .5rem 0; vertical-align: top;
         max-width: min(100%, 520px); }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure.wide { max-width: 100%; }
table.sweeps th:first-child { white-space: nowrap; }
.summary { background: #f6f8fa; border: 1px solid #d0d7de; padding: .5rem 1rem; }
figcaption { font-size: 85%; color: #555; }
section.run { border-top: 1px dashed #ccc; margin-top: 1rem; }
"""
