"""A running sweep's ETA line (sweeps/eta.py): counts, images, and the expected end from the plan before
anything is trained, then from the rate this driver measured; a resumed sweep's driver measures afresh."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from provlae.config import TrialConfig
from sweeps.eta import Progress, trial_images
from sweeps.trainable import GROUP_KEY

CFG = dict(dataset="dsprites", family="pro_vlae", subset=1000, steps_per_stage=100, batch_size=50, device="cpu")


def solo(status: str, step: int | None = None, **kw):
    cfg = TrialConfig.from_dict({**CFG, **kw})
    return SimpleNamespace(status=status, config={"trial": cfg.to_dict()},
                           last_result={} if step is None else {"step": step})


def group(status: str, step: int, k: int):
    members = [TrialConfig.from_dict({**CFG, "seed": s}).to_dict() for s in range(k)]
    return SimpleNamespace(status=status, config={GROUP_KEY: {"label": "g", "members": members}},
                           last_result={"step": step})


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_images_of_solo_trials_and_fused_groups():
    assert trial_images(solo("RUNNING", 120)) == (6_000, 15_000)  # 3 stages x 100 steps x 50 images
    assert trial_images(solo("PENDING")) == (0, 15_000)
    assert trial_images(solo("TERMINATED", 7)) == (15_000, 15_000)
    assert trial_images(group("RUNNING", 100, 4)) == (20_000, 60_000)


def test_the_expected_end_from_the_plan_then_from_the_measured_rate():
    clock = Clock(1_000_000.0)
    progress = Progress(planned_s=600.0, clock=clock)
    trials = [solo("TERMINATED"), solo("RUNNING", 0), solo("PENDING")]
    first = progress.line(trials)
    assert first.startswith("ETA: 1 of 3 trials finished, 1 running, 1 pending; 15k of 45k images trained (33%)")
    assert first.endswith("expected end 13:56 UTC by the plan (nothing trained yet)")  # 1,000,000 s + 600 s
    clock.t += 60
    trials[1] = solo("RUNNING", 60)  # 3,000 images in 60 s: 50 img/s; 27,000 left: 540 s
    line = progress.line(trials)
    assert "18k of 45k images trained (40%)" in line
    assert line.endswith("expected end 13:56 UTC (in 9 min; the plan said 10 min)")
    clock.t += 60
    assert progress.line([solo("TERMINATED")] * 3).endswith("3 of 3 trials finished, 0 running, 0 pending; "
                                                           "45k of 45k images trained (100%); ended after 2 min")


def test_without_a_plan_it_waits_for_progress_and_a_resumed_driver_starts_afresh():
    clock = Clock(0.0)
    progress = Progress(clock=clock)
    assert progress.line([solo("RUNNING", 50)]).endswith("expected end: after the first progress (no plan: "
                                                         "nothing measured)")
    restored = pickle.loads(pickle.dumps(progress))  # as Tune saves and restores its state
    assert restored.start is None and restored.first is None
    clock.t = 100.0
    line = restored.line([solo("RUNNING", 50)])  # what an earlier driver trained is done, not a rate
    assert "2.5k of 15k images trained" in line and "after the first progress" in line


@pytest.mark.parametrize("status", ["ERROR", "TERMINATED"])
def test_failed_trials_count_as_finished(status):
    assert Progress().line([solo(status, 10)]).startswith("ETA: 1 of 1 trials finished")


def configuration(status: str, step: int):
    return SimpleNamespace(status=status, config={"trial": {}}, last_result={"step": step})


def test_a_search_counts_the_configurations_not_yet_proposed_and_what_a_stopped_one_trained():
    """4 configurations of 3 seeds, batch 50, 300 steps: 45,000 images each. Tune has created two so far:
    one stopped early by ASHA at step 100 (15,000 images: its whole part), one running at step 200."""
    from sweeps.eta import configuration_images

    images_of = configuration_images(3 * 50, 300)
    assert images_of(configuration("RUNNING", 200)) == (30_000, 45_000)
    assert images_of(configuration("TERMINATED", 100)) == (15_000, 15_000)
    progress = Progress(images_of=images_of, clock=Clock(0.0), expected=(4, 45_000))
    line = progress.line([configuration("TERMINATED", 100), configuration("RUNNING", 200)])
    assert line.startswith("ETA: 1 of 4 trials finished, 1 running, 2 pending; 45k of 150k images trained (30%)")
    done = progress.line([configuration("TERMINATED", 300)] * 4)
    assert "4 of 4 trials finished" in done and "180k of 180k images trained (100%)" in done
