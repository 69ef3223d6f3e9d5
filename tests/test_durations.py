"""The parallel workers' file order (tests/durations.py): whole files, longest first by the table, and the
table refreshed by ``--store-durations`` without losing what the run did not measure."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import durations

ROOT = Path(__file__).resolve().parents[1]


def item(path: str, name: str) -> SimpleNamespace:
    return SimpleNamespace(path=Path(path), nodeid=f"{path}::{name}")


def test_whole_files_go_longest_first_by_the_selected_tests():
    items = [item("a.py", "t1"), item("a.py", "t2"), item("b.py", "t1"), item("c.py", "t1"),
             item("c.py", "t2"), item("d.py", "t1")]
    seconds = {"a.py::t1": 1.0, "a.py::t2": 2.0, "b.py::t1": 5.0, "c.py::t1": 2.5, "c.py::t2": 0.5,
               "e.py::t1": 99.0}  # e.py: not selected; d.py: not measured
    durations.longest_files_first(items, seconds)
    assert [i.nodeid for i in items] == ["b.py::t1", "a.py::t1", "a.py::t2", "c.py::t1", "c.py::t2", "d.py::t1"]
    # a.py and c.py tie at 3 s: collection order; a file's tests keep theirs
    items = items[::-1]
    durations.longest_files_first(items, seconds)
    assert [i.nodeid for i in items] == ["b.py::t1", "c.py::t2", "c.py::t1", "a.py::t2", "a.py::t1", "d.py::t1"]


def test_no_table_keeps_the_collection_order(tmp_path):
    assert durations.read(tmp_path / "durations.json") == {}
    items = [item("b.py", "t"), item("a.py", "t")]
    durations.longest_files_first(items, {})
    assert [i.nodeid for i in items] == ["b.py::t", "a.py::t"]


def test_store_durations_adds_this_runs_tests_and_keeps_the_others(tmp_path):
    """A real pytest run with the option, in a folder of its own: its test's seconds replace the old
    entry, an entry it did not run stays."""
    (tmp_path / "conftest.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import durations\n"
        "def pytest_addoption(parser):\n"
        "    parser.addoption('--store-durations', action='store_true')\n"
        "def pytest_configure(config):\n"
        "    if config.getoption('store_durations'):\n"
        f"        config.pluginmanager.register(durations.Recorder(durations.Path({str(tmp_path / 't.json')!r})))\n")
    (tmp_path / "test_x.py").write_text("import time\n\ndef test_sleeps():\n    time.sleep(0.3)\n")
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"test_x.py::test_sleeps": 99.0, "test_gone.py::test_old": 7.0}))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--store-durations"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    got = durations.read(table)
    assert got["test_gone.py::test_old"] == 7.0
    assert 0.3 <= got["test_x.py::test_sleeps"] < 5
    assert not list(tmp_path.glob(".t.json.tmp-*"))  # no temporary left beside the table
