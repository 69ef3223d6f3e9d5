"""Which real file each dataset of a trial reads: a data directory and per-dataset overrides.

A data directory (``--data-dir DIR``, or ``$PROVLAE_DATA_DIR``) holds each dataset's file under its standard
name (``DatasetSpec.default_filename``: ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``, ``3dshapes.h5``,
...); ``--data-file NAME=PATH`` overrides it for one dataset. A grid over several datasets then trains
each on its own file. A dataset the directory lacks is one error naming the dataset and the file expected.
A trial's MLflow run records the file it trained on and its sha256 (``data_source``, ``data_sha256``).
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from provlae.errors import ConfigError, DataError

ENV = "PROVLAE_DATA_DIR"
HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class DataFiles:
    """A data directory and per-dataset files; ``path_for`` says which file a dataset reads (None: none)."""

    directory: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_args(cls, directory: str | None, assignments: list[str] = ()) -> DataFiles:
        """``--data-dir`` (else ``$PROVLAE_DATA_DIR``) and ``--data-file NAME=PATH`` items, checked."""
        from provlae.data.registry import get_spec

        directory = directory or os.environ.get(ENV) or None
        if directory is not None:
            folder = Path(directory).expanduser().absolute()
            if not folder.is_dir():
                raise DataError(f"data directory {folder} (--data-dir / {ENV}) is not a directory")
            directory = str(folder)
        files = {}
        for item in assignments:
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(f"--data-file expects DATASET=PATH, got {item!r}")
            get_spec(name.strip())  # an unknown dataset name: the registered ones
            files[name.strip()] = str(Path(path.strip()).expanduser().absolute())
        return cls(directory, files)

    def __bool__(self) -> bool:
        return self.directory is not None or bool(self.files)

    def path_for(self, dataset: str) -> str | None:
        """The file ``dataset`` trains on; DataError when the directory lacks it or an override is missing."""
        from provlae.data.registry import get_spec

        if dataset in self.files:
            path = Path(self.files[dataset])
            if not path.exists():
                raise DataError(f"dataset {dataset!r}: its file {path} (--data-file) does not exist")
            return str(path)
        if self.directory is None:
            return None
        spec = get_spec(dataset)
        if not spec.default_filename:
            raise DataError(f"dataset {dataset!r} has no standard file name to find in the data directory "
                            f"{self.directory}: give its file with --data-file {dataset}=PATH")
        path = Path(self.directory) / spec.default_filename
        if not path.exists():
            raise DataError(f"dataset {dataset!r}: expected its file {spec.default_filename} in the data "
                            f"directory {self.directory} (--data-dir / {ENV}); not found at {path}")
        return str(path)

    def layer(self, dataset: str) -> dict[str, str]:
        """Config fields for a trial on ``dataset``: its data_path (none where no file is given)."""
        path = self.path_for(dataset)
        return {} if path is None else {"data_path": path}


def checksum(path: str | os.PathLike) -> str:
    """sha256 of a file; of a folder (CelebA's JPEGs, MNIST's IDX files), of its files' names and contents."""
    p = Path(path).absolute()
    stat = p.stat()
    return _checksum(str(p), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _checksum(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if f != p:
            digest.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
