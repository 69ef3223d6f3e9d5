"""Factor score (Kim & Mnih 2018, "FactorVAE metric") on precomputed codes.

Global std of each latent's mean from `global_samples` random points (ddof 1); latents with std below
`std_threshold` are pruned. One vote: pick a factor k at random (among factors of size > 1), one of
its values held by at least two points of the data, and `batch_size` points sharing that value
(without replacement, with replacement when the slice is smaller; a one-point slice would give every latent
a variance of 0, and the vote would go to whichever latent rounding favours); divide their codes by the global std, take the variance
of each active latent over the batch (ddof 1); the vote is (argmin latent, k). A majority-vote
classifier maps each latent to its most frequent factor among the training votes; the score is its
accuracy on fresh evaluation votes. With no active latent (or no factor to fix) the score is 0.
Votes are drawn in vectorised batches.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from provlae.metrics._inputs import codes, factor_table

VOTE_BATCH = 2048  # votes gathered at once: bounds memory at VOTE_BATCH * batch_size * J floats


def factor_score(mu, factors, factor_sizes: Sequence[int], *, batch_size: int = 64, train_votes: int = 10000,
                 eval_votes: int = 5000, std_threshold: float = 0.05, global_samples: int = 10000,
                 seed: int = 0) -> dict[str, float]:
    """``factor_score`` (eval accuracy), ``factor_train_acc`` and ``active_dims`` for (N, J) codes
    `mu` and (N, K) integer `factors` with classes 0 <= class < factor_sizes[k]."""
    mu = codes(mu, "mu")
    n = len(mu)
    f, sizes = factor_table(factors, factor_sizes, n)
    for name, value, least in [("batch_size", batch_size, 2), ("train_votes", train_votes, 1),
                               ("eval_votes", eval_votes, 1), ("global_samples", global_samples, 2)]:
        if int(value) != value or value < least:
            raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
    rng = np.random.default_rng(seed)
    rows = rng.choice(n, global_samples, replace=False) if n > global_samples else np.arange(n)
    global_std = mu[rows].std(0, ddof=1)
    active = np.flatnonzero(global_std >= std_threshold)
    groups = {k: _groups(f[:, k]) for k in range(f.shape[1]) if sizes[k] > 1}
    voting = [k for k, g in groups.items() if g[1].size]
    if active.size == 0 or not voting:
        return {"factor_score": 0.0, "factor_train_acc": 0.0, "active_dims": float(active.size)}
    scaled = mu[:, active] / global_std[active]  # (N, A)
    train_dim, train_k = _votes(rng, scaled, groups, voting, int(train_votes), int(batch_size))
    eval_dim, eval_k = _votes(rng, scaled, groups, voting, int(eval_votes), int(batch_size))
    counts = np.zeros((active.size, f.shape[1]), dtype=np.int64)
    np.add.at(counts, (train_dim, train_k), 1)
    classifier = counts.argmax(1)  # latent -> its most frequent factor
    return {"factor_score": float(np.mean(classifier[eval_dim] == eval_k)),
            "factor_train_acc": float(counts.max(1).sum() / train_votes),
            "active_dims": float(active.size)}


def _groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points sorted by value, and the start and size of the run of each value held by two points or more."""
    order = np.argsort(values, kind="stable")
    _, starts, counts = np.unique(values[order], return_index=True, return_counts=True)
    keep = counts >= 2
    return order, starts[keep], counts[keep]


def _votes(rng, scaled, groups, voting, n_votes: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(argmin latent, factor) of `n_votes` votes."""
    ks = rng.choice(np.asarray(voting), n_votes)
    dims = np.empty(n_votes, dtype=np.int64)
    for k in voting:
        at = np.flatnonzero(ks == k)
        order, starts, counts = groups[k]
        value = rng.integers(len(starts), size=at.size)  # a present value per vote
        for i in range(0, at.size, VOTE_BATCH):
            v = value[i:i + VOTE_BATCH]
            pos = _draw(rng, counts[v], batch_size)  # (votes, batch) positions within the slice
            batch = scaled[order[starts[v][:, None] + pos]]  # (votes, batch, A)
            dims[at[i:i + VOTE_BATCH]] = batch.var(1, ddof=1).argmin(1)
    return dims, ks


def _draw(rng, sizes: np.ndarray, b: int) -> np.ndarray:
    """(len(sizes), b) indices: b distinct ones in [0, size) per row (Floyd's algorithm, vectorised
    over rows), or b with replacement where size < b."""
    out = np.empty((len(sizes), b), dtype=np.int64)
    for t in range(b):
        top = sizes - b + t  # Floyd: draw from [0, top], take top itself if already chosen
        pick = np.floor(rng.random(len(sizes)) * (top + 1)).astype(np.int64)
        taken = (out[:, :t] == pick[:, None]).any(1)
        out[:, t] = np.where(taken, top, pick)
    small = sizes < b
    if small.any():
        out[small] = np.floor(rng.random((small.sum(), b)) * sizes[small, None]).astype(np.int64)
    return out
