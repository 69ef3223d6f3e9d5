"""A plain chunked MIG / MIG-sup, in the style of Chen et al.'s and the authors' metric code.

Per latent: for each chunk of sample points, the full (chunk, N) log-density matrix in torch float32
and a logsumexp over N; then the same again for every value slice of every factor (the slice's sample
points against the slice's points). No reuse, no pruning. It computes the same estimator as
provlae.metrics.mig_scores (same z, same sample points), so the two agree to float precision.
"""
from __future__ import annotations

import math

import numpy as np
import torch

CHUNK = 1 << 22  # elements of one log-density matrix (16 MB of float32)


def log_mean_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log (1/N) sum_n N(z_s; mu_n, exp(logvar_n)) for 1-d float32 z (S,), mu and logvar (N,)."""
    out, rows = [], max(1, CHUNK // len(mu))
    for i in range(0, len(z), rows):
        zc = z[i:i + rows, None]
        logq = -0.5 * (math.log(2 * math.pi) + logvar[None] + (zc - mu[None]) ** 2 * torch.exp(-logvar[None]))
        out.append(torch.logsumexp(logq, dim=1) - math.log(len(mu)))
    return torch.cat(out)


def reference_mig(z, mu, logvar, factors, factor_sizes, idx, used, device="cpu") -> dict:
    """MIG, MIG-sup and the (J, K) MI matrix (nats, NaN for unused factors) from numpy inputs."""
    t = {name: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device) for name, a in
         [("z", z), ("mu", mu), ("logvar", logvar)]}
    n_latents, n_factors = mu.shape[1], factors.shape[1]
    mi = np.full((n_latents, n_factors), math.nan)
    with torch.no_grad():
        for j in range(n_latents):
            zj, mj, lj = t["z"][:, j], t["mu"][:, j], t["logvar"][:, j]
            marginal = log_mean_density(zj[idx], mj, lj).double().cpu().numpy()
            for k in used:
                cond = np.empty(len(idx))
                for v in np.unique(factors[idx, k]):
                    rows = np.flatnonzero(factors[idx, k] == v)
                    members = torch.as_tensor(np.flatnonzero(factors[:, k] == v), device=device)
                    logq = log_mean_density(zj[idx[rows]], mj[members], lj[members])
                    cond[rows] = logq.double().cpu().numpy()
                mi[j, k] = np.mean(cond - marginal)
    norm = np.clip(mi, 0, None) / np.log(np.asarray(factor_sizes, dtype=np.float64))[None]
    gaps = [_gap(norm[:, k]) for k in used]
    active = np.asarray(mu).var(0) > 1e-2
    sup = [_gap(norm[i, used]) for i in range(n_latents) if active[i]]
    return {"mig": float(np.mean(gaps)), "mig_sup": float(np.mean(sup)) if sup else 0.0, "mi": mi,
            "mi_normalized": norm}


def _gap(values) -> float:
    top = np.sort(values)[::-1]
    return float(max(0.0, top[0] - (top[1] if len(top) > 1 else 0.0)))
