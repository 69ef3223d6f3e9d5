"""Files that appear whole: written under a temporary name beside their place, fsync'ed, renamed over the
place, and the folder fsync'ed, so a reader (or a machine that loses power) never sees half a file. A write
that fails leaves the file as it was and no temporary behind.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"  # in every temporary's name: ``.<name>.tmp-<pid>-<random>``


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` for the block to write; when the block ends without error,
    fsync it and rename it over ``path``. Either way the temporary is gone afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` whole (``atomic_path``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_tmp(directory: Path) -> None:
    """Delete temporaries left by a killed writer (call only while holding the directory's lock)."""
    for p in directory.glob(f".*{TMP_MARK}*"):
        p.unlink(missing_ok=True)
