"""The Tune function trainables, reporting to Tune and MLflow:
- ``train_trial``: config dict -> TrialConfig -> Trainer (one trial);
- ``train_group``: config dict -> several TrialConfigs -> FusedTrainer (a fused group, ``--fuse K``), each
  member its own MLflow run exactly as a solo trial's, so nothing downstream tells them apart.

Checkpoints go to Tune (at every stage end and every ``checkpoint_every`` steps), so a trial whose worker
dies resumes mid-stage; the trainer replays the same numbers bitwise, and the trial's MLflow run
(``tracking.TrialRun``) skips the steps it already holds. Metrics are flushed to MLflow *before* each
checkpoint is reported, so a restore never skips a step that was not stored.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune

from provlae import plugins
from provlae.config import TrialConfig
from provlae.errors import CheckpointError, TrainingDiverged
from sweeps.tracking import TrackingContext, TrialRun

CHECKPOINT_FILE = "trainer.pt"
PROGRESS_EVERY_S = 10.0  # "step" events go to Tune at most this often (each report is a round trip)
GROUP_KEY = "fused"  # a fused trial's Tune config: {"fused": {"label": str, "members": [config dicts]}}


def trial_config(config: dict[str, Any]) -> TrialConfig:
    """Tune's config -> TrialConfig. The grid puts the resolved config under "trial"; a searcher may add
    top-level TrialConfig fields (its sampled values), which win."""
    raw = dict(config.get("trial", {}))
    raw.update({k: v for k, v in config.items() if k != "trial"})
    return TrialConfig.from_dict(raw)


def train_trial(config: dict[str, Any], tracking: TrackingContext, threads: int = 1,
                plugin_paths: tuple[str, ...] = ()) -> None:
    import torch

    plugins.add_paths(list(plugin_paths))  # the trial's config names its plug-ins; they import from here
    torch.set_num_threads(threads)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a log line per checkpoint per trial
    cfg = trial_config(config)
    run = TrialRun.open(tracking, cfg, tune.get_context().get_trial_id())
    if run.finished:  # an earlier attempt finished after Tune last saved its state: don't train again
        tune.report({**run.final_metrics(), "step": cfg.total_steps})
        return
    if run.previous_error.startswith(TrainingDiverged.__name__):
        # The replay from the last checkpoint is the same computation: it would diverge again.
        run.fail(run.previous_error)
        raise TrainingDiverged(run.previous_error.removeprefix(f"{TrainingDiverged.__name__}: "))
    try:
        final, step, stage = _train(cfg, run)
    except Exception as e:  # not SystemExit: that is Tune stopping the trial, which resumes later
        run.fail(e)
        raise
    tune.report({**final, "step": step, "stage": stage})


def _train(cfg: TrialConfig, run: TrialRun) -> tuple[dict[str, float], int, int]:
    from provlae.train import Trainer

    trainer = Trainer(cfg)
    if restore_checkpoint(lambda folder: trainer.load_checkpoint(folder / CHECKPOINT_FILE)):
        run.resumed_at(trainer.step)

    last_report = time.monotonic()

    def on_event(event) -> None:
        nonlocal last_report
        run.log(event.step, event.metrics)  # MLflow gets every event (buffered)
        result = {**event.metrics, "step": event.step, "stage": event.stage}
        if event.kind == "stage_end":
            log_stage_figures(run, trainer)
        if event.kind in ("checkpoint", "stage_end"):
            run.flush()  # before the checkpoint: a restore from it must find every earlier step stored
            with tempfile.TemporaryDirectory(prefix="provlae-ckpt-") as folder:
                trainer.save_checkpoint(Path(folder) / CHECKPOINT_FILE)
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))
        elif event.kind == "step" and time.monotonic() - last_report >= PROGRESS_EVERY_S:
            tune.report(result)  # live progress for Tune's table and schedulers
        else:
            return
        last_report = time.monotonic()

    final = trainer.run(on_event)
    finish_with_figures(run, trainer)
    return final, trainer.step, trainer.stage


def restore_checkpoint(load) -> bool:
    """Load the trial's newest readable Tune checkpoint with ``load(folder)``; False when it has none.
    A damaged newest one (truncated by a full disk or a lost node) falls back to the one kept before it
    (``num_to_keep=2``): the steps in between are trained again, bitwise the same, and MLflow already holds
    them. All damaged: CheckpointError, which ends the trial without retries (sweeps/failure_policy.py)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return False
    errors = []
    for candidate in [checkpoint, *earlier_checkpoints(checkpoint)]:
        try:
            with candidate.as_directory() as folder:
                load(Path(folder))
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            logging.getLogger(__name__).warning("resumed from %s: the newer checkpoint is damaged (%s)",
                                                candidate.path, errors[0])
        return True
    raise CheckpointError(f"every kept checkpoint of this trial is damaged: {errors[0]}")


def earlier_checkpoints(checkpoint) -> list:
    """The trial's other kept checkpoints older than ``checkpoint`` (Tune's checkpoint_NNNNNN folders
    beside it), newest first."""
    import pyarrow.fs

    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    try:
        infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError:
        return []
    older = sorted((Path(i.path).name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and Path(i.path).name.startswith("checkpoint_") and Path(i.path).name < name), reverse=True)
    return [tune.Checkpoint(f"{parent}/{n}", filesystem=checkpoint.filesystem) for n in older]


def log_stage_figures(run: TrialRun, trainer) -> None:
    """The figures of the stage the trainer just ended into its run (``figures/stage<s>/``)."""
    with tempfile.TemporaryDirectory(prefix="provlae-figures-") as folder:
        trainer.write_stage_figures(folder)
        run.log_figures(Path(folder))


def finish_with_figures(run: TrialRun, trainer) -> None:
    """The trained trial's figures into its run, then the run FINISHED."""
    with tempfile.TemporaryDirectory(prefix="provlae-figures-") as folder:
        trainer.write_figures(folder)
        run.finish(Path(folder))


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
    import torch

    plugins.add_paths(list(plugin_paths))
    torch.set_num_threads(threads)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfgs, trial_id = group_configs(config), tune.get_context().get_trial_id()
    runs = [TrialRun.open(tracking, cfg, trial_id) for cfg in cfgs]
    todo = []
    for i, run in enumerate(runs):
        if run.finished:
            continue
        if run.previous_error.startswith(TrainingDiverged.__name__):
            run.fail(run.previous_error)  # the replay from the checkpoint would diverge again
            continue
        todo.append(i)
    if todo:
        try:
            _train_members(cfgs, runs, todo, kernels)
        except Exception as e:  # not SystemExit: that is Tune stopping the trial, which resumes later
            for i in todo:
                if runs[i].status == "RUNNING":
                    runs[i].fail(e)
            raise
    tune.report({**_group_counts(runs), "step": cfgs[0].total_steps, "stage": cfgs[0].num_stages - 1})


def _group_counts(runs: list[TrialRun]) -> dict[str, int]:
    return {"members": len(runs), "finished": sum(r.status == "FINISHED" for r in runs),
            "failed": sum(r.status == "FAILED" for r in runs)}


def _train_members(cfgs: list[TrialConfig], runs: list[TrialRun], todo: list[int], kernels: str) -> None:
    from provlae.fused import FusedTrainer

    group = FusedTrainer([cfgs[i] for i in todo], kernels=kernels)

    def load(folder: Path) -> None:
        nonlocal group
        try:
            group.load_checkpoint(folder)
        except CheckpointError:  # members read before the damaged one are loaded: start the next try afresh
            group = FusedTrainer([cfgs[i] for i in todo], kernels=kernels)
            raise

    if restore_checkpoint(load):
        for j, i in enumerate(todo):
            runs[i].resumed_at(group.members[j].step)
    last_report = time.monotonic()

    def progress(step: int, stage: int) -> dict[str, Any]:
        return {**_group_counts(runs), "live": len(group.live), "step": step, "stage": stage}

    def on_event(j: int, event) -> None:
        nonlocal last_report
        run = runs[todo[j]]
        if event.kind == "failed":
            run.fail(group.failed[j])  # the member's divergence, as its solo trial would record it
            return
        run.log(event.step, event.metrics)
        if event.kind == "stage_end":
            log_stage_figures(run, group.members[j])
        if event.kind == "step" and time.monotonic() - last_report >= PROGRESS_EVERY_S:
            tune.report(progress(event.step, event.stage))
            last_report = time.monotonic()

    def on_checkpoint(step: int) -> None:
        nonlocal last_report
        for j in group.live:
            runs[todo[j]].flush()  # before the checkpoint: a restore from it must find every earlier step
        with tempfile.TemporaryDirectory(prefix="provlae-ckpt-") as folder:
            group.save_checkpoint(folder)
            tune.report(progress(step, group.members[group.live[0]].stage),
                        checkpoint=tune.Checkpoint.from_directory(folder))
        last_report = time.monotonic()

    finals = group.run(on_event, on_checkpoint=on_checkpoint)
    for j, final in enumerate(finals):
        if final is None:
            continue
        finish_with_figures(runs[todo[j]], group.members[j])
