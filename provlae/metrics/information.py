"""I(x; z_l) per level and in total (paper §4, Fig. 5), with the Chen et al. (2018) estimator.

For a group G of latent dims and S seeded sample points s (one posterior sample z_s per point):

    I(x; z_G) = mean_s [ log q(z_sG | x_s) - log q(z_sG) ],    q(z_G) = 1/N sum_n q(z_G | x_n)

q(z_G | x) is the product of the group's per-dim Gaussians (log densities summed before the
logsumexp over n). Both terms use the same sample points, so the estimate never exceeds log N.
I_over = sum_l I(x; z_l) - I(x; z) measures the information the levels share.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from provlae.metrics._inputs import codes, draw_z, sample_points, worker_threads
from provlae.metrics._mixture import LOG_2PI, Mixture, run_calls


def level_information(mu, logvar, levels: Sequence[Sequence[int]], *, z=None, samples: int | None = 10000,
                      seed: int = 0, device=None, chunk: int | None = None,
                      num_threads: int | None = None) -> dict[str, float]:
    """``mi_z1`` ... ``mi_zL`` (levels as listed, lowest first), ``mi_total`` over all latents and
    ``mi_over``, in nats.

    mu, logvar, z: (N, J); z is drawn from N(mu, exp(logvar)) with `seed` when None (the same z as
    mig_scores draws for the same seed). levels: the latent column indices of each level. samples:
    seeded sample points (None: every point). device, chunk, num_threads: as for mig_scores.
    """
    mu = codes(mu, "mu")
    n, j = mu.shape
    logvar = codes(logvar, "logvar", n, j)
    z = draw_z(mu, logvar, seed) if z is None else codes(z, "z", n, j)
    groups = _groups(levels, j)
    idx = sample_points(n, samples, seed)
    dev = torch.device(device or "cpu")
    groups.append(np.arange(j))  # the last group, all latents, gives mi_total
    with worker_threads(num_threads, dev) as workers, torch.no_grad():
        calls = {g: (len(idx) * n * len(c), partial(information, z[:, c], mu[:, c], logvar[:, c], idx,
                                                      device=dev, chunk=chunk)) for g, c in enumerate(groups)}
        mi = run_calls(calls, workers)
    out = {f"mi_z{g + 1}": mi[g] for g in range(len(groups) - 1)}
    out["mi_total"] = mi[len(groups) - 1]
    out["mi_over"] = sum(out[f"mi_z{g + 1}"] for g in range(len(groups) - 1)) - out["mi_total"]
    return out


def information(z, mu, logvar, idx, *, device, chunk=None) -> float:
    """I(x; z_G) in nats for (N, G) float64 arrays and sample point indices `idx`."""
    zs, ms, ls = z[idx], mu[idx], logvar[idx]
    own = (-0.5 * (LOG_2PI + ls + (zs - ms) ** 2 * np.exp(-ls))).sum(1)  # log q(z_s | x_s)
    aggregate = Mixture(z, mu, logvar).log_mean(idx, device=device, chunk=chunk)  # log q(z_s)
    return float(np.mean(own - aggregate))


def _groups(levels, n_latents: int) -> list[np.ndarray]:
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise ValueError(f"levels: expected a list of latent index lists, got {levels!r}")
    groups = []
    for l, cols in enumerate(levels, start=1):
        try:
            cols = np.asarray(list(cols))
        except TypeError:
            raise ValueError(f"levels[{l - 1}]: expected a list of latent indices, got {cols!r}") from None
        if cols.size == 0 or cols.dtype.kind not in "iu":
            raise ValueError(f"levels[{l - 1}]: expected a non-empty list of integer indices, "
                             f"got {cols.tolist()}")
        if cols.min() < 0 or cols.max() >= n_latents:
            raise ValueError(f"levels[{l - 1}]: indices {cols.tolist()} outside [0, {n_latents}) latents")
        groups.append(cols.astype(np.int64))
    if not groups:
        raise ValueError("levels: no level given")
    return groups

