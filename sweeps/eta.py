"""A running sweep's expected end: one line under each of Tune's status tables (and so in ``ray job logs``).

    ETA: 3 of 8 trials finished, 2 running, 3 pending; 1.23M of 2.1M images trained (58%); expected end
    21:42 UTC (in 12 min; the plan said 25 min)

Before any image is trained the end is the plan's (``provlae.plan``, where a measurement made one); from
then on it is the plan corrected by what this driver has measured: the images still to train over the
images per second trained since the first report (evaluations slow that rate too, so they are counted).
Images trained by an earlier driver of a resumed sweep count as done, not in the rate. A search creates its
Tune trials as it goes: the configurations not yet proposed count as pending, each its full training, and
a configuration stopped early (ASHA) counts what it trained.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from provlae.config import TrialConfig
from provlae.plan import count, duration
from sweeps.trainable import GROUP_KEY, group_configs, trial_config

DONE = ("TERMINATED", "ERROR")


def trial_images(trial) -> tuple[int, int]:
    """(images trained so far, images in all) of a grid's Tune trial: a solo trial or a fused group."""
    configs: list[TrialConfig] = (group_configs(trial.config) if GROUP_KEY in trial.config
                                  else [trial_config(trial.config)])
    total = sum(c.total_steps * c.batch_size for c in configs)
    if trial.status == "TERMINATED":
        return total, total
    step = int((trial.last_result or {}).get("step") or 0)
    return min(total, sum(min(step, c.total_steps) * c.batch_size for c in configs)), total


def configuration_images(images_per_step: int, total_steps: int) -> Callable:
    """``images_of`` for a search's Tune trials: a configuration trains all its seeds at once and reports
    its step at stage ends; one that ended (finished, stopped early or failed) counts what it trained."""
    total = images_per_step * total_steps

    def images_of(trial) -> tuple[int, int]:
        step = int((trial.last_result or {}).get("step") or 0)
        done = min(total, step * images_per_step)
        return (done, done) if trial.status in DONE else (done, total)

    return images_of


class Progress:
    """What the ETA line needs to remember between reports: when and how far the first one saw the sweep.
    ``expected``: (Tune trials the sweep will have, images of one not created yet), for a search."""

    def __init__(self, planned_s: float | None = None, images_of: Callable = trial_images,
                 clock: Callable[[], float] = time.time, expected: tuple[int, int] | None = None):
        self.planned_s, self.images_of, self.clock, self.expected = planned_s, images_of, clock, expected
        self.start: float | None = None  # the first report: this driver's start
        self.first: tuple[float, int] | None = None  # (time, images done) at the first report

    def __getstate__(self) -> dict:
        """Saved with Tune's state: a resumed sweep's driver measures afresh."""
        return {**self.__dict__, "start": None, "first": None}

    def line(self, trials: list) -> str:
        now = self.clock()
        if self.start is None:
            self.start = now
        unseen = max(0, self.expected[0] - len(trials)) if self.expected else 0
        finished = sum(t.status in DONE for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        pending = len(trials) + unseen - finished - running
        done, total = 0, unseen * self.expected[1] if unseen else 0
        for t in trials:
            d, n = self.images_of(t)
            done, total = done + d, total + n
        if self.first is None:
            self.first = (now, done)
        share = f" ({100 * done / total:.0f}%)" if total else ""
        head = (f"ETA: {finished} of {len(trials) + unseen} trials finished, {running} running, {pending} pending; "
                f"{count(done)} of {count(total)} images trained{share}")
        if finished == len(trials) + unseen:
            return f"{head}; ended after {duration(now - self.start)}"
        rate = (done - self.first[1]) / (now - self.first[0]) if now > self.first[0] else 0.0
        planned = f"the plan said {duration(self.planned_s)}" if self.planned_s else "no plan: nothing measured"
        if rate > 0:
            left = (total - done) / rate
            end = time.strftime("%H:%M UTC", time.gmtime(now + left))
            return f"{head}; expected end {end} (in {duration(left)}; {planned})"
        if self.planned_s:
            end = time.strftime("%H:%M UTC", time.gmtime(self.start + self.planned_s))
            return f"{head}; expected end {end} by the plan (nothing trained yet)"
        return f"{head}; expected end: after the first progress ({planned})"
