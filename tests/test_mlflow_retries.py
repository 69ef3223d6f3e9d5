"""Exactly one run per trial key and one parent per sweep when MLflow's client retries a create.

A real ``mlflow server`` sits behind a loopback proxy (tests/proxy.py) that commits some ``runs/create``
requests on the server and answers them 504, as a gateway that timed out: the client retries, and the
server then holds a ghost run beside the one the client was told about. Everything is checked against the
server itself, not through the proxy.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, ViewType
from proxy import lossy_proxy
from smoke import quick, quick_args

from sweeps import grid, tracking

ROOT = Path(__file__).resolve().parents[1]
# MLflow 3.17's client retries 7 times with backoff factor 2 and jitter 1 s; keep the retries, drop the waits
FAST_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}


def test_retried_creates_leave_one_parent_and_one_run_per_trial(mlflow_server, tmp_path, provlae_home,
                                                                check_sweep_runs):
    sweep, experiment = "retried", "retries"
    configs = {c.run_name: c for c in grid.build_trials("smoke", families=["pro_vlae"], seeds=[0, 1],
                                                        overrides=quick({"device": "cpu"}))}
    first, second = sorted(configs)
    drop = {sweep: 2, first: 1, second: 2}  # 504s answered per run name: each leaves a ghost
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(FAST_RETRIES, PROVLAE_HOME=str(provlae_home), RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    with lossy_proxy(mlflow_server, drop) as proxy:
        cmd = [sys.executable, "sweeps/full_grid.py", "--preset", "smoke", "--families", "pro_vlae",
               "--seeds", "2", "--set", "device=cpu", "--tracking-uri", proxy.url, "--experiment", experiment,
               "--name", sweep, "--storage", str(tmp_path / "ray"), "--no-report", *quick_args()]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                             check=False)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert proxy.dropped == drop  # every ghost was really committed on the server

    runs = check_sweep_runs(mlflow_server, experiment, sweep, configs)  # against the server: one of each
    client = MlflowClient(mlflow_server)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    active = client.search_runs([exp_id], "", max_results=1000)
    assert sorted(r.info.run_name for r in active) == sorted([sweep, *configs])
    assert not [r.info.run_name for r in active if r.info.status == "RUNNING"]
    for name, run in runs.items():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == list(range(5, configs[name].total_steps + 1, 5)), name  # each step once
    parent = next(r for r in active if r.info.run_name == sweep)
    assert parent.data.params["trials"] == "2" and parent.info.status == "FINISHED"

    deleted = client.search_runs([exp_id], "", run_view_type=ViewType.DELETED_ONLY, max_results=1000)
    kept = {r.info.run_name: r.info.run_id for r in active}
    ghosts = sorted(r.info.run_name for r in deleted)
    assert ghosts == sorted(name for name, n in drop.items() for _ in range(n))
    for ghost in deleted:
        assert ghost.data.tags[tracking.DUPLICATE_TAG] == kept[ghost.info.run_name]
        assert not ghost.data.metrics


def where(key: str) -> str:
    return f"tags.`{tracking.KEY_TAG}` = '{key}'"


def _run(client, exp_id, key, start, status="RUNNING", metrics=(), params=False):
    run = client.create_run(exp_id, run_name="t", start_time=start, tags={tracking.KEY_TAG: key})
    client.log_batch(run.info.run_id, metrics=[Metric(m, 1.0, start, 0) for m in metrics])
    if params:
        client.log_param(run.info.run_id, "seed", "0")
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_keep_one_deletes_only_ghosts_and_prefers_the_record(mlflow_server):
    client = MlflowClient(mlflow_server)
    exp_id = client.create_experiment("keep-one")

    # Fresh runs of one create (same start time): the smaller run id is kept, whoever asks.
    a, b = _run(client, exp_id, "fresh", 1000), _run(client, exp_id, "fresh", 1000)
    assert tracking.find_trial_run(client, exp_id, "fresh").info.run_id == min(a, b)
    assert tracking.keep_one(client, exp_id, where("fresh")).info.run_id == min(a, b)
    assert client.get_run(max(a, b)).info.lifecycle_stage == "deleted"
    assert client.get_run(max(a, b)).data.tags[tracking.DUPLICATE_TAG] == min(a, b)
    assert tracking.keep_one(client, exp_id, where("fresh")).info.run_id == min(a, b)  # a second asker agrees

    # Two that hold metrics: the earliest is kept and the other left in place; a ghost still goes.
    late = _run(client, exp_id, "both", 3000, metrics=["loss"])
    early = _run(client, exp_id, "both", 2000, metrics=["loss"])
    ghost = _run(client, exp_id, "both", 1000)
    assert tracking.keep_one(client, exp_id, where("both")).info.run_id == early
    assert client.get_run(late).info.lifecycle_stage == "active"
    assert tracking.DUPLICATE_TAG not in client.get_run(late).data.tags
    assert client.get_run(ghost).info.lifecycle_stage == "deleted"

    # An older store's duplicates: FINISHED first, then the one with metrics, then the earliest.
    ghost = _run(client, exp_id, "old", 1000)
    logged = _run(client, exp_id, "old", 2000, metrics=["loss"])
    assert tracking.find_trial_run(client, exp_id, "old").info.run_id == logged
    done = _run(client, exp_id, "old", 3000, status="FINISHED", metrics=["loss"])
    assert tracking.find_trial_run(client, exp_id, "old").info.run_id == done
    assert client.get_run(ghost).info.lifecycle_stage == "active"  # finding changes nothing

    # A parent whose ghost starts at the same time and has the smaller run id: the described one is kept.
    described = _run(client, exp_id, "parent", 5000, params=True)
    bare = [_run(client, exp_id, "parent", 5000)]
    while min(bare) > described:
        bare.append(_run(client, exp_id, "parent", 5000))
    assert tracking.keep_one(client, exp_id, where("parent")).info.run_id == described
    assert {client.get_run(b).info.lifecycle_stage for b in bare} == {"deleted"}
    assert tracking.keep_one(client, exp_id, where("nothing")) is None


def test_a_resumed_parent_is_found_not_recreated(mlflow_server):
    client = MlflowClient(mlflow_server)
    exp_id, name = tracking.open_experiment(client, "parents"), "resumed"
    first = tracking.find_or_create_parent(client, exp_id, name, {"trials": 2})
    client.set_terminated(first, "FINISHED")
    assert tracking.find_or_create_parent(client, exp_id, name, {"trials": 3}) == first
    run = client.get_run(first)
    assert run.info.status == "RUNNING" and run.data.params == {"trials": "2"}  # described once
