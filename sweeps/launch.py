"""Run a list of trial configs as one Ray Tune experiment, tracked in MLflow.

Order matters for the error contract: configs are validated by the caller, then the tracking store is
checked (bounded time), then the sweep folder; only then does Ray start and the parent run get made.
Re-running the same command resumes the experiment (``Tuner.restore``); finished trials never run again.
At the end the study report (analysis/report.py) of the sweep is written beside its Ray results and logged
to its parent run; the last two lines say where it is and where the MLflow runs table is.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

from provlae import paths, plugins
from provlae.config import TrialConfig
from provlae.errors import ConfigError, ProvlaeError
from provlae.text import last_line
from sweeps import sweep_folder, tracking
from sweeps.cluster_checks import check_cluster
from sweeps.trainable import GROUP_KEY, group_configs, group_label, train_group, train_trial, trial_config

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST = sweep_folder.GRID_MANIFEST  # the grid a sweep folder was started with
TABLE_METRICS = ("mig", "mig_sup", "factor_score", "recon_error")
MAX_LISTED = 20  # failed trials listed in the summary: it stays one screen
REPORT_TOP_K = 3  # the paper's top-3 seeds per cell, or all of a sweep's seeds when it has fewer
REPORT_DIR = "report"  # the report's folder: in the sweep folder, and as the parent run's artifact folder


def check_trial_data(configs: list[TrialConfig]) -> None:
    """Open each distinct dataset of the sweep once (a user's file is validated; procedural data is
    checked from its spec), so bad data is one error before anything starts, not a failure per trial."""
    from provlae.train import check_data

    seen = set()
    for cfg in configs:
        key = (cfg.dataset, cfg.data_path, cfg.subset, cfg.batch_size, cfg.levels, cfg.device, cfg.dtype)
        if key not in seen:
            seen.add(key)
            check_data(cfg)


def run_sweep(configs: list[TrialConfig], args: argparse.Namespace, description: dict[str, Any]) -> int:
    """Run (or resume) the sweep; 0 when every trial finished, 1 when any failed or did not finish."""
    check_trial_data(configs)
    uri = tracking.normalize_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    folder = f"{args.storage.rstrip('/')}/{args.name}"
    check_manifest(folder, configs, fuse_size(args), uri, args.experiment, write=False)

    with sweep_folder.SweepLease.acquire(folder, args.name):  # one driver per sweep, on any machine
        restart = sweep_folder.check_tune_state(folder, restartable=True)  # Tune's state is ours to mend now
        mlflow = tracking.client(uri)
        tracking.check_experiment(mlflow, args.experiment)  # a deleted experiment: before Ray
        init_ray(args.address)
        check_cluster(configs, uri, args.storage, getattr(args, "storage_is_shared", False))  # before any run
        check_manifest(folder, configs, fuse_size(args), uri, args.experiment)
        experiment_id = tracking.open_experiment(mlflow, args.experiment)
        orphans = tracking.end_running(mlflow, experiment_id, args.name)
        if orphans:
            print(f"{orphans} run(s) of sweep {args.name!r} left RUNNING by a driver that died: marked KILLED "
                  f"until they resume", flush=True)
        parent = tracking.find_or_create_parent(mlflow, experiment_id, args.name,
                                                {**description, "trials": len(configs)})
        ctx = tracking.TrackingContext(uri, experiment_id, args.name, parent,
                                       patience=getattr(args, "tracking_patience", tracking.PATIENCE))
        with terminate_as_interrupt():
            results = make_tuner(configs, args, ctx, folder, restore=not restart).fit()
        try:  # past the Tuner, MLflow calls wait for the server as the trials' do, then give up
            return end_sweep(configs, args, results, ctx, tracking.patient_client(uri, ctx.patience))
        except Exception as e:  # noqa: BLE001 - the table is printed; what MLflow could not record, the rerun does
            if not (tracking.unreachable(e) or isinstance(e, tracking.TrackingError)):
                raise
            print(f"\nThe sweep's end could not be recorded in MLflow at {uri} ({last_line(str(e))}): rerun the "
                  f"same command to record it.")
            return 1


def end_sweep(configs: list[TrialConfig], args: argparse.Namespace, results, ctx: tracking.TrackingContext,
              mlflow) -> int:
    """The summary table and failures, the parent run's end (KILLED runs when the sweep was interrupted),
    the report; the exit status."""
    parent, uri = ctx.parent_run_id, ctx.tracking_uri
    rows, failures = summarize(results, ctx, mlflow) if fuse_size(args) == 1 else summarize_groups(results, ctx, mlflow)
    unfinished = len(configs) - len(rows)
    print(format_table(rows))
    if unfinished:
        print(f"\n{unfinished} trial(s) did not finish: rerun the same command to resume the sweep.")
    if failures:
        print(f"\n{len(failures)} of {len(configs)} trial(s) failed:")
        for name, error in failures[:MAX_LISTED]:
            print(f"  {name}: {error}")
        if len(failures) > MAX_LISTED:
            print(f"  ... and {len(failures) - MAX_LISTED} more (each run's MLflow tag 'error' holds its error)")
    if unfinished:  # interrupted: no trial runs now, so what is still RUNNING was stopped with the driver
        tracking.end_running(mlflow, ctx.experiment_id, args.name)
    else:
        tracking.end_parent(mlflow, parent, failed=len(failures))
    print(f"\nMLflow experiment {args.experiment!r} at {uri}, parent run {parent}")
    print(ui_hint(uri))
    if getattr(args, "report", True) and not unfinished:
        k = min(REPORT_TOP_K, len({c.seed for c in configs}))  # a sweep of 2 seeds reports the top 2
        print(write_sweep_report(args, uri, parent, mlflow, k=k))
    print(runs_table_line(uri, ctx.experiment_id))
    return 1 if failures or unfinished else 0


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (``ray job stop``, a scheduler's kill) stops the sweep as Ctrl-C does: Tune saves its state
    and stops the trials, and the runs still RUNNING end KILLED."""
    def interrupt(signum, frame):
        signal.raise_signal(signal.SIGINT)

    try:
        before = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


# ------------------------------------------------------------------------------------------ Ray


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` / $RAY_ADDRESS (set for drivers under ``ray job submit``), else start a local Ray:
    no dashboard, and the repository on the workers' path wherever this script is run from. A dashboard
    (http://) address, or a token the cluster does not take, is a ConfigError before ray.init. ray.init's
    own "Connecting to / Started a local Ray" lines are left out, so that a sweep refused once Ray is up
    (sweeps/cluster_checks.py) says its one error line alone; the "ray" logger is then at INFO, as ray.init
    leaves it."""
    import logging

    import ray
    from ray.exceptions import AuthenticationError

    from sweeps.cluster_checks import check_driver_address, check_token, driver_address

    if ray.is_initialized():
        return
    address, source = driver_address(address)
    if address:
        check_driver_address(address, source)
        check_token(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, AuthenticationError) as e:
            raise ConfigError(f"cannot connect to the Ray cluster at {address}: {last_line(str(e))}") from None
    else:
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        # address="local": never silently join another user's `ray start` cluster on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    logging.getLogger("ray").setLevel(logging.INFO)


def fuse_size(args: argparse.Namespace) -> int:
    """Trials per fused group (``--fuse``; 1: every trial on its own, as a solo trainer)."""
    return getattr(args, "fuse", 1)


def groups_of(configs: list[TrialConfig], args: argparse.Namespace) -> list[list[TrialConfig]]:
    from provlae.fused import make_groups

    return make_groups(configs, fuse_size(args))


def make_tuner(configs: list[TrialConfig], args: argparse.Namespace, ctx: tracking.TrackingContext,
               folder: str, restore: bool = True):
    """The grid's Tuner, or the interrupted one restored from ``folder`` (errored trials retried) unless
    ``restore`` is False. With ``--fuse K`` > 1 each Tune trial is a fused group of up to K grid trials."""
    from ray import tune

    trainable = trainable_for(args, ctx)
    if restore and tune.Tuner.can_restore(folder):
        print(f"resuming sweep {args.name!r} from {folder}", flush=True)
        return tune.Tuner.restore(folder, trainable=trainable, resume_errored=True)
    if fuse_size(args) == 1:
        space = {"trial": tune.grid_search([c.to_dict() for c in configs])}
    else:
        space = {GROUP_KEY: tune.grid_search([{"label": group_label(g), "members": [c.to_dict() for c in g]}
                                              for g in groups_of(configs, args)])}
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=args.max_concurrent, reuse_actors=True,
                                    trial_dirname_creator=trial_dirname),
        run_config=run_config(args),
    )


def trainable_for(args: argparse.Namespace, ctx: tracking.TrackingContext):
    """The trainable with the sweep's tracking context and per-trial resources bound."""
    from ray import tune

    threads, folders = max(1, int(args.cpus_per_trial)), tuple(plugins.worker_paths(args))
    if fuse_size(args) == 1:
        fn = tune.with_parameters(train_trial, tracking=ctx, threads=threads, plugin_paths=folders)
    else:
        fn = tune.with_parameters(train_group, tracking=ctx, threads=threads, plugin_paths=folders,
                                  kernels=getattr(args, "fused_kernels", "auto"))
    return tune.with_resources(fn, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})


def run_config(args: argparse.Namespace):
    from ray import tune

    from sweeps.failure_policy import EndRepeatedFailures

    return tune.RunConfig(
        name=args.name, storage_path=args.storage, verbose=1, progress_reporter=reporter(fuse_size(args) > 1),
        callbacks=[EndRepeatedFailures()],
        failure_config=tune.FailureConfig(max_failures=args.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2))


def reporter(fused: bool = False):
    """A status table every 30 s, one row per trial with its grid point (not a config dump per trial);
    a fused trial's row names its group and counts its members."""
    from ray import tune

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output engine ignores progress_reporter
    if fused:
        return tune.CLIReporter(
            parameter_columns={f"{GROUP_KEY}/label": "group"},
            metric_columns={"step": "step", "stage": "stage", "live": "live", "finished": "finished",
                            "failed": "failed"},
            max_report_frequency=30)
    return tune.CLIReporter(
        parameter_columns={f"trial/{k}": k for k in ("dataset", "family", "beta", "seed")},
        metric_columns={"step": "step", "stage": "stage", "loss": "loss", "mig": "mig"},
        max_report_frequency=30)


def trial_dirname(trial) -> str:
    if GROUP_KEY in trial.config:
        return f"{trial.config[GROUP_KEY]['label']}_{trial.trial_id}"
    return f"{trial_config(trial.config).run_name}_{trial.trial_id}"


# ------------------------------------------------------------------------------ sweep folder


def check_manifest(folder: str, configs: list[TrialConfig], fuse: int, tracking_uri: str, experiment: str,
                   write: bool = True) -> None:
    """A sweep name resumes the same grid in the same MLflow store: refuse a folder started with other
    trials, another ``--fuse`` (Tune's saved trials are the groups), another experiment or tracking URI,
    or a search. ``write``: record a new sweep's grid (and the store of one recorded before stores were)."""
    sweep_folder.check_kind(folder, "grid")
    digests = sorted(hashlib.sha256(json.dumps(c.identity(), sort_keys=True).encode()).hexdigest()
                     for c in configs)
    saved = sweep_folder.read_json(folder, MANIFEST)
    if saved is not None:
        before = saved.get("trials")
        if before != digests:
            count = len(before) if isinstance(before, list) else "?"
            raise ConfigError(f"sweep folder {folder} holds a different grid ({count} trials; now "
                              f"{len(digests)}): repeat the original flags to resume it, or pass --name "
                              f"for a new sweep")
        if saved.get("fuse", 1) != fuse:
            raise ConfigError(f"sweep folder {folder} was started with --fuse {saved.get('fuse', 1)}, not "
                              f"--fuse {fuse}: repeat it to resume the sweep, or pass --name for a new sweep")
        sweep_folder.check_store(folder, saved, tracking_uri, experiment)
        if write and "tracking_uri" not in saved:
            sweep_folder.write_json(folder, MANIFEST, {**saved, **sweep_folder.store_fields(tracking_uri, experiment)})
        return
    if write:
        sweep_folder.write_json(folder, MANIFEST, {"trials": digests, "fuse": fuse,
                                                   **sweep_folder.store_fields(tracking_uri, experiment)})


# ---------------------------------------------------------------------------------- the summary


def summarize(results, ctx: tracking.TrackingContext, mlflow) -> tuple[list[dict], list[tuple[str, str]]]:
    """One row per trial that ended (finished or failed); failed trials' runs are marked FAILED."""
    rows, failures = [], []
    for result in results:
        cfg = trial_config(result.config)
        metrics = result.metrics or {}
        if result.error is not None:
            error = last_line(str(result.error))
            failures.append((cfg.run_name, error))
            rows.append({"run": cfg.run_name, "status": "FAILED"})
            _mark_failed(mlflow, ctx, cfg, metrics.get("trial_id", ""), error)
        elif metrics.get("done"):
            rows.append({"run": cfg.run_name, "status": "FINISHED", **{k: metrics.get(k) for k in TABLE_METRICS}})
    return rows, failures


def summarize_groups(results, ctx: tracking.TrackingContext, mlflow) -> tuple[list[dict], list[tuple[str, str]]]:
    """The same rows as ``summarize``, one per member of every fused trial, each read from the member's
    MLflow run (a member fails alone; the group's Tune trial may still have finished)."""
    rows, failures = [], []
    for result in results:
        group_error = None if result.error is None else last_line(str(result.error))
        for cfg in group_configs(result.config):
            run = tracking.find_trial_run(mlflow, ctx.experiment_id, ctx.trial_key(cfg, ""))
            status = None if run is None else run.info.status
            if status == "FINISHED":
                rows.append({"run": cfg.run_name, "status": "FINISHED",
                             **{k: run.data.metrics.get(k) for k in TABLE_METRICS}})
            elif status == "FAILED" or group_error is not None:
                error = (run.data.tags.get(tracking.ERROR_TAG) if status == "FAILED" else None) or group_error
                failures.append((cfg.run_name, last_line(error or "unknown error")))
                rows.append({"run": cfg.run_name, "status": "FAILED"})
                if run is not None and status != "FAILED":
                    tracking.mark_failed(mlflow, run.info.run_id, error)
    return rows, failures


def _mark_failed(mlflow, ctx: tracking.TrackingContext, cfg: TrialConfig, trial_id: str, error: str) -> None:
    """A trial whose worker died on its last try could not end its own run."""
    try:
        run = tracking.find_trial_run(mlflow, ctx.experiment_id, ctx.trial_key(cfg, trial_id))
        if run is not None and run.info.status != "FAILED":
            tracking.mark_failed(mlflow, run.info.run_id, error)
    except tracking.TrackingError:  # the server is away: the rerun retries the trial and records it
        pass


def format_table(rows: list[dict]) -> str:
    width = max([len("run")] + [len(r["run"]) for r in rows])
    header = f"{'run':<{width}}  {'status':<8}" + "".join(f"  {m:>12}" for m in TABLE_METRICS)
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = "".join(f"  {_cell(r.get(m)):>12}" for m in TABLE_METRICS)
        lines.append(f"{r['run']:<{width}}  {r['status']:<8}{cells}")
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------------------- the report


def report_folder(storage: str, name: str) -> Path:
    """Where a sweep's report is written: in its sweep folder when that is local, else under the data home."""
    if "://" in storage:
        return paths.data_home() / "reports" / name
    return Path(storage) / name / REPORT_DIR


def write_sweep_report(args: argparse.Namespace, uri: str, parent: str, mlflow, k: int = REPORT_TOP_K) -> str:
    """Write this sweep's report (top ``k`` seeds per cell) and log it to the parent run
    (``report/index.html``: the MLflow UI shows it); the line that says where. A report that cannot be
    made (no trial finished, say) is that one line, and never changes the sweep's outcome."""
    from analysis.report import write_report

    try:
        path = write_report(args.experiment, report_folder(args.storage, args.name), tracking_uri=uri,
                            sweep=args.name, k=k)
        mlflow.log_artifact(parent, str(path), REPORT_DIR)
    except ProvlaeError as e:
        return f"Report: not written ({last_line(str(e))})"
    except Exception as e:  # noqa: BLE001 - the trials' results stand whatever happens to their summary page
        return f"Report: not written ({type(e).__name__}: {last_line(str(e))})"
    return f"Report: {path} (also the parent run's artifact {REPORT_DIR}/{path.name})"


def runs_table_line(uri: str, experiment_id: str) -> str:
    from analysis.report import runs_table_url, ui_base

    return f"Runs table: {runs_table_url(ui_base(uri), experiment_id)}"


def report_lines(experiment: str, name: str, tracking_uri: str | None = None,
                 storage: str | None = None) -> list[str]:
    """The two last lines of a finished sweep, again (``make demo`` ends with them): its report's path and
    the experiment's runs table, from the default store and storage unless given."""
    uri = tracking.normalize_uri(tracking_uri or paths.default_tracking_uri())
    exp = tracking.client(uri).get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {uri}")
    page = report_folder(storage or str(paths.default_storage()), name) / "index.html"
    report = f"Report: {page}" if page.is_file() else f"Report: none at {page} (see the sweep's output)"
    return [report, runs_table_line(uri, exp.experiment_id)]


def ui_hint(uri: str) -> str:
    if uri.startswith("http"):
        return f"Open the MLflow UI at {uri}"
    return f"Open the MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1"

