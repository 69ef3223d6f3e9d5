"""Bad input to the sweep scripts (full_grid.py, optuna_search.py) and to cluster/local.sh: each is one
``error: ...`` line on stderr, exit status 2, no traceback, and nothing created — no sweep folder under
--storage, no MLflow run, and no MLflow store or experiment where the check comes before the store is
opened; for local.sh, no server and no state.

Covered: cuda trials without a GPU (``--set device=cuda`` with ``--gpus-per-trial 0``, before Ray; GPUs
asked of a cluster that has none, once Ray is up), a dashboard (http://) address for a driver, a missing
or refused Ray token, a tracking server whose /health answers while its API refuses (401) or fails (500),
a deleted MLflow experiment, and local.sh's numeric settings.

The scripts run as subprocesses (the refusals that need no process of their own in this one, through
tests/commands.py), each with its own --storage, sqlite store, --name, --experiment and PROVLAE_HOME. The checks that need Ray share one ``ray start`` head without GPUs (tests/servers.py),
joined with --address; the others fail before Ray starts.
"""
from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import servers
from commands import run_command

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "cluster" / "local.sh"
SCRIPTS = {"full_grid": ["sweeps/full_grid.py", "--preset", "smoke"],
           "optuna": ["sweeps/optuna_search.py", "--preset", "smoke", "--family", "vlae", "--dataset", "dsprites",
                      "--trials", "2"]}
NAME, EXPERIMENT = "bad-input", "inputs"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray's or MLflow's settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    return {**env, **extra}


def sweep_flags(tmp: Path, script: str, flags, tracking_uri: str | None) -> list[str]:
    """The script's arguments with its own storage, sqlite store, name and experiment under ``tmp``."""
    return [*SCRIPTS[script][1:], "--storage", str(tmp / "ray"), "--name", NAME, "--experiment", EXPERIMENT,
            "--tracking-uri", tracking_uri or f"sqlite:///{tmp / 'mlflow.db'}", *flags]


def sweep(tmp: Path, *flags: str, script: str = "full_grid", env: dict[str, str] | None = None,
          tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    """A sweep script with its own storage, sqlite store, name, experiment and PROVLAE_HOME under ``tmp``."""
    cmd = [sys.executable, SCRIPTS[script][0], *sweep_flags(tmp, script, flags, tracking_uri)]
    env = {**(env if env is not None else clean_env()), "PROVLAE_HOME": str(tmp / "home")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def sweep_here(tmp: Path, *flags: str, capsys, monkeypatch, script: str = "full_grid",
               env: dict[str, str] | None = None, tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    """``sweep`` run in this process (tests/commands.py): for the refusals that need no process of their own."""
    unset = {k: None for k in os.environ if k.startswith(("RAY_", "MLFLOW_"))}
    return run_command(Path(SCRIPTS[script][0]).stem, *sweep_flags(tmp, script, flags, tracking_uri),
                       capsys=capsys, monkeypatch=monkeypatch,
                       env={**unset, **(env or {}), "PROVLAE_HOME": str(tmp / "home")})


def assert_refused(out: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status 2 and stderr exactly one ``error: ...`` line holding ``words``; the line."""
    said = out.stdout + out.stderr
    assert "Traceback" not in said, said[-3000:]
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), said[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def assert_no_sweep_folder(tmp: Path) -> None:
    storage = tmp / "ray"
    assert not storage.exists() or not any(storage.iterdir()), sorted(storage.rglob("*"))


def store_runs(db: Path) -> list:
    """Every run of every experiment (deleted ones too) in the sqlite store ``db``."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=ViewType.ALL) if ids else []


def assert_nothing_created(tmp: Path, store: bool = False) -> None:
    """No sweep folder and no run; ``store``: the check runs after the store is opened (it may exist,
    empty of runs), else the store was never touched."""
    assert_no_sweep_folder(tmp)
    db = tmp / "mlflow.db"
    if store:
        assert db.exists() and store_runs(db) == []
    else:
        assert not db.exists()


# ------------------------------------------------------------------------- before Ray starts


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_cuda_without_gpus_per_trial_is_refused_before_ray(tmp_path, script):
    out = sweep(tmp_path, "--set", "device=cuda", script=script)
    assert_refused(out, "--set device=cuda with --gpus-per-trial 0", "no GPU", "pass --gpus-per-trial")
    assert_nothing_created(tmp_path)


def test_dashboard_address_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    """The RAY_ADDRESS that `eval "$(cluster/local.sh up)"` exports, for a driver run by hand."""
    url = "http://127.0.0.1:8265"
    out = sweep_here(tmp_path, capsys=capsys, monkeypatch=monkeypatch, env={"RAY_ADDRESS": url})
    assert_refused(out, f"RAY_ADDRESS {url}", "Jobs API", "`ray job submit --address`", "GCS address (HOST:6379)",
                   "`auto`")
    assert_nothing_created(tmp_path)


def test_init_ray_refuses_a_dashboard_address_without_connecting():
    import ray

    from provlae.errors import ConfigError
    from sweeps.launch import init_ray

    with pytest.raises(ConfigError, match=r"--address https://head\.example:8265 is the Ray dashboard's Jobs API"):
        init_ray("https://head.example:8265")
    assert not ray.is_initialized()


class Tracking(http.server.BaseHTTPRequestHandler):
    """/health answers 200, the API ``api_status``; every request is recorded."""

    api_status: int
    seen: list[tuple[str, str]]  # each test's own handler class holds its own list

    def do_GET(self):
        self.seen.append(("GET", self.path))
        self._answer(200 if self.path == "/health" else self.api_status)

    def do_POST(self):
        self.seen.append(("POST", self.path))
        self._answer(self.api_status)

    def _answer(self, status: int) -> None:
        body = b"OK" if status == 200 else b"{}"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, words", [
    (401, ["requires authentication", "credentials are missing (HTTP 401)", "MLFLOW_TRACKING_USERNAME"]),
    (500, ["answered HTTP 500 on its API"]),
])
def test_healthy_tracking_server_whose_api_fails(tmp_path, status, words, capsys, monkeypatch):
    handler = type("Handler", (Tracking,), {"api_status": status, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        out = sweep_here(tmp_path, capsys=capsys, monkeypatch=monkeypatch, tracking_uri=url)
    finally:
        server.shutdown()
        server.server_close()
    assert_refused(out, f"tracking server {url}", *words)
    assert handler.seen[0] == ("GET", "/health") and len(handler.seen) == 2, handler.seen
    assert handler.seen[1][1].startswith("/api/2.0/mlflow/"), handler.seen
    assert not [r for r in handler.seen if r[0] != "GET"], "nothing may be created on the server"
    assert_no_sweep_folder(tmp_path)


def test_deleted_experiment_is_refused(tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    client.delete_experiment(exp)  # what the UI's delete does
    out = sweep_here(tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_refused(out, f"MLflow experiment {EXPERIMENT!r} is deleted", "restore it", "--experiment")
    assert client.get_experiment(exp).lifecycle_stage == "deleted"
    assert store_runs(db) == []
    assert_no_sweep_folder(tmp_path)


# ------------------------------------------------------------------------------- once Ray is up


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head without GPUs (CUDA_VISIBLE_DEVICES="": none detected, on any machine), token auth on."""
    home = tmp_path_factory.mktemp("head-home")
    with servers.ray_head(env={"PROVLAE_HOME": str(home), "CUDA_VISIBLE_DEVICES": ""}) as h:
        yield h


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow sqlite store as a user's stands after a first sweep: its tables made (a new file would
    have MLflow log that it creates them). Each test below gets a copy."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def own_store(store, tmp_path):
    shutil.copy(store, tmp_path / "mlflow.db")


def joined(head, **extra: str) -> dict[str, str]:
    return clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.env["RAY_AUTH_TOKEN"], **extra)


@pytest.mark.parametrize("script, flags", [
    ("full_grid", ["--gpus-per-trial", "1", "--set", "device=cuda"]),
    ("optuna", ["--gpus-per-trial", "0.5"]),
])
def test_gpus_asked_of_a_cluster_without_gpus(tmp_path, head, own_store, script, flags):
    out = sweep(tmp_path, "--address", head.gcs_address, *flags, script=script, env=joined(head))
    assert_refused(out, "has 0 GPUs", "1 node(s), no autoscaler to add GPU nodes",
                   "each trial asks for a GPU to train on cuda", "would wait forever", "--gpus-per-trial 0")
    assert_nothing_created(tmp_path, store=True)


@pytest.mark.parametrize("case", ["wrong", "missing", "no mode"])
def test_ray_token_missing_or_refused(tmp_path, head, own_store, case):
    home = tmp_path / "user"  # a home of its own: no ~/.ray/auth_token
    home.mkdir()
    env = {"wrong": clean_env(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
           "missing": clean_env(HOME=str(home), RAY_AUTH_MODE="token"),
           "no mode": clean_env(HOME=str(home))}[case]
    words = {"wrong": ["refused this driver's token (from RAY_AUTH_TOKEN)", "set RAY_AUTH_TOKEN"],
             "missing": ["no Ray token", "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH nor ~/.ray/auth_token"],
             "no mode": ["requires a token and this driver sent none", "set RAY_AUTH_MODE=token"]}[case]
    started = time.monotonic()
    out = sweep(tmp_path, "--address", head.gcs_address, env=env)
    took = time.monotonic() - started
    assert_refused(out, f"cluster at {head.gcs_address}", *words, "`ray get-auth-token`")
    assert took < 20, f"{took:.0f} s: ray.init alone retries for 20 s"
    assert_nothing_created(tmp_path, store=True)


def test_autoscaled_clusters_may_get_gpus():
    """The GPU check refuses only a cluster that cannot get GPUs: the autoscaler's node types (v2) decide;
    a `ray up` head, or a (v1) monitor that names configured node types, may add GPU nodes; a monitor that
    only mirrors the running nodes (``node_<id>``, what `ray start` runs), or none, cannot."""
    from sweeps.cluster_checks import may_add_gpus

    mirrored = {"autoscaler_report": {"node_type_mapping": {"ab12": "node_ab12", "cd34": "node_cd34"}}}
    configured = {"autoscaler_report": {"node_type_mapping": {"ab12": "head", "cd34": "gpu_worker"}}}
    assert may_add_gpus({"CPU": 64, "GPU": 16}, None, False)
    assert not may_add_gpus({"CPU": 64, "GPU": 0}, configured, True)  # the node types say it all
    assert may_add_gpus(None, mirrored, True)
    assert may_add_gpus(None, configured, False)
    assert not may_add_gpus(None, mirrored, False)
    assert not may_add_gpus(None, None, False)


# -------------------------------------------------------------------------------- cluster/local.sh


@pytest.fixture
def local_env(tmp_path):
    """local.sh's environment: a data home of its own, free ports. Should a check ever let `up` through,
    the service it started is stopped again."""
    env = clean_env(PYTHON=sys.executable, PROVLAE_HOME=str(tmp_path / "home"),
                    **{f"PROVLAE_{k}_PORT": str(servers.free_port()) for k in ("RAY", "DASHBOARD", "MLFLOW")})
    yield env
    if (tmp_path / "home" / "cluster").exists():
        subprocess.run(["bash", str(LOCAL_SH), "down"], env=env, capture_output=True, timeout=120, check=False)


@pytest.mark.parametrize("setting, value, must_be", [
    ("PROVLAE_RAY_PORT", "abc", "a port number (1-65535)"),
    ("PROVLAE_DASHBOARD_PORT", "0", "a port number (1-65535)"),
    ("PROVLAE_MLFLOW_PORT", "70000", "a port number (1-65535)"),
    ("PROVLAE_MLFLOW_WORKERS", "two", "a whole number of workers (at least 1)"),
    ("PROVLAE_UP_TIMEOUT", "1.5", "a whole number of seconds (at least 1)"),
    ("PROVLAE_STOP_TIMEOUT", "-1", "a whole number of seconds (0 or more)"),
])
def test_local_sh_refuses_a_bad_number(local_env, tmp_path, setting, value, must_be):
    out = subprocess.run(["bash", str(LOCAL_SH), "up"], env={**local_env, setting: value}, capture_output=True,
                         text=True, timeout=60, check=False)
    assert (out.returncode, out.stdout) == (2, ""), out.stderr
    assert out.stderr == f"local.sh: error: {setting} must be {must_be}, got '{value}'\n"
    assert not (tmp_path / "home").exists(), "nothing may be written"


def test_local_sh_refuses_one_port_for_two_servers(local_env, tmp_path):
    env = {**local_env, "PROVLAE_DASHBOARD_PORT": local_env["PROVLAE_RAY_PORT"]}
    out = subprocess.run(["bash", str(LOCAL_SH), "up"], env=env, capture_output=True, text=True, timeout=60,
                         check=False)
    port = local_env["PROVLAE_RAY_PORT"]
    assert (out.returncode, out.stdout) == (2, ""), out.stderr
    assert out.stderr == (f"local.sh: error: PROVLAE_RAY_PORT, PROVLAE_DASHBOARD_PORT and PROVLAE_MLFLOW_PORT must "
                          f"differ, got {port}, {port} and {local_env['PROVLAE_MLFLOW_PORT']}\n")
    assert not (tmp_path / "home").exists()


def test_local_sh_down_refuses_a_bad_stop_timeout(local_env, tmp_path):
    out = subprocess.run(["bash", str(LOCAL_SH), "down"], env={**local_env, "PROVLAE_STOP_TIMEOUT": "soon"},
                         capture_output=True, text=True, timeout=60, check=False)
    assert (out.returncode, out.stdout) == (2, ""), out.stderr
    assert out.stderr == ("local.sh: error: PROVLAE_STOP_TIMEOUT must be a whole number of seconds (0 or more), "
                          "got 'soon'\n")
    assert not (tmp_path / "home").exists()
