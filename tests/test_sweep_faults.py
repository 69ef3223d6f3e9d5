"""The sweep's MLflow record under the faults users hit, each reproduced against the real components
(a local Ray; a sqlite store, or a real ``mlflow server`` on 127.0.0.1 that is stopped and started again):

- a second driver on a live sweep is refused; SIGTERM on the driver ends its runs KILLED; a damaged
  newest checkpoint and a damaged newest Tune state fall back to the ones before; the rerun finishes
  every trial in its one run, every step once, the numbers of an uninterrupted run;
- the tracking server away for longer than ``--tracking-patience``: the trial fails with a clear error,
  the summary prints, the rerun resumes into the same run; away for 12 s: the sweep waits it out;
- ``--max-failures -1`` with an error that repeats on every attempt ends the trial;
- a sweep folder resumes only as it was started (store, kind) and a damaged manifest is one error.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import servers
import smoke
from commands import run_command

from provlae.errors import ConfigError
from provlae.train import read_checkpoint
from sweeps import grid
from sweeps.tracking import RESUMED_TAG

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# long enough to be stopped mid-stage: the paced family's trials (tests/paced.py) on the narrow network
LONG = smoke.quick({"steps_per_stage": 60, "checkpoint_every": 10})
PACED = ["--plugin", "tests.paced", "--families", "paced"]
OUTAGE = 12  # seconds the tracking server is away while a trial waits for it: two of its 5-second retries


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


def sweep_cmd(store: Path, name: str, *extra: str, uri: str | None = None) -> list[str]:
    return [sys.executable, "sweeps/full_grid.py", "--preset", "smoke", "--name", name, "--experiment", name,
            "--tracking-uri", uri or f"sqlite:///{store / 'mlflow.db'}", "--storage", str(store / "ray"),
            "--no-report", *extra]  # the report: its own tests (tests/test_report.py, the smoke sweep's)


def long_args(**overrides) -> list[str]:
    return [*PACED, *[f"--set={k}={v}" for k, v in {**LONG, **overrides}.items()]]


def the_trial(paced, **overrides):
    """The config of the one paced trial that ``long_args(**overrides)`` sweeps."""
    (cfg,) = grid.build_trials("smoke", families=[paced.FAMILY], overrides={
        "device": "cpu", "plugins": paced.MODULE, **{k: str(v) for k, v in {**LONG, **overrides}.items()}})
    return cfg


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def sweep_runs(uri: str, sweep: str) -> list:
    mlflow = client(uri)
    exp = mlflow.get_experiment_by_name(sweep)
    return mlflow.search_runs([exp.experiment_id], f"tags.sweep = '{sweep}'") if exp else []


def logged_step(uri: str, sweep: str) -> int:
    """The highest ``loss`` step the sweep's trial run holds (0 before it exists or is reachable)."""
    try:
        trials = [r for r in sweep_runs(uri, sweep) if r.data.tags.get("provlae.role") == "trial"]
        return max((m.step for r in trials for m in client(uri).get_metric_history(r.info.run_id, "loss")), default=0)
    except Exception:  # noqa: BLE001 - the server is away or the store is being written
        return 0


def reference_run(paced, cfg) -> tuple[dict, list[tuple[int, float]]]:
    """The trial trained in this process, uninterrupted (and unpaced): its final metrics and its loss
    history."""
    losses = []

    def on_event(event):  # the first value at a step is the one a run keeps
        if "loss" in event.metrics and (not losses or event.step > losses[-1][0]):
            losses.append((event.step, float(event.metrics["loss"])))

    return paced.reference(cfg, on_event), losses


def assert_same_as_uninterrupted(uri: str, run, cfg, reference) -> None:
    final, losses = reference
    history = sorted((m.step, m.value) for m in client(uri).get_metric_history(run.info.run_id, "loss"))
    assert history == losses  # every step once, none missing, the same values
    for key in ("mig", "mig_sup", "factor_score", "recon_error"):
        assert run.data.metrics[key] == final[key], key


def one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    return lines[0]


def trial_folder(store: Path, sweep: str) -> Path:
    (folder,) = [p for p in (store / "ray" / sweep).iterdir() if p.is_dir() and p.name.startswith("paced")]
    return folder


# ----------------------------------------------------------------------------- drivers and damage


def test_a_second_driver_is_refused_and_a_stopped_sweep_resumes_past_damage(local_ray, store, check_sweep_runs,
                                                                            paced):
    name, uri = "drivers", f"sqlite:///{store / 'mlflow.db'}"
    cmd = sweep_cmd(store, name, *long_args(), "--address", local_ray)
    cfg = the_trial(paced)
    with open(store / f"{name}-1.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            servers.wait_for(lambda: logged_step(uri, name) >= 30, 300, "the trial at step 30", proc=first)
            before = sorted(r.info.run_id for r in sweep_runs(uri, name))
            second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
            line = one_error_line(second)
            assert line.startswith(f"error: sweep '{name}' is already running: its driver (pid {first.pid} on "), line
            assert str(store / "ray" / name) in line
            assert sorted(r.info.run_id for r in sweep_runs(uri, name)) == before  # nothing created
            assert first.poll() is None  # and the first driver goes on

            first.send_signal(signal.SIGTERM)  # `ray job stop`, a scheduler's kill
            code = first.wait(timeout=180)
        finally:
            if first.poll() is None:
                servers.kill_session(first)
                first.wait()
    said = (store / f"{name}-1.log").read_text()
    assert code == 1, said[-3000:]
    assert "did not finish: rerun the same command" in said and "Traceback" not in said, said[-3000:]
    runs = sweep_runs(uri, name)
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]  # the parent and the trial's run
    assert not (store / "ray" / name / "provlae_lease.json").exists()  # given up on the way out

    # The newest checkpoint is truncated (a full disk): the rerun resumes from the one kept before it.
    trial = trial_folder(store, name)
    kept = sorted(trial.glob("checkpoint_*"))[-2:]  # Tune keeps two (a third may await deletion)
    steps = [read_checkpoint(k / "trainer.pt", "cpu")["step"] for k in kept]
    newest = kept[-1] / "trainer.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming sweep '{name}'" in rerun.stdout
    run = check_sweep_runs(uri, name, name, {cfg.run_name: cfg})[cfg.run_name]
    assert int(run.data.tags[RESUMED_TAG]) == steps[0] < steps[1]  # from the checkpoint before the damaged one
    reference = reference_run(paced, cfg)
    assert_same_as_uninterrupted(uri, run, cfg, reference)

    # The newest Tune state is truncated: the grid starts its Tuner again in the folder, and the trial,
    # finished in MLflow, is not trained again.
    states = sorted((store / "ray" / name).glob("experiment_state-*.json"))
    states[-1].write_text(states[-1].read_text()[:100])
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"note: Tune's state {states[-1].name} in {store / 'ray' / name} is damaged" in again.stdout
    assert (states[-1].parent / f"{states[-1].name}.damaged").is_file()
    run = check_sweep_runs(uri, name, name, {cfg.run_name: cfg})[cfg.run_name]
    assert_same_as_uninterrupted(uri, run, cfg, reference)
    assert run.data.tags[RESUMED_TAG] == str(steps[0])  # no new attempt trained it


def test_a_driver_killed_outright_leaves_runs_that_the_rerun_sets_right(local_ray, store, check_sweep_runs, paced):
    """SIGKILL (no chance to record anything): the rerun takes over its lease at once (same machine, the
    process is gone), marks what it left RUNNING as KILLED, and finishes it."""
    name, uri = "sigkill", f"sqlite:///{store / 'mlflow.db'}"
    cmd = sweep_cmd(store, name, *long_args(steps_per_stage=30), "--address", local_ray)
    cfg = the_trial(paced, steps_per_stage=30)
    with open(store / f"{name}-1.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            servers.wait_for(lambda: logged_step(uri, name) >= 20, 300, "the trial at step 20", proc=first)
        finally:
            servers.kill_session(first)
            first.wait()
    assert sorted(r.info.status for r in sweep_runs(uri, name)) == ["RUNNING", "RUNNING"]
    assert json.loads((store / "ray" / name / "provlae_lease.json").read_text())["pid"] == first.pid

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "2 run(s) of sweep 'sigkill' left RUNNING by a driver that died: marked KILLED" in rerun.stdout
    run = check_sweep_runs(uri, name, name, {cfg.run_name: cfg})[cfg.run_name]
    steps = [m.step for m in client(uri).get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(cfg.log_every, cfg.total_steps + 1, cfg.log_every))


# ------------------------------------------------------------------------------- the tracking server


def test_the_tracking_server_away(local_ray, store, check_sweep_runs, tmp_path, paced):
    """Away for longer than --tracking-patience: the trial fails with that error and the summary prints;
    the rerun resumes it into the same run, and there the server is away for OUTAGE seconds, which it waits out."""
    folder = tmp_path / "mlflow"
    port = servers.free_port()
    uri = f"http://127.0.0.1:{port}"
    name = "outage"
    cmd = sweep_cmd(store, name, *long_args(steps_per_stage=25), "--address", local_ray, "--max-failures", "0",
                    uri=uri)
    cfg = the_trial(paced, steps_per_stage=25)
    with servers.mlflow_server(folder, port=port):
        with open(store / f"{name}-1.log", "w") as log:
            first = subprocess.Popen([*cmd, "--tracking-patience", "4"], cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            try:
                servers.wait_for(lambda: logged_step(uri, name) >= 20, 300, "the trial at step 20", proc=first)
                (run_id,) = [r.info.run_id for r in sweep_runs(uri, name) if r.data.tags["provlae.role"] == "trial"]
            except BaseException:
                servers.kill_session(first)
                raise
    try:  # the server is away until the driver has ended
        code = first.wait(timeout=240)
    finally:
        if first.poll() is None:
            servers.kill_session(first)
    said = (store / f"{name}-1.log").read_text()
    assert code == 1, said[-3000:]
    assert f"tracking server {uri} was unreachable for more than 4 s (--tracking-patience)" in said, said[-3000:]
    assert "The sweep's end could not be recorded in MLflow" in said
    assert "Traceback" not in said.split("trial(s) failed:")[-1], said[-3000:]  # the summary itself

    with servers.mlflow_server(folder, port=port):
        rerun = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        try:
            at = logged_step(uri, name)
            servers.wait_for(lambda: logged_step(uri, name) > at, 300, "the resumed trial logging", proc=rerun)
        except BaseException:
            servers.kill_session(rerun)
            raise
    away = time.monotonic()  # away mid-stage; meanwhile, the uninterrupted trial here
    reference = reference_run(paced, cfg)
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - away)))
    with servers.mlflow_server(folder, port=port):
        try:
            out, _ = rerun.communicate(timeout=300)
        finally:
            if rerun.poll() is None:
                servers.kill_session(rerun)
        assert rerun.returncode == 0, out[-3000:]
        run = check_sweep_runs(uri, name, name, {cfg.run_name: cfg})[cfg.run_name]
        assert run.info.run_id == run_id  # the same run, resumed
        assert_same_as_uninterrupted(uri, run, cfg, reference)


# -------------------------------------------------------------------------------------- retries


FAILING = '''
from provlae.models.families import VLAE, register


@register("always_fails")
class AlwaysFails(VLAE):
    def loss(self, model, x, stage, t, *args, **kwargs):
        if t >= 3:
            raise RuntimeError("always_fails: this family breaks at step 3")
        return super().loss(model, x, stage, t, *args, **kwargs)
'''


def test_an_error_that_repeats_ends_the_trial_even_without_a_retry_limit(local_ray, store, tmp_path):
    (tmp_path / "always_fails.py").write_text(FAILING)
    name, uri = "repeats", f"sqlite:///{store / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    cmd = sweep_cmd(store, name, "--plugin", "always_fails", "--families", "always_fails", "--max-failures", "-1",
                    "--address", local_ray)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 of 1 trial(s) failed:" in out.stdout
    assert "RuntimeError: always_fails: this family breaks at step 3" in out.stdout
    errors = (next(p for p in (store / "ray" / name).iterdir() if p.name.startswith("always_fails")) / "error.txt")
    assert errors.read_text().count("Failure # ") == 3  # two the same, then the last attempt
    (run,) = [r for r in sweep_runs(uri, name) if r.data.tags["provlae.role"] == "trial"]
    assert run.info.status == "FAILED" and "breaks at step 3" in run.data.tags["error"]


# --------------------------------------------------------------------------------- the sweep folder


def test_a_sweep_folder_resumes_only_as_it_was_started(tmp_path, provlae_home, capsys, monkeypatch):
    """Another experiment or tracking URI, a search under a grid's name and the reverse, a damaged
    manifest, a --storage that cannot be written: one error line each, before Ray, nothing created (each
    command run in this process: tests/commands.py)."""
    from sweeps.launch import check_manifest

    storage, env = tmp_path / "ray", {"PROVLAE_HOME": str(provlae_home)}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    configs = grid.build_trials("smoke", overrides={"device": "cpu"})
    check_manifest(str(storage / "s"), configs, 1, uri, "first")  # as the sweep wrote it

    def run(*args: str, command: str = "full_grid") -> str:
        return one_error_line(run_command(command, *args, capsys=capsys, monkeypatch=monkeypatch, env=env))

    grid_args = ["--preset", "smoke", "--name", "s", "--storage", str(storage)]
    line = run(*grid_args, "--experiment", "other", "--tracking-uri", uri)
    assert f"started in MLflow experiment 'first' at {uri}, not experiment 'other' at {uri}" in line
    other = f"sqlite:///{tmp_path / 'other.db'}"
    line = run(*grid_args, "--experiment", "first", "--tracking-uri", other)
    assert f"'first' at {uri}, not experiment 'first' at {other}" in line
    line = run("--family", "pro_vlae", "--dataset", "dsprites", "--trials", "2", "--preset", "smoke", "--name", "s",
               "--storage", str(storage), "--experiment", "first", "--tracking-uri", uri,
               command="optuna_search")
    assert "holds a grid sweep (sweeps/full_grid.py), not an Optuna search" in line

    (storage / "q").mkdir()
    (storage / "q" / "provlae_search.json").write_text("{}")
    line = run("--preset", "smoke", "--name", "q", "--storage", str(storage), "--tracking-uri", uri)
    assert "holds an Optuna search (sweeps/optuna_search.py), not a grid sweep" in line

    manifest = storage / "s" / "provlae_sweep.json"
    manifest.write_text(manifest.read_text()[:40])  # half-written by an older version
    line = run(*grid_args, "--experiment", "first", "--tracking-uri", uri)
    assert "provlae_sweep.json is damaged" in line

    from sweeps.sweep_folder import check_tune_state

    (storage / "q" / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_da')
    with pytest.raises(ConfigError, match="the search cannot be resumed"):
        check_tune_state(str(storage / "q"), restartable=False)
    assert check_tune_state(str(storage / "q"), restartable=True)  # a grid starts its Tuner again
    assert not list((storage / "q").glob("experiment_state-*.json"))

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    line = run("--preset", "smoke", "--name", "b", "--storage", str(blocked / "ray"), "--tracking-uri", uri)
    assert f"cannot write to --storage {blocked / 'ray' / 'b'}" in line

    assert sorted(p.name for p in storage.iterdir()) == ["q", "s"]
    assert sorted(p.name for p in (storage / "s").iterdir()) == ["provlae_sweep.json"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "other.db").exists()  # no store, no run
