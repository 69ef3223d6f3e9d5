"""What a sweep needs of its Ray cluster, each miss a ConfigError saying what to use instead.

Before the driver connects (analysis/ray_cluster.py): an address a driver can join (not the dashboard's)
and a token the cluster takes. Once Ray is up and before any run is created (cluster/README.md, "Many machines"): GPUs for trials
that train on cuda; on more than one node a tracking store and a ``--storage`` every node reaches, and each
trial's ``data_path`` readable on every node.
"""
from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

from provlae.config import TrialConfig
from provlae.errors import ConfigError

PROBE_TIMEOUT_S = 60.0
AUTOSCALER_STATUS = "__autoscaling_status"  # what Ray's autoscaler monitor reports every few seconds
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # on the head of a `ray up` cluster, as Tune looks for it


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
