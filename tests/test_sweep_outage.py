"""The tracking server away under a running sweep, reproduced against a real ``mlflow server`` on 127.0.0.1
that is stopped and started again (and a local Ray): away for longer than ``--tracking-patience``, the
trial fails with a clear error, the summary prints, the rerun resumes into the same run; away for 20 s,
the sweep waits it out."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import servers
from faults import (
    ROOT,
    assert_same_as_uninterrupted,
    logged_step,
    long_args,
    reference_run,
    sweep_cmd,
    sweep_runs,
    the_trial,
)

pytestmark = pytest.mark.slow
OUTAGE = 20  # seconds the tracking server is away while a trial waits for it: four of its 5-second retries


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outage")


def test_the_tracking_server_away(local_ray, store, check_sweep_runs, tmp_path):
    """Away for longer than --tracking-patience: the trial fails with that error and the summary prints;
    the rerun resumes it into the same run, and there the server is away for OUTAGE seconds, which it waits out."""
    folder = tmp_path / "mlflow"
    port = servers.free_port()
    uri = f"http://127.0.0.1:{port}"
    name = "outage"
    cmd = sweep_cmd(store, name, *long_args(steps_per_stage=25), "--address", local_ray, "--max-failures", "0",
                    uri=uri)
    cfg = the_trial(steps_per_stage=25)
    with servers.mlflow_server(folder, port=port):
        with open(store / f"{name}-1.log", "w") as log:
            first = subprocess.Popen([*cmd, "--tracking-patience", "8"], cwd=ROOT, stdout=log,
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
    assert f"tracking server {uri} was unreachable for more than 8 s (--tracking-patience)" in said, said[-3000:]
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
    reference = reference_run(cfg)
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
