"""One Tune trial's life, whatever it trains: a grid's solo trial (``Trainer``), a grid's fused group and a
search's configuration (``FusedTrainer``) all run these steps (sweeps/trainable.py,
sweeps/search_trainable.py).

1. ``prologue``: plug-in folders, torch threads, Ray's log level; then ``Trial.open``: one MLflow run per
   member (``tracking.TrialRun``: found again by its trial key on a retry or a resume);
2. members whose run finished are not trained again; ``fail_diverged``: a member whose earlier attempt
   diverged fails again at once (the replay from a checkpoint is the same computation);
3. ``restore``: the newest readable Tune checkpoint, else the one kept before it;
4. ``checkpoint``: the runs flushed to MLflow *before* Tune gets the checkpoint, so a restore from it never
   skips a step that was not stored;
5. ``stage_figures`` at stage ends, ``finish`` (figures, then FINISHED); ``failing``: the runs still
   RUNNING end FAILED with the error that ends the attempt (not SystemExit: that is Tune stopping it).
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ray import tune

from analysis.record import EVAL_SECONDS, TRAIN_IMG_S
from provlae import plugins
from provlae.config import TrialConfig
from provlae.errors import CheckpointError, TrainingDiverged
from sweeps.tracking import TrackingContext, TrialRun

PROGRESS_EVERY_S = 10.0  # "step" events go to Tune at most this often (each report is a round trip)
T = TypeVar("T")


def prologue(threads: int, plugin_paths: tuple[str, ...]) -> None:
    """What every trial does first on its worker, before it reads its configs (they name plug-ins, which
    import from ``plugin_paths``)."""
    import torch

    plugins.add_paths(list(plugin_paths))  # the trial's config names its plug-ins; they import from here
    torch.set_num_threads(threads)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a log line per checkpoint per trial


@dataclass
class Trial:
    """A Tune trial's members (their configs) and their MLflow runs, index for index."""

    configs: list[TrialConfig]
    runs: list[TrialRun]

    @classmethod
    def open(cls, tracking: TrackingContext, configs: list[TrialConfig]) -> Trial:
        """Each member's run, found again or made (after the ``prologue``)."""
        trial_id = tune.get_context().get_trial_id()
        return cls(list(configs), [TrialRun.open(tracking, cfg, trial_id) for cfg in configs])

    def unfinished(self) -> list[int]:
        """The members an earlier attempt did not finish (it may have finished after Tune's last save)."""
        return [i for i, run in enumerate(self.runs) if not run.finished]

    def fail_diverged(self, members: list[int]) -> list[int]:
        """Those of ``members`` whose earlier attempt diverged, their runs failed again with that error."""
        diverged = [i for i in members if self.runs[i].previous_error.startswith(TrainingDiverged.__name__)]
        for i in diverged:
            self.runs[i].fail(self.runs[i].previous_error)
        return diverged

    @contextlib.contextmanager
    def failing(self, members: list[int]) -> Iterator[None]:
        """On an error, the runs of ``members`` still RUNNING end FAILED with it, and it goes on to Tune."""
        try:
            yield
        except Exception as e:  # not SystemExit: that is Tune stopping the trial, which resumes later
            for i in members:
                if self.runs[i].status == "RUNNING":  # not finished, nor failed already (a divergence)
                    self.runs[i].fail(e)
            raise

    def resumed(self, members: list[int], trainers: list) -> None:
        """Tag each member's run with the step its trainer resumed at."""
        for i, trainer in zip(members, trainers):
            self.runs[i].resumed_at(trainer.step)

    def checkpoint(self, members: list[int], save: Callable[[Path], Any], result: dict[str, Any]) -> None:
        """Flush the runs of ``members``, then report ``result`` with the checkpoint ``save(folder)`` writes."""
        for i in members:
            self.runs[i].flush()  # before the checkpoint: a restore from it must find every earlier step stored
        with tempfile.TemporaryDirectory(prefix="provlae-ckpt-") as folder:
            save(Path(folder))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))

    def stage_figures(self, i: int, trainer) -> None:
        """What the trainer stores of the stage it just ended, into member i's run: the paper's figures
        (``figures/stage<s>/``) and the representation (``representation/stage<s>.npz``)."""
        with tempfile.TemporaryDirectory(prefix="provlae-figures-") as folder:
            trainer.write_stage_figures(folder)
            self.runs[i].log_figures(Path(folder))
        with tempfile.TemporaryDirectory(prefix="provlae-representation-") as folder:
            trainer.write_representation(folder)
            self.runs[i].log_representation(Path(folder))

    def finish(self, i: int, trainer, fuse: int = 1, kernels: str = "solo") -> None:
        """Member i's trained figures into its run, what it measured (``train_img_s``, ``eval_seconds``)
        into its run and into this node's throughput table, then the run FINISHED."""
        measured = trainer.measured(fuse, kernels)
        if measured is not None:
            self.runs[i].log(trainer.step, {TRAIN_IMG_S: measured.train_img_s, EVAL_SECONDS: measured.eval_s})
            record_throughput(measured)
        with tempfile.TemporaryDirectory(prefix="provlae-figures-") as folder:
            trainer.write_figures(folder)
            self.runs[i].finish(Path(folder))


def record_throughput(measured) -> None:
    """Into this node's throughput table, which plans read; a table that cannot take it (damaged, a
    read-only home) is said in one line and left as it is: the trial's record does not depend on it."""
    from provlae.throughput import ThroughputError, add

    try:
        add([measured])
    except (ThroughputError, OSError) as e:
        print(f"note: the throughput table was not updated: {e}", flush=True)


def divergence(error: str) -> TrainingDiverged:
    """The TrainingDiverged an earlier attempt recorded (its run's error tag), raised again."""
    return TrainingDiverged(error.removeprefix(f"{TrainingDiverged.__name__}: "))


class Progress:
    """Whether live progress is due to Tune: at most every PROGRESS_EVERY_S."""

    def __init__(self):
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= PROGRESS_EVERY_S

    def reported(self) -> None:
        self.last = time.monotonic()


# ------------------------------------------------------------------------------------- restoring


def restore(make: Callable[[], T], load: Callable[[T, Path], None]) -> tuple[T, bool]:
    """(trainer, restored): ``make()``'s trainer, loaded with ``load(trainer, folder)`` from the trial's
    newest readable Tune checkpoint when it has one. A damaged newest one (truncated by a full disk or a
    lost node) falls back to the one kept before it (``num_to_keep=2``), into a trainer made afresh (the
    damaged one may be half read): the steps in between are trained again, bitwise the same, and MLflow
    already holds them. All damaged: CheckpointError, which ends the trial without retries
    (sweeps/failure_policy.py)."""
    trainer = make()
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return trainer, False
    errors = []
    for candidate in [checkpoint, *earlier_checkpoints(checkpoint)]:
        if errors:
            trainer = make()
        try:
            with candidate.as_directory() as folder:
                load(trainer, Path(folder))
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            logging.getLogger(__name__).warning("resumed from %s: the newer checkpoint is damaged (%s)",
                                                candidate.path, errors[0])
        return trainer, True
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
