"""cluster/: the configs a GPU cluster needs, and the one-machine service's whole lifecycle.

The config tests parse every YAML under cluster/ and check the fields a multi-node GPU run depends on.
The lifecycle tests start the real service (`cluster/local.sh up`: Ray head + MLflow server on loopback,
state under a temporary PROVLAE_HOME, free ports), check it from the outside, submit the smoke sweep
through `ray job submit` with nothing but the printed exports, find its runs in the MLflow server (each
run's whole record, the sweep's folder and its report), and stop it. They share one service (module fixture) and run in file order: `down` is tested last, and the
fixture runs `down` again whatever happened.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import smoke
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LOCAL_SH = CLUSTER / "local.sh"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
SWEEP = REPO / "sweeps" / "full_grid.py"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def joined(commands) -> str:
    return "\n".join(commands or [])


# ------------------------------------------------------------------------ Ray cluster launcher


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_has_cpu_head_and_gpu_workers(name):
    cfg = load(name)
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] == name.removesuffix(".yaml")
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("CPU", 1) == 0, "trials must land on the GPU workers, not the head"
    assert "GPU" not in types[head]["resources"]
    gpu_types = {k: t for k, t in types.items() if k != head and t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker node type offers a GPU"
    for node_type in gpu_types.values():
        assert node_type.get("max_workers", 0) >= 1
        assert node_type["resources"].get("CPU", 0) >= 1


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_matches_rays_schema(name):
    jsonschema = pytest.importorskip("jsonschema")
    ray = pytest.importorskip("ray")
    schema_file = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    if not schema_file.exists():
        pytest.skip("this Ray build ships no ray-schema.json")
    jsonschema.validate(load(name), json.loads(schema_file.read_text()))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_torch_before_the_project(name):
    setup = joined(load(name)["setup_commands"])
    torch_at = setup.find("pip install torch==2.13.0")
    project_at = setup.find("pip install -e .")
    assert torch_at >= 0, "setup_commands must install torch==2.13.0 (the README's first step)"
    assert project_at > torch_at, "the project is installed after torch, as the README does"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_keeps_token_auth_and_no_public_service(name):
    cfg = load(name)
    head_start = joined(cfg["head_start_ray_commands"])
    worker_start = joined(cfg["worker_start_ray_commands"])
    for commands in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in commands
    assert any("auth_token" in remote for remote in cfg["file_mounts"]), "the token must reach every node"
    assert "--num-cpus=0" in head_start
    assert "0.0.0.0" not in head_start, "the dashboard stays on the head's loopback (SSH tunnel)"
    assert "mlflow-server.sh" in joined(cfg["head_setup_commands"])
    bucket = {"aws.yaml": "s3://", "gcp.yaml": "gs://"}[name]
    assert bucket in (CLUSTER / name).read_text(), "storage_path and artifacts live in a bucket"
    assert "PROVLAE_HOME=" in worker_start, "each node keeps its dataset cache on its own disk"


# ------------------------------------------------------------------------ KubeRay


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_rayjob_runs_the_paper_sweep_on_gpu_workers():
    job = next(d for d in load_all("kuberay/rayjob.yaml") if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    entrypoint = job["spec"]["entrypoint"]
    assert "sweeps/full_grid.py" in entrypoint
    assert "--preset paper" in entrypoint
    assert "--tracking-uri http://mlflow:5000" in entrypoint
    assert "--storage s3://" in entrypoint
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
                         for c in containers(g["template"]))]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"


def test_rayjob_pods_take_the_token_from_a_secret():
    job = next(d for d in load_all("kuberay/rayjob.yaml") if d["kind"] == "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], job["spec"]["submitterPodTemplate"]]
    templates += [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        for container in containers(template):
            env = env_of(container)
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_mlflow_server_takes_its_database_from_a_secret():
    docs = load_all("kuberay/mlflow.yaml")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["metadata"]["name"] == "mlflow"
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "no public MLflow port"
    assert any(p["port"] == 5000 for p in service["spec"]["ports"])
    (server,) = containers(deployment["spec"]["template"])
    env = env_of(server)
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert "secretKeyRef" in env["MLFLOW_ARTIFACTS_DESTINATION"]["valueFrom"]
    assert "--serve-artifacts" in server["command"] + server.get("args", [])
    # MLflow's basic-auth app, its admin password and CSRF key from the Secret
    assert "--app-name basic-auth" in " ".join(server["command"])
    for name in ("MLFLOW_AUTH_DATABASE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name


def test_ray_pods_log_in_to_mlflow_with_a_user_from_a_secret():
    (job,) = load_all("kuberay/rayjob.yaml")
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for container in containers(pod):
            env = env_of(container)
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "provlae-mlflow-user", name


def test_vm_mlflow_server_runs_basic_auth_with_secrets_from_the_secret_store():
    script = (CLUSTER / "mlflow-server.sh").read_text()
    assert "--app-name basic-auth" in script or "app=(--app-name basic-auth)" in script
    for name in ("aws.yaml", "gcp.yaml"):
        assert "PROVLAE_AUTH_COMMAND=" in (CLUSTER / name).read_text(), name


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key setting": re.compile(r"aws_secret_access_key\s*[:=]\s*\S", re.I),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # A password in a URI or a setting; placeholders (USER:PASSWORD@, <password>, $VAR) are fine.
    "password in a URI": re.compile(r"\b[a-z][a-z0-9+]*://[^/\s:@]+:(?![A-Z_]+@|<[^>]*>@|\$)[^/\s@]+@"),
    "literal password": re.compile(r"(?i:password)\s*[:=]\s*['\"]?(?![A-Z_]+\b|<|\$)[^\s'\"]"),
    "hex token": re.compile(r"\b[0-9a-f]{40,}\b"),
    "GCP service account key": re.compile(r"\"private_key(_id)?\"\s*:"),
}


def test_no_credentials_in_cluster_files():
    found = []
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text(errors="replace")
        found += [f"{path.relative_to(REPO)}: {what}" for what, pattern in SECRET_PATTERNS.items()
                  if pattern.search(text)]
    assert not found, found


def test_kubernetes_manifests_hold_no_secret_values():
    for name in ("kuberay/rayjob.yaml", "kuberay/mlflow.yaml"):
        for doc in load_all(name):
            assert doc["kind"] != "Secret", f"{name}: Secrets are created out of band, not committed"
            for container in _all_containers(doc):
                for var in container.get("env", []):
                    if re.search(r"TOKEN|PASSWORD|SECRET|STORE_URI", var["name"]):
                        assert "valueFrom" in var, f"{name}: {var['name']} must come from a Secret"


def _all_containers(doc: dict):
    """Every container spec anywhere in a manifest."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _all_containers(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _all_containers(item)


# ------------------------------------------------------------------------ local.sh lifecycle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


def parse_exports(stdout: str) -> dict[str, str]:
    """`export NAME=VALUE` lines, as the shell would read them; anything else on stdout is an error."""
    exports = {}
    for line in stdout.splitlines():
        words = shlex.split(line)
        assert words[0] == "export" and len(words) == 2 and "=" in words[1], f"not an export line: {line!r}"
        name, value = words[1].split("=", 1)
        exports[name] = value
    return exports


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def session_members(sid: int) -> list[int]:
    """Live processes of a session (the service's leaders are session leaders)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            members.append(int(stat.parent.name))
    return members


class Service:
    """A running `cluster/local.sh` service in a temporary data home."""

    def __init__(self, home: Path):
        self.home = home
        self.state = home / "cluster"
        self.ports = {"RAY": free_port(), "DASHBOARD": free_port(), "MLFLOW": free_port()}
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        venv_bin = str(Path(sys.executable).parent)
        self.base_env = {**clean, "PATH": f"{venv_bin}{os.pathsep}{clean.get('PATH', '')}"}
        self.env = {**self.base_env, "PYTHON": sys.executable, "PROVLAE_HOME": str(home),
                    **{f"PROVLAE_{k}_PORT": str(v) for k, v in self.ports.items()}}
        self.exports: dict[str, str] = {}

    def run(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(LOCAL_SH), command], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def leader(self, name: str) -> int:
        return int((self.state / f"{name}.pid").read_text())

    def client_env(self) -> dict[str, str]:
        """What a user's shell has after `eval "$(cluster/local.sh up)"`."""
        return {**self.base_env, **self.exports}


def _kill_sessions(sids: list[int]) -> None:
    """Last resort if `down` failed: the service's processes must not outlive the tests."""
    import signal

    for sid in sids:
        for pid in session_members(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("provlae-home"))
    sids = []
    try:
        up = svc.run("up")
        for name in ("ray", "mlflow"):
            if (svc.state / f"{name}.pid").exists():
                sids.append(svc.leader(name))
        assert up.returncode == 0, f"up failed:\n{up.stderr}\n{_logs(svc)}"
        svc.exports = parse_exports(up.stdout)
        svc.up_stderr = up.stderr
        yield svc
    finally:
        down = svc.run("down", timeout=120)
        if down.returncode != 0:
            _kill_sessions(sids)


def _logs(svc: Service) -> str:
    logs = sorted((svc.state / "logs").glob("*.log")) if (svc.state / "logs").exists() else []
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)


@pytest.mark.slow
def test_up_prints_exports_and_both_servers_answer(service):
    ex = service.exports
    ports = service.ports
    assert set(ex) == {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"}
    assert ex["RAY_ADDRESS"] == f"http://127.0.0.1:{ports['DASHBOARD']}"
    assert ex["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['MLFLOW']}"
    assert ex["RAY_AUTH_MODE"] == "token"
    token_file = Path(ex["RAY_AUTH_TOKEN_PATH"])
    assert token_file.is_relative_to(service.home)
    assert token_file.stat().st_mode & 0o077 == 0, "the token file is private to its owner"
    token = token_file.read_text().strip()
    assert port_open(ports["RAY"])
    jobs_api = f"{ex['RAY_ADDRESS']}/api/jobs/"
    assert http_status(jobs_api) == 401, "the Jobs API must refuse requests without the token"
    assert http_status(jobs_api, token) == 200
    assert http_status(f"{ex['MLFLOW_TRACKING_URI']}/health") == 200


def listening_sockets() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket, from /proc/net/tcp{,6}."""
    found = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order 32-bit words
            found[int(fields[9])] = (socket.inet_ntop(family, raw), int(port, 16))
    return found


def sockets_of(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except (FileNotFoundError, PermissionError):
        pass
    return inodes


@pytest.mark.slow
def test_service_listens_on_loopback_only(service):
    sockets = listening_sockets()
    listening = [(pid, *sockets[inode])
                 for name in ("ray", "mlflow") for pid in session_members(service.leader(name))
                 for inode in sockets_of(pid) if inode in sockets]
    assert {port for _, _, port in listening} >= set(service.ports.values())
    exposed = [entry for entry in listening if entry[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback (pid, address, port): {exposed}"


@pytest.mark.slow
def test_second_up_says_it_is_already_running(service):
    again = service.run("up")
    assert again.returncode == 0
    assert "already running" in again.stderr
    assert parse_exports(again.stdout) == service.exports


@pytest.mark.slow
def test_status_reports_pids_and_ports(service):
    status = service.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("ray", "mlflow"):
        assert f"{name}: running, pid/pgid {service.leader(name)}" in status.stdout
    for port in service.ports.values():
        assert str(port) in status.stdout


@pytest.fixture(scope="module")
def smoke_job(service) -> tuple[str, subprocess.CompletedProcess]:
    """(experiment, the finished `ray job submit`): the smoke sweep submitted once to the service with
    nothing but its printed exports; the two tests below read what it left."""
    experiment = "cluster-e2e"
    ray_cli = Path(sys.executable).parent / "ray"
    submit = subprocess.run(
        [str(ray_cli), "job", "submit", "--working-dir", str(REPO), "--",
         "python", "sweeps/full_grid.py", "--preset", "smoke", "--experiment", experiment, *smoke.quick_args()],
        env=service.client_env(), cwd=REPO, capture_output=True, text=True, timeout=1500)
    return experiment, submit


@pytest.mark.slow
@pytest.mark.skipif(not SWEEP.exists(), reason="sweeps/full_grid.py is not written yet")
def test_smoke_sweep_submitted_as_a_job_lands_in_the_mlflow_server(service, smoke_job):
    from mlflow.tracking import MlflowClient

    experiment, submit = smoke_job
    assert submit.returncode == 0, f"job failed:\n{submit.stdout[-6000:]}\n{submit.stderr[-3000:]}"

    client = MlflowClient(tracking_uri=service.exports["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, "the sweep logged nothing to the exported MLflow server"
    trials = client.search_runs([exp.experiment_id], "tags.`provlae.role` = 'trial'")
    assert trials, "no trial runs in the MLflow server"
    for run in trials:
        assert run.info.status == "FINISHED"
        assert {"family", "dataset", "sweep"} <= set(run.data.tags)
    from sweeps.grid import build_trials

    assert sorted(r.info.run_name for r in trials) == sorted(c.run_name for c in build_trials("smoke"))


@pytest.mark.slow
def test_job_submit_smoke_sweep(service, smoke_job, check_sweep_runs, tmp_path):
    """The same job, end to end: the MLflow contract of every run, the sweep's folder under the cluster's
    data home, and its report written there and logged to the parent run through the server."""
    from mlflow import MlflowClient

    from sweeps.grid import build_trials

    experiment, out = smoke_job
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout + out.stderr
    uri = service.exports["MLFLOW_TRACKING_URI"]
    configs = {c.run_name: c for c in build_trials("smoke", overrides=smoke.quick({"device": "cpu"}))}
    check_sweep_runs(uri, experiment, "full_grid-smoke", configs)
    # the job ran on the cluster: results under the cluster's PROVLAE_HOME, nothing in the working tree
    folder = service.home / "ray_results" / "full_grid-smoke"
    assert (folder / "provlae_sweep.json").exists()
    # its report, built from the runs and figures read through the server, went back there to the parent run
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    page = folder / "report" / "index.html"
    assert f"Report: {page} (also the parent run's artifact report/index.html)" in out.stdout
    assert f"Runs table: {uri}/#/experiments/{exp.experiment_id}/runs" in out.stdout
    parent, = client.search_runs([exp.experiment_id], "tags.`provlae.role` = 'sweep'")
    logged = client.download_artifacts(parent.info.run_id, "report/index.html", str(tmp_path))
    assert Path(logged).read_bytes() == page.read_bytes() and b'data-artifact="figures/' in page.read_bytes()


@pytest.mark.slow
def test_down_stops_everything_and_removes_the_state(service):
    leaders = {name: service.leader(name) for name in ("ray", "mlflow")}
    members = {pid for sid in leaders.values() for pid in session_members(sid)}
    assert members
    down = service.run("down", timeout=120)
    assert down.returncode == 0, down.stderr
    for port in service.ports.values():
        assert not port_open(port), f"port {port} still answers after down"
    assert not [pid for pid in members if alive(pid)], "processes of the service outlived down"
    assert not [sid for sid in leaders.values() if session_members(sid)]
    assert not any(p.suffix in (".pid", ".started") for p in service.state.iterdir())
    assert not (service.state / "auth_token").exists()
    assert service.run("status").returncode == 3
    again = service.run("down")
    assert again.returncode == 0 and "not running" in again.stderr
