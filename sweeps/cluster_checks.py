"""What a sweep on more than one Ray node needs, checked once Ray is up and before any run is created
(cluster/README.md, "Many machines"): a tracking store and a ``--storage`` every node reaches, and each
trial's ``data_path`` readable on every node. Each miss is a ConfigError saying what to use instead."""
from __future__ import annotations

import os
import urllib.parse
from typing import Any

from provlae.config import TrialConfig
from provlae.errors import ConfigError

PROBE_TIMEOUT_S = 60.0


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_cluster(configs: list[TrialConfig], tracking_uri: str, storage: str, storage_is_shared: bool) -> None:
    nodes = alive_nodes()
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
