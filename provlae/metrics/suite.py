"""The disentanglement_lib suite on stored codes: histogram MIG, DCI, SAP, modularity and explicitness, and
the BetaVAE score (docs/architecture.md §2.4).

Each function follows disentanglement_lib's protocol (Locatello et al. 2019): its defaults and formulas, on
codes ``(N, D)`` (the encoder means) and integer factor indices ``(N, K)`` that are given rather than
sampled from a dataset. Arrays in, a dict out, seeded; no model, tracking or cluster code.

Cases the protocols leave undefined are defined here, and the result says so under ``"note"``:
- no factors (K = 0, a dataset without ground truth): every supervised metric returns only a note;
- a factor with one value (nothing to recover): left out of the metrics that fit a classifier per factor or
  divide by the factor's entropy;
- a constant latent carries no information: it falls in one bin, gets no importance, predicts one class;
- a single latent (D = 1): the second-best latent's share, where a gap needs one, is 0.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import mutual_info_score, roc_auc_score
from sklearn.svm import LinearSVC

from provlae.metrics._inputs import as_array
from provlae.metrics._inputs import codes as check_codes

TRAIN_POINTS, TEST_POINTS = 10_000, 5_000  # disentanglement_lib's num_train / num_test
BINS = 20  # its histogram discretizer's bins


# ----------------------------------------------------------------------------------------------- inputs
def factor_indices(factors, n: int) -> np.ndarray:
    """``(N, K)`` int64 factor indices (K may be 0) matching ``n`` codes."""
    f = as_array(factors, "factors")
    if f.ndim == 1 and f.size == 0:
        f = f.reshape(n, 0)
    if f.ndim != 2 or f.shape[0] != n:
        raise ValueError(f"factors: expected shape ({n}, K) to match the codes' {n} rows, got {f.shape}")
    if not np.isfinite(f).all() or (f != np.round(f)).any() or (f < 0).any():
        raise ValueError("factors: expected non-negative integer indices")
    return f.astype(np.int64)


def split_points(n: int, train: int = TRAIN_POINTS, test: int = TEST_POINTS,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Disjoint, seeded train and test indices into ``n`` stored points. With fewer than ``train + test``
    stored, the two shrink in proportion; the third value then says so (else it is empty)."""
    if train < 1 or test < 1:
        raise ValueError(f"train and test points must be >= 1, got {train} and {test}")
    note = ""
    if n < train + test:
        if n < 4:
            raise ValueError(f"need at least 4 stored points to draw train and test points, got {n}")
        new_train = max(2, min(n - 2, round(n * train / (train + test))))
        note = f"{n} points stored: {new_train} train and {n - new_train} test points instead of {train} and {test}"
        train, test = new_train, n - new_train
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:train]), np.sort(order[train:train + test]), note


def _pair(train_codes, train_factors, test_codes, test_factors):
    xtr = check_codes(train_codes, "train_codes")
    xte = check_codes(test_codes, "test_codes")
    if xte.shape[1] != xtr.shape[1]:
        raise ValueError(f"test_codes: {xte.shape[1]} latents, train_codes {xtr.shape[1]}")
    ytr, yte = factor_indices(train_factors, len(xtr)), factor_indices(test_factors, len(xte))
    if yte.shape[1] != ytr.shape[1]:
        raise ValueError(f"test_factors: {yte.shape[1]} factors, train_factors {ytr.shape[1]}")
    return xtr, ytr, xte, yte


def _varying(factors: np.ndarray) -> tuple[list[int], str]:
    """The factors with two values or more, and a note naming those left out."""
    keep = [k for k in range(factors.shape[1]) if np.unique(factors[:, k]).size > 1]
    dropped = [k for k in range(factors.shape[1]) if k not in keep]
    note = f"factor(s) {', '.join(map(str, dropped))} take one value here: left out" if dropped else ""
    return keep, note


def _result(values: dict, *notes: str) -> dict:
    said = "; ".join(n for n in notes if n)
    return {**{k: float(v) for k, v in values.items()}, **({"note": said} if said else {})}


NO_FACTORS_NOTE = "no ground-truth factors: skipped"
NO_FACTORS = {"note": NO_FACTORS_NOTE}


def _scorable(train_codes, train_factors, test_codes, test_factors) -> tuple[tuple | None, str]:
    """((train codes, train factors, test codes, test factors, the varying factors), note), or (None, why)
    when no factor can be scored."""
    xtr, ytr, xte, yte = _pair(train_codes, train_factors, test_codes, test_factors)
    if ytr.shape[1] == 0:
        return None, NO_FACTORS_NOTE
    keep, note = _varying(ytr)
    return ((xtr, ytr, xte, yte, keep) if keep else None), note


# ---------------------------------------------------------------------------------- discrete information
def discretize(codes: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Each latent into ``bins`` equal-width bins over its own range (disentanglement_lib's histogram
    discretizer: ``np.digitize`` on the histogram's left edges)."""
    if int(bins) != bins or bins < 2:
        raise ValueError(f"bins: expected an integer >= 2, got {bins!r}")
    out = np.empty(codes.shape, dtype=np.int64)
    for d in range(codes.shape[1]):
        out[:, d] = np.digitize(codes[:, d], np.histogram(codes[:, d], int(bins))[1][:-1])
    return out


def discrete_mutual_info(binned: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """``(D, K)`` mutual information (nats) between each binned latent and each factor."""
    return np.array([[mutual_info_score(factors[:, k], binned[:, d]) for k in range(factors.shape[1])]
                     for d in range(binned.shape[1])]).reshape(binned.shape[1], factors.shape[1])


def factor_entropy(factors: np.ndarray) -> np.ndarray:
    return np.array([mutual_info_score(factors[:, k], factors[:, k]) for k in range(factors.shape[1])])


# ------------------------------------------------------------------------------------------ the metrics
def mig_histogram(codes, factors, bins: int = BINS) -> dict:
    """``{"mig_hist"}``: Chen et al.'s MIG as disentanglement_lib computes it: per factor, the gap between
    the two latents with the most mutual information with it (20-bin histograms, ``mutual_info_score``),
    over the factor's entropy; the mean over factors."""
    x = check_codes(codes, "codes")
    f = factor_indices(factors, len(x))
    if f.shape[1] == 0:
        return dict(NO_FACTORS)
    keep, note = _varying(f)
    if not keep:
        return {"note": note}
    mi = np.sort(discrete_mutual_info(discretize(x, bins), f[:, keep]), axis=0)[::-1]
    second = mi[1] if len(mi) > 1 else np.zeros(mi.shape[1])
    return _result({"mig_hist": np.mean((mi[0] - second) / factor_entropy(f[:, keep]))}, note)


def dci(train_codes, train_factors, test_codes, test_factors, seed: int = 0) -> dict:
    """Eastwood & Williams's DCI as disentanglement_lib computes it: one ``GradientBoostingClassifier``
    (defaults, ``random_state=seed``) per factor; its feature importances make the (D, K) importance
    matrix; informativeness is the classifiers' mean accuracy."""
    data, note = _scorable(train_codes, train_factors, test_codes, test_factors)
    if data is None:
        return {"note": note}
    xtr, ytr, xte, yte, keep = data
    importance = np.zeros((xtr.shape[1], len(keep)))
    acc_train, acc_test = [], []
    for col, k in enumerate(keep):
        model = GradientBoostingClassifier(random_state=seed).fit(xtr, ytr[:, k])
        importance[:, col] = np.abs(model.feature_importances_)
        acc_train.append(np.mean(model.predict(xtr) == ytr[:, k]))
        acc_test.append(np.mean(model.predict(xte) == yte[:, k]))
    return _result({"dci_disentanglement": disentanglement_from_importance(importance),
                    "dci_completeness": completeness_from_importance(importance),
                    "dci_informativeness_train": np.mean(acc_train),
                    "dci_informativeness_test": np.mean(acc_test)}, note)


def disentanglement_from_importance(importance: np.ndarray) -> float:
    """D: each code's 1 - entropy (base K) of its importance over the factors, weighted by its share of
    the total importance (equal weights when nothing is important)."""
    importance = np.asarray(importance, dtype=np.float64)
    per_code = (np.ones(importance.shape[0]) if importance.shape[1] == 1 else
                1.0 - stats.entropy(importance.T + 1e-11, base=importance.shape[1]))
    total = importance.sum()
    weights = importance.sum(1) / total if total > 0 else np.full(importance.shape[0], 1 / importance.shape[0])
    return float(np.sum(per_code * weights))


def completeness_from_importance(importance: np.ndarray) -> float:
    """C: each factor's 1 - entropy (base D) of its importance over the codes, weighted by its share."""
    importance = np.asarray(importance, dtype=np.float64)
    per_factor = (np.ones(importance.shape[1]) if importance.shape[0] == 1 else
                  1.0 - stats.entropy(importance + 1e-11, base=importance.shape[0]))
    total = importance.sum()
    weights = importance.sum(0) / total if total > 0 else np.full(importance.shape[1], 1 / importance.shape[1])
    return float(np.sum(per_factor * weights))


def sap_score(train_codes, train_factors, test_codes, test_factors, continuous: bool = False) -> dict:
    """``{"sap"}``: Kumar et al.'s SAP as disentanglement_lib computes it. Discrete factors (the default):
    the test accuracy of a ``LinearSVC(C=0.01, class_weight="balanced")`` per latent and factor, so a
    perfect code's score is 1 minus the chance accuracy of its second-best latent; ``continuous``: the
    squared correlation of latent and factor on the train points. Per factor, the gap between its two
    best latents; the mean over factors."""
    data, note = _scorable(train_codes, train_factors, test_codes, test_factors)
    if data is None:
        return {"note": note}
    xtr, ytr, xte, yte, keep = data
    score = np.zeros((xtr.shape[1], len(keep)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for d in range(xtr.shape[1]):
            for col, k in enumerate(keep):
                if continuous:
                    cov = np.cov(xtr[:, d], ytr[:, k], ddof=1)
                    score[d, col] = cov[0, 1] ** 2 / (cov[0, 0] * cov[1, 1]) if cov[0, 0] > 1e-12 else 0.0
                    continue
                clf = LinearSVC(C=0.01, class_weight="balanced").fit(xtr[:, d:d + 1], ytr[:, k])
                score[d, col] = np.mean(clf.predict(xte[:, d:d + 1]) == yte[:, k])
    ranked = np.sort(score, axis=0)
    second = ranked[-2] if len(ranked) > 1 else np.zeros(ranked.shape[1])
    return _result({"sap": np.mean(ranked[-1] - second)}, note)


def modularity_explicitness(train_codes, train_factors, test_codes, test_factors, bins: int = BINS) -> dict:
    """Ridgeway & Zemel's modularity (from the 20-bin mutual information of the train points) and
    explicitness (ROC-AUC of a ``LogisticRegression`` per factor on the standardised codes, classes
    one-vs-rest, macro mean), as disentanglement_lib computes them. Explicitness's chance level is 0.5."""
    xtr, ytr, xte, yte = _pair(train_codes, train_factors, test_codes, test_factors)
    if ytr.shape[1] == 0:
        return dict(NO_FACTORS)
    mi = discrete_mutual_info(discretize(xtr, bins), ytr)
    keep, note = _varying(ytr)
    mean, std = xtr.mean(0), xtr.std(0)
    std[std == 0] = 1.0  # a constant latent stays 0
    ntr, nte = (xtr - mean) / std, (xte - mean) / std
    train_auc, test_auc = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for k in keep:
            clf = LogisticRegression().fit(ntr, ytr[:, k])
            train_auc.append(_macro_auc(ytr[:, k], clf.predict_proba(ntr), clf.classes_))
            test_auc.append(_macro_auc(yte[:, k], clf.predict_proba(nte), clf.classes_))
    values = {"modularity": modularity(mi)}
    if keep:
        values.update(explicitness_train=np.nanmean(train_auc), explicitness_test=np.nanmean(test_auc))
    return _result(values, note)


def modularity(mutual_info: np.ndarray) -> float:
    """Mean over codes of 1 - (the squared information it shares with its other factors) / (its largest
    squared information x (K - 1)); a code with no information scores 0."""
    sq = np.square(np.asarray(mutual_info, dtype=np.float64))
    top = sq.max(1)
    if sq.shape[1] == 1:
        per_code = np.ones_like(top)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            per_code = 1.0 - (sq.sum(1) - top) / (top * (sq.shape[1] - 1))
    per_code[top == 0] = 0.0
    return float(np.mean(per_code))


def _macro_auc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Mean one-vs-rest ROC-AUC over the classes present (and absent) in ``y``; NaN when none is both."""
    aucs = [roc_auc_score(y == c, proba[:, i]) for i, c in enumerate(classes) if 0 < np.sum(y == c) < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def beta_vae_score(codes, factors, factor_sizes: Sequence[int] | None = None, batch_size: int = 64,
                   train_votes: int = 10_000, eval_votes: int = 5_000, seed: int = 0) -> dict:
    """``{"beta_vae_score"}`` (eval accuracy) and ``beta_vae_train_acc``: Higgins et al.'s metric as
    disentanglement_lib computes it, on pairs drawn from the points given. A vote fixes one factor at
    random; ``batch_size`` pairs of points share its value; the vote's features are the mean absolute
    difference of the pairs' codes; a ``LogisticRegression`` predicts the fixed factor."""
    x = check_codes(codes, "codes")
    f = factor_indices(factors, len(x))
    if factor_sizes is not None and len(factor_sizes) != f.shape[1]:
        raise ValueError(f"factor_sizes: {len(factor_sizes)} sizes for {f.shape[1]} factor columns")
    for name, value in (("batch_size", batch_size), ("train_votes", train_votes), ("eval_votes", eval_votes)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if f.shape[1] == 0:
        return dict(NO_FACTORS)
    keep, note = _varying(f)
    if len(keep) < 2:
        return {"note": (note + "; " if note else "") + "fewer than two factors vary: nothing to tell apart"}
    pairs = {k: _Pairs(f[:, k]) for k in keep}
    pairs = {k: p for k, p in pairs.items() if p.anchors.size}  # a value held by two points at least
    if len(pairs) < 2:
        return {"note": "fewer than two factors have a value shared by two points: nothing to tell apart"}
    keep, pairs = list(pairs), list(pairs.values())
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for votes in (int(train_votes), int(eval_votes)):
        labels = rng.integers(len(keep), size=votes)
        features = np.empty((votes, x.shape[1]))
        for col, sampler in enumerate(pairs):
            rows = np.flatnonzero(labels == col)
            for start in range(0, len(rows), 1024):  # bounds memory at 1024 x batch x D floats
                part = rows[start:start + 1024]
                a, b = sampler.draw(rng, (len(part), int(batch_size)))
                features[part] = np.abs(x[a] - x[b]).mean(1)
        xs.append(features)
        ys.append(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(random_state=seed).fit(xs[0], ys[0])
    return _result({"beta_vae_score": model.score(xs[1], ys[1]), "beta_vae_train_acc": model.score(xs[0], ys[0])},
                   note)


class _Pairs:
    """Draws pairs of distinct points that share one factor's value."""

    def __init__(self, values: np.ndarray):
        self.order = np.argsort(values, kind="stable")
        _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.start, self.size = starts[inverse], counts[inverse]  # per point: its value's run
        self.rank = np.empty(len(values), dtype=np.int64)
        self.rank[self.order] = np.arange(len(values)) - starts[inverse[self.order]]
        self.anchors = np.flatnonzero(self.size >= 2)

    def draw(self, rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        a = rng.choice(self.anchors, size=shape)
        r = np.floor(rng.random(shape) * (self.size[a] - 1)).astype(np.int64)
        r += r >= self.rank[a]  # skip the anchor itself
        return a, self.order[self.start[a] + r]
