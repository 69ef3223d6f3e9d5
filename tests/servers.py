"""Real servers for tests, bound to 127.0.0.1: an MLflow tracking server and a Ray head with token auth.

Plain context managers (pytest fixtures wrap them in conftest.py). Each server runs in its own process
group (``start_new_session=True``) and is stopped by that group id, then any descendant left over is
killed by pid: nothing else on the machine is touched.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent  # the venv's console scripts (ray, mlflow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25, proc=None):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {proc.returncode}")
        time.sleep(interval)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


def http_status(url: str, headers: dict | None = None, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


# ------------------------------------------------------------------------------------- processes


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = children_map(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_group(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """Stop a process started with start_new_session=True: its group, then any descendant left."""
    if proc.poll() is None or descendants(proc.pid):
        left = descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in left:  # processes that moved to their own group or session
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=grace)


# ---------------------------------------------------------------------------------------- MLflow


@contextlib.contextmanager
def mlflow_server(folder: Path, timeout: float = 90.0, admin_password: str | None = None,
                  port: int | None = None) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a sqlite store and local artifacts under ``folder``; yields its URL.
    With ``admin_password``: MLflow's basic-auth app, its user store in ``folder``, user ``admin``. ``port``:
    a given one (a server started again over the same folder is the same server to its clients)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--default-artifact-root", str(folder / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # as cluster/local.sh: no job runners
    if admin_password is not None:
        ini = folder / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{folder / 'basic_auth.db'}\nadmin_username = admin\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
                   MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex())
        cmd += ["--app-name", "basic-auth"]
    log = open(folder / "server.log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_status(f"{url}/health") == 200, timeout, "mlflow server", proc=proc)
        yield url
    finally:
        stop_group(proc)
        log.close()


# ------------------------------------------------------------------------------------------- Ray


@dataclass
class RayHead:
    gcs_address: str  # for ray.init / --address
    dashboard_url: str  # for `ray job submit --address`
    env: dict[str, str]  # environment for Ray CLI calls: token auth on
    proc: subprocess.Popen


def auth_token() -> str:
    """The token Ray's CLI and clients use (``ray get-auth-token --generate`` creates one if missing)."""
    out = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, env: dict[str, str] | None = None, timeout: float = 120.0) -> Iterator[RayHead]:
    """``ray start --head --block`` on 127.0.0.1 with token auth, in its own process group and temp dir
    (so no other ``ray.init()`` on this machine finds and joins it)."""
    token = auth_token()
    env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's unix sockets live under it
    port, dash, agent = free_port(), free_port(), free_port()
    # The dashboard agent (which runs submitted jobs) defaults to port 52365: any other Ray on the machine
    # already holds it, and then every `ray job submit` fails with "No available agent".
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--dashboard-agent-listen-port", str(agent),
           "--num-cpus", str(num_cpus), "--temp-dir", temp, "--disable-usage-stats"]
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    auth = {"Authorization": f"Bearer {token}"}
    try:
        wait_for(lambda: http_status(f"{url}/api/jobs/", auth) == 200, timeout, "ray head", proc=proc)
        gcs = _gcs_address(Path(temp), port)
        yield RayHead(gcs, url, env, proc)
    finally:
        stop_group(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _gcs_address(temp: Path, port: int) -> str:
    current = temp / "ray_current_cluster"
    return current.read_text().strip() if current.exists() else f"127.0.0.1:{port}"


@dataclass
class RayNode:
    proc: subprocess.Popen  # `ray start --block`, a session leader: its session holds the node's processes
    node_id: str


def session_members(sid: int) -> list[int]:
    """Every process whose session id is ``sid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[3]) == sid:  # after the name: state ppid pgrp session
                out.append(int(entry))
    return out


def kill_session(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a node's whole session (its raylet, workers, agents), then reap the leader."""
    for pid in session_members(proc.pid) + descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def alive_node_ids(head: RayHead) -> list[str]:
    url = f"{head.dashboard_url}/api/v0/nodes?limit=100"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            import json

            nodes = json.load(r)["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return []
    return [n["node_id"] for n in nodes if n["state"] == "ALIVE"]


@contextlib.contextmanager
def ray_node(head: RayHead, env: dict[str, str] | None = None, num_cpus: int = 1, hide: tuple[Path, ...] = (),
             timeout: float = 120.0) -> Iterator[RayNode]:
    """A second Ray node joining ``head`` (``ray start --address``) as another machine would: its own
    session and process group, its own environment (e.g. its own PROVLAE_HOME), the head's token.
    ``hide``: folders this node does not see (an empty tmpfs over each, in a mount namespace of its own),
    as files that exist on the driver's machine but not on another node."""
    before = set(wait_for(lambda: alive_node_ids(head), timeout, "ray head's node"))  # the head's raylet
    env = {**head.env, **(env or {})}
    cmd = [str(BIN / "ray"), "start", "--address", head.gcs_address, "--block", "--node-ip-address", "127.0.0.1",
           "--num-cpus", str(num_cpus), "--disable-usage-stats",
           "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]
    if hide:
        mounts = " && ".join(f"mount -t tmpfs provlae-hidden {shlex.quote(str(p))}" for p in hide)
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'{mounts} && exec "$@"', "ray-node", *cmd]
    log = tempfile.NamedTemporaryFile("w", prefix="ray-node-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        new = wait_for(lambda: set(alive_node_ids(head)) - before, timeout, "ray node", proc=proc)
        yield RayNode(proc, next(iter(new)))
    finally:
        kill_session(proc, signal.SIGTERM)
        time.sleep(1)
        kill_session(proc)
        log.close()
