"""A tracking server with MLflow's basic-auth app (as cluster/mlflow-server.sh runs it), on 127.0.0.1:
the right credentials land a sweep's runs there; missing or wrong ones are one error before anything starts."""
import base64
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import servers
import smoke

ROOT = Path(__file__).resolve().parents[1]
ADMIN = ("admin", "admin-pass-8c1f")
USER = ("alice", "alice-pass-27d4")


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode(),
            "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow-auth"), admin_password=ADMIN[1]) as url:
        # the runbook's step: the admin creates a user for the sweeps
        body = json.dumps({"username": USER[0], "password": USER[1]}).encode()
        req = urllib.request.Request(f"{url}/api/2.0/mlflow/users/create", data=body, headers=_basic(*ADMIN))
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        yield url


def _sweep(url, tmp_path, provlae_home, credentials):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(PROVLAE_HOME=str(provlae_home), RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    if credentials:
        env.update(MLFLOW_TRACKING_USERNAME=credentials[0], MLFLOW_TRACKING_PASSWORD=credentials[1])
    cmd = [sys.executable, "sweeps/full_grid.py", "--preset", "smoke", "--families", "vlae",
           "--experiment", "auth", "--name", "auth-smoke", "--tracking-uri", url,
           "--storage", str(tmp_path / "ray"), *smoke.quick_args()]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def _runs(url):
    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = ADMIN
    try:
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("auth")
        return [] if exp is None else client.search_runs([exp.experiment_id])
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")


@pytest.mark.slow
@pytest.mark.parametrize("credentials, message", [
    (None, "requires authentication and the credentials are missing (HTTP 401)"),
    ((USER[0], "wrong"), "requires authentication and the credentials were refused (HTTP 401)"),
])
def test_missing_or_wrong_credentials_are_one_error_and_nothing_is_created(auth_server, tmp_path, provlae_home,
                                                                            credentials, message):
    out = _sweep(auth_server, tmp_path, provlae_home, credentials)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: tracking server {auth_server} ") and message in lines[0]
    assert _runs(auth_server) == [] and not (tmp_path / "ray").exists()


@pytest.mark.slow
def test_a_sweep_with_a_users_credentials_lands_its_runs(auth_server, tmp_path, provlae_home):
    out = _sweep(auth_server, tmp_path, provlae_home, USER)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = _runs(auth_server)
    trials = [r for r in runs if r.data.tags.get("provlae.role") == "trial"]
    parents = [r for r in runs if r.data.tags.get("provlae.role") == "sweep"]
    assert len(trials) == 1 and len(parents) == 1
    assert trials[0].info.status == "FINISHED" and "mig" in trials[0].data.metrics
    # the server authenticated the sweep as alice: the experiment she created is hers to manage
    from urllib.parse import urlencode

    query = urlencode({"username": USER[0], "resource_type": "experiment",
                       "resource_id": trials[0].info.experiment_id})
    req = urllib.request.Request(f"{auth_server}/api/3.0/mlflow/users/permissions/get?{query}",
                                 headers=_basic(*ADMIN))
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.load(r)["permission"] == "MANAGE"
