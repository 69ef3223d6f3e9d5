"""An adaptive search over one (family, dataset) as one Ray Tune experiment, tracked in MLflow.

The search (``SearchSpec``): the preset's config for (family, dataset) is the base; Optuna distributions
over a few of its fields (``build_space``) propose the rest; every proposed configuration trains on each
of the search's seeds, and scores the mean over them of one of the trainer's stage-end metrics.

The Tune side:
- ``search_trial``: one Tune trial = one configuration. Its seeds train as one fused group
  (``provlae.fused.FusedTrainer``: every member exactly its seed's solo trial), a stage at a time, each
  seed in its own MLflow child run, and it reports to Tune once per stage end: the seed mean of the
  objective, with the group's checkpoint (one solo-format file per seed). A seed that diverges fails the
  configuration.
- ``make_tuner``: OptunaSearch (seeded TPE) behind a ConcurrencyLimiter, ASHA at stage ends, or the
  experiment restored from its folder (searcher and scheduler state included).
- ``run_search``: the parent run, the fit, the end-of-search table and the best configuration.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.record import NEED_FACTORS, STAGE_END_METRICS, default_mode
from provlae import plugins
from provlae.config import TrialConfig
from provlae.errors import ConfigError, TrainingDiverged
from sweeps import grid, sweep_folder, tracking

if TYPE_CHECKING:
    from provlae.fused import FusedTrainer

BETA_RANGE = (0.5, 32.0)  # log-uniform
LR_RANGE = (1e-4, 2e-3)  # log-uniform
REDUCTION_FACTOR = 2  # ASHA: rungs at S, 2S, 4S, ... steps, so every rung is a stage end (see make_scheduler)
MANIFEST = sweep_folder.SEARCH_MANIFEST  # the search a sweep folder was started with
SEARCH_TAG = ("search", "optuna")
CHECKPOINT_META = "search.json"  # beside the fused group's checkpoint: the step it was taken at


# ------------------------------------------------------------------------------------ the search


@dataclass(frozen=True)
class SearchSpec:
    preset: str
    base: TrialConfig  # every field that is not searched; seed = seeds[0]
    seeds: tuple[int, ...]
    objective: str
    mode: str  # "max" | "min"
    trials: int
    space: dict[str, Any] = field(compare=False)  # TrialConfig field -> optuna distribution
    sampler_seed: int = 0
    early_stopping: bool = True

    @property
    def rungs(self) -> list[int]:
        """Steps at which ASHA may stop a configuration (none for single-stage families)."""
        if not self.early_stopping or self.base.num_stages < 2:
            return []
        return asha_milestones(self.base.stage_steps, self.base.total_steps)

    def config_for(self, sampled: dict[str, Any], seed: int) -> TrialConfig:
        return self.base.with_overrides({**sampled, "seed": seed})

    def describe(self) -> dict[str, Any]:
        """The parent run's params: what was searched, how, and over what."""
        return {"search": "optuna", "preset": self.preset, "family": self.base.family,
                "dataset": self.base.dataset, "objective": self.objective, "mode": self.mode,
                "trials": self.trials, "seeds": ",".join(map(str, self.seeds)),
                "sampler": f"TPE(seed={self.sampler_seed})",
                "early_stopping": f"ASHA at steps {','.join(map(str, self.rungs))}" if self.rungs else "off",
                **{f"space.{k}": describe_distribution(d) for k, d in self.space.items()}}

    def manifest(self) -> dict[str, Any]:
        return {"base": self.base.identity(), "seeds": list(self.seeds), "objective": self.objective,
                "mode": self.mode, "trials": self.trials, "sampler_seed": self.sampler_seed,
                "early_stopping": self.early_stopping,
                "space": {k: describe_distribution(d) for k, d in self.space.items()}}


def build_space(base: TrialConfig, fixed: set[str] = frozenset()) -> dict[str, Any]:
    """β and lr log-uniform, and the family's own ranges (``Family.search_ranges``: for pro_vlae γ uniform
    in [0, 1] and fade_in_steps an integer in [0, steps_per_stage]). Fields in ``fixed`` (set with --set)
    stay out of the search."""
    from optuna.distributions import FloatDistribution, IntDistribution

    from provlae.models.families import family_class

    family = family_class(base.family)
    space = {"beta": FloatDistribution(*BETA_RANGE, log=True)}
    for name, (kind, low, high) in family.search_ranges(base).items():
        if name not in TrialConfig.__dataclass_fields__:
            raise ConfigError(f"family {base.family!r}: search range for {name!r}, which is no config field")
        if kind == "int":
            space[name] = IntDistribution(int(low), int(high))
        elif kind in ("uniform", "loguniform"):
            space[name] = FloatDistribution(float(low), float(high), log=kind == "loguniform")
        else:
            raise ConfigError(f"family {base.family!r}: search range {name!r} has kind {kind!r}, expected "
                              f"uniform, loguniform or int")
    space["lr"] = FloatDistribution(*LR_RANGE, log=True)
    return {k: d for k, d in space.items() if k not in fixed}


def describe_distribution(d) -> str:
    from optuna.distributions import FloatDistribution

    kind = "loguniform" if d.log else ("uniform" if isinstance(d, FloatDistribution) else "int")
    return f"{kind}({d.low:g}, {d.high:g})"


def check_inputs(family: str, dataset: str, trials: int, objective: str, mode: str | None) -> None:
    """The search's names and counts; a ConfigError naming the first bad one."""
    from provlae.data.registry import get_spec
    from provlae.models.families import family_class

    family_class(family)  # ConfigError naming the registered families
    spec = get_spec(dataset)
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if objective not in STAGE_END_METRICS:
        raise ConfigError(f"unknown objective {objective!r}: choose one of the trainer's stage-end metrics "
                          f"({', '.join(STAGE_END_METRICS)})")
    if objective in NEED_FACTORS and not spec.has_factors:
        raise ConfigError(f"objective {objective} needs ground-truth factors, which {dataset} has not")
    if mode not in (None, "max", "min"):
        raise ConfigError(f"--mode must be max or min, got {mode!r}")


def build_spec(preset: str, family: str, dataset: str, trials: int, objective: str, mode: str | None,
               seeds: list[int], overrides: dict[str, Any], sampler_seed: int = 0,
               early_stopping: bool = True, data=None) -> SearchSpec:
    """A validated search; every bad input is a ConfigError naming it."""
    if preset not in grid.PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(grid.PRESETS)})")
    check_inputs(family, dataset, trials, objective, mode)
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    fixed = sorted(set(overrides) & {"family", "dataset", "seed"})
    if fixed:
        raise ConfigError(f"--set cannot change {', '.join(fixed)}: use --family, --dataset, --seeds")
    point = {"dataset": dataset, "family": family, "beta": 1.0, "seed": seeds[0]}
    base = grid.resolve(grid.PRESETS[preset], point, overrides, data)
    space = build_space(base, set(overrides))
    if not space:
        raise ConfigError("--set fixes every searched field: nothing left to search")
    for corner in ({k: d.low for k, d in space.items()}, {k: d.high for k, d in space.items()}):
        base.with_overrides(corner)  # the whole box is valid (raises ConfigError otherwise)
    return SearchSpec(preset, base, tuple(seeds), objective, mode or default_mode(objective), trials, space,
                      sampler_seed, early_stopping)


def parse_seed_list(text: str) -> list[int]:
    """'0' -> [0]; '0,1,2' -> [0, 1, 2] (seed values, not a count)."""
    seeds = []
    for item in grid.parse_list(text):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not value.is_integer() or value < 0:
            raise ConfigError(f"seeds must be non-negative integers, got {item!r}")
        seeds.append(int(value))
    return list(dict.fromkeys(seeds))


def asha_milestones(stage_steps: int, total_steps: int) -> list[int]:
    """The rungs AsyncHyperBandScheduler(time_attr="step", grace_period=stage_steps, max_t=total_steps,
    reduction_factor=2, brackets=1) builds: stage_steps * 2**k below total_steps (the result at
    total_steps ends the trial anyway). Each is a whole number of stages, i.e. a stage end."""
    out, t = [], stage_steps
    while t < total_steps:
        out.append(t)
        t *= REDUCTION_FACTOR
    return out


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


# ------------------------------------------------------------------------------ the trainable


def search_trial(config: dict[str, Any], tracking_ctx: tracking.TrackingContext, seeds: list[int],
                 objective: str, threads: int = 1, plugin_paths: tuple[str, ...] = ()) -> None:
    """One configuration (the searcher's sampled fields over config["trial"]) on every seed.

    The seeds still to train form one ``provlae.fused.FusedTrainer`` group, each member exactly its seed's
    solo trial. Reports to Tune only at stage ends, each result carrying the objective (the seed mean):
    Tune rejects a result without the searched metric (strict metric checking) and
    OptunaSearch.on_trial_result reads it from every result. Progress inside a stage goes to MLflow.
    Checkpoints are taken at stage ends only (the group's members are then all at the same step), so a
    retried configuration repeats at most a stage.

    A seed that diverges fails the configuration at once (there is no seed mean without it): its run ends
    FAILED with its TrainingDiverged, which is raised to Tune, and the other seeds' unfinished runs end
    FAILED with the same error (the seed that diverged is named in it).
    """
    import logging

    import torch
    from ray import tune

    from sweeps.trainable import trial_config

    plugins.add_paths(list(plugin_paths))
    torch.set_num_threads(threads)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a log line per checkpoint per trial
    base, trial_id = trial_config(config), tune.get_context().get_trial_id()
    configs = [base.with_overrides({"seed": s}) for s in seeds]
    runs = [tracking.TrialRun.open(tracking_ctx, cfg, trial_id) for cfg in configs]
    live = [i for i, run in enumerate(runs) if not run.finished]  # finished runs: a resumed search
    diverged = next((runs[i].previous_error for i in live
                     if runs[i].previous_error.startswith(TrainingDiverged.__name__)), "")
    if diverged:  # a retry: the replay from the last stage end is the same computation, it would diverge again
        for i in live:
            runs[i].fail(runs[i].previous_error or diverged)
        raise TrainingDiverged(diverged.removeprefix(f"{TrainingDiverged.__name__}: "))
    try:
        _train_seeds(base, configs, runs, live, objective)
    except Exception as e:  # not SystemExit: that is Tune stopping the trial (ASHA, or the driver)
        for i in live:
            if runs[i].status == "RUNNING":  # not finished, nor failed already (the seed that diverged)
                runs[i].fail(e)
        raise


def _train_seeds(base: TrialConfig, configs: list[TrialConfig], runs: list, live: list[int],
                 objective: str) -> None:
    """Advance the live seeds (``live``: indices into configs/runs) as one fused group, stage end by stage
    end; the others finished in an earlier attempt, are left out of the group and read back from MLflow."""
    from ray import tune

    from provlae.fused import FusedTrainer
    from sweeps.trainable import finish_with_figures

    # the seeds' trainers as one fused group over one copy of the data (kernels: the device's best)
    group = FusedTrainer([configs[i] for i in live]) if live else None  # a group needs one member
    slot = {i: j for j, i in enumerate(live)}  # seed index -> member of the group
    start = _restore(group, live, runs)
    on_event = _group_logger(group, live, runs) if group is not None else None
    for end in (e for e in _stage_ends(base) if e > start):
        if group is not None:
            reached = group.run(on_event, until=end)  # raises the first divergence (see _group_logger)
            for j, final in enumerate(reached):
                if final:  # the member reached the end
                    finish_with_figures(runs[live[j]], group.members[j])
        values = [_stage_value(group.members[slot[i]].history, end, objective) if i in slot
                  else _logged_value(runs[i], end, objective) for i in range(len(runs))]
        finals = []
        if end == base.total_steps:
            finals = [group.members[slot[i]].final_metrics() if i in slot else runs[i].final_metrics()
                      for i in range(len(runs))]
        result = _stage_result(values, finals, configs, objective, end, base)
        with tempfile.TemporaryDirectory(prefix="provlae-ckpt-") as folder:
            _save(group, live, runs, Path(folder), end)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))


def _stage_ends(cfg: TrialConfig) -> list[int]:
    return [cfg.stage_steps * (k + 1) for k in range(cfg.num_stages)]


def _logger(run):
    def on_event(event) -> None:
        run.log(event.step, event.metrics)  # buffered; flushed before every Tune checkpoint
        if event.kind in ("checkpoint", "stage_end"):
            run.flush()

    return on_event


def _group_logger(group: FusedTrainer, live: list[int], runs: list):
    """The group's callback: member j's events to its seed's run. A member that diverged (retired by the
    group) ends its run FAILED with the error, which is raised at once: the configuration has failed."""
    loggers = [_logger(runs[i]) for i in live]

    def on_event(j: int, event) -> None:
        if event.kind == "failed":
            error = group.failed[j]
            runs[live[j]].fail(error)
            raise error
        loggers[j](event)

    return on_event


def _restore(group: FusedTrainer | None, live: list[int], runs: list) -> int:
    """Load the trial's Tune checkpoint, if any; the global step it was taken at (0 without one)."""
    from ray import tune

    from provlae.fused import GROUP_FILE

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        step = json.loads((folder / CHECKPOINT_META).read_text())["step"]
        if group is not None and (folder / GROUP_FILE).exists():
            group.load_checkpoint(folder)  # each member from its solo-format file
            for j, i in enumerate(live):
                runs[i].resumed_at(group.members[j].step)
    return step


def _save(group: FusedTrainer | None, live: list[int], runs: list, folder: Path, step: int) -> None:
    """The group's checkpoint (one solo-format file per member and group.json) while a seed is still
    training, and CHECKPOINT_META with the step in every case (also when every seed has finished)."""
    unfinished = [i for i in live if not runs[i].finished]
    for i in unfinished:
        runs[i].flush()  # before the checkpoint: a restore from it must find every earlier step stored
    if unfinished:
        group.save_checkpoint(folder)
    (folder / CHECKPOINT_META).write_text(json.dumps({"step": step}))


def _stage_value(history: list[dict], step: int, objective: str) -> float:
    return next(h[objective] for h in history if h["step"] == step)


def _logged_value(run, step: int, objective: str) -> float:
    """A finished seed's objective at a stage end, read back from its MLflow run."""
    history = run.mlflow.get_metric_history(run.run_id, objective)
    values = [m.value for m in history if m.step == step]
    if not values:
        raise RuntimeError(f"MLflow run {run.run_id} has no {objective} at step {step}")
    return values[-1]


def _stage_result(values: list[float], finals: list[dict], configs: list[TrialConfig], objective: str,
                  step: int, base: TrialConfig) -> dict[str, float]:
    """Tune's result at a stage end: the objective's seed mean (and spread, per seed); at the end also
    the seed mean of every final metric."""
    mean = sum(values) / len(values)
    result: dict[str, float] = {}
    if finals:
        keys = set.intersection(*(set(f) for f in finals))
        result.update({k: sum(f[k] for f in finals) / len(finals) for k in sorted(keys)})
    result.update({objective: mean, "step": step, "stage": step // base.stage_steps - 1})
    if len(values) > 1:
        result[f"{objective}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        result.update({f"{objective}_s{c.seed}": v for c, v in zip(configs, values)})
    return result


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


def make_tuner(spec: SearchSpec, args: argparse.Namespace, ctx: tracking.TrackingContext, folder: str):
    """(tuner, restored): the experiment restored from ``folder`` when Tune saved it there, else a new one."""
    from ray import tune

    from sweeps.failure_policy import EndRepeatedFailures

    trainable = tune.with_resources(
        tune.with_parameters(search_trial, tracking_ctx=ctx, seeds=list(spec.seeds), objective=spec.objective,
                             threads=max(1, int(args.cpus_per_trial)),
                             plugin_paths=tuple(plugins.worker_paths(args))),
        {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    if tune.Tuner.can_restore(folder):
        return tune.Tuner.restore(folder, trainable=trainable, resume_errored=True), True
    return tune.Tuner(
        trainable,
        param_space={"trial": spec.base.to_dict()},
        tune_config=tune.TuneConfig(search_alg=make_searcher(spec, args.name, args.max_concurrent),
                                    scheduler=make_scheduler(spec), num_samples=spec.trials,
                                    # a stopped configuration's actor goes at once: its training thread
                                    # would notice the stop only at its next report, a stage end away
                                    reuse_actors=False, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=args.name, storage_path=args.storage, verbose=1, progress_reporter=reporter(spec),
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2), callbacks=[EndRepeatedFailures()]),
    ), False


def reporter(spec: SearchSpec):
    import os

    from ray import tune

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output engine ignores progress_reporter
    return tune.CLIReporter(parameter_columns=list(spec.space),
                            metric_columns={"step": "step", spec.objective: spec.objective},
                            max_report_frequency=30)


def trial_dirname(trial) -> str:
    from sweeps.trainable import trial_config

    cfg = trial_config(trial.config)
    return f"{cfg.family}-{cfg.dataset}-b{cfg.beta:.3g}_{trial.trial_id}"


def trial_id_of(dirname: str) -> str:
    """The Tune trial id at the end of a trial_dirname (family names hold '_', beta does not)."""
    return dirname[dirname.rindex("-b"):].split("_", 1)[1]


# -------------------------------------------------------------------------------------- the run


def run_search(spec: SearchSpec, args: argparse.Namespace) -> int:
    """Run (or resume) the search; 0 when every trial ended (finished or stopped early), 1 otherwise."""
    from sweeps.launch import check_trial_data

    check_trial_data([spec.base])
    uri = tracking.normalize_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    folder = f"{args.storage.rstrip('/')}/{args.name}"
    check_manifest(folder, spec, uri, args.experiment, write=False)
    with sweep_folder.SweepLease.acquire(folder, args.name):  # one driver per search, on any machine
        sweep_folder.check_tune_state(folder, restartable=False)
        mlflow = tracking.client(uri)
        tracking.check_experiment(mlflow, args.experiment)  # a deleted experiment: before Ray
        started = check_manifest(folder, spec, uri, args.experiment, write=False)
        return _run_search(spec, args, uri, mlflow, folder, started)


def _run_search(spec: SearchSpec, args: argparse.Namespace, uri: str, mlflow, folder: str, started: bool) -> int:
    from sweeps.cluster_checks import check_cluster
    from sweeps.launch import init_ray, terminate_as_interrupt, ui_hint

    init_ray(args.address)
    check_cluster([spec.base], uri, args.storage, args.storage_is_shared)  # before any run
    check_manifest(folder, spec, uri, args.experiment)  # a search refused above leaves no folder behind
    experiment_id = tracking.open_experiment(mlflow, args.experiment)
    parent = tracking.find_or_create_parent(mlflow, experiment_id, args.name, spec.describe())
    ctx = tracking.TrackingContext(uri, experiment_id, args.name, parent, tags=(SEARCH_TAG,),
                                   patience=getattr(args, "tracking_patience", tracking.PATIENCE))
    mlflow.set_tag(parent, *SEARCH_TAG)
    mlflow.log_dict(parent, search_document(spec), "search_space.json")
    tuner, restored = make_tuner(spec, args, ctx, folder)
    if started:
        ended = f"{len(ended_runs(mlflow, ctx))} of {spec.trials * len(spec.seeds)} trial runs already ended"
        if restored:
            print(f"resuming search {args.name!r} from {folder} ({ended})", flush=True)
        else:  # killed before Tune first saved its state: the seeded sampler proposes the same trials again
            print(f"restarting search {args.name!r} in {folder}: no Tune state saved yet ({ended}; "
                  f"their runs are found in MLflow, not retrained)", flush=True)
    with terminate_as_interrupt():
        results = tuner.fit()

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
            record_best(mlflow, parent, best, spec)
        tracking.end_parent(mlflow, parent, failed=len(failed))
    study = export_study(rows, spec, folder, args.name)
    if study:
        print(f"\nOptuna study {args.name!r} at {study} (optuna-dashboard, optuna.visualization)")
    if failed:
        print(f"\n{len(failed)} of {spec.trials} trial(s) failed:")
        for r in failed:
            print(f"  {r['trial_id']}: {r['error']}")
    print(f"\nMLflow experiment {args.experiment!r} at {uri}, parent run {parent}")
    print(ui_hint(uri))
    return 1 if failed or unfinished else 0


def search_document(spec: SearchSpec) -> dict[str, Any]:
    """search_space.json on the parent run: the space, the seeds, the objective, the base config."""
    return {"space": {k: describe_distribution(d) for k, d in spec.space.items()}, "seeds": list(spec.seeds),
            "objective": spec.objective, "mode": spec.mode, "trials": spec.trials,
            "sampler": {"name": "TPE", "seed": spec.sampler_seed},
            "early_stopping": {"scheduler": "ASHA", "time_attr": "step", "rungs": spec.rungs,
                               "reduction_factor": REDUCTION_FACTOR} if spec.rungs else None,
            "base": spec.base.to_dict()}


def ended_runs(mlflow, ctx: tracking.TrackingContext) -> list:
    query = f"tags.sweep = '{ctx.sweep}' and tags.`{tracking.ROLE_TAG}` = 'trial'"
    runs = mlflow.search_runs([ctx.experiment_id], query, max_results=10000)
    return [r for r in runs if r.info.status in ("FINISHED", "KILLED")]


# ---------------------------------------------------------------------------------- the summary


def summarize(results, spec: SearchSpec, ctx: tracking.TrackingContext, mlflow) -> list[dict]:
    """One row per Tune trial: its sampled values, objective, status and MLflow runs. The runs of a
    configuration that ASHA stopped end KILLED (tag early_stopped); those of a failed one FAILED."""
    from sweeps.launch import last_line
    from sweeps.trainable import trial_config

    rows = []
    for result in results:
        metrics, cfg = result.metrics or {}, trial_config(result.config)
        trial_id = metrics.get("trial_id") or trial_id_of(Path(result.path).name)
        runs = [tracking.find_trial_run(mlflow, ctx.experiment_id, ctx.trial_key(cfg.with_overrides({"seed": s}),
                                                                                 trial_id))
                for s in spec.seeds]
        row = {"trial_id": trial_id, "params": {k: getattr(cfg, k) for k in spec.space},
               "objective": metrics.get(spec.objective), "step": metrics.get("step", 0),
               "run_ids": [r.info.run_id for r in runs if r is not None]}
        if result.error is not None:
            row.update(status="FAILED", error=last_line(str(result.error)))
            for run in runs:
                if run is not None and run.info.status != "FAILED":
                    tracking.mark_failed(mlflow, run.info.run_id, row["error"])
        elif metrics.get("done") and row["step"] >= spec.base.total_steps:
            row["status"] = "FINISHED"
        elif metrics.get("done"):  # ASHA's STOP marks the last result done
            row["status"] = "STOPPED"
            stage = int(metrics.get("stage", 0))
            for run in runs:
                if run is not None and run.info.status == "RUNNING":
                    mlflow.set_tag(run.info.run_id, "early_stopped", f"after stage {stage}")
                    mlflow.set_terminated(run.info.run_id, "KILLED")
        else:
            row["status"] = "UNFINISHED"
        rows.append(row)
    return rows


def export_study(rows: list[dict], spec: SearchSpec, folder: str, name: str) -> str | None:
    """The search's trials as an Optuna study in <folder>/optuna.db, rebuilt from Tune's results at the
    end of every run (the study the search runs on lives in Tune's experiment state). Local folders only."""
    if "://" in folder:
        return None
    import optuna
    from optuna.trial import TrialState, create_trial

    uri = f"sqlite:///{Path(folder) / 'optuna.db'}"
    states = {"FINISHED": TrialState.COMPLETE, "STOPPED": TrialState.PRUNED, "FAILED": TrialState.FAIL}
    try:
        optuna.delete_study(study_name=name, storage=uri)
    except KeyError:  # not exported yet
        pass
    study = optuna.create_study(study_name=name, storage=uri,
                                direction="minimize" if spec.mode == "min" else "maximize")
    for r in (r for r in rows if r["status"] in states):
        state, value = states[r["status"]], r["objective"]
        study.add_trial(create_trial(
            state=state, params=r["params"], distributions=spec.space,
            value=value if state == TrialState.COMPLETE else None,
            intermediate_values={int(r["step"]): value} if value is not None else None,
            user_attrs={"ray_trial_id": r["trial_id"], "mlflow_run_ids": r["run_ids"]}))
    return uri


def best_row(rows: list[dict], spec: SearchSpec) -> dict | None:
    done = [r for r in rows if r["status"] == "FINISHED" and r["objective"] is not None]
    if not done:
        return None
    sign = -1.0 if spec.mode == "max" else 1.0
    return min(done, key=lambda r: sign * r["objective"])


def record_best(mlflow, parent: str, best: dict, spec: SearchSpec) -> None:
    """best.<field> params, best_<objective> metric, best.trial_id / best.run_ids tags, best_config.json."""
    from mlflow.entities import Param

    have = mlflow.get_run(parent).data.params
    params = [Param(f"best.{k}", str(v)) for k, v in best["params"].items() if f"best.{k}" not in have]
    if params:
        mlflow.log_batch(parent, params=params)
    mlflow.log_metric(parent, f"best_{spec.objective}", best["objective"])
    mlflow.set_tag(parent, "best.trial_id", best["trial_id"])
    mlflow.set_tag(parent, "best.run_ids", ",".join(best["run_ids"]))
    config = {**spec.base.to_dict(), **best["params"]}
    config.pop("seed")
    mlflow.log_dict(parent, {"config": config, "seeds": list(spec.seeds), spec.objective: best["objective"]},
                    "best_config.json")


def format_table(rows: list[dict], spec: SearchSpec) -> str:
    sign = -1.0 if spec.mode == "max" else 1.0
    order = sorted(rows, key=lambda r: (r["status"] != "FINISHED", r["objective"] is None,
                                        sign * (r["objective"] or 0.0)))
    names = list(spec.space)
    header = f"{'trial':<12}" + "".join(f"  {n:>13}" for n in names) + f"  {spec.objective:>12}  status"
    lines = [header, "-" * len(header)]
    for r in order:
        cells = "".join(f"  {_value(r['params'][n]):>13}" for n in names)
        status = r["status"].lower() if r["status"] != "STOPPED" else f"stopped at step {r['step']}"
        lines.append(f"{r['trial_id']:<12}{cells}  {_value(r['objective']):>12}  {status}")
    return "\n".join(lines)


def format_best(best: dict | None, rows: list[dict], spec: SearchSpec, final: bool) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("FINISHED", "STOPPED", "FAILED")}
    done = (f"{counts['FINISHED']} of {spec.trials} trials finished, {counts['STOPPED']} stopped early, "
            f"{counts['FAILED']} failed")
    if best is None:
        return f"no configuration finished yet ({done})"
    seeds = ",".join(map(str, spec.seeds))
    title = "best configuration" if final else "best configuration so far"
    lines = [f"{title}: {spec.objective} = {best['objective']:.6g} ({spec.mode}, mean over seeds {seeds}; {done})"]
    lines += [f"  {k} = {_value(v)}" for k, v in best["params"].items()]
    summary = {**best["params"], spec.objective: best["objective"], "trial_id": best["trial_id"],
               "run_ids": best["run_ids"]}
    lines.append("best: " + json.dumps(summary))
    return "\n".join(lines)


def _value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
