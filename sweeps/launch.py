"""The grid as one Ray Tune experiment, tracked in MLflow: what it hands the driver (sweeps/driver.py) — its
manifest, its Tuner of solo trials or fused groups (``--fuse K``), its summary and the study report.

At the end the study report (analysis/report.py) of the sweep is written beside its Ray results and logged
to its parent run; the last two lines say where it is and where the MLflow runs table is.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from analysis.ray_cluster import REPO_ROOT, init_ray
from provlae import paths
from provlae.config import TrialConfig
from provlae.errors import ConfigError, ProvlaeError
from provlae.text import last_line
from sweeps import sweep_folder, tracking
from sweeps.cli import SweepOptions
from sweeps.driver import (
    Sweep,
    cli_reporter,
    drive,
    restored_tuner,
    run_config,
    ui_hint,
    where_lines,
)
from sweeps.trainable import GROUP_KEY, group_configs, group_label, train_group, train_trial, trial_config

__all__ = ["REPO_ROOT", "init_ray", "last_line", "run_sweep", "ui_hint"]  # imported from here by scripts and tests
MANIFEST = sweep_folder.GRID_MANIFEST  # the grid a sweep folder was started with
TABLE_METRICS = ("mig", "mig_sup", "factor_score", "recon_error")
MAX_LISTED = 20  # failed trials listed in the summary: it stays one screen
REPORT_TOP_K = 3  # the paper's top-3 seeds per cell, or all of a sweep's seeds when it has fewer
REPORT_DIR = "report"  # the report's folder: in the sweep folder, and as the parent run's artifact folder


def run_sweep(configs: list[TrialConfig], options: SweepOptions, description: dict[str, Any]) -> int:
    """Run (or resume) the sweep; 0 when every trial finished, 1 when any failed or did not finish."""
    return drive(Grid(configs, options, description))


class Grid(Sweep):
    def __init__(self, configs: list[TrialConfig], options: SweepOptions, description: dict[str, Any]):
        super().__init__(configs, options)
        self.description = description

    def check_manifest(self, uri: str, write: bool) -> bool:
        return check_manifest(self.options.folder, self.configs, self.options.fuse, uri, self.options.experiment,
                              write=write)

    def params(self) -> dict[str, Any]:
        return {**self.description, "trials": len(self.configs)}

    def tuner(self, ctx: tracking.TrackingContext, restore: bool, started: bool):
        planned = self.description.get("plan_wall_s")
        return make_tuner(self.configs, self.options, ctx, restore=restore,
                          planned_s=float(planned) if planned else None)

    def end(self, results, ctx: tracking.TrackingContext, mlflow) -> int:
        return end_sweep(self.configs, self.options, results, ctx, mlflow)


def end_sweep(configs: list[TrialConfig], options: SweepOptions, results, ctx: tracking.TrackingContext,
              mlflow) -> int:
    """The summary table and failures, the parent run's end (KILLED runs when the sweep was interrupted),
    the report; the exit status."""
    parent, uri = ctx.parent_run_id, ctx.tracking_uri
    rows, failures = (summarize(results, ctx, mlflow) if options.fuse == 1
                      else summarize_groups(results, ctx, mlflow))
    unfinished = len(configs) - len(rows)
    print(format_table(rows))
    if unfinished:
        print(f"\n{unfinished} trial(s) did not finish: rerun the same command to resume the sweep.")
    if failures:
        print(f"\n{len(failures)} of {len(configs)} trial(s) failed:")
        for name, error in failures[:MAX_LISTED]:
            print(f"  {name}: {error}")
        if len(failures) > MAX_LISTED:
            print(f"  ... and {len(failures) - MAX_LISTED} more (each run's MLflow tag 'error' holds its error)")
    if unfinished:  # interrupted: no trial runs now, so what is still RUNNING was stopped with the driver
        tracking.end_running(mlflow, ctx.experiment_id, options.name)
    else:
        tracking.end_parent(mlflow, parent, failed=len(failures))
    print(where_lines(options, ctx))
    if options.report and not unfinished:
        k = min(REPORT_TOP_K, len({c.seed for c in configs}))  # a sweep of 2 seeds reports the top 2
        print(write_sweep_report(options, uri, parent, mlflow, k=k))
    print(runs_table_line(uri, ctx.experiment_id))
    return 1 if failures or unfinished else 0


# ------------------------------------------------------------------------------------------ Tune


def make_tuner(configs: list[TrialConfig], options: SweepOptions, ctx: tracking.TrackingContext,
               restore: bool = True, planned_s: float | None = None):
    """The grid's Tuner, or the interrupted one restored from the sweep folder (errored trials retried)
    unless ``restore`` is False. With ``--fuse K`` > 1 each Tune trial is a fused group of up to K grid
    trials."""
    from ray import tune

    from provlae.fused import make_groups

    trainable = trainable_for(options, ctx)
    restored = restored_tuner(options.folder, trainable) if restore else None
    if restored is not None:
        print(f"resuming sweep {options.name!r} from {options.folder}", flush=True)
        return restored
    if options.fuse == 1:
        space = {"trial": tune.grid_search([c.to_dict() for c in configs])}
    else:
        space = {GROUP_KEY: tune.grid_search([{"label": group_label(g), "members": [c.to_dict() for c in g]}
                                              for g in make_groups(configs, options.fuse)])}
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=options.max_concurrent, reuse_actors=True,
                                    trial_dirname_creator=trial_dirname),
        run_config=run_config(options, reporter(options.fuse > 1, planned_s)),
    )


def trainable_for(options: SweepOptions, ctx: tracking.TrackingContext):
    """The trainable with the sweep's tracking context and per-trial resources bound."""
    from ray import tune

    if options.fuse == 1:
        fn = tune.with_parameters(train_trial, tracking=ctx, threads=options.threads,
                                  plugin_paths=options.plugin_paths)
    else:
        fn = tune.with_parameters(train_group, tracking=ctx, threads=options.threads,
                                  plugin_paths=options.plugin_paths, kernels=options.fused_kernels)
    return tune.with_resources(fn, options.resources)


def reporter(fused: bool = False, planned_s: float | None = None):
    """One row per trial with its grid point (not a config dump per trial); a fused trial's row names its
    group and counts its members; under the table, the sweep's expected end (``sweeps.eta``)."""
    from sweeps.eta import Progress

    if fused:
        return cli_reporter({f"{GROUP_KEY}/label": "group"},
                            {"step": "step", "stage": "stage", "live": "live", "finished": "finished",
                             "failed": "failed"}, Progress(planned_s))
    return cli_reporter({f"trial/{k}": k for k in ("dataset", "family", "beta", "seed")},
                        {"step": "step", "stage": "stage", "loss": "loss", "mig": "mig"}, Progress(planned_s))


def trial_dirname(trial) -> str:
    if GROUP_KEY in trial.config:
        return f"{trial.config[GROUP_KEY]['label']}_{trial.trial_id}"
    return f"{trial_config(trial.config).run_name}_{trial.trial_id}"


# ------------------------------------------------------------------------------ sweep folder


def check_manifest(folder: str, configs: list[TrialConfig], fuse: int, tracking_uri: str, experiment: str,
                   write: bool = True) -> bool:
    """A sweep name resumes the same grid in the same MLflow store: refuse a folder started with other
    trials, another ``--fuse`` (Tune's saved trials are the groups), another experiment or tracking URI,
    or a search. ``write``: record a new sweep's grid (and the store of one recorded before stores were).
    Whether the folder held this grid already."""
    sweep_folder.check_kind(folder, "grid")
    digests = sorted(hashlib.sha256(json.dumps(c.identity(), sort_keys=True).encode()).hexdigest()
                     for c in configs)
    saved = sweep_folder.read_json(folder, MANIFEST)
    if saved is not None:
        before = saved.get("trials")
        if before != digests:
            count = len(before) if isinstance(before, list) else "?"
            raise ConfigError(f"sweep folder {folder} holds a different grid ({count} trials; now "
                              f"{len(digests)}): repeat the original flags to resume it, or pass --name "
                              f"for a new sweep")
        if saved.get("fuse", 1) != fuse:
            raise ConfigError(f"sweep folder {folder} was started with --fuse {saved.get('fuse', 1)}, not "
                              f"--fuse {fuse}: repeat it to resume the sweep, or pass --name for a new sweep")
        sweep_folder.check_store(folder, saved, tracking_uri, experiment)
        if write and "tracking_uri" not in saved:
            sweep_folder.write_json(folder, MANIFEST, {**saved, **sweep_folder.store_fields(tracking_uri, experiment)})
        return True
    if write:
        sweep_folder.write_json(folder, MANIFEST, {"trials": digests, "fuse": fuse,
                                                   **sweep_folder.store_fields(tracking_uri, experiment)})
    return False


# ---------------------------------------------------------------------------------- the summary


def summarize(results, ctx: tracking.TrackingContext, mlflow) -> tuple[list[dict], list[tuple[str, str]]]:
    """One row per trial that ended (finished or failed); failed trials' runs are marked FAILED."""
    rows, failures = [], []
    for result in results:
        cfg = trial_config(result.config)
        metrics = result.metrics or {}
        if result.error is not None:
            error = last_line(str(result.error))
            failures.append((cfg.run_name, error))
            rows.append({"run": cfg.run_name, "status": "FAILED"})
            _mark_failed(mlflow, ctx, cfg, metrics.get("trial_id", ""), error)
        elif metrics.get("done"):
            rows.append({"run": cfg.run_name, "status": "FINISHED", **{k: metrics.get(k) for k in TABLE_METRICS}})
    return rows, failures


def summarize_groups(results, ctx: tracking.TrackingContext, mlflow) -> tuple[list[dict], list[tuple[str, str]]]:
    """The same rows as ``summarize``, one per member of every fused trial, each read from the member's
    MLflow run (a member fails alone; the group's Tune trial may still have finished)."""
    rows, failures = [], []
    for result in results:
        group_error = None if result.error is None else last_line(str(result.error))
        for cfg in group_configs(result.config):
            run = tracking.find_trial_run(mlflow, ctx.experiment_id, ctx.trial_key(cfg, ""))
            status = None if run is None else run.info.status
            if status == "FINISHED":
                rows.append({"run": cfg.run_name, "status": "FINISHED",
                             **{k: run.data.metrics.get(k) for k in TABLE_METRICS}})
            elif status == "FAILED" or group_error is not None:
                error = (run.data.tags.get(tracking.ERROR_TAG) if status == "FAILED" else None) or group_error
                failures.append((cfg.run_name, last_line(error or "unknown error")))
                rows.append({"run": cfg.run_name, "status": "FAILED"})
                if run is not None and status != "FAILED":
                    tracking.mark_failed(mlflow, run.info.run_id, error)
    return rows, failures


def _mark_failed(mlflow, ctx: tracking.TrackingContext, cfg: TrialConfig, trial_id: str, error: str) -> None:
    """A trial whose worker died on its last try could not end its own run."""
    try:
        run = tracking.find_trial_run(mlflow, ctx.experiment_id, ctx.trial_key(cfg, trial_id))
        if run is not None and run.info.status != "FAILED":
            tracking.mark_failed(mlflow, run.info.run_id, error)
    except tracking.TrackingError:  # the server is away: the rerun retries the trial and records it
        pass


def format_table(rows: list[dict]) -> str:
    width = max([len("run")] + [len(r["run"]) for r in rows])
    header = f"{'run':<{width}}  {'status':<8}" + "".join(f"  {m:>12}" for m in TABLE_METRICS)
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = "".join(f"  {_cell(r.get(m)):>12}" for m in TABLE_METRICS)
        lines.append(f"{r['run']:<{width}}  {r['status']:<8}{cells}")
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------------------- the report


def report_folder(storage: str, name: str) -> Path:
    """Where a sweep's report is written: in its sweep folder when that is local, else under the data home."""
    if "://" in storage:
        return paths.data_home() / "reports" / name
    return Path(storage) / name / REPORT_DIR


def write_sweep_report(options: SweepOptions, uri: str, parent: str, mlflow, k: int = REPORT_TOP_K) -> str:
    """Write this sweep's report (top ``k`` seeds per cell) and log it to the parent run
    (``report/index.html``: the MLflow UI shows it); the line that says where. A report that cannot be
    made (no trial finished, say) is that one line, and never changes the sweep's outcome."""
    from analysis.report import write_report

    try:
        path = write_report(options.experiment, report_folder(options.storage, options.name), tracking_uri=uri,
                            sweep=options.name, k=k)
        mlflow.log_artifact(parent, str(path), REPORT_DIR)
    except ProvlaeError as e:
        return f"Report: not written ({last_line(str(e))})"
    except Exception as e:  # noqa: BLE001 - the trials' results stand whatever happens to their summary page
        return f"Report: not written ({type(e).__name__}: {last_line(str(e))})"
    return f"Report: {path} (also the parent run's artifact {REPORT_DIR}/{path.name})"


def runs_table_line(uri: str, experiment_id: str) -> str:
    from analysis.report import runs_table_url, ui_base

    return f"Runs table: {runs_table_url(ui_base(uri), experiment_id)}"


def report_lines(experiment: str, name: str, tracking_uri: str | None = None,
                 storage: str | None = None) -> list[str]:
    """The two last lines of a finished sweep, again (``make demo`` ends with them): its report's path and
    the experiment's runs table, from the default store and storage unless given."""
    uri = tracking.normalize_uri(tracking_uri or paths.default_tracking_uri())
    exp = tracking.client(uri).get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {uri}")
    page = report_folder(storage or str(paths.default_storage()), name) / "index.html"
    report = f"Report: {page}" if page.is_file() else f"Report: none at {page} (see the sweep's output)"
    return [report, runs_table_line(uri, exp.experiment_id)]
