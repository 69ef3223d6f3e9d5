"""Disentanglement metrics: oracle codes, agreement with a plain reference, determinism, bad input."""
import math

import numpy as np
import pytest
import torch

from provlae.metrics import factor_score, level_information, mig_scores
from provlae.metrics._inputs import draw_z, sample_points

# ------------------------------------------------------------------ a plain reference (numpy, float64)


def logsumexp(x, axis):
    m = x.max(axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis, keepdims=True))).squeeze(axis)


def ref_log_q(z_rows, mu, logvar):
    """log (1/C) sum_n prod_j N(z_rows[s, j]; mu[n, j], exp(logvar[n, j])): (R, G), (C, G) -> (R,)."""
    var = np.exp(logvar[None])
    e = -0.5 * (math.log(2 * math.pi) + logvar[None] + (z_rows[:, None] - mu[None]) ** 2 / var)  # (R, C, G)
    return logsumexp(e.sum(-1), axis=1) - math.log(len(mu))


def ref_mi(z, mu, logvar, factors, idx):
    """(J, K) I(z_j; v_k): per latent, marginal and per factor value the same again, no reuse."""
    mi = np.zeros((mu.shape[1], factors.shape[1]))
    for j in range(mu.shape[1]):
        col = slice(j, j + 1)
        marginal = ref_log_q(z[idx, col], mu[:, col], logvar[:, col])
        for k in range(factors.shape[1]):
            cond = np.empty(len(idx))
            for v in np.unique(factors[idx, k]):
                at = factors[idx, k] == v
                members = factors[:, k] == v
                cond[at] = ref_log_q(z[idx[at], col], mu[members, col], logvar[members, col])
            mi[j, k] = np.mean(cond) - np.mean(marginal)
    return mi


def ref_scores(mi, sizes, mu):
    norm = np.clip(mi, 0, None) / np.log(sizes)
    top = -np.sort(-norm, axis=0)
    mig = np.mean(top[0] - top[1])
    active = mu.var(0) > 1e-2
    top = -np.sort(-norm[active], axis=1)
    return norm, mig, np.mean(top[:, 0] - top[:, 1])


def ref_information(z, mu, logvar, idx):
    zs, ms, ls = z[idx], mu[idx], logvar[idx]
    own = (-0.5 * (math.log(2 * math.pi) + ls + (zs - ms) ** 2 / np.exp(ls))).sum(1)
    return np.mean(own - ref_log_q(z[idx], mu, logvar))


# ------------------------------------------------------------------ synthetic codes


def grid(sizes, repeats=1):
    f = np.stack(np.unravel_index(np.arange(int(np.prod(sizes))), sizes), 1)
    return np.repeat(f, repeats, 0)


def factor_code(factors, sizes, noise=0.02, seed=0):
    """One latent per factor: its value spread over [-1.5, 1.5] plus small noise; posterior std = noise."""
    rng = np.random.default_rng(seed)
    mu = (factors / (np.asarray(sizes) - 1) - 0.5) * 3 + noise * rng.standard_normal(factors.shape)
    return mu, np.full(mu.shape, 2 * np.log(noise))


def random_code(n, j, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, j)), rng.uniform(-3, 0, (n, j))


SIZES = (3, 4, 5)

# ------------------------------------------------------------------ agreement with the reference


@pytest.mark.parametrize("samples", [None, 150])
def test_mig_matches_plain_reference(samples):
    rng = np.random.default_rng(1)
    n = 400
    factors = np.stack([rng.integers(0, s, n) for s in SIZES], 1)  # not a grid: uneven slices
    mu, logvar = random_code(n, 4)
    mu[:, 0] += factors[:, 0]  # some information to measure
    mu[:, 1] = 0.3 * factors[:, 1] + 0.2 * factors[:, 2] + 0.1 * rng.standard_normal(n)
    z = draw_z(mu, logvar, seed=3)
    out = mig_scores(mu, logvar, factors, SIZES, z=z, samples=samples, seed=3)
    mi = ref_mi(z, mu, logvar, factors, sample_points(n, samples, 3))
    norm, mig, sup = ref_scores(mi, np.asarray(SIZES), mu)
    np.testing.assert_allclose(out["mi"], mi, atol=1e-4)
    np.testing.assert_allclose(out["mi_normalized"], norm, atol=1e-4)
    assert out["mig"] == pytest.approx(mig, abs=1e-4)
    assert out["mig_sup"] == pytest.approx(sup, abs=1e-4)


def test_level_information_matches_plain_reference():
    n = 500
    mu, logvar = random_code(n, 5, seed=2)
    z = draw_z(mu, logvar, seed=0)
    levels = [[0], [1, 2], [3, 4]]
    for samples in (None, 200):
        out = level_information(mu, logvar, levels, z=z, samples=samples)
        idx = sample_points(n, samples, 0)
        expect = [ref_information(z[:, c], mu[:, c], logvar[:, c], idx) for c in levels]
        total = ref_information(z, mu, logvar, idx)
        for l, value in enumerate(expect, start=1):
            assert out[f"mi_z{l}"] == pytest.approx(value, abs=1e-4)
        assert out["mi_total"] == pytest.approx(total, abs=1e-4)
        assert out["mi_over"] == pytest.approx(sum(expect) - total, abs=1e-4)


def test_pruned_tiled_paths_match_reference():
    """Narrow posteriors on a larger set: pruning, posterior-width strata and small tiles all engage."""
    rng = np.random.default_rng(4)
    n = 17000  # >= STRATA * MIN_STRATUM: the marginal is stratified
    factors = np.stack([rng.integers(0, 2, n), rng.integers(0, 7, n)], 1)
    mu = np.stack([factors[:, 1] + 0.05 * rng.standard_normal(n), rng.standard_normal(n)], 1)
    logvar = np.log(rng.uniform(0.01, 0.2, (n, 2)) ** 2)
    logvar[::30, 1] = 100.0  # points far wider than the rest: their own terms leave the float32 range
    z = draw_z(mu, logvar, seed=0)
    idx = sample_points(n, 120, 0)
    mi = ref_mi(z, mu, logvar, factors, idx)
    for chunk in (None, 5000):
        out = mig_scores(mu, logvar, factors, (2, 7), z=z, samples=120, chunk=chunk)
        np.testing.assert_allclose(out["mi"], mi, atol=1e-4)


# ------------------------------------------------------------------ oracle codes


def test_factor_code_scores_one():
    factors = grid(SIZES, repeats=5)
    mu, logvar = factor_code(factors, SIZES)
    out = mig_scores(mu, logvar, factors, SIZES, samples=None)
    assert out["mig"] > 0.9 and out["mig_sup"] > 0.9
    assert out["active_units"] == 3
    assert np.all(np.diag(out["mi_normalized"]) > 0.95)
    assert factor_score(mu, factors, SIZES, train_votes=500, eval_votes=300)["factor_score"] == 1.0


def test_duplicated_latent_kills_mig_of_its_factor_only():
    factors = grid(SIZES, repeats=5)
    mu, logvar = factor_code(factors, SIZES)
    dup = mu[:, :1] + 0.02 * np.random.default_rng(9).standard_normal((len(mu), 1))
    mu, logvar = np.hstack([mu, dup]), np.hstack([logvar, logvar[:, :1]])
    out = mig_scores(mu, logvar, factors, SIZES, samples=None)
    assert out["mig_per_factor"][0] < 0.1
    assert min(out["mig_per_factor"][1:]) > 0.9
    assert out["mig_sup"] > 0.9


def test_latent_holding_two_factors_drops_mig_sup():
    factors = grid(SIZES, repeats=5)
    mu, logvar = factor_code(factors, SIZES)
    clean = mig_scores(mu, logvar, factors, SIZES, samples=None)
    mixed = mu.copy()
    noise = 0.02 * np.random.default_rng(0).standard_normal(len(mu))
    mixed[:, 0] = (factors[:, 0] * SIZES[1] + factors[:, 1]) * 0.3 + noise  # z = f0 * |v1| + f1
    mixed[:, 1] = 0.0  # factor 1 now lives only in latent 0
    out = mig_scores(mixed, logvar, factors, SIZES, samples=None)
    assert out["active_units"] == 2
    assert out["mig_sup_per_latent"][0] < 0.5
    assert out["mig_sup"] < clean["mig_sup"] - 0.3


def test_exclude_factors_and_constant_factors():
    factors = grid((2, 3, 4, 1), repeats=3)  # the last factor has one value: no information to measure
    mu, logvar = factor_code(factors[:, :3], (2, 3, 4))
    out = mig_scores(mu, logvar, factors, (2, 3, 4, 1), samples=None, exclude_factors=(0,))
    assert out["factors_used"] == [1, 2]
    assert np.isnan(out["mi_normalized"][:, [0, 3]]).all()
    assert len(out["mig_per_factor"]) == 2 and out["mig"] > 0.9


def test_random_code_factor_score_is_chance():
    factors = grid((4, 4, 4, 4), repeats=20)  # slices much larger than a batch
    mu, _ = random_code(len(factors), 6, seed=5)
    out = factor_score(mu, factors, (4, 4, 4, 4), train_votes=2000, eval_votes=2000, seed=1)
    assert out["factor_score"] == pytest.approx(0.25, abs=0.08)
    assert out["active_dims"] == 6


def test_factor_score_without_active_latents_is_zero():
    factors = grid(SIZES)
    out = factor_score(np.zeros((len(factors), 3)), factors, SIZES, train_votes=50, eval_votes=50)
    assert out == {"factor_score": 0.0, "factor_train_acc": 0.0, "active_dims": 0.0}


def test_inactive_latent_carries_no_information():
    factors = grid(SIZES, repeats=5)
    mu, logvar = factor_code(factors, SIZES)
    mu[:, 2], logvar[:, 2] = 0.3, 0.0  # collapsed to the prior (shifted): constant mean, unit variance
    info = level_information(mu, logvar, [[0, 1], [2]], samples=None)
    assert abs(info["mi_z2"]) < 1e-4
    assert info["mi_z1"] > 2.0
    assert info["mi_over"] == pytest.approx(info["mi_z1"] + info["mi_z2"] - info["mi_total"])
    assert mig_scores(mu, logvar, factors, SIZES, samples=None)["active_units"] == 2


# ------------------------------------------------------------------ determinism, inputs, state


def test_seeded_and_deterministic():
    factors = grid(SIZES, repeats=4)
    mu, logvar = factor_code(factors, SIZES, noise=0.3)
    a = mig_scores(mu, logvar, factors, SIZES, samples=100, seed=7)
    b = mig_scores(torch.as_tensor(mu), torch.as_tensor(logvar), torch.as_tensor(factors), SIZES, samples=100,
                   seed=7, num_threads=1)
    c = mig_scores(mu, logvar, factors, SIZES, samples=100, seed=8)
    np.testing.assert_array_equal(a["mi"], b["mi"])
    assert a["mig"] == b["mig"] and a["mig"] != c["mig"]
    fa, fb = (factor_score(mu, factors, SIZES, train_votes=300, eval_votes=200, seed=s) for s in (3, 3))
    assert fa == fb
    la, lb = (level_information(mu, logvar, [[0], [1, 2]], samples=80, seed=2) for _ in range(2))
    assert la == lb


def test_leaves_torch_threads_as_they_were():
    before = torch.get_num_threads()
    factors = grid(SIZES, repeats=2)
    mu, logvar = factor_code(factors, SIZES)
    mig_scores(mu, logvar, factors, SIZES, samples=None, num_threads=2)
    level_information(mu, logvar, [[0, 1, 2]], samples=None)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("change, message", [
    ({"logvar": np.zeros((60, 2))}, "logvar: shape"),
    ({"z": np.zeros((59, 3))}, "z: shape"),
    ({"mu": np.full((60, 3), np.nan)}, "mu: contains NaN"),
    ({"factors": np.zeros((60, 2), dtype=int)}, "factor_sizes: 3 sizes for 2"),
    ({"factors": grid(SIZES) + [0, 0, 1]}, r"factors\[:, 2\] has value 5 outside \[0, factor size 5\)"),
    ({"factors": grid(SIZES)[:50]}, "factors: expected shape"),
    ({"exclude_factors": (3,)}, "exclude_factors"),
    ({"samples": 0}, "samples"),
])
def test_bad_input_is_named(change, message):
    factors = grid(SIZES)
    mu, logvar = factor_code(factors, SIZES)
    args = {"mu": mu, "logvar": logvar, "factors": factors, "factor_sizes": SIZES, "z": None, "samples": None,
            "exclude_factors": ()}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        mig_scores(args.pop("mu"), args.pop("logvar"), args.pop("factors"), args.pop("factor_sizes"), **args)


def test_bad_levels_and_factor_values_are_named():
    factors = grid(SIZES)
    mu, logvar = factor_code(factors, SIZES)
    with pytest.raises(ValueError, match=r"levels\[1\]: indices \[2, 3\] outside \[0, 3\)"):
        level_information(mu, logvar, [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"levels\[0\]: expected a non-empty"):
        level_information(mu, logvar, [[]])
    with pytest.raises(ValueError, match=r"factors\[:, 0\] has value -1"):
        factor_score(mu, factors - 1, SIZES)
    with pytest.raises(ValueError, match="batch_size"):
        factor_score(mu, factors, SIZES, batch_size=1)
