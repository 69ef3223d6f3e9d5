"""Disentanglement metrics as pure functions: arrays in (numpy or torch), dict out, seeded
(docs/architecture.md §2.4).

- mig_scores: MIG (Chen et al. 2018) and MIG-sup (paper eq. 12) from the Chen et al. MI estimator.
- factor_score: the Kim & Mnih (2018) majority-vote factor metric.
- level_information: I(x; z_l) per level, I(x; z) and their overlap (paper Fig. 5).
- suite: disentanglement_lib's metrics on stored codes (histogram MIG, DCI, SAP, modularity and
  explicitness, the BetaVAE score); udr: Unsupervised Disentanglement Ranking across seeds.

No model, tracking or cluster code here; the hot loop (provlae.metrics._mixture) runs in torch on CPU
or GPU with memory bounded by its chunk size.
"""
from provlae.metrics.factor import factor_score
from provlae.metrics.information import level_information
from provlae.metrics.mig import mig_scores

__all__ = ["factor_score", "level_information", "mig_scores"]
