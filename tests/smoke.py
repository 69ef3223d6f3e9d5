"""The smoke preset as the sweep tests run it: a narrower network (8 conv channels, 32 dense units) and its
metrics on 200 seeded images instead of all 1,000.

A smoke trial spends more on its stage-end evaluations than on its 30 training steps, and its network's
width sets how long both take; what the sweep tests check (the record, the faults, the cluster) depends on
neither. A test that stops a trial part-way sweeps the paced family (tests/paced.py): a narrow trial that
waits at each step, so it lasts long enough to be stopped. Use both helpers together: the command's
``--set`` flags and the configs it is expected to resolve.
"""
from __future__ import annotations

QUICK = {"eval_subset": "200", "channels": "8", "hidden": "32"}


def quick_args(overrides: dict | None = None) -> list[str]:
    """``--set`` flags for a sweep command."""
    return [f"--set={k}={v}" for k, v in quick(overrides).items()]


def quick(overrides: dict | None = None) -> dict:
    """Overrides for ``grid.build_trials`` that resolve what a command with ``quick_args()`` runs."""
    return {**QUICK, **(overrides or {})}
