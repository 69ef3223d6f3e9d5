"""Shared fixtures. The servers themselves live in tests/servers.py as plain context managers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import servers  # tests/ is on sys.path (pytest's rootdir conftest)


@pytest.fixture(scope="session")
def provlae_home(tmp_path_factory) -> Path:
    """One PROVLAE_HOME for the session, so generated datasets are cached once."""
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    return home


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite store, local artifacts); yields its URL."""
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture(scope="module")
def ray_head(provlae_home):
    """A real Ray head on 127.0.0.1 with token auth (``servers.RayHead``), sharing the session's data home."""
    with servers.ray_head(env={"PROVLAE_HOME": str(provlae_home)}) as head:
        yield head


@pytest.fixture(scope="module")
def local_ray(provlae_home):
    """An in-process local Ray (2 CPUs) as the sweep scripts start it; yields its GCS address."""
    import ray

    from sweeps.launch import init_ray

    before = os.environ.get("PROVLAE_HOME")
    os.environ["PROVLAE_HOME"] = str(provlae_home)  # the workers inherit it
    init_ray(None, num_cpus=2)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("PROVLAE_HOME", None)
        else:
            os.environ["PROVLAE_HOME"] = before
