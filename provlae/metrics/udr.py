"""Unsupervised Disentanglement Ranking (Duan et al., ICLR 2020) on stored codes (docs/architecture.md §2.4).

M models of one cell (same data, family and beta; different seeds) encode the same inputs. For each ordered
pair (i, j), a similarity matrix between model i's latents and model j's: the absolute coefficients of a
``Lasso(alpha=0.1)`` regressing j's standardised codes on i's, or the absolute Spearman correlations. Latents
whose mean KL is at most ``kl_threshold`` are left out (they encode nothing). The pair's score is the
relative-strength score of that matrix: for every latent, its strongest similarity squared over the sum of
its similarities, averaged over rows and over columns, the two averages averaged. A model's UDR is the
median of the scores of the pairs it is compared in (as disentanglement_lib computes it: column i). A
disentangled model is one that other seeds reproduce up to permutation and sign: it needs no labels.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso

from provlae.metrics._inputs import as_array
from provlae.metrics._inputs import codes as check_codes

CORRELATIONS = ("lasso", "spearman")


def udr(means: Sequence, kls: Sequence, correlation: str = "lasso", kl_threshold: float = 0.01,
        seed: int = 0) -> dict:
    """``{"model_scores": [M floats], "pairwise": (M, M) array}`` for M >= 2 models' ``(N, D_m)`` means
    on the same N inputs and their ``(D_m,)`` mean KL per latent. A model with no latent above the KL
    threshold scores 0 in every pair (``"note"`` names it)."""
    if correlation not in CORRELATIONS:
        raise ValueError(f"correlation: expected one of {', '.join(CORRELATIONS)}, got {correlation!r}")
    if len(means) != len(kls):
        raise ValueError(f"{len(means)} models' means but {len(kls)} KL vectors")
    if len(means) < 2:
        raise ValueError(f"UDR compares models with each other: need 2 or more, got {len(means)}")
    reps, masks = [], []
    for m, (mu, kl) in enumerate(zip(means, kls)):
        x = check_codes(mu, f"means[{m}]")
        k = as_array(kl, f"kls[{m}]").reshape(-1)
        if k.shape != (x.shape[1],):
            raise ValueError(f"kls[{m}]: {k.size} values for {x.shape[1]} latents")
        if reps and len(x) != len(reps[0]):
            raise ValueError(f"means[{m}]: {len(x)} points, means[0] {len(reps[0])}: models must encode the same inputs")
        std = x.std(0)
        std[std == 0] = 1.0
        active = k > kl_threshold
        reps.append((x - x.mean(0)) / std * active)
        masks.append(active)
    n_models = len(reps)
    pairwise = np.zeros((n_models, n_models))
    for i in range(n_models):
        for j in range(n_models):
            if i != j:
                sim = similarity(reps[i], reps[j], correlation, seed)
                pairwise[i, j] = relative_strength(sim[masks[i]][:, masks[j]])
    scores = [float(np.median(np.delete(pairwise[:, i], i))) for i in range(n_models)]
    silent = [m for m, a in enumerate(masks) if not a.any()]
    out = {"model_scores": scores, "pairwise": pairwise}
    if silent:
        out["note"] = f"model(s) {', '.join(map(str, silent))}: no latent above KL {kl_threshold}"
    return out


def similarity(a: np.ndarray, b: np.ndarray, correlation: str, seed: int = 0) -> np.ndarray:
    """``(D_a, D_b)`` absolute similarities between the latents of two standardised codes."""
    if correlation == "lasso":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = Lasso(alpha=0.1, random_state=seed).fit(a, b)
        return np.abs(model.coef_).reshape(b.shape[1], a.shape[1]).T
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        rho = stats.spearmanr(a, b).statistic
    rho = np.atleast_2d(rho)
    if rho.shape == (1, 1):  # one latent each: spearmanr returns the coefficient itself
        block = rho
    else:
        block = rho[:a.shape[1], a.shape[1]:]
    return np.nan_to_num(np.abs(block))


def relative_strength(sim: np.ndarray) -> float:
    """Mean over columns of max² / sum, and over rows, averaged; 0 for an empty matrix."""
    if sim.size == 0:
        return 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        cols = np.nan_to_num(sim.max(0) ** 2 / sim.sum(0))
        rows = np.nan_to_num(sim.max(1) ** 2 / sim.sum(1))
    return float((cols.mean() + rows.mean()) / 2)
