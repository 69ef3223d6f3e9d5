"""An example family of your own: a β-TCVAE-style total-correlation penalty on the ladder.

β-TCVAE (Chen et al. 2018) splits the KL term into index-code MI + total correlation (TC) +
dimension-wise KL and weighs only the TC by β. Here on the ladder: every level active from step 0 (as VLAE),

    loss = recon + Σ_l KL_l + (β - 1) · TC(z),

with TC(z) = E[log q(z) - Σ_d log q(z_d)] over the concatenated code of all levels, each log q estimated
from the batch (minibatch-weighted sampling with the batch as the aggregate posterior: the constant
(D - 1) · log N of the full estimator is left out; it has no gradient).

Use it without touching the package:

    python -m provlae train --plugin examples.tc_vlae --set family=tc_vlae --out runs/tc
    python sweeps/full_grid.py --preset smoke --plugin examples.tc_vlae --families tc_vlae,vlae
"""
from __future__ import annotations

import math

import torch

from provlae.models import Family, register
from provlae.models.families import wide


@register("tc_vlae")
class TCVLAE(Family):
    """VLAE whose KL weight is 1, plus (β - 1) · TC(z) over all levels' latents."""

    display_order = 10  # after the built-in families in tables and figures

    def kl_weights(self, stage: int) -> list[float]:
        return [1.0] * self.L  # β weighs the total correlation instead (extra_loss)

    def coefficients(self, stage: int) -> dict:
        return {**super().coefficients(stage), "tc": self.cfg.beta - 1.0}

    def extra_loss(self, model, x, out, stage, noise, coef) -> dict:
        z = torch.cat([wide(t) for t in out.z if t is not None], 1)  # (B, D)
        mu = torch.cat([wide(t) for t in out.mu if t is not None], 1)
        logvar = torch.cat([wide(t) for t in out.logvar if t is not None], 1)
        return {"tc": coef["tc"] * total_correlation(z, mu, logvar)}


def total_correlation(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Minibatch estimate of E[log q(z) - Σ_d log q(z_d)] for codes z (B, D) of posteriors (mu, logvar)."""
    b = z.shape[0]
    # log q(z_i,d | x_j) for every pair (i, j): (B, B, D)
    diff = z[:, None, :] - mu[None, :, :]
    log_qzd = -0.5 * (diff.pow(2) / logvar.exp()[None] + logvar[None] + math.log(2 * math.pi))
    log_qz = torch.logsumexp(log_qzd.sum(2), dim=1) - math.log(b)  # (B,)
    log_prod = (torch.logsumexp(log_qzd, dim=1) - math.log(b)).sum(1)  # (B,)
    return (log_qz - log_prod).mean()
