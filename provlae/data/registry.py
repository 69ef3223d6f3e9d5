"""The dataset container, the registry of dataset specs, and factor-grid arithmetic.

A *spec* knows one dataset: how to open the file format users have, and — for datasets with
ground-truth factors — how to render any row of the factor grid procedurally. Specs register by name:

    @register("dsprites")
    class DSprites(ProceduralSpec): ...

Rows of a factor grid are in row-major order (last factor fastest): row = sum_k class_k * base_k.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np

from provlae.data import cache
from provlae.errors import ConfigError, DataError


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images (N, H, W, C) uint8 — memory-mapped where possible — and their factor classes (N, K)."""

    name: str
    images: np.ndarray
    factors: np.ndarray
    factor_names: tuple[str, ...]
    factor_sizes: tuple[int, ...]
    pixel_scale: float  # uint8 * pixel_scale is in [0, 1]
    source: str = ""  # file the data came from, or "procedural"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, h, w, c = self.images.shape
        return c, h, w

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        factors = ", ".join(f"{n}={s}" for n, s in zip(self.factor_names, self.factor_sizes))
        return (f"Dataset({self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
                f"factors=[{factors}], source={self.source!r})")


# ------------------------------------------------------------------------------------------ grid maths


def grid_bases(sizes: tuple[int, ...]) -> np.ndarray:
    """Row-major strides: row = classes @ grid_bases(sizes)."""
    return np.cumprod((1, *sizes[::-1]))[-2::-1].astype(np.int64)


def grid_classes(sizes: tuple[int, ...], rows: np.ndarray | None = None) -> np.ndarray:
    """(n, K) int64 factor classes of grid rows (all rows if ``rows`` is None)."""
    if rows is None:
        rows = np.arange(int(np.prod(sizes)), dtype=np.int64)
    return np.stack(np.unravel_index(np.asarray(rows, dtype=np.int64), sizes), axis=1).astype(np.int64)


def reduced_grid_classes(sizes: tuple[int, ...], full_sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Full-grid classes kept by a reduced grid: per factor ``size`` evenly spaced classes, ends included."""
    if len(sizes) != len(full_sizes) or not all(1 <= s <= f for s, f in zip(sizes, full_sizes)):
        raise ConfigError(f"factor_sizes: got {list(sizes)}, expected {len(full_sizes)} sizes with "
                          f"1 <= size <= {list(full_sizes)}")
    return [np.round(np.linspace(0, f - 1, s)).astype(np.int64) for s, f in zip(sizes, full_sizes)]


def check_grid(classes: np.ndarray, sizes: tuple[int, ...], file: Path, key: str) -> None:
    """Raise DataError unless ``classes`` is exactly the full grid of ``sizes`` in row-major order."""
    n = int(np.prod(sizes))
    if len(classes) != n:
        raise DataError(f"{file}: key '{key}' has {len(classes)} rows, expected {n} "
                        f"(the product of factor sizes {list(sizes)})")
    bad = (classes < 0) | (classes >= np.asarray(sizes))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{file}: key '{key}' row {row} column {col} is {classes[row, col]}, "
                        f"expected a class in [0, {sizes[col]})")
    order = classes @ grid_bases(sizes)
    wrong = np.flatnonzero(order != np.arange(n))
    if len(wrong):
        raise DataError(f"{file}: key '{key}' is not the factor grid in row-major order "
                        f"(first mismatch at row {wrong[0]}), expected rows sorted by factor classes")


def check_array(file: Path, key: str, shape: tuple, dtype: np.dtype, want_shape: tuple,
                want_dtype: str) -> None:
    """DataError unless ``shape`` matches ``want_shape`` (None = any size) and dtype matches ``want_dtype``.

    ``want_dtype`` is a dtype name ("uint8") or a description of a kind: "integer", "float".
    """
    ok_shape = len(shape) == len(want_shape) and all(w is None or s == w for s, w in zip(shape, want_shape))
    if not ok_shape:
        want = "(" + ", ".join("N" if w is None else str(w) for w in want_shape) + ")"
        raise DataError(f"{file}: key '{key}' has shape {tuple(shape)}, expected {want}")
    kinds = {"integer": "iu", "float": "f"}
    ok_dtype = dtype.kind in kinds[want_dtype] if want_dtype in kinds else dtype == np.dtype(want_dtype)
    if not ok_dtype:
        raise DataError(f"{file}: key '{key}' has dtype {dtype}, expected {want_dtype}")


def subset_indices(n_full: int, subset: int | None, seed: int) -> np.ndarray | None:
    """Sorted rows of a seeded subset without replacement; None means all rows."""
    if subset is None:
        return None
    if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)):
        raise ConfigError(f"subset: got {subset!r}, expected an integer number of images or None")
    if not 0 < subset <= n_full:
        raise ConfigError(f"subset: got {subset}, expected 1 <= subset <= {n_full} (the dataset size)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed: got {seed!r}, expected an integer (it picks the subset's rows)")
    return np.sort(np.random.default_rng(seed).choice(n_full, int(subset), replace=False))


def chunk_ranges(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


# ----------------------------------------------------------------------------------------------- specs


class DatasetSpec:
    """One dataset. Subclasses implement ``open`` (and ``claims`` so files can be recognised)."""

    name: ClassVar[str] = ""
    pixel_scale: ClassVar[float] = 1 / 255
    options: ClassVar[dict[str, Any]] = {}  # loader options and their defaults
    path_hint: ClassVar[str] = ""  # what a user's path should point to, for error messages
    default_filename: ClassVar[str] = ""  # the real file's standard name (found in a data directory)
    size: int | None = None  # images in the full dataset, where it is fixed
    has_factors: ClassVar[bool] = True  # ground-truth factors: the disentanglement metrics apply
    optional_factors: ClassVar[tuple[int, ...]] = ()  # factors left out of MIG / MIG-sup unless include_shape
    display_order: ClassVar[int] = 100  # position in tables (built-ins first)
    # The reference hyper-parameters for this dataset (docs/architecture.md §2.2) that the paper preset
    # applies: TrialConfig fields, plus "epochs_per_stage", which sets steps_per_stage from the dataset's size.
    paper_config: ClassVar[dict[str, Any]] = {}
    paper: ClassVar[bool] = False  # one of the datasets of the paper's study (the paper preset's grid)

    def claims(self, path: Path) -> bool:
        """Whether ``path`` looks like this dataset's file format (for ``data check``)."""
        return False

    def open(self, path: Path, **options) -> Dataset:
        """The full dataset from a user's file, images memory-mapped."""
        raise NotImplementedError

    def open_subset(self, path: Path, subset: int, seed: int, **options) -> Dataset:
        full = self.open(path, **options)
        rows = subset_indices(len(full), subset, seed)
        return take(full, rows)

    def resolve_options(self, options: dict) -> dict:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(f"dataset '{self.name}': unknown option(s) {unknown} (allowed: {allowed})")
        return {**self.options, **options}


class ProceduralSpec(DatasetSpec):
    """A dataset with a factor grid that can also be rendered: ``render`` is a pure function of classes."""

    version: ClassVar[str] = ""  # bump whenever rendered pixels change: it keys the cache
    factor_names: ClassVar[tuple[str, ...]] = ()
    factor_sizes: ClassVar[tuple[int, ...]] = ()
    image_hwc: ClassVar[tuple[int, int, int]] = (64, 64, 1)  # rendered image (H, W, C)
    chunk: ClassVar[int] = 4096  # rows rendered at once
    loader: ClassVar[str] = ""  # version of the real-file extraction: it keys the extracted cache

    def open(self, path: Path, **options) -> Dataset:
        """The user's real file, validated once and extracted into the cache as memory-mappable arrays."""
        parts = {"loader": self.loader, "source": cache.file_fingerprint(path)}
        arrays, info = cache.cached_arrays(self.name, parts, ("images", "factors"),
                                           lambda d: self._extract(path, d))
        return Dataset(self.name, arrays["images"], arrays["factors"], self.factor_names,
                       tuple(info["factor_sizes"]), self.pixel_scale, str(path))

    def _extract(self, path: Path, directory: Path) -> dict:
        """Validate the real file and write images.npy / factors.npy into ``directory``; return info
        holding ``factor_sizes``."""
        raise NotImplementedError

    def render(self, classes: np.ndarray) -> np.ndarray:
        """(n, K) int factor classes -> (n, H, W) or (n, H, W, C) uint8 images."""
        raise NotImplementedError

    def render_nhwc(self, classes: np.ndarray) -> np.ndarray:
        images = self.render(np.asarray(classes, dtype=np.int64))
        return images[..., None] if images.ndim == 3 else images

    def values(self, classes: np.ndarray) -> np.ndarray:
        """Physical factor values of full-grid classes, as the real file stores them."""
        raise NotImplementedError

    def write(self, out: Path, sizes: tuple[int, ...], chunks: Iterator, compress: bool) -> None:
        """Write the real file format to ``out``; ``chunks`` yields (file classes, full classes, images)."""
        raise NotImplementedError

    @property
    def size(self) -> int:  # type: ignore[override]
        return int(np.prod(self.factor_sizes))

    def check_classes(self, classes: np.ndarray) -> None:
        classes = np.asarray(classes)
        if classes.ndim != 2 or classes.shape[1] != len(self.factor_sizes):
            raise ConfigError(f"{self.name}: classes have shape {classes.shape}, "
                              f"expected (n, {len(self.factor_sizes)})")
        if ((classes < 0) | (classes >= np.asarray(self.factor_sizes))).any():
            raise ConfigError(f"{self.name}: classes out of range, expected 0 <= class < {self.factor_sizes}")


def take(full: Dataset, rows: np.ndarray | None) -> Dataset:
    """Rows of a dataset, copied into memory (None: the dataset itself)."""
    if rows is None:
        return full
    return Dataset(full.name, np.ascontiguousarray(full.images[rows]), np.ascontiguousarray(full.factors[rows]),
                   full.factor_names, full.factor_sizes, full.pixel_scale, full.source)


DATASETS: dict[str, DatasetSpec] = {}


def register(name: str):
    """Class decorator: register an instance of the spec under ``name``."""

    def deco(cls: type[DatasetSpec]) -> type[DatasetSpec]:
        if not (isinstance(cls, type) and issubclass(cls, DatasetSpec)):
            raise ConfigError(f"dataset {name!r}: {cls!r} is not a subclass of provlae.data.DatasetSpec")
        old = type(DATASETS[name]) if name in DATASETS else None
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(f"dataset {name!r} of {cls.__module__} clashes with the dataset of that name "
                              f"in {type(DATASETS[name]).__module__}: choose another name")
        cls.name = name
        DATASETS[name] = cls()
        return cls

    return deco


def dataset_names() -> list[str]:
    """Every registered dataset, in display order (built-ins first, then by name)."""
    return sorted(DATASETS, key=lambda n: (DATASETS[n].display_order, n))


def get_spec(name: str) -> DatasetSpec:
    if not DATASETS:  # the built-in specs register when provlae.data is imported
        import provlae.data  # noqa: F401
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r} (choose from {', '.join(dataset_names())}; a dataset "
                          f"of your own module loads with --plugin MODULE)") from None
