"""Input checks, seeded draws and thread handling shared by the metric functions.

Every metric takes numpy or torch arrays; they are checked here and converted to float64 / int64
numpy once. A bad input raises ValueError naming the argument and what was expected.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def as_array(x, name: str, dtype=np.float64) -> np.ndarray:
    """numpy or torch (any device) -> numpy of `dtype`. Torch is not imported for it: a tensor exists only
    where torch already is (the stored-representation metrics run without it)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot be read as a {np.dtype(dtype).name} array ({e})") from None


def codes(x, name: str, n: int | None = None, j: int | None = None) -> np.ndarray:
    """A finite (N, J) float64 array, optionally of a required shape."""
    a = as_array(x, name)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d (N, J) array, got shape {a.shape}")
    if (n is not None and a.shape[0] != n) or (j is not None and a.shape[1] != j):
        raise ValueError(f"{name}: shape {a.shape} does not match mu's shape ({n}, {j})")
    if a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"{name}: need at least 2 points and 1 latent, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return a


def factor_table(factors, factor_sizes: Sequence[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) int64 factor classes checked against `factor_sizes`: 0 <= class < size."""
    f = as_array(factors, "factors", dtype=np.float64)
    if f.ndim != 2 or f.shape[0] != n:
        raise ValueError(f"factors: expected shape ({n}, K) to match mu's {n} rows, got {f.shape}")
    if not np.isfinite(f).all() or (f != np.round(f)).any():
        raise ValueError("factors: classes must be integers")
    f = f.astype(np.int64)
    sizes = np.asarray([int(s) for s in factor_sizes], dtype=np.int64)
    if sizes.shape != (f.shape[1],):
        raise ValueError(f"factor_sizes: {len(sizes)} sizes for {f.shape[1]} factor columns")
    if (sizes < 1).any():
        raise ValueError(f"factor_sizes: sizes must be >= 1, got {sizes.tolist()}")
    for k in range(f.shape[1]):
        lo, hi = int(f[:, k].min()), int(f[:, k].max())
        if lo < 0 or hi >= sizes[k]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"factors[:, {k}] has value {bad} outside [0, factor size {sizes[k]})")
    return f, sizes


def draw_z(mu: np.ndarray, logvar: np.ndarray, seed: int) -> np.ndarray:
    """One posterior sample per point, z = mu + exp(logvar / 2) * eps, seeded (stream 0 of `seed`)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    return mu + np.exp(0.5 * logvar) * rng.standard_normal(mu.shape)


def sample_points(n: int, samples: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the estimator's sample points: `samples` of the n points drawn without
    replacement (stream 1 of `seed`), or every point when `samples` is None or >= n."""
    if samples is not None and (int(samples) != samples or samples < 1):
        raise ValueError(f"samples: expected a positive integer or None, got {samples!r}")
    if samples is None or samples >= n:
        return np.arange(n)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    return np.sort(rng.choice(n, int(samples), replace=False))


@contextlib.contextmanager
def worker_threads(n: int | None, device: torch.device) -> Iterator[int]:
    """Yield the number of CPU worker threads for the estimator and, on CPU, run torch single-threaded
    meanwhile (restored afterwards): the workers split the blocks among themselves, which needs no
    per-op synchronisation and keeps its speed on a busy machine, where torch's intra-op threads wait
    for each other at every op. Default: torch's thread setting, capped at the CPUs this process may use.
    """
    import torch

    before = torch.get_num_threads()
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = os.cpu_count() or 1
    workers = max(1, min(before, allowed) if n is None else int(n))
    if device.type != "cpu":
        yield 1
        return
    torch.set_num_threads(1)
    try:
        yield workers
    finally:
        torch.set_num_threads(before)
