"""Datasets with ground-truth factors (docs/architecture.md §2.1).

    from provlae import data
    ds = data.load("dsprites")                       # procedural, full grid, memory-mapped from the cache
    ds = data.load("shapes3d", "3dshapes.h5", subset=10_000, seed=0)
    data.generate("dsprites", "out/")                # the real file format, procedurally rendered

``data.DATASETS`` maps names to specs; a new dataset registers with ``@data.register("name")``.
"""
from provlae.data import celeba, dsprites, mnist, shapes3d  # noqa: F401  (register the datasets)
from provlae.data.api import detect, generate, load
from provlae.data.registry import DATASETS, Dataset, DatasetSpec, ProceduralSpec, register

__all__ = ["DATASETS", "Dataset", "DatasetSpec", "ProceduralSpec", "detect", "generate", "load", "register"]
