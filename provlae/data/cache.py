"""Content-addressed dataset cache: build once per node, then every trial memory-maps the same files.

An entry is a directory ``dataset_cache()/<dataset>/<key>/`` holding uncompressed ``<array>.npy`` files
and a ``manifest.json`` written last (its presence means the entry is complete). The key hashes what
determines the content: generator version and parameters, or a source file's (absolute path, size,
mtime). A ``.lock`` file (``fcntl.flock``) makes concurrent processes wait for one builder instead of
all building; pages of the mapped files are shared through the page cache.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from provlae.atomic import remove_stale_tmp, write_atomic
from provlae.paths import dataset_cache

MANIFEST = "manifest.json"


def content_key(parts: dict) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def entry_dir(dataset: str, parts: dict) -> Path:
    return dataset_cache() / dataset / content_key(parts)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_entry(directory: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {n: np.load(directory / f"{n}.npy", mmap_mode="r") for n in names}


def cached_arrays(dataset: str, parts: dict, names: tuple[str, ...],
                  build: Callable[[Path], dict | None]) -> tuple[dict[str, np.ndarray], dict]:
    """Memory-mapped arrays ``names`` of the entry for ``parts`` and its manifest; build it if absent.

    ``build(directory)`` must write each ``directory/<name>.npy`` atomically (``npyio.write_npy_chunks``)
    and may return a dict of facts (e.g. factor sizes read from a source file) kept in the manifest.
    """
    directory = entry_dir(dataset, parts)
    for attempt in range(2):
        if not (directory / MANIFEST).exists():
            with locked(directory):
                if not (directory / MANIFEST).exists():  # another process may have built it meanwhile
                    remove_stale_tmp(directory)
                    info = build(directory) or {}
                    manifest = {"dataset": dataset, "arrays": list(names), "parts": parts, "info": info}
                    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1, default=str))
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            return open_entry(directory, names), manifest["info"]
        except (OSError, ValueError, KeyError):  # damaged by hand (file deleted, edited): rebuild once
            if attempt:
                raise
            with locked(directory):
                (directory / MANIFEST).unlink(missing_ok=True)
    raise AssertionError("unreachable")


def entry_exists(dataset: str, parts: dict) -> bool:
    return (entry_dir(dataset, parts) / MANIFEST).exists()

