"""A plug-in family for the tests that stop a trial part-way: pro-VLAE whose every training step also waits
``Paced.pace`` seconds.

A fault test needs a trial that lasts long enough to be stopped mid-stage, not one that computes more: on
the narrow smoke network (tests/smoke.py) a paced trial lasts about as long as one at the preset's width
while it costs the narrow network's CPU. The wait changes nothing computed, so a paced trial's numbers
are those of the same trial unpaced: the tests train their uninterrupted reference in their own process
with the wait off (``reference``).

Load it as a plug-in, ``--plugin tests.paced`` from the repository's root (the sweep's workers get its
folder from the trial's ``plugins`` field), and sweep ``--families paced``.
"""
from __future__ import annotations

import contextlib
import time

from provlae.models.families import ProVLAE, register

MODULE = "tests.paced"
FAMILY = "paced"


@register(FAMILY)
class Paced(ProVLAE):
    pace = 0.1  # seconds per training step

    def loss(self, model, x, stage, t, *args, **kwargs):
        if self.pace:
            time.sleep(self.pace)
        return super().loss(model, x, stage, t, *args, **kwargs)


@contextlib.contextmanager
def unpaced():
    """Paced trials trained in this process wait nothing (a reference run)."""
    pace, Paced.pace = Paced.pace, 0.0
    try:
        yield
    finally:
        Paced.pace = pace


def reference(cfg, on_event=None) -> dict:
    """The trial trained here, uninterrupted, as its worker trains it (one torch thread) and unpaced: its
    final metrics (``on_event`` gets its events)."""
    import torch

    from provlae.train import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trial
    try:
        with unpaced():
            return Trainer(cfg).run(on_event)
    finally:
        torch.set_num_threads(threads)
