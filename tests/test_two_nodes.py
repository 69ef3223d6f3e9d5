"""Two Ray nodes on this machine, as two machines would run them: a head and a second node joined with
``ray start --address``, each in its own session with its own PROVLAE_HOME, token auth on, a real
``mlflow server``, all on 127.0.0.1. A smoke sweep spreads over both nodes and survives the second node's
SIGKILL mid-trial; the multi-node footguns are refused before any run is created."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import servers
import smoke

from sweeps import grid
from sweeps.tracking import RESUMED_TAG

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# two seeds of the paced family (tests/paced.py) on the narrow network: a trial lasts long enough to lose its node
STEPS = smoke.quick({"steps_per_stage": "25", "checkpoint_every": "5", "plugins": "tests.paced"})
PACED = ["--plugin", "tests.paced", "--families", "paced", "--seeds", "2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """{"head", "node", "homes", "hidden"}: the second node does not see the folder ``hidden``."""
    root = tmp_path_factory.mktemp("two-nodes")
    homes = {"head": root / "home-head", "node": root / "home-node"}
    hidden = root / "driver-only"
    for folder in (*homes.values(), hidden):
        folder.mkdir()
    with servers.ray_head(num_cpus=1, env={"PROVLAE_HOME": str(homes["head"])}) as head, \
            servers.ray_node(head, env={"PROVLAE_HOME": str(homes["node"])}, num_cpus=1, hide=(hidden,)) as node:
        yield {"head": head, "node": node, "homes": homes, "hidden": hidden}


def driver(cluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**cluster["head"].env, "PROVLAE_HOME": str(cluster["homes"]["head"])}
    cmd = [sys.executable, "sweeps/full_grid.py", "--preset", "smoke", "--address", cluster["head"].gcs_address,
           "--no-report", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("case", ["sqlite", "local-storage", "data-not-on-a-node"])
def test_multi_node_footguns_are_refused_before_any_run(cluster, mlflow_server, tmp_path, case):
    from mlflow import MlflowClient
    from test_data import write_dsprites

    assert len(servers.alive_node_ids(cluster["head"])) == 2  # (these run before the node-loss test)
    experiment = f"footgun-{case}"
    args = ["--families", "vlae", "--experiment", experiment, "--name", experiment,
            "--storage", str(tmp_path / "storage")]
    if case == "sqlite":
        args += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage-is-shared"]
        message = "is a file on one machine: trials on the other nodes would each write their own"
    elif case == "local-storage":
        args += ["--tracking-uri", mlflow_server]
        message = f"--storage {tmp_path / 'storage'} is a local path"
    else:  # a real file on the driver's machine that the second node does not have
        data = cluster["hidden"] / "dsprites_small.npz"
        write_dsprites(data)
        args += ["--tracking-uri", mlflow_server, "--storage-is-shared", "--set", f"data_path={data}",
                 "--set", "subset=40"]
        message = f"data_path {data} is not readable on node "
    out = driver(cluster, *args, timeout=300)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], errors
    if case == "data-not-on-a-node":
        assert f"({cluster['node'].node_id[:12]})" in errors[0]  # the node that lacks it, named
    else:
        assert "the Ray cluster has 2 nodes" in errors[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "storage").exists()  # no sweep folder
    if case != "sqlite":
        exp = MlflowClient(mlflow_server).get_experiment_by_name(experiment)
        assert exp is None or not MlflowClient(mlflow_server).search_runs([exp.experiment_id])  # no run


def test_sweep_spreads_over_both_nodes_and_survives_losing_one(cluster, mlflow_server, tmp_path, check_sweep_runs,
                                                              paced):
    from mlflow import MlflowClient

    head_id = servers.alive_node_ids(cluster["head"])
    node_id = cluster["node"].node_id
    seen: dict[str, set[str]] = {}
    killed: list[str] = []
    watcher = threading.Thread(target=_kill_node_mid_trial, args=(cluster, mlflow_server, seen, killed), daemon=True)
    watcher.start()
    out = driver(cluster, *PACED, "--experiment", "two-nodes", "--name", "two-nodes",
                 "--tracking-uri", mlflow_server, "--storage", str(tmp_path / "shared"), "--storage-is-shared",
                 *[a for k, v in STEPS.items() for a in ("--set", f"{k}={v}")])
    watcher.join(timeout=5)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert killed, "the second node was never killed"

    expected = {c.run_name: c for c in grid.build_trials("smoke", families=[paced.FAMILY], seeds=[0, 1],
                                                         overrides={**STEPS, "device": "cpu"})}
    runs = check_sweep_runs(mlflow_server, "two-nodes", "two-nodes", expected)  # one run each, no step twice
    # the trials ran on both nodes at once; the one on the lost node moved to the head and resumed there
    assert {n for nodes in seen.values() for n in nodes} == {node_id, *head_id}
    moved = runs[killed[0]]
    assert seen[killed[0]] == {node_id, *head_id} and moved.data.tags["ray_node_id"] != node_id
    assert 0 < int(moved.data.tags[RESUMED_TAG]) < expected[killed[0]].total_steps
    mlflow = MlflowClient(mlflow_server)
    cfg = expected[killed[0]]
    steps = [m.step for m in mlflow.get_metric_history(moved.info.run_id, "loss")]
    assert steps == list(range(cfg.log_every, cfg.total_steps + 1, cfg.log_every))  # none missing, none twice
    # each node built or opened its own dataset cache
    for home in cluster["homes"].values():
        assert any((home / "datasets").iterdir()), home

    reference = paced.reference(cfg)  # the same trial, uninterrupted
    for key in ("mig", "mig_sup", "factor_score", "recon_error", "loss"):
        assert moved.data.metrics[key] == reference[key], key


def _kill_node_mid_trial(cluster, tracking_uri: str, seen: dict, killed: list) -> None:
    """Record the node of every trial run; once the run on the second node has logged step 10 (Tune holds
    a checkpoint before it), SIGKILL that node's whole session."""
    from mlflow import MlflowClient

    mlflow, node = MlflowClient(tracking_uri), cluster["node"]
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        exp = mlflow.get_experiment_by_name("two-nodes")
        runs = mlflow.search_runs([exp.experiment_id], "tags.`provlae.role` = 'trial'") if exp else []
        for run in runs:
            if "ray_node_id" in run.data.tags:
                seen.setdefault(run.info.run_name, set()).add(run.data.tags["ray_node_id"])
        on_node = [r for r in runs if r.data.tags.get("ray_node_id") == node.node_id]
        if not killed and on_node and max((m.step for m in mlflow.get_metric_history(on_node[0].info.run_id, "loss")),
                                          default=0) >= 10:
            servers.kill_session(node.proc)
            killed.append(on_node[0].info.run_name)
        if killed and len(seen.get(killed[0], ())) > 1:
            return
        time.sleep(0.2)
