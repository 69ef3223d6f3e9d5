"""What a sweep needs of its Ray cluster, each miss a ConfigError saying what to use instead.

Before the driver connects: an address a driver can join (not the dashboard's) and a token the cluster
takes. Once Ray is up and before any run is created (cluster/README.md, "Many machines"): GPUs for trials
that train on cuda; on more than one node a tracking store and a ``--storage`` every node reaches, and each
trial's ``data_path`` readable on every node.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from provlae.config import TrialConfig
from provlae.errors import ConfigError

PROBE_TIMEOUT_S = 60.0
GCS_TIMEOUT_S = 10  # the token check's one call to the GCS (nothing listening: about 10 s more to connect)
AUTOSCALER_STATUS = "__autoscaling_status"  # what Ray's autoscaler monitor reports every few seconds
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # on the head of a `ray up` cluster, as Tune looks for it
GET_TOKEN = "`ray get-auth-token` on the cluster's head prints it"


# ------------------------------------------------------------------------- before connecting


def driver_address(address: str | None) -> tuple[str | None, str]:
    """The address ``ray.init`` will join and where it comes from: ``--address``, else $RAY_ADDRESS
    (which ray.init also puts in place of ``auto``)."""
    env = os.environ.get("RAY_ADDRESS")
    if env and address in (None, "auto"):
        return env, "RAY_ADDRESS"
    return address, "--address"


def check_driver_address(address: str | None, source: str = "--address") -> None:
    """A driver joins the GCS (HOST:6379, or ``auto`` on a node of the cluster); the dashboard's http://
    address is the Jobs API, where ``ray.init`` would try a Ray Client and fail."""
    if address and address.strip().lower().startswith(("http://", "https://")):
        raise ConfigError(f"{source} {address} is the Ray dashboard's Jobs API address, which `ray job submit "
                          f"--address` takes; a driver joins the cluster at its GCS address (HOST:6379) or "
                          f"`auto` on one of its nodes: pass --address HOST:6379, or submit the sweep with "
                          f"`ray job submit --address {address} -- python sweeps/...`")


def check_token(address: str) -> None:
    """Ask the GCS at ``address`` once for the cluster id, with this driver's token, before ray.init: a
    missing or refused token, or no GCS there, is one ConfigError within about 2 * GCS_TIMEOUT_S (ray.init
    would retry for 20 s, log every refusal, and then say only that it could not connect)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # another Ray: ray.init alone decides
        return
    if "://" in address:  # a Ray Client (ray://): its server checks the driver its own way
        return
    try:
        gcs = canonicalize_bootstrap_address(address)
    except ValueError:
        raise ConfigError(f"{address!r} is not a Ray address: use HOST:PORT (the GCS, port 6379 by default) "
                          f"or auto") from None
    if gcs is None:  # local: a new Ray on this machine
        return
    token_auth = is_token_auth_enabled()
    if token_auth and not has_token():  # (Ray's GCS client would abort the process rather than raise)
        raise ConfigError(f"no Ray token for the cluster at {address}: RAY_AUTH_MODE=token, but neither "
                          f"RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH nor ~/.ray/auth_token holds one; set "
                          f"RAY_AUTH_TOKEN to the cluster's token ({GET_TOKEN})")
    error = ask_gcs(gcs)
    if error == "refused" and token_auth:
        raise ConfigError(f"the Ray cluster at {address} refused this driver's token (from {token_source()}): "
                          f"set RAY_AUTH_TOKEN to the cluster's token ({GET_TOKEN})")
    if error == "refused":
        raise ConfigError(f"the Ray cluster at {address} requires a token and this driver sent none "
                          f"(RAY_AUTH_MODE is not 'token'): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to "
                          f"the cluster's token ({GET_TOKEN})")
    if error:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {error} (is a Ray head running "
                          f"there? `ray start --head` prints its address)")


def has_token() -> bool:
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    try:
        return AuthenticationTokenLoader.instance().has_token()
    except AuthenticationError:  # token auth on and no token anywhere
        return False


def ask_gcs(gcs: str) -> str | None:
    """One call to the GCS at ``gcs`` (HOST:PORT): None when it answers, "refused" when it refuses this
    driver's token, else what went wrong. Ray's C++ client logs each failed call to stderr: kept out of
    the way when the call fails (the caller says what happened), shown when it succeeds."""
    from ray._raylet import InnerGcsClient
    from ray.exceptions import AuthenticationError, RayError

    logged = bytearray()
    with native_stderr(logged):
        try:
            InnerGcsClient.standalone(gcs, None, GCS_TIMEOUT_S * 1000)
        except AuthenticationError:
            return "refused"
        except (RayError, ConnectionError, TimeoutError) as e:  # RpcError: nothing answered in time
            return (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
    os.write(2, logged)
    return None


def token_source() -> str:
    """Where Ray takes the driver's token from: the variable, else the file it names, else the default file."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH {os.environ['RAY_AUTH_TOKEN_PATH']}"
    return "~/.ray/auth_token"


@contextlib.contextmanager
def native_stderr(logged: bytearray):
    """File descriptor 2 into ``logged`` for the block: Ray's C++ client writes a warning line there for
    each refused call, beside the one error line a refused driver gets."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            logged.extend(sink.read())


# ------------------------------------------------------------------------------ once Ray is up


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_cluster(configs: list[TrialConfig], tracking_uri: str, storage: str, storage_is_shared: bool) -> None:
    nodes = alive_nodes()
    check_gpus(configs, nodes)
    if len(nodes) > 1:
        check_shared_stores(len(nodes), tracking_uri, storage, storage_is_shared)
    paths = sorted({c.data_path for c in configs if c.data_path})
    if paths:
        check_readable_everywhere(paths, nodes)


def check_shared_stores(n_nodes: int, tracking_uri: str, storage: str, storage_is_shared: bool) -> None:
    scheme = urllib.parse.urlparse(tracking_uri).scheme
    if scheme in ("sqlite", "file", ""):
        raise ConfigError(f"the Ray cluster has {n_nodes} nodes and --tracking-uri {tracking_uri} is a file on "
                          f"one machine: trials on the other nodes would each write their own; use a tracking "
                          f"server every node reaches (--tracking-uri http://HOST:5000, cluster/mlflow-server.md)")
    if "://" not in storage and not storage_is_shared:
        raise ConfigError(f"the Ray cluster has {n_nodes} nodes and --storage {storage} is a local path: a trial "
                          f"moved to another node would not find its checkpoints; use s3://... or gs://..., or "
                          f"add --storage-is-shared if {storage} is one shared file system (NFS) on every node")


def check_readable_everywhere(paths: list[str], nodes: list[dict[str, Any]]) -> None:
    """Ask every alive node, with a zero-CPU task pinned to it, whether it can read each path."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_readable)
    pending = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(paths): n for n in nodes}
    try:
        answers = ray.get(list(pending), timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(f"could not check data_path on every node: no answer within {PROBE_TIMEOUT_S:.0f} s "
                          f"from {len(nodes)} node(s)") from None
    for node, unreadable in zip(pending.values(), answers):
        if unreadable:
            raise ConfigError(f"data_path {unreadable[0]} is not readable on node {node['NodeManagerAddress']} "
                              f"({node['NodeID'][:12]}): put it at that path on every node (a shared volume, "
                              f"cluster/README.md)")


def _readable(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.access(p, os.R_OK)]


def check_gpus(configs: list[TrialConfig], nodes: list[dict[str, Any]]) -> None:
    """Trials that train on cuda ask Ray for GPUs (sweeps/cli.trial_device): on a cluster that has none and
    cannot get any they would wait forever. An autoscaler that may add GPU nodes lets the sweep start."""
    import ray

    asked = sorted({c.device for c in configs if c.device.startswith("cuda")})
    if not asked:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus > 0 or may_add_gpus(*autoscaler_view()):
        return
    started_here = getattr(ray._private.worker._global_node, "head", False)  # the driver's own local Ray
    where = ("the Ray started for this sweep on this machine" if started_here
             else f"the Ray cluster at {ray.get_runtime_context().gcs_address}")
    raise ConfigError(f"{where} has {gpus:g} GPUs ({len(nodes)} node(s), no autoscaler to add "
                      f"GPU nodes) and each trial asks for a GPU to train on {', '.join(asked)} "
                      f"(--gpus-per-trial > 0): the trials would wait forever; join a cluster with GPUs "
                      f"(--address HOST:6379), or train on the CPU (--gpus-per-trial 0, no --set device=cuda)")


def may_add_gpus(ceiling: dict[str, float] | None, status: dict[str, Any] | None, launcher: bool) -> bool:
    """Whether an autoscaler may add GPU nodes. ``ceiling``: the most of each resource the autoscaler's node
    types allow (autoscaler v2 reports them); ``status``: the (v1) autoscaler monitor's last report, whose
    node types are named ``node_<id>`` after each node when it only mirrors a fixed cluster; ``launcher``:
    this machine is the head of a ``ray up`` cluster."""
    if ceiling is not None:
        return ceiling.get("GPU", 0) > 0
    if launcher:
        return True
    types = ((status or {}).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in types.items())


def autoscaler_view() -> tuple[dict[str, float] | None, dict[str, Any] | None, bool]:
    """``may_add_gpus``'s inputs, read from the connected cluster and this machine."""
    import ray._private.state
    from ray.experimental.internal_kv import _internal_kv_get

    ceiling = ray._private.state.state.get_max_resources_from_cluster_config()
    raw = _internal_kv_get(AUTOSCALER_STATUS)
    status = json.loads(raw) if raw else None
    return ceiling, status, Path(LAUNCHER_CONFIG).expanduser().exists()
