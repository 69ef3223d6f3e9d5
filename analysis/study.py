"""What a study report shows, read from MLflow before anything is written: the trial runs, their sweeps,
the top-k table, each family's best run and its figure artifacts, and the MLflow UI's links to them
(docs/architecture.md §8).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote, urlparse

import pandas as pd

from analysis.errors import AnalysisError
from analysis.record import LOWER_IS_BETTER
from analysis.runs import load_runs, load_sweeps, run_artifacts, select_sweep
from analysis.topk import METRICS, available_metrics, check_metric, finished, top_k

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local (sqlite / file) store by default
# MLflow 3's UI opens on its GenAI side ("Overview": traces, tokens) unless told otherwise, whatever the
# experiment's kind tag; this query selects its "Model training" side (older UIs ignore it).
TRAINING_VIEW = "?workflowType=machine_learning"
DEFAULT_BEST_BY = "mig_sup"  # the paper's proposed metric picks each family's best run
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
    return best.sort_values(["dataset", "family"], key=family_key, kind="stable").reset_index(drop=True)


def family_key(column: pd.Series) -> pd.Series:
    """Sort key: registered families in display order (others after them, by name); other columns as
    they are."""
    if column.name != "family":
        return column
    from provlae.models.families import family_names  # when needed: the registry loads torch

    known = family_names()
    return column.map(lambda f: f"{known.index(f) if f in known else len(known):03d} {f}")


# -------------------------------------------------------------------------------- figures of a run


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
