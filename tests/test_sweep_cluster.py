"""End to end: `ray job submit` of the smoke sweep to a real Ray head (127.0.0.1, token auth), tracked by a
real `mlflow server` (127.0.0.1). Checks the runs through the server, then both servers are stopped by
process group.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import servers
import smoke

from sweeps import grid

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_job_submit_smoke_sweep(ray_head, mlflow_server, provlae_home, check_sweep_runs):
    runtime_env = {"env_vars": {"PROVLAE_HOME": str(provlae_home)}}  # one dataset cache per node
    cmd = [str(servers.BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "sweeps/full_grid.py", "--preset", "smoke", "--tracking-uri", mlflow_server, *smoke.quick_args()]
    out = subprocess.run(cmd, cwd=ROOT, env=ray_head.env, capture_output=True, text=True, timeout=420)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout + out.stderr
    configs = {c.run_name: c for c in grid.build_trials("smoke", overrides=smoke.quick({"device": "cpu"}))}
    check_sweep_runs(mlflow_server, "provlae", "full_grid-smoke", configs)
    # the job ran on the cluster: results under the job's PROVLAE_HOME, nothing in the working tree
    assert (provlae_home / "ray_results" / "full_grid-smoke" / "provlae_sweep.json").exists()
    # its report, built from the runs and figures read through the server, went back there to the parent run
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("provlae")
    page = provlae_home / "ray_results" / "full_grid-smoke" / "report" / "index.html"
    assert f"Report: {page} (also the parent run's artifact report/index.html)" in out.stdout
    assert f"Runs table: {mlflow_server}/#/experiments/{exp.experiment_id}/runs" in out.stdout
    parent, = client.search_runs([exp.experiment_id], "tags.`provlae.role` = 'sweep'")
    logged = client.download_artifacts(parent.info.run_id, "report/index.html", str(provlae_home))
    assert Path(logged).read_bytes() == page.read_bytes() and b'data-artifact="figures/' in page.read_bytes()
