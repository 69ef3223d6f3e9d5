"""Which metrics the evaluation stage computes from stored representations, and the values each logs: the
names ``--metrics`` takes and the MLflow metric keys they become. Imports nothing heavy, so the record's
contract (analysis/record.py) reads it without loading the metrics' libraries."""
from __future__ import annotations

from collections.abc import Sequence

SUITE = {  # metric name -> the values it logs, each an MLflow metric of the run at the stage's step
    "mig_hist": ("mig_hist",),
    "dci": ("dci_disentanglement", "dci_completeness", "dci_informativeness_train", "dci_informativeness_test"),
    "sap": ("sap",),
    "modularity": ("modularity", "explicitness_train", "explicitness_test"),
    "beta_vae": ("beta_vae_score", "beta_vae_train_acc"),
}
UDR = "udr"  # across the seeds of a cell: each model's score (Lasso similarity); the value is named alike
METRIC_NAMES = (*SUITE, UDR)
SUITE_VALUES = tuple(value for values in SUITE.values() for value in values)


def check_names(names: str | Sequence[str]) -> tuple[str, ...]:
    """``names`` (a comma-separated list or a sequence; ``"all"``: every metric) as known metric names in
    catalogue order; ValueError naming an unknown one and the known ones."""
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not names:
        raise ValueError(f"no metric named; known: {', '.join(METRIC_NAMES)} (or all)")
    if "all" in names:
        return METRIC_NAMES
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRIC_NAMES)} (or all)")
    return tuple(n for n in METRIC_NAMES if n in names)
