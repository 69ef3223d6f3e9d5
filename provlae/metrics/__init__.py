"""Disentanglement metrics as pure functions: arrays in (numpy or torch), dict out, seeded
(docs/architecture.md §2.4).

- mig_scores: MIG (Chen et al. 2018) and MIG-sup (paper eq. 12) from the Chen et al. MI estimator.
- factor_score: the Kim & Mnih (2018) majority-vote factor metric.
- level_information: I(x; z_l) per level, I(x; z) and their overlap (paper Fig. 5).
- suite: disentanglement_lib's metrics on stored codes (histogram MIG, DCI, SAP, modularity and
  explicitness, the BetaVAE score); udr: Unsupervised Disentanglement Ranking across seeds.

- scoring: the suite on one stored representation and UDR on a cell's, as the evaluation stage runs them;
  names: which metrics there are and the values each logs (no heavy import: the record's contract reads it).

No model, tracking or cluster code here; the hot loop (provlae.metrics._mixture) runs in torch on CPU
or GPU with memory bounded by its chunk size. The package imports torch only when one of the three
in-training metrics below is first used.
"""
import importlib

_LAZY = {"factor_score": "provlae.metrics.factor", "level_information": "provlae.metrics.information",
         "mig_scores": "provlae.metrics.mig"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
