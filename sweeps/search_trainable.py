"""The search's Tune trainable: one Tune trial = one configuration, trained on every seed of the search.

Its seeds train as one fused group (``provlae.fused.FusedTrainer``: every member exactly its seed's solo
trial), a stage at a time, each seed in its own MLflow child run, and it reports to Tune once per stage
end: the seed mean of the objective, with the group's checkpoint (one solo-format file per seed, and
``search.json`` with the step). A seed that diverges fails the configuration. The trial's life (prologue,
runs, restore with its fallback, flush-then-checkpoint, figures, failing) is sweeps/lifecycle.py's.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provlae.config import TrialConfig
from provlae.errors import CheckpointError
from sweeps import tracking
from sweeps.lifecycle import Trial, divergence, prologue, restore

if TYPE_CHECKING:
    from provlae.fused import FusedTrainer

CHECKPOINT_META = "search.json"  # beside the fused group's checkpoint: the step it was taken at


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
    from sweeps.trainable import trial_config

    prologue(threads, plugin_paths)
    base = trial_config(config)
    trial = Trial.open(tracking_ctx, [base.with_overrides({"seed": s}) for s in seeds])
    live = trial.unfinished()  # finished runs: a resumed search
    diverged = trial.fail_diverged(live)
    if diverged:  # a retry: the replay from the last stage end is the same computation, it would diverge again
        error = trial.runs[diverged[0]].previous_error
        for i in live:
            if trial.runs[i].status == "RUNNING":
                trial.runs[i].fail(trial.runs[i].previous_error or error)
        raise divergence(error)
    with trial.failing(live):
        _train_seeds(base, trial, live, objective)


def _train_seeds(base: TrialConfig, trial: Trial, live: list[int], objective: str) -> None:
    """Advance the live seeds (``live``: indices into the trial's members) as one fused group, stage end
    by stage end; the others finished in an earlier attempt, are left out of the group and read back
    from MLflow."""
    from provlae.fused import GROUP_FILE, FusedTrainer

    restored = {"step": 0, "group": False}

    def make() -> FusedTrainer | None:  # over one copy of the data (kernels: the device's best)
        return FusedTrainer([trial.configs[i] for i in live]) if live else None  # a group needs one member

    def load(group: FusedTrainer | None, folder: Path) -> None:
        restored["step"], restored["group"] = read_step(folder), False
        if group is not None and (folder / GROUP_FILE).exists():
            group.load_checkpoint(folder)  # each member from its solo-format file
            restored["group"] = True

    group, _ = restore(make, load)
    if restored["group"]:
        trial.resumed(live, group.members)
    slot = {i: j for j, i in enumerate(live)}  # seed index -> member of the group
    on_event = _group_logger(group, live, trial) if group is not None else None
    for end in (e for e in _stage_ends(base) if e > restored["step"]):
        if group is not None:
            reached = group.run(on_event, until=end)  # raises the first divergence (see _group_logger)
            for j, final in enumerate(reached):
                if final:  # the member reached the end
                    trial.finish(live[j], group.members[j], len(group.live), group.kernels)
        values = [_stage_value(group.members[slot[i]].history, end, objective) if i in slot
                  else _logged_value(trial.runs[i], end, objective) for i in range(len(trial.runs))]
        finals = []
        if end == base.total_steps:
            finals = [group.members[slot[i]].final_metrics() if i in slot else trial.runs[i].final_metrics()
                      for i in range(len(trial.runs))]
        result = _stage_result(values, finals, trial.configs, objective, end, base)
        unfinished = [i for i in live if not trial.runs[i].finished]
        trial.checkpoint(unfinished, functools.partial(_save, group, unfinished, step=end), result)


def _stage_ends(cfg: TrialConfig) -> list[int]:
    return [cfg.stage_steps * (k + 1) for k in range(cfg.num_stages)]


def _logger(run: tracking.TrialRun):
    def on_event(event) -> None:
        run.log(event.step, event.metrics)  # buffered; flushed before every Tune checkpoint
        if event.kind in ("checkpoint", "stage_end"):
            run.flush()

    return on_event


def _group_logger(group: FusedTrainer, live: list[int], trial: Trial):
    """The group's callback: member j's events to its seed's run. A member that diverged (retired by the
    group) ends its run FAILED with the error, which is raised at once: the configuration has failed."""
    loggers = [_logger(trial.runs[i]) for i in live]

    def on_event(j: int, event) -> None:
        if event.kind == "failed":
            error = group.failed[j]
            trial.runs[live[j]].fail(error)
            raise error
        loggers[j](event)

    return on_event


def read_step(folder: Path) -> int:
    """The step a search checkpoint was taken at (its ``search.json``); CheckpointError when damaged."""
    try:
        return int(json.loads((folder / CHECKPOINT_META).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"search checkpoint {folder}: cannot read {CHECKPOINT_META} ({e})") from None


def _save(group: FusedTrainer | None, unfinished: list[int], folder: Path, step: int) -> None:
    """The group's checkpoint (one solo-format file per member and group.json) while a seed is still
    training, and CHECKPOINT_META with the step in every case (also when every seed has finished)."""
    if unfinished:
        group.save_checkpoint(folder)
    (folder / CHECKPOINT_META).write_text(json.dumps({"step": step}))


def _stage_value(history: list[dict], step: int, objective: str) -> float:
    return next(h[objective] for h in history if h["step"] == step)


def _logged_value(run: tracking.TrialRun, step: int, objective: str) -> float:
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
