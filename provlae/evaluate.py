"""Stage-end evaluation: one encoding pass over the evaluated images, then the pure metrics.

Uses its own seeded generator, never the training RNG, so evaluating does not change the training
trajectory (a resumed run stays bitwise identical).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from provlae import metrics
from provlae.models import Family, LadderVAE
from provlae.models.families import bernoulli_nll


@dataclass
class Encoding:
    mu: np.ndarray  # (N, D) posterior means of the latents in use, level by level, lowest level first
    logvar: np.ndarray  # (N, D)
    z: np.ndarray  # (N, D) one posterior sample per image
    levels: list[list[int]]  # column indices of each level in use, lowest first
    level_ids: list[int]  # 1-based level number of each entry of `levels`
    recon_error: float  # mean per-image Bernoulli NLL (sum over pixels), decoding the posterior mean
    kl: dict[int, float]  # mean KL per level in use


def batches_to_float(images: torch.Tensor, idx: torch.Tensor, scale: float, device,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N,H,W,C) rows -> (B,C,H,W) in [0,1] on `device`, in `dtype`."""
    x = images[idx].to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).to(dtype).mul_(scale)


def columns_in_use(family: Family, stage: int) -> list[tuple[int, list[int]]]:
    """(level, dims) pairs of the latents the model generates with at this stage."""
    dims = family.level_dims()
    mask = family.gates(stage, 0, "cpu").dim_mask
    out = []
    for l in family.active_levels(stage):
        used = list(range(dims[l])) if mask[l] is None else torch.nonzero(mask[l]).flatten().tolist()
        out.append((l, used))
    return out


@torch.no_grad()
def encode(model: LadderVAE, family: Family, stage: int, t: int, images: torch.Tensor, scale: float,
           index: torch.Tensor, device, seed: int, batch_size: int = 512) -> Encoding:
    """Encode `index` rows with the model as trained so far: stage `stage`, `t` steps into it (alpha).

    Everything stays on the device until the end (one copy to the host, no per-batch round trips)."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    gates = family.gates(stage, t, device)
    cols = columns_in_use(family, stage)
    gen = torch.Generator(device=device).manual_seed(seed)
    mus, logvars, zs, nll, kls = [], [], [], [], {l: [] for l, _ in cols}
    for start in range(0, len(index), batch_size):
        x = batches_to_float(images, index[start:start + batch_size], scale, device, dtype)
        mu_l, logvar_l = model.encode(x, gates)
        mu = torch.cat([mu_l[l][:, d] for l, d in cols], 1)
        logvar = torch.cat([logvar_l[l][:, d] for l, d in cols], 1)
        z = mu + torch.randn(mu.shape, device=device, generator=gen) * torch.exp(0.5 * logvar)
        # reconstruction from the posterior means, masked as in training
        nll.append(bernoulli_nll(model.decode(gates.masked(mu_l), gates), x).sum())
        for l, d in cols:
            m, lv = mu_l[l][:, d], logvar_l[l][:, d]
            kls[l].append((0.5 * (m.pow(2) + lv.exp() - 1 - lv)).sum())
        mus.append(mu)
        logvars.append(logvar)
        zs.append(z)
    model.train(was_training)
    n = len(index)
    levels, pos = [], 0
    for _, d in cols:
        levels.append(list(range(pos, pos + len(d))))
        pos += len(d)
    # sums in float64 whatever the model's dtype; one transfer each
    sums = torch.stack([torch.stack(nll).double().sum()] + [torch.stack(v).double().sum() for v in kls.values()])
    sums = sums.cpu().tolist()
    return Encoding(torch.cat(mus).cpu().numpy(), torch.cat(logvars).cpu().numpy(), torch.cat(zs).cpu().numpy(),
                    levels, [l + 1 for l, _ in cols], sums[0] / n,
                    {l + 1: v / n for l, v in zip(kls, sums[1:])})


def disentanglement(enc: Encoding, factors: np.ndarray, factor_sizes: tuple[int, ...], *,
                    exclude_factors: tuple[int, ...], mi_samples: int, train_votes: int, eval_votes: int,
                    seed: int, device) -> dict[str, float]:
    """MIG, MIG-sup, factor score, I(x; z_l) from one encoding (DESIGN §2.4)."""
    out: dict[str, float] = {"recon_error": enc.recon_error}
    # "eval_": the training steps report kl_z<l> of their batch at the same global step
    out.update({f"eval_kl_z{l}": v for l, v in enc.kl.items()})
    dev = str(device)
    info = metrics.level_information(enc.mu, enc.logvar, enc.levels, z=enc.z, samples=mi_samples, seed=seed,
                                     device=dev)
    for i, l in enumerate(enc.level_ids):  # rename position-based keys to the real level numbers
        out[f"mi_z{l}"] = info[f"mi_z{i + 1}"]
    out["mi_total"], out["mi_over"] = info["mi_total"], info["mi_over"]
    if factors.shape[1] == 0:  # no ground-truth factors (CelebA): information terms only
        return out
    mig = metrics.mig_scores(enc.mu, enc.logvar, factors, factor_sizes, z=enc.z, samples=mi_samples,
                             seed=seed, exclude_factors=exclude_factors, device=dev)
    fs = metrics.factor_score(enc.mu, factors, factor_sizes, train_votes=train_votes, eval_votes=eval_votes,
                              seed=seed)
    out.update(mig=mig["mig"], mig_sup=mig["mig_sup"], active_units=float(mig["active_units"]),
               factor_score=fs["factor_score"])
    return out
