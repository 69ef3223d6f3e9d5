"""An adaptive search over one (family, dataset) as one Ray Tune experiment, tracked in MLflow.

- sweeps/search_space.py: the search (``SearchSpec``, ``build_spec``): the base config, the space, the seeds,
  the objective, the ASHA rungs;
- sweeps/search_trainable.py: ``search_trial``, one Tune trial = one configuration on every seed, as one
  fused group, reporting the seed mean at stage ends;
- here: the sweep folder's manifest, ``make_tuner`` (OptunaSearch (seeded TPE) behind a ConcurrencyLimiter,
  ASHA at stage ends, or the experiment restored from its folder, searcher and scheduler state included),
  and ``run_search``: what the search hands the one driver (sweeps/driver.py);
- sweeps/search_summary.py: the end-of-search table, the best configuration and the Optuna study.
"""
from __future__ import annotations

import json
from typing import Any

from provlae.errors import ConfigError
from sweeps import sweep_folder, tracking
from sweeps.cli import SweepOptions, plan_target
from sweeps.driver import Sweep, cli_reporter, drive, restored_tuner, run_config, where_lines
from sweeps.search_space import (
    LOWER_IS_BETTER,
    NEED_FACTORS,
    OBJECTIVES,
    REDUCTION_FACTOR,
    SEARCH_TAG,
    SearchSpec,
    asha_milestones,
    build_space,
    build_spec,
    check_inputs,
    default_mode,
    describe_distribution,
    parse_seed_list,
    search_document,
    search_plan,
)
from sweeps.search_summary import (
    best_row,
    export_study,
    format_best,
    format_table,
    record_best,
    summarize,
    trial_dirname,
    trial_id_of,
)
from sweeps.search_trainable import CHECKPOINT_META, search_trial

__all__ = [  # the search's names, importable from here as before it was split
    "CHECKPOINT_META", "LOWER_IS_BETTER", "NEED_FACTORS", "OBJECTIVES", "REDUCTION_FACTOR", "SEARCH_TAG",
    "SearchSpec", "asha_milestones", "best_row", "build_space", "build_spec", "check_inputs", "default_mode",
    "describe_distribution", "export_study", "format_best", "format_table", "parse_seed_list", "record_best",
    "search_document", "search_trial", "summarize", "trial_dirname", "trial_id_of"]
MANIFEST = sweep_folder.SEARCH_MANIFEST  # the search a sweep folder was started with


def run_search(spec: SearchSpec, options: SweepOptions) -> int:
    """Run (or resume) the search; 0 when every trial ended (finished or stopped early), 1 otherwise."""
    return drive(Search(spec, options))


class Search(Sweep):
    kind = "search"
    restartable = False  # its runs are keyed by Tune's trial ids (sweep_folder.check_tune_state)
    tags = (SEARCH_TAG,)

    def __init__(self, spec: SearchSpec, options: SweepOptions):
        super().__init__([spec.base], options)
        self.spec = spec
        self.plan = search_plan(spec, plan_target(options))  # the parent run's params and the ETA line's

    def check_manifest(self, uri: str, write: bool) -> bool:
        return check_manifest(self.options.folder, self.spec, uri, self.options.experiment, write=write)

    def params(self) -> dict[str, Any]:
        return {**self.spec.describe(), **self.plan.params()}

    def opened(self, mlflow, parent: str) -> None:
        mlflow.log_dict(parent, search_document(self.spec), "search_space.json")

    def tuner(self, ctx: tracking.TrackingContext, restore: bool, started: bool):
        planned_s = self.plan.wall_s if self.plan.measured else None
        tuner, restored = make_tuner(self.spec, self.options, ctx, planned_s)
        if started:
            options, spec = self.options, self.spec
            ended = (f"{len(ended_runs(tracking.client(ctx.tracking_uri), ctx))} of {spec.trials * len(spec.seeds)} "
                     f"trial runs already ended")
            if restored:
                print(f"resuming search {options.name!r} from {options.folder} ({ended})", flush=True)
            else:  # killed before Tune first saved its state: the seeded sampler proposes the same trials again
                print(f"restarting search {options.name!r} in {options.folder}: no Tune state saved yet ({ended}; "
                      f"their runs are found in MLflow, not retrained)", flush=True)
        return tuner

    def end(self, results, ctx: tracking.TrackingContext, mlflow) -> int:
        return end_search(self.spec, self.options, results, ctx, mlflow)


def end_search(spec: SearchSpec, options: SweepOptions, results, ctx: tracking.TrackingContext, mlflow) -> int:
    """The table, the best configuration (recorded when the search is over), the study, the failures."""
    rows = summarize(results, spec, ctx, mlflow)
    print(format_table(rows, spec))
    unfinished = spec.trials - sum(r["status"] in ("FINISHED", "STOPPED", "FAILED") for r in rows)
    failed = [r for r in rows if r["status"] == "FAILED"]
    best = best_row(rows, spec)
    print()
    print(format_best(best, rows, spec, final=not unfinished))
    if unfinished:
        print(f"\n{unfinished} trial(s) did not finish: rerun the same command to resume the search.")
    else:
        if best is not None:
            record_best(mlflow, ctx.parent_run_id, best, spec)
        tracking.end_parent(mlflow, ctx.parent_run_id, failed=len(failed))
    study = export_study(rows, spec, options.folder, options.name)
    if study:
        print(f"\nOptuna study {options.name!r} at {study} (optuna-dashboard, optuna.visualization)")
    if failed:
        print(f"\n{len(failed)} of {spec.trials} trial(s) failed:")
        for r in failed:
            print(f"  {r['trial_id']}: {r['error']}")
    print(where_lines(options, ctx))
    return 1 if failed or unfinished else 0


def ended_runs(mlflow, ctx: tracking.TrackingContext) -> list:
    """The search's trial runs that ended: finished, or stopped early (KILLED with the tag early_stopped;
    not those a dead driver left RUNNING, marked KILLED until they resume)."""
    query = f"tags.sweep = '{ctx.sweep}' and tags.`{tracking.ROLE_TAG}` = 'trial'"
    runs = mlflow.search_runs([ctx.experiment_id], query, max_results=10000)
    return [r for r in runs if r.info.status == "FINISHED"
            or (r.info.status == "KILLED" and "early_stopped" in r.data.tags)]


# -------------------------------------------------------------------------------- the sweep folder


def check_manifest(folder: str, spec: SearchSpec, tracking_uri: str, experiment: str, write: bool = True) -> bool:
    """True when the folder already holds this search; else, with ``write``, record the search's manifest
    in it. A folder started with another search (other flags), with another MLflow store, or holding a
    grid is refused rather than mixed."""
    sweep_folder.check_kind(folder, "search")
    mine = json.loads(json.dumps(spec.manifest()))
    before = sweep_folder.read_json(folder, MANIFEST)
    if before is not None:
        store = {k: before.pop(k) for k in sweep_folder.STORE_FIELDS if k in before}
        differ = sorted(k for k in set(mine) | set(before) if mine.get(k) != before.get(k))
        if differ:
            raise ConfigError(f"sweep folder {folder} holds a different search (differs in: {', '.join(differ)}):"
                              f" repeat the original flags to resume it, or pass --name for a new search")
        sweep_folder.check_store(folder, store, tracking_uri, experiment)
        return True
    if write:
        sweep_folder.write_json(folder, MANIFEST, {**mine, **sweep_folder.store_fields(tracking_uri, experiment)})
    return False


# ----------------------------------------------------------------------------------- Tune set-up


def make_searcher(spec: SearchSpec, name: str, max_concurrent: int):
    """Seeded TPE over ``spec.space``, at most ``max_concurrent`` configurations in flight. The study is
    kept in memory and saved by Tune with the experiment (see sweeps/optuna_search.py on why not an
    RDB storage)."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = OptunaSearch(space=dict(spec.space), metric=spec.objective, mode=spec.mode, study_name=name,
                            sampler=optuna.samplers.TPESampler(seed=spec.sampler_seed))
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def make_scheduler(spec: SearchSpec):
    """ASHA deciding only at stage ends, or FIFO (no early stopping).

    Checked against ray/tune/schedulers/async_hyperband.py (Ray 2.60):
    - on_trial_result returns CONTINUE for a result lacking time_attr or the metric; the trainable reports
      only at stage ends anyway, each result with ``step`` and the objective.
    - the bracket's rungs are grace_period * reduction_factor**k for k < int(log(max_t / grace_period) /
      log(reduction_factor) + 1): with grace_period = stage_steps and an integer reduction factor every
      rung is a whole number of stages, i.e. a stage end (``asha_milestones``); with 3 stages, 2 rungs.
    - a result at step >= max_t (= total_steps) stops the trial without being recorded: the end.
    - at a rung a configuration stops when its objective is below the rung's (1 - 1/rf) percentile of
      those recorded there before it: with rf = 2, the worse half.
    """
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    if not spec.rungs:
        return FIFOScheduler()
    return AsyncHyperBandScheduler(time_attr="step", metric=spec.objective, mode=spec.mode,
                                   grace_period=spec.base.stage_steps, max_t=spec.base.total_steps,
                                   reduction_factor=REDUCTION_FACTOR, brackets=1)


def make_tuner(spec: SearchSpec, options: SweepOptions, ctx: tracking.TrackingContext,
               planned_s: float | None = None):
    """(tuner, restored): the experiment restored from the sweep folder when Tune saved it there, else a
    new one."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(search_trial, tracking_ctx=ctx, seeds=list(spec.seeds), objective=spec.objective,
                             threads=options.threads, plugin_paths=options.plugin_paths),
        options.resources)
    restored = restored_tuner(options.folder, trainable)
    if restored is not None:
        return restored, True
    return tune.Tuner(
        trainable,
        param_space={"trial": spec.base.to_dict()},
        tune_config=tune.TuneConfig(search_alg=make_searcher(spec, options.name, options.max_concurrent),
                                    scheduler=make_scheduler(spec), num_samples=spec.trials,
                                    # a stopped configuration's actor goes at once: its training thread
                                    # would notice the stop only at its next report, a stage end away
                                    reuse_actors=False, trial_dirname_creator=trial_dirname),
        run_config=run_config(options, reporter(spec, planned_s)),
    ), False


def reporter(spec: SearchSpec, planned_s: float | None = None):
    """One row per configuration with its sampled values; under the table, the search's expected end
    (``sweeps.eta``: every configuration's seeds trained together, the ones not yet proposed pending)."""
    from sweeps.eta import Progress, configuration_images

    per_step = spec.base.batch_size * len(spec.seeds)
    progress = Progress(planned_s, configuration_images(per_step, spec.base.total_steps),
                        expected=(spec.trials, per_step * spec.base.total_steps))
    return cli_reporter(list(spec.space), {"step": "step", spec.objective: spec.objective}, progress)
