"""The sections of a study report, top to bottom: the summary, what was run, the top-k table, the metric
suite, Fig. 2 and Fig. 3, the family comparison and each family's best run (docs/architecture.md §8).
"""
from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd

from analysis.figures import LABELS, write_figures, write_stage_figure
from analysis.page import Page, cell_text, count_cell, document, esc, fmt, is_number, safe_name, table
from analysis.record import LOWER_IS_BETTER
from analysis.runs import fetch_artifact, stage_information
from analysis.study import Study, best_runs, family_key, pick_figures, run_url, runs_table_url
from analysis.topk import METRICS, SUITE_METRICS, compare, paper_order, paper_ordering, udr_agreement, wide
from provlae.text import last_line

ORDERING_WORDS = {True: "holds", False: "does not hold", None: "cannot be checked"}
SWEEP_AXES = ("preset", "datasets", "families", "betas", "seeds", "overrides", "fuse")


def render(study: Study, page: Page) -> str:
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    scope = (f"sweep {study.sweeps[0]}" if len(study.sweeps) == 1 else
             f"{len(study.sweeps)} sweeps pooled" if study.sweeps else "untagged runs")
    table_url = runs_table_url(study.ui, study.experiment_id)
    body = [
        f"<h1>provlae study report: {esc(study.experiment)} <small>({esc(scope)})</small></h1>",
        f'<p class="meta">Generated {esc(generated)} from {esc(study.tracking_uri)}. '
        f'<a href="{esc(table_url)}">Runs table in the MLflow UI</a> ({esc(table_url)}).</p>',
        section_summary(study),
        section_what_was_run(study),
        section_top_k(study),
        section_suite(study),
        section_figures(study, page),
        section_comparison(study),
        section_best_runs(study, page),
    ]
    return document(esc(f"provlae report: {study.experiment}"), "\n".join(body))


# ------------------------------------------------------------------------------------- summary


def section_summary(study: Study) -> str:
    """The answer first: per dataset, who leads each metric and whether the paper's ordering holds."""
    done, total = len(study.done), len(study.trials)
    items = []
    comparison, ordering = compare(study.top[study.top["metric"].isin(METRICS)]), paper_ordering(study.top)
    for dataset, group in comparison.groupby("dataset", sort=True):
        leads = "; ".join(f"{LABELS.get(r.metric, r.metric)}: {r.leader} (β={r.leader_beta:g}, "
                          f"{r.leader_value:.4g})" for r in group.itertuples())
        verdicts = "; ".join(f"on {LABELS.get(r.metric, r.metric)} {ORDERING_WORDS[r.holds]}"
                             for r in ordering[ordering["dataset"] == dataset].itertuples())
        items.append(f"<li><b>{esc(dataset)}</b>: leaders at their best β: {esc(leads)}. The paper's ordering "
                     f"{esc(' > '.join(paper_order()))} {esc(verdicts)}.</li>")
    incomplete = int(wide(study.top)["incomplete"].sum())
    note = (f" {incomplete} cell(s) have fewer than {study.k} finished seeds: their numbers are less certain."
            if incomplete else "")
    return (f'<div class="summary" id="summary"><p>{done} of {total} trial runs finished.{esc(note)}</p>'
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
    rows = [[f"<th>{esc(field)}</th>", *(c[field] for c in columns)] for field in columns[0]]
    head = ["sweep", *names]
    parts = [f"<h2>What was run</h2><p>Pooled: {esc(pooled)}. Cells are (dataset, family, β); a cell is "
             f"complete with {study.k} finished seeds.</p>", table(head, rows, cls="sweeps", id_="sweeps")]
    failed = study.trials[study.trials["status"] == "FAILED"]
    if not failed.empty:
        items = [f"<li>{esc(r.run_name)}: {esc(last_line(getattr(r, 'error', None)))}</li>"
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
    column.update({axis: esc(cell_text(described.get(axis))) for axis in SWEEP_AXES})
    column.update({
        "trials planned": esc(cell_text(planned)),
        "trial runs": count_cell(len(trials), "n_runs"),
        "finished": count_cell(n_done, "n_finished"),
        "failed": count_cell(n_failed, "n_failed"),
        "running / killed": count_cell(len(trials) - n_done - n_failed, "n_other"),
        "not started": esc(cell_text(max(int(planned) - len(trials), 0) if is_number(planned) else None)),
        "cells": count_cell(cells[0], "n_cells"),
        f"incomplete cells (1 to {study.k - 1} finished seeds)": count_cell(cells[1], "n_incomplete_cells"),
        "cells with none finished": count_cell(cells[2], "n_empty_cells"),
        "hardware": esc(_hardware(trials)),
        "wall time": _wall_time(trials, described),
        "compute (sum over trial runs)": _seconds_cell(_seconds(trials).sum()),
        "parent run": (f'<a href="{esc(run_url(study.ui, study.experiment_id, described["run_id"]))}">'
                       f'{esc(described["status"])}</a>') if described else "-",
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
    return f"<td{value}>{esc(_duration(seconds) + suffix)}</td>"


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
             f"<p>Mean ± sample std of the {study.k} best seeds per (family, β) cell ({esc(ranked)}), "
             f"as the paper reports; FINISHED runs only. Ranking metric: "
             f"<b>{esc(study.rank_by or 'each metric itself')}</b>. Bold: the best cell of a column "
             f"(↑ higher is better, ↓ lower).</p>"]
    for dataset, group in wide(study.top).groupby("dataset", sort=True):
        parts.append(f"<h3>{esc(dataset)}</h3>")
        parts.append(_cells_table(study, dataset, group, METRICS, "topk"))
    return "\n".join(parts)


def _cells_table(study: Study, dataset: str, group: pd.DataFrame, shown: tuple[str, ...], cls: str) -> str:
    """One dataset's (family, β) cells: the top-k mean ± std of each metric of ``shown`` that they report."""
    runs = study.top.groupby(["dataset", "family", "beta"])["n_runs"].max()
    group = group.sort_values(["family", "beta"], key=family_key, kind="stable")
    metrics = [m for m in shown if m in group and group[m].notna().any()]
    best = {m: (group[m].min() if m in LOWER_IS_BETTER else group[m].max()) for m in metrics}
    arrows = {m: "↓" if m in LOWER_IS_BETTER else "↑" for m in metrics}
    head = ["family", "β", *(f"{LABELS.get(m, m)} {arrows[m]}" for m in metrics), "finished runs", "note"]
    rows = []
    for cell in group.to_dict("records"):
        n = int(runs.get((dataset, cell["family"], cell["beta"]), 0))
        rows.append([esc(cell["family"]), esc(f"{cell['beta']:g}"),
                     *(_metric_cell(m, cell[m], cell[f"{m}_std"], cell[m] == best[m]) for m in metrics),
                     esc(n), "incomplete" if cell["incomplete"] else ""])
    return table(head, rows, cls=cls, id_=f"{cls}-{dataset}", data={"dataset": dataset})


# ------------------------------------------------------------------------------------ the suite


def section_suite(study: Study) -> str:
    """disentanglement_lib's metrics and UDR, from the runs' stored representations: per dataset the
    cells' table and how well UDR, without labels, ranks the seeds as MIG-sup does."""
    parts = ["<h2>The disentanglement_lib suite</h2>"]
    logged = study.top[study.top["metric"].isin(SUITE_METRICS)]
    if logged.empty:
        sweep = f" --sweep {study.sweeps[0]}" if len(study.sweeps) == 1 else ""
        parts.append(f'<p class="note">No metric of the suite is logged yet. Compute them from the runs\' '
                     f"stored representations: <code>python -m analysis evaluate --experiment "
                     f"{esc(study.experiment)}{esc(sweep)}</code></p>")
        return "\n".join(parts)
    parts.append(f"<p>Computed after training from each run's stored representation (<code>python -m analysis "
                 f"evaluate</code>), as disentanglement_lib does; top-{study.k} mean ± std per cell, the seeds "
                 f"picked as in the table above. UDR ranks seeds without labels, by how consistently they "
                 f"encode the same images.</p>")
    agreement = udr_agreement(study.trials).set_index("dataset")
    for dataset, group in wide(logged).groupby("dataset", sort=True):
        parts.append(f"<h3>{esc(dataset)}</h3>")
        parts.append(_cells_table(study, dataset, group, SUITE_METRICS, "suite"))
        if dataset in agreement.index:
            parts.append(_agreement_sentence(agreement.loc[dataset]))
    return "\n".join(parts)


def _agreement_sentence(row: pd.Series) -> str:
    cells = (f"{row['cell_rho']:.2f} across the seeds of a cell (mean of {int(row['cells'])} cells with three "
             f"seeds or more)" if row["cells"] else "no cell has three seeds with both values")
    pooled = (f"{row['pooled_rho']:.2f} across all {int(row['runs'])} runs" if pd.notna(row["pooled_rho"])
              else f"not defined across the {int(row['runs'])} runs")
    return (f'<p class="agreement" data-cell-rho="{float(row["cell_rho"])!r}" '
            f'data-pooled-rho="{float(row["pooled_rho"])!r}">'
            f"UDR against MIG-sup, Spearman's rank correlation: {esc(cells)}; {esc(pooled)}.</p>")


def _metric_cell(metric: str, mean: float, std: float, best: bool) -> str:
    if pd.isna(mean):
        return "-"
    text = f"{mean:.4g} ± {std:.2g}" if pd.notna(std) else f"{mean:.4g}"
    std_attr = f' data-std="{std!r}"' if pd.notna(std) else ""
    inner = f"<b>{esc(text)}</b>" if best else esc(text)
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
        rows = [[esc(LABELS.get(r.metric, r.metric)), esc(r.leader), esc(f"{r.leader_beta:g}"),
                 esc(f"{r.leader_value:.4g}"), esc(r.runner_up or "-"), esc(fmt(r.runner_up_beta, "g")),
                 esc(fmt(r.runner_up_value)), esc(fmt(r.margin, ".3g"))] for r in group.itertuples()]
        parts.append(f"<h3>{esc(dataset)}</h3>")
        parts.append(table(head, rows, cls="compare", id_=f"compare-{dataset}", data={"dataset": dataset}))
        parts.append("<ul>" + "".join(f"<li>{esc(_leader_sentence(r, study.k))}</li>"
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
    order = " > ".join(paper_order())
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
        items.append(f'<li class="ordering {verdict}" data-dataset="{esc(r.dataset)}" '
                     f'data-metric="{esc(r.metric)}" data-holds="{verdict}">'
                     f"The paper's ordering {esc(order)} on {esc(name)} {esc(text)}.</li>")
    note = f"<p class=\"note\">Cells with fewer than {k} seeds count as they are; see the table's notes.</p>"
    return f"<ul>{''.join(items)}</ul>{note}" if items else ""


# --------------------------------------------------------------------------------- best runs


def section_best_runs(study: Study, page: Page) -> str:
    parts = ["<h2>Best run of each family</h2>",
             f"<p>Per dataset, each family's FINISHED run with the best "
             f"{esc(LABELS.get(study.best_by, study.best_by))}: "
             f"its Fig. 5 panels (images sampled from each level's prior, I(x; z_l) beside them, per "
             f"progressive stage), I(x; z_l) per stage from its logged metrics, and its final traversal "
             f"(Fig. 4), from the run's artifacts.</p>"]
    for run in best_runs(study).to_dict("records"):
        parts.append(_best_run(study, page, run))
    return "\n".join(parts)


def _best_run(study: Study, page: Page, run: dict) -> str:
    url = run_url(study.ui, study.experiment_id, run["run_id"])
    metrics = ", ".join(f"{LABELS.get(m, m)} {run[m]:.4g}" for m in METRICS if m in run and pd.notna(run[m]))
    parts = [f'<section class="run" data-run-id="{esc(run["run_id"])}" data-dataset="{esc(run["dataset"])}" '
             f'data-family="{esc(run["family"])}">',
             f"<h3>{esc(run['dataset'])}: {esc(run['family'])} &mdash; "
             f'<a href="{esc(url)}">{esc(run["run_name"])}</a></h3>',
             f"<p>β={esc(format(run['beta'], 'g'))}, seed {esc(run['seed'])}: {esc(metrics)}. "
             f'<a href="{esc(url)}">Open the run in the MLflow UI</a>.</p>']
    folder = page.images / "runs" / safe_name(run["run_name"])
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
