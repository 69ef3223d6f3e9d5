"""The smoke preset as the sweep tests run it: its metrics on 200 seeded images instead of all 1,000.

A smoke trial spends more on its stage-end evaluations than on its 30 training steps; what the sweep tests
check (the record, the faults, the cluster) does not depend on how many images are evaluated. Use both
helpers together: the command's ``--set`` flags and the configs it is expected to resolve.
"""
from __future__ import annotations

QUICK_EVAL = {"eval_subset": "200"}


def quick_args() -> list[str]:
    """``--set`` flags for a sweep command."""
    return [f"--set={k}={v}" for k, v in QUICK_EVAL.items()]


def quick(overrides: dict | None = None) -> dict:
    """Overrides for ``grid.build_trials`` that resolve what a command with ``quick_args()`` runs."""
    return {**QUICK_EVAL, **(overrides or {})}
