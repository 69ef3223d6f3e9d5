"""The paper's summary statistic and the comparisons built on it (Fig. 2/3, docs/architecture.md §8).

For each (dataset, family, β) cell the paper reports the mean of the three best random seeds. A
"best" seed is best by the metric being reported, unless ``rank_by`` names one metric whose ranking
then picks the seeds for every metric: ``udr`` picks them without labels, on any dataset. Beside the
paper's metrics go the suite's that the evaluation stage logged (analysis/evaluate.py).
"""
from __future__ import annotations

import pandas as pd

from analysis.errors import AnalysisError
from analysis.record import EVALUATED_METRICS, LOWER_IS_BETTER, default_mode

METRICS = ("factor_score", "mig", "mig_sup", "recon_error")  # Fig. 2 panels, left to right, and the y axis
# The evaluation stage's values shown beside them (the classifiers' training accuracies stay in the export).
SUITE_METRICS = tuple(m for m in EVALUATED_METRICS if "_train" not in m)
CELL = ("dataset", "family", "beta")
TOP_K_COLUMNS = ("dataset", "family", "beta", "metric", "top_k_mean", "top_k_std", "n_runs", "seeds",
                 "incomplete")


def available_metrics(df: pd.DataFrame) -> list[str]:
    """Metric columns of ``df`` a ranking may use: the paper's four plus any metric load_runs found."""
    logged = set(df.attrs.get("metrics", ())) | set(METRICS)
    return sorted(m for m in logged if m in df.columns)


def check_metric(df: pd.DataFrame, metric: str, role: str = "metric") -> str:
    available = available_metrics(df)
    if metric not in available:
        raise AnalysisError(f"unknown {role} {metric!r}; available: {', '.join(available) or 'none'}")
    return metric


def best_first(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Runs that report ``metric``, best first (ties broken by seed, so the answer is deterministic)."""
    ranked = runs[runs[metric].notna()]
    order = [metric, "seed"] if "seed" in ranked.columns else [metric]
    ascending = [metric in LOWER_IS_BETTER] + [True] * (len(order) - 1)
    return ranked.sort_values(order, ascending=ascending, kind="stable")


def finished(df: pd.DataFrame) -> pd.DataFrame:
    """Only FINISHED runs count for any summary, whatever the frame holds."""
    return df[df["status"] == "FINISHED"] if "status" in df.columns else df


def top_k(df: pd.DataFrame, k: int = 3, rank_by: str | None = None) -> pd.DataFrame:
    """Mean and sample std (ddof=1) of the k best FINISHED runs per (dataset, family, β) and metric.

    One row per cell and metric of ``METRICS`` and ``SUITE_METRICS`` that the cell reports: ``top_k_mean``,
    ``top_k_std``
    (NaN from one value), ``n_runs`` (finished runs in the cell reporting the ranking metric),
    ``seeds`` (the chosen runs' seeds, best first) and ``incomplete`` (fewer than k values).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise AnalysisError(f"k must be a positive integer, got {k!r}")
    if rank_by is not None:
        check_metric(df, rank_by, "rank_by metric")
    missing = [c for c in (*CELL, "seed") if c not in df.columns]
    if missing:
        raise AnalysisError(f"runs lack column(s) {', '.join(missing)}; is this a load_runs() frame?")
    runs = finished(df)
    if runs.empty:
        raise AnalysisError("no FINISHED runs to rank")
    metrics = [m for m in (*METRICS, *SUITE_METRICS) if m in runs.columns]
    if not metrics:
        raise AnalysisError(f"runs report none of the metrics {', '.join(METRICS)}")
    rows = []
    for (dataset, family, beta), cell in runs.groupby(list(CELL), sort=True):
        for metric in metrics:
            candidates = best_first(cell, rank_by or metric)
            chosen = candidates.head(k)
            values = chosen[metric].dropna()
            if values.empty:
                continue
            seeds = [int(s) for s in chosen.loc[values.index, "seed"] if pd.notna(s)]
            rows.append({
                "dataset": dataset, "family": family, "beta": float(beta), "metric": metric,
                "top_k_mean": float(values.mean()), "top_k_std": float(values.std(ddof=1)),
                "n_runs": len(candidates), "seeds": seeds, "incomplete": len(values) < k,
            })
    top = pd.DataFrame(rows, columns=list(TOP_K_COLUMNS))
    top.attrs.update(k=k, rank_by=rank_by)
    return top


def wide(top: pd.DataFrame) -> pd.DataFrame:
    """top_k rows as one row per cell: ``<metric>``, ``<metric>_std`` and ``incomplete`` (any metric)."""
    index = list(CELL)
    by_metric = top.set_index([*index, "metric"])
    means = by_metric["top_k_mean"].unstack("metric")
    stds = by_metric["top_k_std"].unstack("metric").add_suffix("_std")
    out = means.join(stds).join(top.groupby(index)["incomplete"].any())
    out.columns.name = None
    return out.reset_index()


def best_per_family(top: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, metric and family: the family's best cell over β (its top-k mean), best family first.

    Columns: dataset, metric, family, beta, value, std, incomplete. Ties go to the smaller β.
    """
    rows = []
    for (dataset, metric), group in top.groupby(["dataset", "metric"], sort=True):
        lower = metric in LOWER_IS_BETTER
        ordered = group.sort_values(["top_k_mean", "beta"], ascending=[lower, True], kind="stable")
        for cell in ordered.drop_duplicates("family").itertuples():
            rows.append({"dataset": dataset, "metric": metric, "family": cell.family, "beta": cell.beta,
                         "value": cell.top_k_mean, "std": cell.top_k_std,
                         "incomplete": bool(cell.incomplete)})
    return pd.DataFrame(rows, columns=["dataset", "metric", "family", "beta", "value", "std", "incomplete"])


def compare(top: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and metric: the family that leads at its best β, and its margin over the runner-up.

    Columns: dataset, metric, leader, leader_beta, leader_value, runner_up, runner_up_beta,
    runner_up_value, margin (always >= 0: how much better the leader is), leader_incomplete.
    """
    rows = []
    for (dataset, metric), per_family in best_per_family(top).groupby(["dataset", "metric"], sort=True):
        lead = per_family.iloc[0]
        second = per_family.iloc[1] if len(per_family) > 1 else None
        margin = float("nan") if second is None else abs(lead.value - second.value)
        rows.append({
            "dataset": dataset, "metric": metric, "leader": lead.family, "leader_beta": lead.beta,
            "leader_value": lead.value,
            "runner_up": None if second is None else second.family,
            "runner_up_beta": float("nan") if second is None else second.beta,
            "runner_up_value": float("nan") if second is None else second.value,
            "margin": margin, "leader_incomplete": bool(lead.incomplete),
        })
    order = {m: i for i, m in enumerate((*METRICS, *SUITE_METRICS))}  # the paper's metrics, then the suite's
    rows.sort(key=lambda r: (r["dataset"], order.get(r["metric"], len(order)), r["metric"]))
    return pd.DataFrame(rows)


def paper_order() -> tuple[str, ...]:
    """The paper's finding on MIG and MIG-sup (§4, Fig. 2/3), best first: the families' ``paper_rank``.
    Read from the registry when asked (it loads torch, which a table from MLflow does not need)."""
    from provlae.models.families import FAMILIES

    ranked = [(cls.paper_rank, name) for name, cls in FAMILIES.items() if cls.paper_rank is not None]
    return tuple(name for _, name in sorted(ranked))


PAPER_ORDER_METRICS = ("mig", "mig_sup")


def paper_ordering(top: pd.DataFrame, order: tuple[str, ...] | None = None,
                   metrics: tuple[str, ...] = PAPER_ORDER_METRICS) -> pd.DataFrame:
    """Whether ``order`` (best first; the paper's, ``paper_order()``, by default) holds per dataset and
    metric, each family at its best β.

    Columns: dataset, metric, holds (True/False, None when a family of ``order`` has no value),
    values ({family: (β, top-k mean)} of the families present) and missing (families without a value).
    The ordering holds when each family's value is strictly better than the next one's (higher, or lower
    for a metric in LOWER_IS_BETTER).
    """
    order = paper_order() if order is None else order
    best = best_per_family(top)
    rows = []
    for dataset in sorted(top["dataset"].unique()):
        for metric in metrics:
            cells = best[(best["dataset"] == dataset) & (best["metric"] == metric)].set_index("family")
            values = {f: (float(cells.at[f, "beta"]), float(cells.at[f, "value"]))
                      for f in order if f in cells.index}
            missing = [f for f in order if f not in values]
            sign = -1 if metric in LOWER_IS_BETTER else 1
            holds = None if missing else all(sign * (values[a][1] - values[b][1]) > 0
                                             for a, b in zip(order, order[1:]))
            rows.append({"dataset": dataset, "metric": metric, "holds": holds, "values": values,
                         "missing": missing})
    return pd.DataFrame(rows, columns=["dataset", "metric", "holds", "values", "missing"])


def verdict(comparison: pd.DataFrame, k: int = 3) -> str:
    """A few lines per dataset saying which family leads on each metric, as compare() found."""
    lines = []
    width = max(13, *(len(m) for m in comparison.get("metric", [])))
    for dataset, group in comparison.groupby("dataset", sort=True):
        lines.append(f"{dataset} (mean of the top {k} seeds; each family at its best β):")
        for row in group.itertuples():
            better = "lower" if row.metric in LOWER_IS_BETTER else "higher"
            text = f"  {row.metric:<{width}} {row.leader} leads at β={row.leader_beta:g} ({row.leader_value:.4g})"
            if row.runner_up is None:
                text += ", the only family with this metric"
            else:
                text += (f", {better} than {row.runner_up} at β={row.runner_up_beta:g} "
                         f"({row.runner_up_value:.4g}) by {row.margin:.3g}")
            if row.leader_incomplete:
                text += f" [fewer than {k} seeds]"
            lines.append(text)
    return "\n".join(lines)


def rank_trials(df: pd.DataFrame, objective: str, search: str | None = None,
                mode: str | None = None) -> pd.DataFrame:
    """FINISHED trials ranked by ``objective`` (best first), optionally only those tagged search=<search>.

    ``mode`` is "max" or "min"; by default "min" for losses and reconstruction error, else "max".
    Columns: rank, the objective, run_name, family, dataset, beta, seed, the params that vary across
    the listed trials (what a search tuned), run_id.
    """
    check_metric(df, objective, "objective")
    runs = finished(df)
    if search is not None:
        if "search" not in runs.columns or not (runs["search"] == search).any():
            raise AnalysisError(f"no FINISHED runs tagged search={search}")
        runs = runs[runs["search"] == search]
    if mode not in (None, "max", "min"):
        raise AnalysisError(f"mode must be 'max' or 'min', got {mode!r}")
    lower = (mode or default_mode(objective)) == "min"
    runs = runs[runs[objective].notna()].sort_values(objective, ascending=lower, kind="stable")
    if runs.empty:
        raise AnalysisError(f"no FINISHED run reports the objective {objective!r}")
    fixed = [c for c in ("run_name", "family", "dataset", "beta", "seed") if c in runs.columns]
    params = [p for p in df.attrs.get("params", ()) if p in runs.columns and p not in fixed]
    varying = [p for p in params if runs[p].astype(str).nunique() > 1]
    out = runs[[objective, *fixed, *varying, "run_id"]].reset_index(drop=True)
    out.insert(0, "rank", range(1, len(out) + 1))
    return out


def udr_agreement(df: pd.DataFrame, metric: str = "mig_sup") -> pd.DataFrame:
    """How well UDR, which needs no labels, ranks seeds as ``metric`` does: per dataset whose FINISHED runs
    report both, Spearman's rank correlation across the seeds of each (family, β) cell with three seeds or
    more (``cells``, their mean ``cell_rho``), and across all the dataset's runs (``runs``, ``pooled_rho``)."""
    from scipy.stats import spearmanr

    columns = ["dataset", "cells", "cell_rho", "runs", "pooled_rho"]
    runs = finished(df)
    if "udr" not in runs.columns or metric not in runs.columns:
        return pd.DataFrame(columns=columns)
    both = runs[runs["udr"].notna() & runs[metric].notna()]
    rows = []
    for dataset, group in both.groupby("dataset", sort=True):
        rhos = [_rho(spearmanr, cell["udr"], cell[metric]) for _, cell in group.groupby(["family", "beta"])
                if len(cell) >= 3]
        rhos = [r for r in rhos if pd.notna(r)]
        rows.append({"dataset": dataset, "cells": len(rhos),
                     "cell_rho": float(sum(rhos) / len(rhos)) if rhos else float("nan"),
                     "runs": len(group), "pooled_rho": _rho(spearmanr, group["udr"], group[metric])})
    return pd.DataFrame(rows, columns=columns)


def _rho(spearmanr, a: pd.Series, b: pd.Series) -> float:
    """Spearman's rho, NaN when either side is constant or there are fewer than three values."""
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)
