"""MIG (Chen et al. 2018) and MIG-sup (paper eq. 12) from the Chen et al. mutual-information estimator.

For latent j and factor k, with one posterior sample z_n per point and S seeded sample points s:

    H(z_j)       = mean_s  -log q(z_sj),          q(z_j)       = 1/N   sum_n         q(z_j | x_n)
    H(z_j | v_k) = mean_s  -log q_v(z_sj),        q_v(z_j)     = 1/N_v sum_{n: v_k(n)=v} q(z_j | x_n)
                   with v = v_k(s), the value of factor k at the sample point itself
    I(z_j; v_k)  = H(z_j) - H(z_j | v_k),         normalised by H(v_k) = log |v_k|

Sample points are drawn once and serve every term. The conditional term of a slice {v_k = v} uses the
sample points that fall in the slice and the slice's points as the mixture, as Chen et al.'s code does;
its budget of sample points is proportional to the slice's frequency (Chen et al. draw up to S per
slice), so averaging over the sample points weights each slice by its frequency among them — exactly
the data frequency when ``samples=None``. Pairing the marginal and conditional terms on the same
sample points makes I an average of log q_v(z_s) - log q(z_s) <= -log p(v), so the normalised MI of a
uniform factor never exceeds 1, and it costs (1 + sum_k 1/|v_k|) S N log-densities per latent rather
than Chen et al.'s (1 + K) S N. Each slice is its own (small) pass rather than a segmented sum
inside the marginal pass: a slice pass costs 1/|v_k| of the marginal and prunes like it, while a
per-element scatter into the |v_k| bins costs about a fifth of a marginal pass per factor on CPU
(index_add_; a one-hot matmul costs more), so the separate passes win for every factor with more
than ~5 values and lose little below that.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from provlae.metrics._inputs import codes, draw_z, factor_table, sample_points, worker_threads
from provlae.metrics._mixture import Mixture, run_calls

ACTIVE_VARIANCE = 1e-2  # a latent is active when the variance of its mean over the data exceeds this


def mig_scores(mu, logvar, factors, factor_sizes: Sequence[int], *, z=None, samples: int | None = 10000,
               seed: int = 0, exclude_factors: Sequence[int] = (), device=None, chunk: int | None = None,
               num_threads: int | None = None) -> dict:
    """MIG, MIG-sup and the normalised MI matrix of a code.

    mu, logvar, z: (N, J) posterior means, log-variances and one sample per point (z drawn from
    N(mu, exp(logvar)) with `seed` when None). factors: (N, K) integer classes, 0 <= class < size.
    samples: number of seeded sample points of the estimator (None: every point). exclude_factors:
    factor indices left out of MIG and MIG-sup; factors of size 1 carry no information and are left
    out too. device: torch device of the estimator ('cpu', 'cuda'). chunk: elements per block (bounds
    memory; default 2^19 on CPU, 2^24 on GPU). num_threads: CPU worker threads (default: torch's
    thread count, capped at the usable CPUs); torch itself runs single-threaded during the call and
    its setting is restored afterwards.

    Returns floats ``mig``, ``mig_sup`` (0 without an active latent), ``active_units`` (latents whose
    mean varies by more than 1e-2 over the data), lists ``mig_per_factor`` (per used factor),
    ``mig_sup_per_latent`` (NaN for inactive latents), ``entropy`` (H(z_j), nats) and
    ``factors_used``, and (J, K) arrays ``mi`` (nats) and ``mi_normalized`` (clamped at 0), NaN in
    the columns of unused factors.
    """
    mu = codes(mu, "mu")
    n, j = mu.shape
    logvar = codes(logvar, "logvar", n, j)
    z = draw_z(mu, logvar, seed) if z is None else codes(z, "z", n, j)
    f, sizes = factor_table(factors, factor_sizes, n)
    used = _used_factors(exclude_factors, sizes)
    idx = sample_points(n, samples, seed)
    dev = torch.device(device or "cpu")
    with worker_threads(num_threads, dev) as workers, torch.no_grad():
        mi, entropy = mutual_information(z, mu, logvar, f, used, idx, device=dev, chunk=chunk,
                                         workers=workers)
    mi_norm = np.clip(mi, 0.0, None) / np.log(sizes)[None, :]  # NaN stays NaN in unused columns
    active = mu.var(0) > ACTIVE_VARIANCE
    per_factor = [_gap(mi_norm[:, k]) for k in used]
    per_latent = [_gap(mi_norm[i, used]) if active[i] and used else math.nan for i in range(j)]
    sup = [g for g in per_latent if not math.isnan(g)]
    return {
        "mig": float(np.mean(per_factor)) if per_factor else 0.0,
        "mig_sup": float(np.mean(sup)) if sup else 0.0,
        "active_units": float(active.sum()),
        "mig_per_factor": per_factor,
        "mig_sup_per_latent": per_latent,
        "entropy": [float(h) for h in entropy],
        "factors_used": list(used),
        "mi": mi,
        "mi_normalized": mi_norm,
    }


def mutual_information(z, mu, logvar, factors, used, idx, *, device, chunk=None, workers=1):
    """(J, K) I(z_j; v_k) in nats (NaN for factors not in `used`) and (J,) H(z_j), float64 inputs."""
    n_latents, n_factors = mu.shape[1], factors.shape[1]
    at = {k: {int(v): np.flatnonzero(factors[idx, k] == v) for v in np.unique(factors[idx, k])} for k in used}
    calls = {}  # one estimator call per (latent, marginal) and (latent, factor, value slice)
    for j in range(n_latents):
        m = Mixture(z[:, [j]], mu[:, [j]], logvar[:, [j]])
        calls[j, None, 0] = (len(idx) * len(z), partial(m.log_mean, idx, device=device, chunk=chunk))
        for k in used:
            members = m.grouped(factors[:, k])
            for v, pos in at[k].items():
                calls[j, k, v] = (len(pos) * len(members[v]), partial(m.log_mean, idx[pos], members[v],
                                                                      device=device, chunk=chunk))
    logq = run_calls(calls, workers)  # log q(z_sj) and log q_v(z_sj) at the sample points
    mi = np.full((n_latents, n_factors), math.nan)
    entropy = np.array([-logq[j, None, 0].mean() for j in range(n_latents)])
    for j in range(n_latents):
        for k in used:
            cond = np.empty(len(idx))
            for v, pos in at[k].items():
                cond[pos] = logq[j, k, v]
            mi[j, k] = entropy[j] + cond.mean()  # H(z_j) - H(z_j | v_k)
    return mi, entropy


def _used_factors(exclude: Sequence[int], sizes: np.ndarray) -> list[int]:
    exclude = [int(k) for k in exclude]
    bad = [k for k in exclude if not 0 <= k < len(sizes)]
    if bad:
        raise ValueError(f"exclude_factors: {bad} not among the {len(sizes)} factor indices")
    return [k for k in range(len(sizes)) if k not in exclude and sizes[k] > 1]


def _gap(values: np.ndarray) -> float:
    """Top-1 minus top-2 (0 when there is only one), clamped at 0."""
    top = np.sort(values)[::-1]
    return float(max(0.0, top[0] - (top[1] if len(top) > 1 else 0.0)))
