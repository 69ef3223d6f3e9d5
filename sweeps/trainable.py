"""The Tune function trainable: config dict -> TrialConfig -> Trainer, reporting to Tune and MLflow.

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

from provlae.config import TrialConfig
from provlae.errors import TrainingDiverged
from sweeps.tracking import TrackingContext, TrialRun

CHECKPOINT_FILE = "trainer.pt"
PROGRESS_EVERY_S = 10.0  # "step" events go to Tune at most this often (each report is a round trip)


def trial_config(config: dict[str, Any]) -> TrialConfig:
    """Tune's config -> TrialConfig. The grid puts the resolved config under "trial"; a searcher may add
    top-level TrialConfig fields (its sampled values), which win."""
    raw = dict(config.get("trial", {}))
    raw.update({k: v for k, v in config.items() if k != "trial"})
    return TrialConfig.from_dict(raw)


def train_trial(config: dict[str, Any], tracking: TrackingContext, threads: int = 1) -> None:
    import torch

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
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_checkpoint(Path(folder) / CHECKPOINT_FILE)
        run.resumed_at(trainer.step)

    last_report = time.monotonic()

    def on_event(event) -> None:
        nonlocal last_report
        run.log(event.step, event.metrics)  # MLflow gets every event (buffered)
        result = {**event.metrics, "step": event.step, "stage": event.stage}
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
    with tempfile.TemporaryDirectory(prefix="provlae-figures-") as folder:
        trainer.write_figures(folder)
        run.finish(Path(folder))
    return final, trainer.step, trainer.stage
