"""The one sweep driver: start, Tuner, end, for the grid (sweeps/launch.py) and the search
(sweeps/search.py) alike; each says only what differs (a ``Sweep``: its manifest, its parent run's params,
its Tuner, its summary).

Order matters for the error contract: the trials' data is checked, then the tracking store (bounded
time), then the sweep folder; only then is the folder's lease taken, Ray started and the parent run made.
Re-running the same command resumes the experiment (``Tuner.restore``); finished trials never run again,
and runs a driver killed outright left RUNNING are marked KILLED until they resume. Past the Tuner, the
end waits for an absent tracking server as the trials do; when it does not come back, the table is
printed and the rerun of the same command records the rest.
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from analysis.ray_cluster import init_ray
from provlae.config import TrialConfig
from provlae.errors import ProvlaeError
from provlae.text import last_line
from sweeps import sweep_folder, tracking
from sweeps.cli import SweepOptions
from sweeps.cluster_checks import check_cluster


class Sweep:
    """What a sweep script hands the driver. ``configs``: the trials (or the search's base config) whose
    data and devices are checked before anything starts."""

    kind = "sweep"  # the word its messages use
    restartable = True  # a damaged Tune state: start the Tuner again in the folder (else: one error)
    tags: tuple[tuple[str, str], ...] = ()  # on the parent run and every trial run

    def __init__(self, configs: list[TrialConfig], options: SweepOptions):
        self.configs, self.options = configs, options

    def check_manifest(self, uri: str, write: bool) -> bool:
        """Whether the sweep folder already holds this sweep; refuse another one (ConfigError). ``write``:
        record a new sweep's manifest."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The parent run's params."""
        raise NotImplementedError

    def opened(self, mlflow, parent: str) -> None:
        """After the parent run is found or made: what else it holds."""

    def tuner(self, ctx: tracking.TrackingContext, restore: bool, started: bool):
        """The Tuner: restored from the sweep folder when ``restore`` and Tune saved it there."""
        raise NotImplementedError

    def end(self, results, ctx: tracking.TrackingContext, mlflow) -> int:
        """The summary, the runs' and the parent's end; the exit status."""
        raise NotImplementedError


def drive(sweep: Sweep) -> int:
    """Run (or resume) the sweep; its ``end``'s exit status, or 1 when MLflow could not record the end."""
    options = sweep.options
    check_trial_data(sweep.configs)
    uri = tracking.normalize_uri(options.tracking_uri)
    tracking.check_reachable(uri)
    sweep.check_manifest(uri, write=False)
    with sweep_folder.SweepLease.acquire(options.folder, options.name):  # one driver per sweep, on any machine
        restart = sweep_folder.check_tune_state(options.folder, restartable=sweep.restartable)  # ours to mend now
        mlflow = tracking.client(uri)
        tracking.check_experiment(mlflow, options.experiment)  # a deleted experiment: before Ray
        init_ray(options.address)
        check_cluster(sweep.configs, uri, options.storage, options.storage_is_shared)  # before any run
        started = sweep.check_manifest(uri, write=True)  # a sweep refused above leaves no folder behind
        ctx = open_parent(sweep, mlflow, uri)
        tuner = sweep.tuner(ctx, restore=not restart, started=started)
        with terminate_as_interrupt():
            results = tuner.fit()
        try:  # past the Tuner, MLflow calls wait for the server as the trials' do, then give up
            status = sweep.end(results, ctx, tracking.patient_client(uri, ctx.patience))
        except Exception as e:  # the table is printed; what MLflow could not record, the rerun does
            if not (tracking.unreachable(e) or isinstance(e, tracking.TrackingError)):
                raise
            print(f"\nThe {sweep.kind}'s end could not be recorded in MLflow at {uri} ({last_line(str(e))}): "
                  f"rerun the same command to record it.")
            return 1
        if options.evaluate and results.num_terminated + results.num_errors == len(results):
            status = max(status, evaluate_sweep(options, uri))
        return status


def evaluate_sweep(options: SweepOptions, uri: str) -> int:
    """``--evaluate``: the chosen metrics from the sweep's stored representations into its runs, on the
    sweep's Ray (analysis/evaluate.py); 1 when a run could not be scored."""
    from analysis.evaluate import evaluate

    print(f"\nEvaluating {', '.join(options.evaluate)} from the stored representations", flush=True)
    try:
        outcome = evaluate(options.experiment, uri, sweep=options.name, metrics=options.evaluate,
                           say=lambda line: print(line, flush=True))
    except ProvlaeError as e:
        print(f"evaluation: {e}")
        return 1
    return outcome.report()


def open_parent(sweep: Sweep, mlflow, uri: str) -> tracking.TrackingContext:
    """The experiment and the parent run (the runs a dead driver left RUNNING marked KILLED first); the
    context every trial gets."""
    options = sweep.options
    experiment_id = tracking.open_experiment(mlflow, options.experiment)
    orphans = tracking.end_running(mlflow, experiment_id, options.name)
    if orphans:
        print(f"{orphans} run(s) of {sweep.kind} {options.name!r} left RUNNING by a driver that died: marked "
              f"KILLED until they resume", flush=True)
    parent = tracking.find_or_create_parent(mlflow, experiment_id, options.name, sweep.params())
    for key, value in sweep.tags:
        mlflow.set_tag(parent, key, value)
    sweep.opened(mlflow, parent)
    return tracking.TrackingContext(uri, experiment_id, options.name, parent, tags=sweep.tags,
                                    patience=options.tracking_patience)


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


# ------------------------------------------------------------------------------------------ Tune


def restored_tuner(folder: str, trainable):
    """Tune's experiment saved in ``folder``, restored with its errored trials retried; None without one."""
    from ray import tune

    if not tune.Tuner.can_restore(folder):
        return None
    return tune.Tuner.restore(folder, trainable=trainable, resume_errored=True)


def run_config(options: SweepOptions, reporter):
    """The RunConfig both Tuners share: the sweep folder, retries, two checkpoints kept per trial (the
    newest and the one a damaged newest falls back to), an error that repeats ends the trial."""
    from ray import tune

    from sweeps.failure_policy import EndRepeatedFailures

    return tune.RunConfig(
        name=options.name, storage_path=options.storage, verbose=1, progress_reporter=reporter,
        callbacks=[EndRepeatedFailures()],
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2))


def cli_reporter(parameter_columns, metric_columns, progress=None):
    """A status table every 30 s, one row per trial; with ``progress`` (``sweeps.eta.Progress``) the
    sweep's expected end under each table."""
    from ray import tune

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output engine ignores progress_reporter

    class Reporter(tune.CLIReporter):
        def report(self, trials, done, *sys_info):
            super().report(trials, done, *sys_info)
            if progress is not None:
                print(progress.line(trials), flush=True)

    return Reporter(parameter_columns=parameter_columns, metric_columns=metric_columns, max_report_frequency=30)


# ---------------------------------------------------------------------------------------- output


def where_lines(options: SweepOptions, ctx: tracking.TrackingContext) -> str:
    """Where the sweep's runs are: the experiment and parent run, and how to open the MLflow UI."""
    return (f"\nMLflow experiment {options.experiment!r} at {ctx.tracking_uri}, parent run {ctx.parent_run_id}\n"
            f"{ui_hint(ctx.tracking_uri)}")


def ui_hint(uri: str) -> str:
    if uri.startswith("http"):
        return f"Open the MLflow UI at {uri}"
    return f"Open the MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1"
