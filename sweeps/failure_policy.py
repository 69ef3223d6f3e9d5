"""When Tune stops retrying a failed trial.

Tune retries a failed trial up to ``--max-failures`` times (-1: without end). Two kinds of failure end a
trial sooner, even under -1, because a retry would only fail the same way:
- an error no retry can mend: a divergence (the replay from the checkpoint is the same computation) or
  checkpoints that are all damaged;
- an error that came back identical on ``REPEATS`` attempts in a row (a bug, a file missing on a node).
After such a failure the trial gets one last attempt (which, for a mendless error, fails at once without
training) and then ends ERROR; a rerun of the sweep retries it again, as it does every failed trial.
"""
from __future__ import annotations

import re
from pathlib import Path

from ray import tune

REPEATS = 2  # identical errors in a row after which the next failure is the trial's last
MENDLESS = ("TrainingDiverged", "CheckpointError")
_FAILURE = re.compile(r"^Failure # \d+ \(occurred at [^)]*\)$", re.M)


def error_lines(error_file: str | None) -> list[str]:
    """The last line (``Type: message``) of each failure Tune appended to a trial's error file."""
    if not error_file or not Path(error_file).is_file():
        return []
    blocks = _FAILURE.split(Path(error_file).read_text(errors="replace"))[1:]
    lines = []
    for block in blocks:
        text = [line.strip() for line in block.strip().splitlines() if line.strip()]
        lines.append(text[-1] if text else "")
    return lines


def is_final(errors: list[str]) -> bool:
    """Whether the failures so far (oldest first) mean the next one should end the trial."""
    if not errors:
        return False
    last = errors[-1]
    if any(last.startswith(kind) or f".{kind}:" in last or f" {kind}:" in last for kind in MENDLESS):
        return True
    return len(errors) >= REPEATS and len(set(errors[-REPEATS:])) == 1


class EndRepeatedFailures(tune.Callback):
    """Lowers a trial's allowed failures to those it has had when ``is_final`` says so: Tune then ends it
    at its next failure instead of retrying (the attempt already scheduled still runs)."""

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        if is_final(error_lines(trial.error_file)):
            trial.max_failures = trial.num_failures
