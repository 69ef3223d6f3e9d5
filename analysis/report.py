"""The study report: one self-contained HTML page that answers a sweep's questions
(docs/architecture.md §8).

    write_report("demo", "report/")                      # every sweep of the experiment, pooled
    write_report("demo", "report/", sweep="full_grid-demo")

``report/index.html`` holds, from top to bottom: what was run (sweeps, preset, axes, trial counts,
hardware, wall time), the top-k table per dataset, Fig. 2 and Fig. 3 per dataset, the family comparison
(who leads each metric at its best β, by how much, and whether the paper's pro-VLAE > VLAE > β-VAE
ordering on MIG and MIG-sup holds), and for the best run of each family its Fig. 5 panels and final
traversal, fetched from the run's artifacts, with links into the MLflow UI.

Every image is inlined (a ``data:`` URI), so the page renders on its own and as an MLflow artifact (the
UI shows HTML artifacts from a blob URL, where relative links resolve to nothing); the same PNG files
are also written beside it under ``images/``. The page is built in a temporary folder next to ``out``
and moved into place only when complete: bad input leaves nothing half-written.

What the page shows is read first (``analysis.study``), then rendered (``analysis.sections``, its HTML
pieces in ``analysis.page``); this module writes and publishes it.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from analysis.errors import AnalysisError
from analysis.page import Page
from analysis.sections import render
from analysis.study import gather, runs_table_url, ui_base  # noqa: F401  (analysis.report names them)


def write_report(experiment: str, out: str | Path, tracking_uri: str | None = None, sweep: str | None = None,
                 k: int = 3, rank_by: str | None = None, best_by: str | None = None,
                 ui_url: str | None = None) -> Path:
    """Write ``out/index.html`` (and ``out/images/``); returns the page's path. ``out`` may hold an
    earlier report, which is replaced whole; any other existing content is refused."""
    out = Path(out).expanduser().absolute()
    _check_out(out)
    study = gather(experiment, tracking_uri, sweep, k, rank_by, best_by, ui_url)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.with_name(f".{out.name}-{secrets.token_hex(4)}")  # same filesystem: moved in one rename
    building.mkdir()
    try:
        page = Page(building)
        (building / "index.html").write_text(render(study, page), encoding="utf-8")
        _publish(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out / "index.html"


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "index.html").is_file())):
        raise AnalysisError(f"--out {out} exists and is not a report folder (no index.html): pick another")


def _publish(building: Path, out: Path) -> None:
    """Move the finished folder into place; an earlier report there is replaced."""
    _check_out(out)
    if not out.exists():
        building.rename(out)
        return
    old = out.with_name(f".{out.name}-old-{os.getpid()}")
    out.rename(old)
    building.rename(out)
    shutil.rmtree(old, ignore_errors=True)
