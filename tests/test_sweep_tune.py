"""Sweeps through Ray Tune on an in-process local Ray (2 CPUs), tracked in a sqlite MLflow store.

One Ray for the module. Each test runs its own sweep (own name and experiment) in one shared store:
the smoke grid and its re-run, a diverging cell, a worker SIGKILLed mid-stage, a driver SIGKILLed
between trials.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import servers
import smoke

from sweeps import grid
from sweeps.full_grid import main
from sweeps.tracking import RESUMED_TAG, TrackingContext
from sweeps.trainable import train_trial

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweeps")


def sweep_args(store: Path, name: str, *extra: str, report: bool = False) -> list[str]:
    """The smoke sweep's command line; the study report only where a test reads it (its own tests are in
    tests/test_report.py; writing it costs a driver seconds of CPU)."""
    return ["--preset", "smoke", "--name", name, "--experiment", name,
            "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}", "--storage", str(store / "ray"),
            *smoke.quick_args(), *([] if report else ["--no-report"]), *extra]


def trials(overrides: dict | None = None, **axes) -> dict:
    """run name -> config of the smoke trials, as full_grid.py resolves them on a CPU-only sweep."""
    overrides = smoke.quick({"device": "cpu", **(overrides or {})})
    return {c.run_name: c for c in grid.build_trials("smoke", overrides=overrides, **axes)}


def client(store: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


def history(store: Path, run_id: str, key: str) -> list[int]:
    return [m.step for m in client(store).get_metric_history(run_id, key)]


# A finished smoke sweep (vlae) as the code before the sweep layer was written once left it: its sweep folder
# (Tune's state, the manifest) and its MLflow store; the trial's checkpoint file emptied (a finished trial's
# is never read) and the report left out (written again). Both name absolute paths, so it is unpacked where
# it was written.
OLD_SWEEP = ROOT / "tests" / "data" / "sweep_v0.tar.gz"
OLD_AT = Path("/tmp/provlae-v0-sweep")


def test_a_sweep_and_store_written_before_resume_and_analyse_unchanged(local_ray, capsys):
    import shutil
    import tarfile

    from mlflow import MlflowClient

    from analysis import load_runs

    shutil.rmtree(OLD_AT, ignore_errors=True)
    with tarfile.open(OLD_SWEEP) as tar:
        tar.extractall(OLD_AT.parent, filter="data")
    uri = f"sqlite:///{OLD_AT / 'mlflow.db'}"

    def trial_runs() -> dict:
        exp = MlflowClient(uri).get_experiment_by_name("v0")
        runs = MlflowClient(uri).search_runs([exp.experiment_id], "tags.`provlae.role` = 'trial'")
        return {r.info.run_id: (r.info.run_name, r.info.status, r.info.end_time, r.data.metrics, r.data.params)
                for r in runs}

    before = trial_runs()
    assert [v[:2] for v in before.values()] == [("vlae-dsprites-b1-s0", "FINISHED")]
    args = ["--preset", "smoke", "--families", "vlae", "--name", "v0", "--experiment", "v0", "--tracking-uri", uri,
            "--storage", str(OLD_AT / "ray")]
    try:
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "resuming sweep 'v0'" in out and "\nvlae-dsprites-b1-s0 " in out
        assert trial_runs() == before  # nothing trained or logged again
        table = load_runs("v0", tracking_uri=uri)
        (run_id,) = before
        assert list(table.run_id) == [run_id] and table.family.tolist() == ["vlae"]
        assert table.mig.iloc[0] == before[run_id][3]["mig"] and table.beta.iloc[0] == 1.0
        assert (OLD_AT / "ray" / "v0" / "report" / "index.html").is_file()
    finally:
        shutil.rmtree(OLD_AT, ignore_errors=True)


def test_trainable_pickles(local_ray):
    from ray import cloudpickle, tune

    assert pickle.loads(pickle.dumps(train_trial)) is train_trial
    ctx = TrackingContext("sqlite:////tmp/x.db", "1", "sweep", "parent")
    assert pickle.loads(pickle.dumps(ctx)) == ctx
    wrapped = tune.with_parameters(train_trial, tracking=ctx, threads=1)
    assert callable(cloudpickle.loads(cloudpickle.dumps(wrapped)))


def test_smoke_sweep_tracks_one_run_per_trial(local_ray, store, capsys, check_sweep_runs):
    args = sweep_args(store, "smoke", report=True)
    assert main(args) == 0
    out = capsys.readouterr().out
    expected = trials()
    for name in expected:
        assert f"\n{name} " in out and "FINISHED" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    n = len(expected)  # under Tune's last status table, the expected end's line: all ended
    assert f"ETA: {n} of {n} trials finished, 0 running, 0 pending; " in out and "(100%); ended after" in out
    runs = check_sweep_runs(f"sqlite:///{store / 'mlflow.db'}", "smoke", "smoke", expected)
    # The last two lines: the study report (also the parent run's artifact) and the runs table's URL.
    report, table = out.strip().splitlines()[-2:]
    page = store / "ray" / "smoke" / "report" / "index.html"
    assert report == f"Report: {page} (also the parent run's artifact report/index.html)"
    exp = client(store).get_experiment_by_name("smoke")
    assert table == (f"Runs table: http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
                     f"?workflowType=machine_learning")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client(store).search_runs([exp.experiment_id], "tags.`provlae.role` = 'sweep'")[0]
    # its compute plan, as --dry-run prints it (the estimate itself depends on what this machine measured)
    assert parent.data.params["plan_trials"] == parent.data.params["plan_tune_trials"] == str(len(expected))
    assert parent.data.params["plan_train_images"] == str(sum(c.total_steps * c.batch_size
                                                              for c in expected.values()))
    logged = client(store).list_artifacts(parent.info.run_id, "report")
    assert [a.path for a in logged] == ["report/index.html"]
    html = page.read_text()
    assert all(name in html for name in expected) and 'id="topk-dsprites"' in html
    assert "<h2>Top-1 per dataset</h2>" in html  # one seed per cell: the top 1, no cell incomplete
    for run in runs.values():  # what the trial ran on, for the report
        assert run.data.tags["hardware"].startswith("cpu: ")
    # what each trial measured, also in this node's throughput table, where plans read it
    from provlae.throughput import read_table

    measured = {(m.family, m.source) for m in read_table() if m.measured_at >= exp.creation_time / 1000 - 1}
    assert {(c.family, "trial") for c in expected.values()} <= measured
    pro = runs["pro_vlae-dsprites-b1-s0"]
    assert history(store, pro.info.run_id, "loss") == [5, 10, 15, 20, 25, 30]  # every log_every steps
    assert history(store, pro.info.run_id, "mig") == [10, 20, 30]  # every stage end
    assert pro.data.params["family"] == "pro_vlae" and pro.data.params["subset"] == "1000"

    # The same command again: the finished sweep is restored, nothing runs or logs twice.
    assert main(args) == 0
    assert "resuming sweep 'smoke'" in capsys.readouterr().out
    again = check_sweep_runs(f"sqlite:///{store / 'mlflow.db'}", "smoke", "smoke", expected)
    for name, run in runs.items():
        assert again[name].info.run_id == run.info.run_id
        assert again[name].info.end_time == run.info.end_time
        assert history(store, run.info.run_id, "loss") == [5, 10, 15, 20, 25, 30]


def test_diverging_cell_fails_alone(local_ray, store, capsys, check_sweep_runs):
    # beta = 1e39 is finite in the config (float64) but inf in the float32 loss: NaN/Inf at step 1.
    # Retries are allowed: each one finds the divergence in the trial's run and fails again at once.
    args = sweep_args(store, "nan", "--families", "beta_vae", "--betas", "1,1e39", "--max-failures", "2",
                      report=True)
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "1 of 2 trial(s) failed" in out and "TrainingDiverged" in out
    page = store / "ray" / "nan" / "report" / "index.html"  # the finished trial's report
    assert out.strip().splitlines()[-2].startswith(f"Report: {page}") and page.is_file()
    bad = "beta_vae-dsprites-b1e+39-s0"
    runs = check_sweep_runs(f"sqlite:///{store / 'mlflow.db'}", "nan", "nan",
                            trials(families=["beta_vae"], betas=[1.0, 1e39]), failed={bad})
    assert runs[bad].data.tags["error"].startswith("TrainingDiverged: loss became")
    parent = client(store).search_runs([runs[bad].info.experiment_id], "tags.`provlae.role` = 'sweep'")[0]
    assert parent.info.status == "FAILED"


def test_killed_worker_resumes_into_the_same_run(local_ray, store, check_sweep_runs, paced):
    """SIGKILL the trial's worker once a mid-stage checkpoint is in: the retry restores it and ends with
    one run, every step once, and the numbers of an uninterrupted run."""
    long = {"steps_per_stage": "30", "checkpoint_every": "5"}  # a paced trial (tests/paced.py): stopped mid-stage
    extra = ["--plugin", paced.MODULE, "--families", paced.FAMILY, *[f"--set={k}={v}" for k, v in long.items()]]
    expected = trials({**long, "plugins": paced.MODULE}, families=[paced.FAMILY])
    killed: list[int] = []
    thread = threading.Thread(target=_kill_worker_after_step, args=(store, "fault", 10, killed), daemon=True)
    thread.start()
    assert main(sweep_args(store, "fault", *extra)) == 0
    thread.join(timeout=5)
    assert killed, "the worker was never killed"

    (name, cfg), = expected.items()
    run = check_sweep_runs(f"sqlite:///{store / 'mlflow.db'}", "fault", "fault", expected)[name]
    resumed = int(run.data.tags[RESUMED_TAG])
    assert 0 < resumed < cfg.total_steps and resumed % cfg.stage_steps != 0  # mid-stage
    assert history(store, run.info.run_id, "loss") == list(range(5, cfg.total_steps + 1, 5))

    reference = paced.reference(cfg)  # the same trial, uninterrupted
    for key in ("mig", "mig_sup", "factor_score", "recon_error", "loss"):
        assert run.data.metrics[key] == reference[key], key


def _kill_worker_after_step(store: Path, sweep: str, step: int, killed: list[int]) -> None:
    """Once the trial has logged ``step`` (so Tune holds a checkpoint before it), SIGKILL its worker."""
    from mlflow import MlflowClient

    mlflow = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        exp = mlflow.get_experiment_by_name(sweep)
        runs = mlflow.search_runs([exp.experiment_id], "tags.`provlae.role` = 'trial'") if exp else []
        if runs and max((m.step for m in mlflow.get_metric_history(runs[0].info.run_id, "loss")),
                        default=0) >= step:
            workers = [p for p in servers.descendants(os.getpid())
                       if servers.cmdline(p).startswith("ray::ImplicitFunc")]
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
                return
        time.sleep(0.1)


def test_killed_driver_resumes_without_rerunning_finished_trials(local_ray, store, check_sweep_runs):
    """SIGKILL the sweep's driver after its first trial finished; the same command finishes the rest."""
    families = ["beta_vae", "vlae"]
    cmd = [sys.executable, "sweeps/full_grid.py", *sweep_args(store, "driver"), "--families", ",".join(families),
           "--max-concurrent", "1", "--address", local_ray]
    folder = store / "ray" / "driver"
    with open(store / "driver-1.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            servers.wait_for(lambda: _terminated(folder), 240, "a finished trial in the saved sweep state",
                             proc=proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    done = _terminated(folder)
    lines = {d: _result_lines(folder / d) for d in done}

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming sweep 'driver'" in rerun.stdout
    for d, n in lines.items():  # Tune did not run the finished trials again
        assert _result_lines(folder / d) == n, d
    check_sweep_runs(f"sqlite:///{store / 'mlflow.db'}", "driver", "driver", trials(families=families))


def _terminated(folder: Path) -> list[str]:
    """Trial folders that Tune's saved experiment state records as TERMINATED."""
    states = sorted(folder.glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        data = json.loads(states[-1].read_text())
    except ValueError:  # being written
        return []
    trials = [json.loads(t[0]) for t in data["trial_data"]]
    return [t["custom_dirname"] for t in trials if t["status"] == "TERMINATED"]


def _result_lines(trial_dir: Path) -> int:
    return len((trial_dir / "result.json").read_text().splitlines())


def test_the_sweeps_local_ray_refuses_a_driver_without_the_token(local_ray, tmp_path):
    """The local Ray a sweep starts has token auth on: a driver without the token, or with a wrong one,
    cannot join it; the machine's token can."""
    probe = ("import ray, sys\n"
             "try:\n"
             f"    ray.init(address={local_ray!r}, log_to_driver=False)\n"
             "except Exception as e:\n"
             "    print('REFUSED', type(e).__name__, str(e)[:300]); sys.exit(3)\n"
             "print('JOINED', ray.cluster_resources()['CPU'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
                                                             "RAY_AUTH_MODE")}
    # a home of its own: no ~/.ray/auth_token; a refused driver gives up after 3 tries (Ray's default: 20)
    no_token = {**env, "HOME": str(tmp_path), "RAY_gcs_server_port_wait_time_s": "3"}
    for case in (no_token, {**no_token, "RAY_AUTH_MODE": "token"},
                 {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
        out = subprocess.run([sys.executable, "-c", probe], env=case, capture_output=True, text=True, timeout=120)
        said = out.stdout + out.stderr
        assert out.returncode == 3 and "REFUSED" in out.stdout, said[-2000:]
        assert "no authentication token was found" in said or "InvalidAuthToken" in said, said[-2000:]
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "RAY_AUTH_MODE": "token"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "JOINED 2.0" in out.stdout, out.stdout + out.stderr[-2000:]
