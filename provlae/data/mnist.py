"""MNIST: 70,000 handwritten digits (train then test), loader only; the factor is the digit label.

Accepted paths: ``mnist.npz`` (keys x_train, y_train, x_test, y_test, as Keras ships it), or a directory
holding either that file or the four IDX files (``train-images-idx3-ubyte`` etc., optionally ``.gz``;
torchvision's ``MNIST/raw/`` layout works too). Images are zero-padded from 28x28 to 32x32 (``size=32``,
the default) or padded then doubled to 64x64 (``size=64``), and cached as a memory-mappable .npy.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from provlae.data import cache
from provlae.data.npyio import NpzReader, write_npy_chunks
from provlae.data.registry import Dataset, DatasetSpec, check_array, register
from provlae.errors import ConfigError, DataError

IDX = {  # role -> (file stem, expected dims after the count, description)
    "train_images": ("train-images-idx3-ubyte", (28, 28)),
    "train_labels": ("train-labels-idx1-ubyte", ()),
    "test_images": ("t10k-images-idx3-ubyte", (28, 28)),
    "test_labels": ("t10k-labels-idx1-ubyte", ()),
}
NPZ_NAME = "mnist.npz"
PAD = 2


@register("mnist")
class MNIST(DatasetSpec):
    options = {"size": 32}
    size, display_order = 70_000, 2
    default_filename = "mnist.npz"
    pixel_scale = 1 / 255
    path_hint = "mnist.npz or a directory with the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...)"
    factor_names = ("digit",)
    factor_sizes = (10,)

    def claims(self, path: Path) -> bool:
        try:
            return self._sources(path) is not None
        except DataError:
            return False

    def open(self, path: Path, size: int = 32) -> Dataset:
        if size not in (32, 64):
            raise ConfigError(f"mnist option size: got {size!r}, expected 32 (pad 28 -> 32) or 64")
        sources = self._sources(path)
        if sources is None:
            raise DataError(f"{path}: no MNIST data found, expected {self.path_hint}")
        parts = {"loader": "mnist-1", "size": size,
                 "sources": [cache.file_fingerprint(p) for p in sources.values()]}
        arrays, _ = cache.cached_arrays(self.name, parts, ("images", "factors"),
                                        lambda d: self._extract(sources, size, d))
        return Dataset(self.name, arrays["images"], arrays["factors"], self.factor_names, self.factor_sizes,
                       self.pixel_scale, str(path))

    def _sources(self, path: Path) -> dict[str, Path] | None:
        """{"npz": file} or {role: IDX file}; None if ``path`` holds neither."""
        if path.is_file():
            return {"npz": path} if path.suffix == ".npz" and _has_member(path, "x_train") else None
        for folder in (path, path / "raw", path / "MNIST" / "raw"):
            if (folder / NPZ_NAME).is_file():
                return {"npz": folder / NPZ_NAME}
            found = {role: _find_idx(folder, stem) for role, (stem, _) in IDX.items()}
            if all(found.values()):
                return found
            if any(found.values()):
                missing = [IDX[r][0] for r, p in found.items() if p is None]
                raise DataError(f"{folder}: incomplete MNIST IDX set, missing {missing} (or .gz)")
        return None

    def _extract(self, sources: dict[str, Path], size: int, directory: Path) -> None:
        if "npz" in sources:
            parts = _read_npz(sources["npz"])
        else:
            parts = {role: _read_idx(p, IDX[role][1]) for role, p in sources.items()}
            for split in ("train", "test"):
                if len(parts[f"{split}_images"]) != len(parts[f"{split}_labels"]):
                    raise DataError(f"{sources[split + '_labels']}: {len(parts[split + '_labels'])} labels, "
                                    f"expected {len(parts[split + '_images'])} (one per image)")
        images = np.concatenate([parts["train_images"], parts["test_images"]])
        labels = np.concatenate([parts["train_labels"], parts["test_labels"]]).astype(np.int64)
        if labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise DataError(f"{next(iter(sources.values()))}: labels outside 0..9, expected digit labels")
        images = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))
        if size == 64:
            images = images.repeat(2, axis=1).repeat(2, axis=2)
        write_npy_chunks(directory / "images.npy", (*images.shape, 1), np.uint8, [images[..., None]])
        write_npy_chunks(directory / "factors.npy", (len(labels), 1), np.int64, [labels[:, None]])


def _has_member(path: Path, key: str) -> bool:
    try:
        with NpzReader(path) as z:
            return key in z.keys
    except DataError:
        return False


def _find_idx(folder: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path, dims: tuple[int, ...]) -> np.ndarray:
    """An IDX file of unsigned bytes with (count, *dims) shape."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    ndim = 1 + len(dims)
    if len(raw) < 4 + 4 * ndim or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path}: header 'magic' is {raw[:4].hex()}, expected 0000080{ndim} "
                        f"(unsigned bytes, {ndim} dimensions)")
    shape = tuple(int(x) for x in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    if shape[1:] != dims:
        raise DataError(f"{path}: header 'dims' is {list(shape)}, expected [N, {', '.join(map(str, dims))}]")
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path}: data has {len(body)} bytes, expected {int(np.prod(shape))} "
                        f"for dims {list(shape)}")
    return np.frombuffer(body, np.uint8).reshape(shape)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with NpzReader(path) as z:
        for split in ("train", "test"):
            x, y = f"x_{split}", f"y_{split}"
            z.require(x, "(N, 28, 28) uint8 images")
            z.require(y, "(N,) integer labels")
            shape, dtype = z.header(x)
            check_array(path, x, shape, dtype, (None, 28, 28), "uint8")
            n = shape[0]
            shape, dtype = z.header(y)
            check_array(path, y, shape, dtype, (n,), "integer")
            out[f"{split}_images"], out[f"{split}_labels"] = z.read(x), z.read(y)
    return out
