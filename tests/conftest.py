"""Shared fixtures. The servers themselves live in tests/servers.py as plain context managers.

Every test that starts a server, a cluster or a browser is marked ``slow`` (by its fixtures here, or by
hand): ``make test-fast`` runs the others (``-m "not slow"``), ``make test`` runs all."""
from __future__ import annotations

import os
from pathlib import Path

import durations
import pytest
import servers  # tests/ is on sys.path (pytest's rootdir conftest)

# Parallel workers (``-n``) share the cores: each worker's torch, and every process it starts (a CLI
# training, a sweep driver), takes its share of threads instead of all of them. Oversubscribed OpenMP
# threads spin against each other and slow every test down. Set before any test module imports torch;
# tests that compare a run in this process with one in a child process then use the same count.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


# Fixtures that start a Ray node, an MLflow server or the local service: a test using one is ``slow``.
SERVER_FIXTURES = frozenset({"mlflow_server", "ray_head", "local_ray", "service", "head", "cluster",
                             "auth_server"})


def pytest_addoption(parser) -> None:
    parser.addoption("--store-durations", action="store_true",
                     help="add each test's seconds in this run to tests/durations.json (tests/durations.py)")


def pytest_configure(config) -> None:
    """With parallel workers (``-n``), Ray's token file is made once, before they start: two workers
    generating it at once could each start a cluster with a token the file no longer holds."""
    controller = not hasattr(config, "workerinput")
    if config.getoption("numprocesses", default=None) and controller:
        servers.auth_token()
    if config.getoption("store_durations") and controller:
        config.pluginmanager.register(durations.Recorder(), "store-durations")


def pytest_collection_modifyitems(config, items) -> None:
    """``slow`` on every test that uses a server fixture. In a parallel worker (``make test``: whole files
    to each worker), the files longest first (tests/durations.py)."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if hasattr(config, "workerinput"):
        durations.longest_files_first(items, durations.read())


@pytest.fixture(scope="session")
def provlae_home(tmp_path_factory) -> Path:
    """One PROVLAE_HOME for the session, so generated datasets are cached once: with parallel workers
    (``-n``) one for all of them (the cache's files are written whole, then moved into place)."""
    base = tmp_path_factory.getbasetemp()
    home = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "home"
    home.mkdir(exist_ok=True)
    return home


@pytest.fixture
def paced():
    """The paced plug-in family (tests/paced.py), loaded here as a sweep loads it, for this test only (a
    sweep of every registered family, later in this process, must not see it): its module."""
    import sys

    from registries import isolated_registries

    from provlae import plugins

    with isolated_registries():
        (name,) = plugins.load("tests.paced")
        yield sys.modules[name]


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


@pytest.fixture
def check_sweep_runs():
    """A checker of the MLflow contract (docs/architecture.md §4) for one sweep: returns {run name: run}."""
    return _check_sweep_runs


def _check_sweep_runs(tracking_uri: str, experiment: str, sweep: str, configs: dict, failed=()) -> dict:
    """``configs``: run name -> TrialConfig of every trial; ``failed``: the run names expected to fail."""
    from mlflow import MlflowClient

    from analysis import record
    from provlae.config import TrialConfig

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{sweep}'", max_results=1000)
    parents = [r for r in runs if r.data.tags.get("provlae.role") == "sweep"]
    assert len(parents) == 1, f"{len(parents)} parent runs for sweep {sweep}"
    children = [r for r in runs if r.data.tags.get("provlae.role") == "trial"]
    names = sorted(r.info.run_name for r in children)
    assert names == sorted(configs), f"one run per trial expected, got {names}"
    fields = set(TrialConfig.__dataclass_fields__)
    for run in children:
        cfg, tags = configs[run.info.run_name], run.data.tags
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert (tags["family"], tags["dataset"], tags["sweep"]) == (cfg.family, cfg.dataset, sweep)
        assert tags["ray_trial_id"]
        assert set(run.data.params) == fields
        assert run.data.params == {k: str(v) for k, v in cfg.to_dict().items()}
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), f"{run.info.run_name}: {key} logged twice at a step"
        if run.info.run_name in failed:
            assert run.info.status == "FAILED" and tags.get("error"), run.info.run_name
            continue
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status, tags.get("error"))
        assert "error" not in tags
        assert {"mig", "mig_sup", "factor_score", "recon_error", "loss"} <= set(run.data.metrics)
        assert run.data.metrics["train_img_s"] > 0 and run.data.metrics["eval_seconds"] > 0  # what it measured
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.json" in artifacts
        figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert {"figures/information.png", "figures/traversal.png", "figures/information_per_stage.png"} <= figures
        for s in range(cfg.num_stages):  # the paper's figures at every stage end
            stage = {a.path for a in client.list_artifacts(run.info.run_id, f"figures/stage{s}")}
            assert stage == {f"figures/stage{s}/information.png", f"figures/stage{s}/traversal.png"}, stage
        stored = {a.path for a in client.list_artifacts(run.info.run_id, record.REPRESENTATION_DIR)}
        assert stored == {record.representation_path(s) for s in range(cfg.num_stages)}, stored
    return {r.info.run_name: r for r in children}
