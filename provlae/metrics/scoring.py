"""The suite scored on one stored representation, and UDR on a cell's: what the evaluation stage runs per
run and per cell (docs/architecture.md §2.4). Arrays in, a dict out; no model, tracking or cluster code.

Metric names (what ``--metrics`` takes) and the values each logs: ``provlae.metrics.names``. The points are
drawn as disentanglement_lib draws them: 10,000 train and 5,000 test, disjoint and seeded, from the stored
evaluation images (fewer when fewer are stored: the notes say so).
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from provlae.metrics import suite, udr
from provlae.metrics.names import SUITE

UDR_POINTS = 10_000  # the inputs UDR compares the models on: as many as the suite's train points
UDR_MIN_POINTS = 100  # fewer inputs shared by a cell's models: no UDR


def score(codes, factors, metrics: Sequence[str] = tuple(SUITE), seed: int = 0,
          train: int = suite.TRAIN_POINTS, test: int = suite.TEST_POINTS) -> dict:
    """The ``metrics`` of ``SUITE`` on one representation's ``(N, D)`` codes and ``(N, K)`` factor indices.

    ``{"values": {value name: float}, "notes": [str], "seconds": {metric: float}}``: a metric that cannot be
    computed here (no factors, nothing varies) logs no value and its note says why."""
    unknown = [m for m in metrics if m not in SUITE]
    if unknown:
        raise ValueError(f"not a metric of the suite: {unknown[0]!r}; the suite: {', '.join(SUITE)}")
    codes = np.asarray(codes)
    factors = suite.factor_indices(factors, len(codes))
    if factors.shape[1] == 0:  # a dataset without ground truth: the supervised suite does not apply
        return {"values": {}, "notes": [f"no ground-truth factors: {', '.join(metrics)} skipped"],
                "seconds": {name: 0.0 for name in metrics}}
    tr, te, split_note = suite.split_points(len(codes), train, test, seed)
    xtr, ytr, xte, yte = codes[tr], factors[tr], codes[te], factors[te]
    runs = {
        "mig_hist": lambda: suite.mig_histogram(xtr, ytr),
        "dci": lambda: suite.dci(xtr, ytr, xte, yte, seed=seed),
        "sap": lambda: suite.sap_score(xtr, ytr, xte, yte),
        "modularity": lambda: suite.modularity_explicitness(xtr, ytr, xte, yte),
        "beta_vae": lambda: suite.beta_vae_score(np.concatenate([xtr, xte]), np.concatenate([ytr, yte]),
                                                 seed=seed),
    }
    values, notes, seconds = {}, [split_note] if split_note else [], {}
    for name in metrics:
        start = time.perf_counter()
        result = runs[name]()
        seconds[name] = time.perf_counter() - start
        values.update({k: float(v) for k, v in result.items() if k in SUITE[name]})
        if result.get("note"):
            notes.append(f"{name}: {result['note']}")
    return {"values": values, "notes": notes, "seconds": seconds}


def udr_scores(means: Sequence[np.ndarray], kls: Sequence[np.ndarray], indices: Sequence[np.ndarray],
               points: int = UDR_POINTS, seed: int = 0) -> dict:
    """UDR (Lasso) of M >= 2 models from their stored means, KL per latent and the dataset rows each
    encoded: compared on the rows every model stored (at most ``points``, drawn by ``seed``).

    ``{"model_scores", "pairwise", "points", "notes"}``; ValueError when the models share fewer than
    ``UDR_MIN_POINTS`` rows (they were evaluated on different images)."""
    if len(means) != len(indices):
        raise ValueError(f"{len(means)} models' means but {len(indices)} index vectors")
    shared = indices[0]
    for index in indices[1:]:
        shared = np.intersect1d(shared, index)
    if len(shared) < UDR_MIN_POINTS:
        raise ValueError(f"the models share {len(shared)} evaluation images (at least {UDR_MIN_POINTS} needed): "
                         f"were they evaluated on the same data?")
    if len(shared) > points:
        shared = np.sort(np.random.default_rng(seed).choice(shared, points, replace=False))
    rows = [_positions(np.asarray(index), shared) for index in indices]
    result = udr.udr([np.asarray(mu)[r] for mu, r in zip(means, rows)], kls, correlation="lasso", seed=seed)
    notes = [result["note"]] if result.get("note") else []
    return {"model_scores": result["model_scores"], "pairwise": result["pairwise"], "points": len(shared),
            "notes": notes}


def _positions(index: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where each of ``wanted`` (all present) stands in ``index``, whatever its order."""
    order = np.argsort(index, kind="stable")
    return order[np.searchsorted(index, wanted, sorter=order)]
