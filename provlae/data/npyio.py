"""Low-level file plumbing: streamed .npy writing, streamed .npz reading.

Datasets are bigger than we want in memory (dSprites 3 GB, 3DShapes 5.9 GB), so arrays are written and
read in row chunks. Every file the package writes appears atomically (``provlae.atomic``): a reader never
sees half a file.
"""
from __future__ import annotations

import contextlib
import pickle
import zipfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from provlae.atomic import atomic_path
from provlae.errors import DataError


class NpyStreamWriter:
    """Write an .npy of known shape to an open binary stream, a row chunk at a time."""

    def __init__(self, fp: IO[bytes], shape: tuple[int, ...], dtype: np.dtype):
        self.fp, self.shape, self.dtype = fp, tuple(int(s) for s in shape), np.dtype(dtype)
        self.rows = 0
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_1_0(fp, header)

    def write(self, chunk: np.ndarray) -> None:
        if chunk.shape[1:] != self.shape[1:] or chunk.dtype != self.dtype:
            raise ValueError(f"chunk {chunk.shape} {chunk.dtype} does not fit {self.shape} {self.dtype}")
        if self.rows + len(chunk) > self.shape[0]:
            raise ValueError(f"more than {self.shape[0]} rows written")
        self.fp.write(np.ascontiguousarray(chunk).data)
        self.rows += len(chunk)

    def check_complete(self) -> None:
        if self.rows != self.shape[0]:
            raise ValueError(f"wrote {self.rows} rows of {self.shape[0]}")


def write_npy_chunks(path: Path, shape: tuple[int, ...], dtype, chunks) -> None:
    """Atomically write an uncompressed .npy (memory-mappable) from an iterable of row chunks."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = NpyStreamWriter(f, shape, dtype)
        for chunk in chunks:
            writer.write(chunk)
        writer.check_complete()


def save_npy(path: Path, array: np.ndarray) -> None:
    write_npy_chunks(path, array.shape, array.dtype, [array])


# --------------------------------------------------------------------------------------------- reading


class _SafeUnpickler(pickle.Unpickler):
    """Unpickle plain containers and numpy arrays only, so a dataset file cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class NpzReader:
    """Read members of an .npz (compressed or not) without loading the big ones whole."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{path}: not a readable .npz archive ({e})") from None
        self.keys = {n[:-4] for n in self.zip.namelist() if n.endswith(".npy")}

    def close(self) -> None:
        self.zip.close()

    def __enter__(self) -> "NpzReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def require(self, key: str, expected: str) -> None:
        if key not in self.keys:
            found = ", ".join(sorted(self.keys)) or "none"
            raise DataError(f"{self.path}: missing key '{key}' (expected {expected}; found keys: {found})")

    @contextlib.contextmanager
    def _member(self, key: str):
        try:
            with self.zip.open(key + ".npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                yield f, shape, fortran, dtype
        except (ValueError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise DataError(f"{self.path}: key '{key}' is not a valid .npy member ({e})") from None

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        with self._member(key) as (_, shape, _, dtype):
            return tuple(shape), dtype

    def read(self, key: str) -> np.ndarray:
        with self._member(key) as (f, shape, fortran, dtype):
            if dtype.hasobject:
                raise DataError(f"{self.path}: key '{key}' holds Python objects, expected a numeric array")
            data = self._read_exact(f, key, int(np.prod(shape)) * dtype.itemsize)
            order = "F" if fortran else "C"
            return np.frombuffer(data, dtype=dtype).reshape(shape, order=order)

    def read_pickled(self, key: str):
        """A pickled object member (e.g. dSprites' ``metadata`` dict), restricted to safe types."""
        with self._member(key) as (f, shape, _, dtype):
            if not dtype.hasobject:
                raise DataError(f"{self.path}: key '{key}' has dtype {dtype}, expected a pickled object")
            try:
                obj = _SafeUnpickler(f, encoding="latin1").load()
            except Exception as e:  # any unpickling failure is a bad file
                raise DataError(f"{self.path}: key '{key}' could not be unpickled ({e})") from None
        return obj[()] if isinstance(obj, np.ndarray) and obj.shape == () else obj

    def iter_rows(self, key: str, chunk_rows: int) -> Iterator[np.ndarray]:
        """Yield C-ordered row chunks of a numeric member, streaming from the archive."""
        with self._member(key) as (f, shape, fortran, dtype):
            if fortran and len(shape) > 1:  # cannot stream rows: fall back to a whole read
                yield from _split(np.ascontiguousarray(self.read(key)), chunk_rows)
                return
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], chunk_rows):
                n = min(chunk_rows, shape[0] - start)
                data = self._read_exact(f, key, n * row_bytes)
                yield np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))

    def _read_exact(self, f, key: str, nbytes: int) -> bytes:
        try:
            data = f.read(nbytes)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise DataError(f"{self.path}: key '{key}' is corrupt ({e})") from None
        if len(data) != nbytes:
            raise DataError(f"{self.path}: key '{key}' is truncated ({len(data)} of {nbytes} bytes)")
        return data


def _split(array: np.ndarray, chunk_rows: int) -> Iterator[np.ndarray]:
    for start in range(0, len(array), chunk_rows):
        yield array[start:start + chunk_rows]
