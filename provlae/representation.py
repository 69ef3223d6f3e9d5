"""A trial's representation at a stage end, stored so that metrics can be computed later without the model.

One ``.npz`` of plain arrays per stage end (``representation/stage<s>.npz`` in a sweep's MLflow run): the
encoder means and log-variances of the stage's evaluation images (at most ``MAX_POINTS`` of them, drawn by
the data seed: the same images for every seed of a dataset, so models are compared on identical inputs),
the images' indices into the training set, their factor indices where the dataset has factors, the mean KL
per latent, each latent's level, and which latents the model generates with at that stage. Read back with ``allow_pickle=False``:
a damaged or foreign file is a ``RepresentationError`` naming it.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from provlae.atomic import atomic_path

MAX_POINTS = 20_000  # 15,000 are drawn for the suite (10,000 train, 5,000 test); ~1.6 MB per stage at 9 latents
FORMAT = 1
FIELDS = ("format", "stage", "step", "mu", "logvar", "index", "factors", "kl", "in_use", "level")


class RepresentationError(ValueError):
    """A stored representation that cannot be read as one."""


@dataclass
class Representation:
    stage: int
    step: int  # global step at the stage end
    mu: np.ndarray  # (N, D) float32 encoder means
    logvar: np.ndarray  # (N, D) float32
    index: np.ndarray  # (N,) int64 rows of the training set
    factors: np.ndarray  # (N, K) int64 factor indices; K = 0 without ground truth
    kl: np.ndarray  # (D,) mean KL per latent over the N images
    in_use: np.ndarray  # (D,) bool: the latents the model generates with at this stage
    level: np.ndarray  # (D,) int64: each latent's ladder level (1 the lowest)

    @property
    def codes(self) -> np.ndarray:
        """The means of the latents in use: what the supervised metrics score."""
        return self.mu[:, self.in_use]


def kl_per_latent(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """Mean KL(q(z_d | x) || N(0, 1)) per latent, in float64."""
    mu, logvar = mu.astype(np.float64), logvar.astype(np.float64)
    return (0.5 * (mu ** 2 + np.exp(logvar) - 1.0 - logvar)).mean(0)


def stored_rows(n: int, data_seed: int) -> np.ndarray:
    """Which of ``n`` evaluation images are stored: all of them, or ``MAX_POINTS`` drawn by the data seed."""
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(data_seed + 2).choice(n, MAX_POINTS, replace=False))


def write(path: str | Path, rep: Representation) -> Path:
    """Write ``rep`` to ``path`` whole (never a half-written file)."""
    path = Path(path)
    arrays = {"format": np.int64(FORMAT), "stage": np.int64(rep.stage), "step": np.int64(rep.step),
              "mu": rep.mu.astype(np.float32), "logvar": rep.logvar.astype(np.float32),
              "index": rep.index.astype(np.int64), "factors": rep.factors.astype(np.int64),
              "kl": rep.kl.astype(np.float64), "in_use": rep.in_use.astype(bool),
              "level": rep.level.astype(np.int64)}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def read(path: str | Path) -> Representation:
    """The representation stored at ``path``; RepresentationError naming it if it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in FIELDS if k not in data.files]
            if missing:
                raise RepresentationError(f"{path} is not a stored representation (no {', '.join(missing)})")
            arrays = {k: data[k] for k in FIELDS}
    except RepresentationError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise RepresentationError(f"{path} cannot be read as a stored representation ({e})") from None
    if int(arrays["format"]) != FORMAT:
        raise RepresentationError(f"{path} has format {int(arrays['format'])}, expected {FORMAT}")
    mu, logvar, factors = arrays["mu"], arrays["logvar"], arrays["factors"]
    n = len(mu)
    if (mu.ndim != 2 or logvar.shape != mu.shape or arrays["index"].shape != (n,) or factors.ndim != 2
            or len(factors) != n or any(arrays[k].shape != (mu.shape[1],) for k in ("kl", "in_use", "level"))):
        raise RepresentationError(f"{path}: its arrays' shapes do not agree")
    if not (np.isfinite(mu).all() and np.isfinite(logvar).all()):
        raise RepresentationError(f"{path}: its codes hold NaN or Inf")
    return Representation(stage=int(arrays["stage"]), step=int(arrays["step"]), mu=mu, logvar=logvar,
                          index=arrays["index"], factors=factors, kl=arrays["kl"],
                          in_use=arrays["in_use"].astype(bool), level=arrays["level"])
