"""The order the parallel workers (``make test``, ``make test-fast``: whole files to each) take the test files
in: the longest first, by the seconds each test took when ``tests/durations.json`` was last measured.

pytest-xdist hands each idle worker the next file of the collection (``--no-loadscope-reorder``). Handed
out in pytest's order, a long file that comes last keeps one worker busy while the others have finished;
longest first, the short files fill in at the end and the workers finish together. A file's own tests keep
their order; only the files are reordered, so a file's servers and trained models still start once. A test
not in the table counts 0 s (its file goes after the measured ones); nothing but the order depends on the
numbers.

Refresh the table after adding or much changing a slow test, in one process (each test's own seconds, not
its share of a busy machine); the run adds what it measured and keeps the rest::

    .venv/bin/python -m pytest --store-durations
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

TABLE = Path(__file__).with_name("durations.json")


def read(path: Path = TABLE) -> dict[str, float]:
    """{test node id: seconds} (empty where there is no table)."""
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except FileNotFoundError:
        return {}


def longest_files_first(items: list, seconds: dict[str, float]) -> None:
    """Reorder ``items`` in place: whole files, the most seconds first (of the tests selected), ties and a
    file's own tests in collection order."""
    per_file: dict[Path, float] = defaultdict(float)
    first: dict[Path, int] = {}
    for i, item in enumerate(items):
        per_file[item.path] += seconds.get(item.nodeid, 0.0)
        first.setdefault(item.path, i)
    items.sort(key=lambda item: (-per_file[item.path], first[item.path]))


class Recorder:
    """With ``--store-durations``: each test's seconds (setup, call and teardown) in this run, merged into
    the table at the end of the session (in the controller: workers' reports arrive there)."""

    def __init__(self, path: Path = TABLE):
        self.path = path
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report) -> None:
        self.seconds[report.nodeid] += report.duration

    def pytest_sessionfinish(self, session) -> None:
        if not self.seconds:
            return
        from provlae.atomic import write_atomic

        table = {**read(self.path), **{k: round(v, 1) for k, v in self.seconds.items()}}
        write_atomic(self.path, json.dumps(dict(sorted(table.items())), indent=0) + "\n")
