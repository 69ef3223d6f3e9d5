"""Argument parsing and error reporting shared by the sweep scripts.

Every user error (provlae.errors.ProvlaeError: bad config, unreachable tracking store, ...) ends the
script with one line ``error: ...`` on stderr and exit status 2, before Ray starts.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from analysis.ray_cluster import check_driver_address, driver_address
from provlae import paths, plugins
from provlae.config import parse_assignments
from provlae.data.files import DataFiles
from provlae.errors import ConfigError, ProvlaeError
from provlae.metrics import names as metric_names
from provlae.plan import Target, parse_plan_for
from sweeps.tracking import PATIENCE

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a directory name and a safe MLflow filter value
# An MLflow experiment name becomes a folder of the artifact store: one name, no path in it.
EXPERIMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_. -]{0,199}$")


def check_names(name: str, experiment: str) -> None:
    """--name and --experiment each become one folder name (Ray storage, MLflow artifacts)."""
    if not NAME.match(name) or ".." in name:
        raise ConfigError(f"--name must be one folder name: letters, digits, '_', '.' or '-' (no '..', no "
                          f"'/'), got {name!r}")
    if not EXPERIMENT.match(experiment) or ".." in experiment:
        raise ConfigError(f"--experiment must be one folder name: letters, digits, ' ', '_', '.' or '-', at most "
                          f"200 characters (no '..', no '/'), got {experiment!r}")


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    """Flags every sweep script shares: overrides, resources, tracking, storage, failure handling."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrialConfig field for every trial (repeatable)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE (e.g. mypkg.myfamily), which registers families or datasets of "
                             "your own; it reaches the Ray workers with every trial (repeatable)")
    parser.add_argument("--data-dir", help="a folder holding each dataset's real file under its standard name "
                                           "(dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz, 3dshapes.h5, ...): "
                                           "every trial reads its own dataset's file (default: $PROVLAE_DATA_DIR; "
                                           "neither: procedural data)")
    parser.add_argument("--data-file", action="append", default=[], metavar="DATASET=PATH",
                        help="the real file of one dataset, over --data-dir (repeatable)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per trial")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0,
                        help="GPUs per trial; fractions pack trials (0.25: four per GPU); > 0 trains on cuda")
    parser.add_argument("--experiment", default="provlae", help="MLflow experiment (default: provlae)")
    parser.add_argument("--name", help="sweep name: Ray storage folder and MLflow parent run "
                                       "(default: derived from the preset)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a "
                                               "sqlite file under the user data directory)")
    parser.add_argument("--storage", help="Ray Tune results and checkpoints: a folder every node can reach, "
                                          "or a URI such as s3://bucket/path (default: <user data dir>/"
                                          "ray_results)")
    parser.add_argument("--storage-is-shared", action="store_true",
                        help="--storage is a local path of a file system every node shares (NFS): allowed on a "
                             "cluster of more than one node")
    parser.add_argument("--max-failures", type=int, default=2,
                        help="retries per trial (default: 2; -1: without end, but an error that repeats on "
                             "every attempt, or that no retry can mend, still ends the trial)")
    parser.add_argument("--tracking-patience", type=float, default=PATIENCE, metavar="SECONDS",
                        help="how long a trial waits for an unreachable tracking server before it fails "
                             "(default: 300; each retry of the trial waits as long again)")
    parser.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, as under "
                                          "`ray job submit`; else start a local Ray on this machine)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate every trial config, print one line per trial, start nothing")
    parser.add_argument("--plan-for", metavar="DEVICE×N",
                        help="plan for this cluster (cpu×16, cuda×8, H100×8; x works too) instead of this "
                             "machine's devices: the --dry-run plan's wall time and device-hours")
    parser.add_argument("--evaluate", metavar="LIST",
                        help="at the end, compute these metrics from the trials' stored representations into "
                             f"their runs, as `python -m analysis evaluate` does: a comma list of "
                             f"{', '.join(metric_names.METRIC_NAMES)}, or all")


@dataclass(frozen=True)
class SweepOptions:
    """A sweep script's command line, parsed and checked once (``add_sweep_args`` + ``resolve_common``):
    what the driver, the Tuners and the report read. The grid's own flags have the defaults the search
    runs with."""

    name: str
    experiment: str
    tracking_uri: str
    storage: str  # an absolute folder, or a URI such as s3://bucket/path
    overrides: dict[str, Any] = field(default_factory=dict)  # --set, plug-in names and device resolved
    data: DataFiles | None = None  # --data-dir / --data-file
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    storage_is_shared: bool = False
    max_failures: int = 2
    tracking_patience: float = PATIENCE
    max_concurrent: int | None = None
    plan_for: str | None = None  # --plan-for DEVICE×N: the cluster the plan is for (default: this machine)
    address: str | None = None
    dry_run: bool = False
    fuse: int = 1  # full_grid.py: trials per fused group (1: every trial alone, as a solo trainer)
    fused_kernels: str = "auto"  # full_grid.py: a fused group's kernels
    report: bool = True  # full_grid.py: the study report at the end
    evaluate: tuple[str, ...] = ()  # --evaluate: the metrics computed from stored representations at the end

    @property
    def folder(self) -> str:
        """The sweep folder: Tune's experiment, the manifest, the lease."""
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def threads(self) -> int:
        """Torch threads per trial: its CPUs."""
        return max(1, int(self.cpus_per_trial))

    @property
    def plugin_paths(self) -> tuple[str, ...]:
        """The folders of the ``--plugin`` modules, for the workers (``provlae.plugins.worker_paths``)."""
        return tuple(plugins.worker_paths(plugins.parse(self.overrides.get("plugins"))))

    @property
    def resources(self) -> dict[str, float]:
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}


def resolve_common(args: argparse.Namespace, default_name: str, **own: Any) -> SweepOptions:
    """The shared flags checked, with the defaults that depend on the environment filled in, and the
    script's ``own`` flags (the grid's fuse, fused_kernels, report) beside them."""
    name = args.name or default_name
    check_names(name, args.experiment)
    tracking_uri = args.tracking_uri or paths.default_tracking_uri()
    storage = args.storage
    if storage is None or "://" not in storage:
        storage = str(Path(storage or paths.default_storage()).expanduser().resolve())
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise ConfigError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    if args.max_failures < -1:
        raise ConfigError(f"--max-failures must be >= -1 (-1: retry forever), got {args.max_failures}")
    if not args.tracking_patience > 0:
        raise ConfigError(f"--tracking-patience must be > 0 seconds, got {args.tracking_patience:g}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if args.plan_for is not None:
        parse_plan_for(args.plan_for)  # a bad --plan-for: refused before anything else
    overrides = parse_assignments(args.overrides)
    names = plugins.load(plugins.parse(overrides.get("plugins")) + args.plugin)
    if names:
        overrides["plugins"] = ",".join(names)
    data = DataFiles.from_args(args.data_dir, args.data_file)  # after the plug-ins: their datasets too
    overrides["device"] = trial_device(overrides.get("device"), args.gpus_per_trial)
    if not args.dry_run:  # a dry run joins no cluster: the shell's RAY_ADDRESS does not concern it
        check_driver_address(*driver_address(args.address))
    return SweepOptions(
        name=name, experiment=args.experiment, tracking_uri=tracking_uri, storage=storage, overrides=overrides,
        data=data, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        storage_is_shared=args.storage_is_shared, max_failures=args.max_failures,
        tracking_patience=args.tracking_patience, max_concurrent=args.max_concurrent, address=args.address,
        dry_run=args.dry_run, evaluate=evaluated_metrics(args.evaluate), plan_for=args.plan_for, **own)


def plan_target(options: SweepOptions) -> Target:
    """The cluster a plan is for: ``--plan-for``, else this machine's GPUs (trials asking GPUs) or cores."""
    per_trial = options.gpus_per_trial or 1.0
    if options.plan_for:
        kind, name, count = parse_plan_for(options.plan_for)
        return Target(kind, count, per_trial if kind == "cuda" else options.cpus_per_trial, name)
    if options.gpus_per_trial > 0:
        import torch

        return Target("cuda", max(1, torch.cuda.device_count()), per_trial)
    return Target("cpu", os.cpu_count() or 1, options.cpus_per_trial)


def evaluated_metrics(text: str | None) -> tuple[str, ...]:
    """``--evaluate LIST`` as metric names (none without the flag); ConfigError naming an unknown one."""
    if text is None:
        return ()
    try:
        return metric_names.check_names(text)
    except ValueError as e:
        raise ConfigError(f"--evaluate: {e}") from None


def trial_device(device: str | None, gpus_per_trial: float) -> str:
    """The trials' device: cuda when they are given GPUs, else cpu, unless ``--set device=`` says. A trial
    runs where Ray assigns it GPUs only when it asks for them, so cuda without --gpus-per-trial (and a
    reserved GPU that a cpu trial leaves idle) is refused here, before anything starts."""
    if device is None:
        return "cuda" if gpus_per_trial > 0 else "cpu"
    if device.startswith("cuda") and gpus_per_trial == 0:
        raise ConfigError(f"--set device={device} with --gpus-per-trial 0: Ray assigns a trial no GPU unless it "
                          f"asks for one, so it could not train on cuda; pass --gpus-per-trial (1: a GPU per "
                          f"trial, 0.25: four trials per GPU)")
    if device == "cpu" and gpus_per_trial > 0:
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g} reserves a GPU share for each trial, and --set "
                          f"device=cpu leaves it idle: drop one of the two")
    return device


def registered(kind: str) -> str:
    """The registered families or datasets (plug-ins loaded), for a flag's help."""
    from provlae.data.registry import dataset_names
    from provlae.models.families import family_names

    return ", ".join(family_names() if kind == "families" else dataset_names())


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's main; a user error becomes ``error: ...`` on stderr and status 2."""
    try:
        return main(argv)
    except ProvlaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
