"""What training and evaluation cost on a device, as measured: a small table under the data home
(``throughput.json``) that plans read (``provlae.plan``) and that grows as the service is used.

An entry says what ran — device kind and name, dataset, family, batch size, fuse K and kernels, dtype,
compile — and what it measured: the group's training images per second (all members' images) and the
seconds of one stage-end evaluation of ``eval_images`` images. ``python -m provlae calibrate`` measures
the local device in under a minute; ``benchmarks/gpu_suite.py`` writes its figures here too.

The table is read as plain JSON; a damaged one is a ``ThroughputError`` naming it (a plan then says it has
no measurement) and is never overwritten by a new entry.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from provlae import paths
from provlae.atomic import write_atomic
from provlae.errors import ProvlaeError

TABLE = "throughput.json"
MAX_ENTRIES = 2000  # the oldest go first
SOURCES = ("calibrate", "trial", "gpu_suite")


class ThroughputError(ProvlaeError):
    """A throughput table that cannot be read as one."""


@dataclass(frozen=True)
class Measurement:
    device: str  # "cpu" or "cuda"
    device_name: str  # the GPU's name, or the CPU's
    dataset: str
    family: str
    batch_size: int
    fuse: int  # members trained as one group (1: a solo trainer)
    kernels: str  # "solo", "sequential" or "batched"
    dtype: str
    compile: str
    train_img_s: float  # the group's training images per second, all members together
    eval_s: float | None  # one stage-end evaluation, seconds (None: not measured)
    eval_images: int | None  # the images that evaluation encoded
    source: str  # SOURCES
    measured_at: float = 0.0  # unix time
    mi_samples: int | None = None  # the evaluation's estimator points (its cost grows with them)

    def label(self) -> str:
        what = f"{self.family} on {self.dataset}, batch {self.batch_size}, {self.dtype}"
        group = "solo" if self.fuse == 1 else f"fused K={self.fuse} ({self.kernels})"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.measured_at)) if self.measured_at else "?"
        return (f"{self.device} {self.device_name}: {what}, {group}: {self.train_img_s:.0f} img/s"
                + (f", evaluation {self.eval_s:.1f} s / {self.eval_images} images" if self.eval_s else "")
                + f" ({self.source}, {when})")


def table_path() -> Path:
    return paths.data_home() / TABLE


def read_table(path: str | Path | None = None) -> list[Measurement]:
    """Every measurement in the table (none when it does not exist yet); ThroughputError when damaged."""
    path = Path(path) if path is not None else table_path()
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ValueError("not a list of measurements")
        names = {f.name for f in fields(Measurement)}
        return [Measurement(**{k: v for k, v in row.items() if k in names}) for row in rows]
    except (OSError, ValueError, TypeError) as e:
        raise ThroughputError(f"throughput table {path} cannot be read ({str(e)[:200]}): move it aside, and "
                              f"`python -m provlae calibrate` starts a new one") from None


def add(measurements: list[Measurement], path: str | Path | None = None) -> Path:
    """Append to the table, written whole (never half-written) under a lock (the trials of a node finish
    at the same time); a damaged table is left as it is."""
    import fcntl

    path = Path(path) if path is not None else table_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        rows = [*read_table(path), *measurements][-MAX_ENTRIES:]
        return write_atomic(path, json.dumps([asdict(m) for m in rows], indent=1) + "\n")


def nearest(table: list[Measurement], device: str, device_name: str | None, dataset: str, family: str,
            batch_size: int, fuse: int, dtype: str) -> Measurement | None:
    """The measurement closest to what is planned, on the same device kind (and the named device, when
    one is named): the same fuse K, else the largest K below it (a group's rate grows with K: a lower
    bound), else the smallest above; then the most of dataset, family, batch size and dtype alike; the
    newest of equals. None when the device was never measured."""
    same = [m for m in table if m.device == device and (device_name is None or _same_device(m, device_name))]
    if not same:
        return None

    def score(m: Measurement) -> tuple:
        closeness = (m.fuse == fuse, m.fuse < fuse, m.fuse if m.fuse < fuse else -m.fuse)
        return (*closeness, m.dataset == dataset, m.family == family, m.batch_size == batch_size,
                m.dtype == dtype, m.eval_s is not None, m.measured_at)

    return max(same, key=score)


def _same_device(m: Measurement, name: str) -> bool:
    return name.lower() in m.device_name.lower()
