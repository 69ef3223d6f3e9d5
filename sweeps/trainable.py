"""The grid's Tune function trainables, reporting to Tune and MLflow:
- ``train_trial``: config dict -> TrialConfig -> Trainer (one trial);
- ``train_group``: config dict -> several TrialConfigs -> FusedTrainer (a fused group, ``--fuse K``), each
  member its own MLflow run exactly as a solo trial's, so nothing downstream tells them apart.

Both are thin: the trial's life (the worker prologue, its runs, restore, flush-then-checkpoint, figures,
failing) is sweeps/lifecycle.py's, shared with the search's trainable. Checkpoints go to Tune (at every
stage end and every ``checkpoint_every`` steps), so a trial whose worker dies resumes mid-stage; the
trainer replays the same numbers bitwise, and the trial's MLflow run (``tracking.TrialRun``) skips the
steps it already holds. A solo trial's checkpoint is ``trainer.pt``; a group's is one solo-format file per
member (provlae/fused.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune

from provlae.config import TrialConfig
from sweeps.lifecycle import Progress, Trial, divergence, prologue, restore
from sweeps.tracking import TrackingContext, TrialRun

CHECKPOINT_FILE = "trainer.pt"
GROUP_KEY = "fused"  # a fused trial's Tune config: {"fused": {"label": str, "members": [config dicts]}}


def trial_config(config: dict[str, Any]) -> TrialConfig:
    """Tune's config -> TrialConfig. The grid puts the resolved config under "trial"; a searcher may add
    top-level TrialConfig fields (its sampled values), which win."""
    raw = dict(config.get("trial", {}))
    raw.update({k: v for k, v in config.items() if k != "trial"})
    return TrialConfig.from_dict(raw)


def train_trial(config: dict[str, Any], tracking: TrackingContext, threads: int = 1,
                plugin_paths: tuple[str, ...] = ()) -> None:
    prologue(threads, plugin_paths)
    cfg = trial_config(config)
    trial = Trial.open(tracking, [cfg])
    run = trial.runs[0]
    if run.finished:  # an earlier attempt finished after Tune last saved its state: don't train again
        tune.report({**run.final_metrics(), "step": cfg.total_steps})
        return
    if trial.fail_diverged([0]):  # the replay from the last checkpoint would diverge again
        raise divergence(run.previous_error)
    with trial.failing([0]):
        final, step, stage = _train(trial)
    tune.report({**final, "step": step, "stage": stage})


def _train(trial: Trial) -> tuple[dict[str, float], int, int]:
    from provlae.train import Trainer

    trainer, restored = restore(lambda: Trainer(trial.configs[0]),
                                lambda t, folder: t.load_checkpoint(folder / CHECKPOINT_FILE))
    if restored:
        trial.resumed([0], [trainer])
    progress = Progress()

    def save(folder: Path) -> None:
        trainer.save_checkpoint(folder / CHECKPOINT_FILE)

    def on_event(event) -> None:
        trial.runs[0].log(event.step, event.metrics)  # MLflow gets every event (buffered)
        result = {**event.metrics, "step": event.step, "stage": event.stage}
        if event.kind == "stage_end":
            trial.stage_figures(0, trainer)
        if event.kind in ("checkpoint", "stage_end"):
            trial.checkpoint([0], save, result)
        elif event.kind == "step" and progress.due():
            tune.report(result)  # live progress for Tune's table and schedulers
        else:
            return
        progress.reported()

    final = trainer.run(on_event)
    trial.finish(0, trainer)
    return final, trainer.step, trainer.stage


# ------------------------------------------------------------------------------------ fused groups


def group_configs(config: dict[str, Any]) -> list[TrialConfig]:
    return [TrialConfig.from_dict(c) for c in config[GROUP_KEY]["members"]]


def group_label(configs: list[TrialConfig]) -> str:
    """A fused trial's name in Tune: its first member's run name and how many others it holds."""
    more = f"+{len(configs) - 1}" if len(configs) > 1 else ""
    return f"{configs[0].run_name}{more}"


def train_group(config: dict[str, Any], tracking: TrackingContext, threads: int = 1,
                kernels: str = "auto", plugin_paths: tuple[str, ...] = ()) -> None:
    """A fused group of trials in one Tune trial. Each member finds or creates its own MLflow run (the
    same key as its solo trial); members finished by an earlier attempt are not trained again, and a member
    that diverged stays failed. A member that diverges now fails alone: the Tune trial goes on and ends
    normally, and the sweep's summary reads each member's outcome from its run."""
    prologue(threads, plugin_paths)
    cfgs = group_configs(config)
    trial = Trial.open(tracking, cfgs)
    todo = trial.unfinished()
    diverged = trial.fail_diverged(todo)
    todo = [i for i in todo if i not in diverged]
    if todo:
        with trial.failing(todo):
            _train_members(trial, todo, kernels)
    tune.report({**_group_counts(trial.runs), "step": cfgs[0].total_steps, "stage": cfgs[0].num_stages - 1})


def _group_counts(runs: list[TrialRun]) -> dict[str, int]:
    return {"members": len(runs), "finished": sum(r.status == "FINISHED" for r in runs),
            "failed": sum(r.status == "FAILED" for r in runs)}


def _train_members(trial: Trial, todo: list[int], kernels: str) -> None:
    from provlae.fused import FusedTrainer

    group, restored = restore(lambda: FusedTrainer([trial.configs[i] for i in todo], kernels=kernels),
                              lambda g, folder: g.load_checkpoint(folder))
    if restored:
        trial.resumed(todo, group.members)
    progress = Progress()

    def counts(step: int, stage: int) -> dict[str, Any]:
        return {**_group_counts(trial.runs), "live": len(group.live), "step": step, "stage": stage}

    def on_event(j: int, event) -> None:
        i = todo[j]
        if event.kind == "failed":
            trial.runs[i].fail(group.failed[j])  # the member's divergence, as its solo trial would record it
            return
        trial.runs[i].log(event.step, event.metrics)
        if event.kind == "stage_end":
            trial.stage_figures(i, group.members[j])
        if event.kind == "step" and progress.due():
            tune.report(counts(event.step, event.stage))
            progress.reported()

    def on_checkpoint(step: int) -> None:
        live = group.live
        trial.checkpoint([todo[j] for j in live], group.save_checkpoint,
                         counts(step, group.members[live[0]].stage))
        progress.reported()

    finals = group.run(on_event, on_checkpoint=on_checkpoint)
    for j, final in enumerate(finals):
        if final is not None:
            trial.finish(todo[j], group.members[j], len(group.live), group.kernels)
