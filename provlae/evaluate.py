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
    """Every latent the information terms count, level by level (``Family.information_levels``, lowest
    first): the levels in use at the stage and those not grown yet."""

    mu: np.ndarray  # (N, D) posterior means
    logvar: np.ndarray  # (N, D)
    z: np.ndarray  # (N, D) one posterior sample per image
    levels: list[list[int]]  # column indices of each level, lowest first
    level_ids: list[int]  # 1-based level number of each entry of `levels`
    in_use: list[int]  # columns of the latents the model generates with at this stage (MIG, factor score)
    recon_error: float  # mean per-image Bernoulli NLL (sum over pixels), decoding the posterior mean
    kl: dict[int, float]  # mean KL per level (a level not grown yet included)


def batches_to_float(images: torch.Tensor, idx: torch.Tensor, scale: float, device,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N,H,W,C) rows -> (B,C,H,W) in [0,1] on `device`, in `dtype`, contiguous: a solo trainer's
    convolutions then see the layout a fused group's stacked batch has (a permuted view would keep the
    channels-last strides, and cuDNN would pick other kernels for the one than for the other)."""
    x = images[idx].to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).to(dtype=dtype, memory_format=torch.contiguous_format).mul_(scale)


def columns_in_use(family: Family, stage: int) -> list[tuple[int, list[int]]]:
    """(ladder level, dims) pairs of the latents the model generates with at this stage."""
    dims = family.level_dims()
    mask = family.gates(stage, 0, "cpu").dim_mask
    out = []
    for l in family.active_levels(stage):
        used = list(range(dims[l])) if mask[l] is None else torch.nonzero(mask[l]).flatten().tolist()
        out.append((l, used))
    return out


def levels_at(family: Family, stage: int) -> list[tuple[int, int, list[int], list[int]]]:
    """The information levels at a stage, lowest first: (level number, ladder level, its dims, those of
    its dims in use at this stage; empty for a level not grown yet)."""
    used = {l: set(d) for l, d in columns_in_use(family, stage)}
    return [(lid, l, dims, [d for d in dims if d in used.get(l, ())])
            for lid, l, dims in family.information_levels()]


@torch.no_grad()
def encode(model: LadderVAE, family: Family, stage: int, t: int, images: torch.Tensor, scale: float,
           index: torch.Tensor, device, seed: int, batch_size: int = 512) -> Encoding:
    """Encode `index` rows with the model as trained so far: stage `stage`, `t` steps into it (alpha).

    A latent outside the code (a dimension the family masks: teacher-student's blocks not grown yet) is
    its prior N(0, 1), carrying no information. Everything stays on the device until the end (one copy to
    the host, no per-batch round trips)."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    gates = family.gates(stage, t, device)
    levels = levels_at(family, stage)
    gen = torch.Generator(device=device).manual_seed(seed)
    mus, logvars, zs, nll, kls = [], [], [], [], {lid: [] for lid, *_ in levels}
    for start in range(0, len(index), batch_size):
        x = batches_to_float(images, index[start:start + batch_size], scale, device, dtype)
        mu_l, logvar_l = model.encode(x, gates)
        mu_l, logvar_l = gates.masked(mu_l), gates.masked(logvar_l)  # outside the code: mean 0, log-var 0
        mu = torch.cat([mu_l[l][:, d] for _, l, d, _ in levels], 1)
        logvar = torch.cat([logvar_l[l][:, d] for _, l, d, _ in levels], 1)
        z = mu + torch.randn(mu.shape, device=device, generator=gen) * torch.exp(0.5 * logvar)
        # reconstruction from the posterior means, masked as in training
        nll.append(bernoulli_nll(model.decode(mu_l, gates), x).sum())
        for lid, l, d, _ in levels:
            m, lv = mu_l[l][:, d], logvar_l[l][:, d]
            kls[lid].append((0.5 * (m.pow(2) + lv.exp() - 1 - lv)).sum())
        mus.append(mu)
        logvars.append(logvar)
        zs.append(z)
    model.train(was_training)
    n = len(index)
    columns, in_use, pos = [], [], 0
    for _, _, dims, used in levels:
        columns.append(list(range(pos, pos + len(dims))))
        in_use += [pos + i for i, d in enumerate(dims) if d in used]
        pos += len(dims)
    # sums in float64 whatever the model's dtype; one transfer each
    sums = torch.stack([torch.stack(nll).double().sum()] + [torch.stack(v).double().sum() for v in kls.values()])
    sums = sums.cpu().tolist()
    return Encoding(torch.cat(mus).cpu().numpy(), torch.cat(logvars).cpu().numpy(), torch.cat(zs).cpu().numpy(),
                    columns, [lid for lid, *_ in levels], in_use, sums[0] / n,
                    {lid: v / n for lid, v in zip(kls, sums[1:])})


def disentanglement(enc: Encoding, factors: np.ndarray, factor_sizes: tuple[int, ...], *,
                    exclude_factors: tuple[int, ...], mi_samples: int, train_votes: int, eval_votes: int,
                    seed: int, device) -> dict[str, float]:
    """MIG, MIG-sup, factor score, I(x; z_l) from one encoding (docs/architecture.md §2.4).

    The information terms count every level (``mi_total`` all latents); MIG, MIG-sup and the factor score
    the latents in use at the stage, which the model generates with."""
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
    mu, logvar, z = (a[:, enc.in_use] for a in (enc.mu, enc.logvar, enc.z))
    mig = metrics.mig_scores(mu, logvar, factors, factor_sizes, z=z, samples=mi_samples,
                             seed=seed, exclude_factors=exclude_factors, device=dev)
    fs = metrics.factor_score(mu, factors, factor_sizes, train_votes=train_votes, eval_votes=eval_votes,
                              seed=seed)
    out.update(mig=mig["mig"], mig_sup=mig["mig_sup"], active_units=float(mig["active_units"]),
               factor_score=fs["factor_score"])
    return out
