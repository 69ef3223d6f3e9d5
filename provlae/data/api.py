"""``load``, ``generate`` and ``detect``: the public entry points over the registered dataset specs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from provlae.atomic import atomic_path
from provlae.data import cache
from provlae.data.npyio import write_npy_chunks
from provlae.data.registry import (DATASETS, Dataset, ProceduralSpec, chunk_ranges, get_spec, grid_classes,
                                   reduced_grid_classes, subset_indices)
from provlae.errors import ConfigError, DataError
from provlae.progress import Progress


def load(name: str, path: str | os.PathLike | None = None, subset: int | None = None, seed: int = 0,
         **options) -> Dataset:
    """Dataset ``name`` from the user's file at ``path``, or procedurally generated when ``path`` is None.

    ``subset=n`` keeps the sorted rows ``default_rng(seed).choice(N, n, replace=False)``. Full datasets
    and procedural subsets come memory-mapped from the node's cache (built once per node); subsets of a
    user's file are copied into memory. ``options`` are per-dataset loader options (``size=64`` for mnist).
    """
    spec = get_spec(name)
    options = spec.resolve_options(options)
    if path is None:
        if not isinstance(spec, ProceduralSpec):
            raise ConfigError(f"dataset '{name}': a path is required (no built-in generator); "
                              f"expected path to {spec.path_hint}")
        return _procedural(spec, subset, seed)
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (dataset '{name}')")
    try:
        if subset is None:
            return spec.open(path, **options)
        return spec.open_subset(path, subset, seed, **options)
    except DataError as e:  # a wrong file: say which dataset expected it, and what it expects
        if f"dataset '{name}'" in str(e):
            raise
        raise DataError(f"dataset '{name}' (expects {spec.path_hint}): {e}") from None


def _procedural(spec: ProceduralSpec, subset: int | None, seed: int) -> Dataset:
    sizes = spec.factor_sizes
    rows = subset_indices(int(np.prod(sizes)), subset, seed)
    if rows is None:
        rows = np.arange(int(np.prod(sizes)), dtype=np.int64)
    parts = {"generator": spec.version, "factor_sizes": list(sizes),
             "subset": None if subset is None else int(subset), "seed": None if subset is None else int(seed)}

    def build(directory: Path) -> None:
        classes = grid_classes(sizes, rows)
        with Progress(len(rows), label=f"generating {spec.name}") as bar:
            write_npy_chunks(directory / "images.npy", (len(rows), *spec.image_hwc), np.uint8,
                             _rendered(spec, classes, spec.chunk, bar))
        write_npy_chunks(directory / "factors.npy", classes.shape, np.int64, [classes])

    arrays, _ = cache.cached_arrays(spec.name, parts, ("images", "factors"), build)
    return Dataset(spec.name, arrays["images"], arrays["factors"], spec.factor_names, sizes,
                   spec.pixel_scale, "procedural")


def _rendered(spec: ProceduralSpec, classes: np.ndarray, chunk: int, bar: Progress):
    for start, stop in chunk_ranges(len(classes), chunk):
        yield spec.render_nhwc(classes[start:stop])
        bar.update(stop - start)


def generate(name: str, out_path: str | os.PathLike, *, chunk: int | None = None,
             factor_sizes: tuple[int, ...] | None = None, compress: bool = False,
             progress: bool | None = None) -> Path:
    """Write the procedural dataset ``name`` in the real file format, a chunk of rows at a time.

    ``out_path`` may be a directory (the real file name is used). ``factor_sizes`` writes a reduced grid
    of evenly spaced classes of each factor (small files for tests); default the full grid.
    ``progress``: None shows progress on a terminal only, True always, False never.
    """
    spec = get_spec(name)
    if not isinstance(spec, ProceduralSpec):
        raise ConfigError(f"generate: dataset '{name}' has no generator, expected one of "
                          f"{sorted(n for n, s in DATASETS.items() if isinstance(s, ProceduralSpec))}")
    sizes = tuple(int(s) for s in factor_sizes) if factor_sizes is not None else spec.factor_sizes
    keep = reduced_grid_classes(sizes, spec.factor_sizes)
    chunk = spec.chunk if chunk is None else int(chunk)
    if chunk < 1:
        raise ConfigError(f"chunk: got {chunk}, expected a positive number of rows")
    out = Path(out_path).expanduser().absolute()
    if out.is_dir():
        out = out / spec.default_filename
    n = int(np.prod(sizes))

    def chunks():
        for start, stop in chunk_ranges(n, chunk):
            cls = grid_classes(sizes, np.arange(start, stop))
            full = np.stack([keep[k][cls[:, k]] for k in range(len(sizes))], axis=1)
            yield cls, full, spec.render_nhwc(full)
            bar.update(stop - start)

    with Progress(n, label=f"generating {spec.name}", show=progress) as bar:
        with atomic_path(out) as tmp:
            spec.write(tmp, sizes, chunks(), compress)
    return out


def detect(path: str | os.PathLike) -> str:
    """Name of the registered dataset whose file format ``path`` has."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    for name, spec in DATASETS.items():
        if spec.claims(path):
            return name
    raise DataError(f"{path}: not a recognised dataset file, expected one of: "
                    + "; ".join(f"{n}: {s.path_hint}" for n, s in DATASETS.items()))
