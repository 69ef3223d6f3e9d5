"""The disentanglement_lib suite and UDR on codes whose answer is known: an identity code (each latent one
factor), codes that carry nothing (all zero, or the identity code's rows shuffled against the factors),
importance matrices whose D and C follow from the formulas, a copy of a code under permutation and sign
flips (UDR: the same representation) and under a rotation (not)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from provlae.metrics.suite import (
    beta_vae_score,
    completeness_from_importance,
    dci,
    disentanglement_from_importance,
    mig_histogram,
    modularity_explicitness,
    sap_score,
    split_points,
)
from provlae.metrics.udr import udr

SIZES = (4, 3, 5, 2, 4, 3)  # six factors: the BetaVAE score's chance accuracy is 1/6


def world(n: int, seed: int = 0):
    """(identity code, shuffled identity code, factors) of ``n`` points with independent uniform factors."""
    rng = np.random.default_rng(seed)
    factors = np.stack([rng.integers(s, size=n) for s in SIZES], 1)
    identity = factors / np.array(SIZES) + 0.01 * rng.standard_normal(factors.shape)
    return identity, identity[rng.permutation(n)], factors


def split(x, f, seed=0):
    train, test, _ = split_points(len(x), 2 * len(x) // 3, len(x) // 3, seed)
    return x[train], f[train], x[test], f[test]


def supervised(x, f) -> dict:
    """Every supervised metric of the suite on one code."""
    out = {}
    out.update(mig_histogram(x, f))
    out.update(dci(*split(x, f)))
    out.update(sap_score(*split(x, f), continuous=True))
    out.update(modularity_explicitness(*split(x, f)))
    out.update(beta_vae_score(x, f, SIZES, train_votes=1000, eval_votes=500))
    return out


KEYS = {"mig_hist", "dci_disentanglement", "dci_completeness", "dci_informativeness_train",
        "dci_informativeness_test", "sap", "modularity", "explicitness_train", "explicitness_test",
        "beta_vae_score", "beta_vae_train_acc"}


def test_an_identity_code_scores_high_and_codes_without_information_score_low():
    identity, shuffled, factors = world(1500)
    good = supervised(identity, factors)
    assert set(good) == KEYS  # nothing skipped, no note
    assert all(v >= 0.9 for v in good.values()), good

    zero = supervised(np.zeros_like(identity), factors)
    for name, scores in (("zero", zero), ("shuffled", supervised(shuffled, factors))):
        low = {k: v for k, v in scores.items() if k != "note"}
        # chance levels: explicitness is a ROC-AUC (0.5); informativeness and the BetaVAE score are accuracies
        # (the most frequent class, 1/6 of the votes); modularity rates how a code's information is spread
        # over the factors, and a code's noise spreads evenly (it is 0 only where a code carries nothing)
        for key in ("mig_hist", "dci_disentanglement", "dci_completeness", "sap"):
            assert low[key] <= 0.2, (name, key, low[key])
        assert low["explicitness_test"] == pytest.approx(0.5, abs=0.1), name
        assert low["dci_informativeness_test"] <= 0.5 and low["beta_vae_score"] <= 0.25, (name, low)
    assert zero["modularity"] == 0.0


def test_discrete_sap_is_one_minus_chance_for_binary_factors_and_zero_without_information():
    rng = np.random.default_rng(1)
    factors = rng.integers(2, size=(1200, 3))
    identity = factors + 0.05 * rng.standard_normal(factors.shape)
    good = sap_score(*split(identity, factors))["sap"]
    assert good == pytest.approx(0.5, abs=0.06)  # best latent ~1.0, the next one a balanced coin
    assert sap_score(*split(identity[rng.permutation(1200)], factors))["sap"] <= 0.05


def test_dci_from_given_importance_matrices():
    one_code_two_factors = np.zeros((10, 10))
    one_code_two_factors[0, :2] = 1.0
    assert disentanglement_from_importance(one_code_two_factors) == pytest.approx(1 - math.log(2) / math.log(10))
    redundant = np.zeros((10, 10))
    redundant[:2, 0] = 1.0  # one factor spread over two codes
    assert completeness_from_importance(redundant) == pytest.approx(1 - math.log(2) / math.log(10))
    assert disentanglement_from_importance(np.eye(10)) == pytest.approx(1.0)
    assert completeness_from_importance(np.eye(10)) == pytest.approx(1.0)
    flat = np.ones((10, 10))
    assert disentanglement_from_importance(flat) == pytest.approx(0.0, abs=1e-9)
    assert completeness_from_importance(flat) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("correlation", ["lasso", "spearman"])
def test_udr_ranks_a_permuted_sign_flipped_copy_high_and_a_rotation_low(correlation):
    rng = np.random.default_rng(2)
    base = rng.standard_normal((1000, 5))
    copy = -base[:, [3, 0, 4, 1, 2]] * np.array([1, -1, 1, -1, -1])
    rotation, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    kls = [np.ones(5)] * 3
    same = udr([base, copy], kls[:2], correlation=correlation)
    assert min(same["model_scores"]) >= 0.8, same
    rotated = udr([base, copy, base @ rotation], kls, correlation=correlation)
    pair = rotated["pairwise"]
    assert pair[0, 1] >= 0.8 and pair[0, 2] < 0.6 and pair[2, 0] < 0.6, pair
    assert rotated["model_scores"][2] < 0.6 <= min(rotated["model_scores"][:2])


def test_udr_leaves_out_latents_that_encode_nothing():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((800, 4))
    noisy = np.hstack([base[:, :3], rng.standard_normal((800, 1))])  # latent 3: noise, KL ~ 0
    kl = np.array([1.0, 1.0, 1.0, 0.001])
    filtered = udr([base, noisy], [kl, kl])
    unfiltered = udr([base, noisy], [np.ones(4), np.ones(4)])
    assert filtered["model_scores"][0] > unfiltered["model_scores"][0]
    assert filtered["model_scores"][0] >= 0.8
    silent = udr([base, noisy], [np.zeros(4), kl])
    assert silent["model_scores"] == [0.0, 0.0] and "model(s) 0" in silent["note"]


def test_degenerate_inputs_are_defined_and_say_so():
    identity, _, factors = world(600)
    fixed = factors.copy()
    fixed[:, 1] = 2  # a factor with one value
    for result in (mig_histogram(identity, fixed), dci(*split(identity, fixed)), sap_score(*split(identity, fixed)),
                   modularity_explicitness(*split(identity, fixed))):
        assert "factor(s) 1 take one value here: left out" in result["note"]
        assert all(np.isfinite(v) for k, v in result.items() if k != "note")
    constant = identity.copy()
    constant[:, 0] = 3.0  # a latent that never changes
    scores = supervised(constant, factors)
    assert all(np.isfinite(v) for k, v in scores.items() if k != "note")
    no_factors = np.zeros((600, 0), dtype=np.int64)
    assert mig_histogram(identity, no_factors) == {"note": "no ground-truth factors: skipped"}
    assert dci(identity, no_factors, identity, no_factors) == {"note": "no ground-truth factors: skipped"}
    assert beta_vae_score(identity, no_factors)["note"].startswith("no ground-truth factors")
    single = mig_histogram(identity[:, :1], factors[:, :1])  # one latent: the second best shares nothing
    assert single["mig_hist"] >= 0.9


def test_split_points_are_disjoint_seeded_and_shrink_when_fewer_are_stored():
    train, test, note = split_points(20_000, seed=4)
    assert (len(train), len(test), note) == (10_000, 5_000, "")
    assert not set(train) & set(test)
    again, _, _ = split_points(20_000, seed=4)
    assert np.array_equal(train, again)
    train, test, note = split_points(3_000, seed=4)
    assert (len(train), len(test)) == (2_000, 1_000) and not set(train) & set(test)
    assert note == "3000 points stored: 2000 train and 1000 test points instead of 10000 and 5000"


def test_bad_input_names_the_argument():
    identity, _, factors = world(100)
    with pytest.raises(ValueError, match="factors: expected shape"):
        mig_histogram(identity, factors[:50])
    with pytest.raises(ValueError, match="non-negative integer"):
        mig_histogram(identity, factors - 5)
    with pytest.raises(ValueError, match="bins"):
        mig_histogram(identity, factors, bins=1)
    with pytest.raises(ValueError, match="correlation"):
        udr([identity, identity], [np.ones(6)] * 2, correlation="pearson")
    with pytest.raises(ValueError, match="same inputs"):
        udr([identity, identity[:50]], [np.ones(6)] * 2)
    with pytest.raises(ValueError, match="need 2 or more"):
        udr([identity], [np.ones(6)])
