"""Where the service keeps its data on this machine (datasets cache, MLflow store, Ray results).

Everything lives under one user data directory so that a job's temporary working_dir never holds
results: ``$PROVLAE_HOME`` if set, else ``$XDG_DATA_HOME/provlae``, else ``~/.local/share/provlae``.
"""
from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    """Absolute root of everything the service stores for this user."""
    if os.environ.get("PROVLAE_HOME"):
        root = Path(os.environ["PROVLAE_HOME"])
    else:
        xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        root = Path(xdg) / "provlae"
    return root.expanduser().resolve()


def dataset_cache() -> Path:
    """Content-addressed cache of generated datasets (one per node; trials memory-map it)."""
    return data_home() / "datasets"


def default_tracking_uri() -> str:
    """MLflow tracking URI: ``$MLFLOW_TRACKING_URI`` or an absolute sqlite file under data_home()."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{data_home() / 'mlflow.db'}"


def default_storage() -> Path:
    """Ray Tune results and checkpoints."""
    return data_home() / "ray_results"
