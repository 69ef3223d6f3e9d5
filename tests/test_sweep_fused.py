"""Fused sweeps (``full_grid.py --fuse K``) on an in-process local Ray, tracked in a sqlite MLflow store:
the same runs, params and metrics as the solo sweep of the same grid; a diverging member fails alone."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import smoke

from analysis import record
from sweeps import grid
from sweeps.cli import run_main
from sweeps.full_grid import main
from sweeps.tracking import TrackingContext
from sweeps.trainable import train_group

pytestmark = pytest.mark.slow
GRID = ["--families", "pro_vlae,teacher_student", "--betas", "1,4"]  # 4 trials, members differing in beta
# float64: the fused and solo numbers agree to 1e-7. Batches of 8, the tests' narrow network and metrics on 200
# of the 1,000 images: float64 convolutions take a CPU's slow reference kernels, and the comparison holds at
# any size.
FLOAT64 = ["--set", "dtype=float64", "--set", "batch_size=8", *smoke.quick_args()]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fused-sweeps")


def sweep_args(store: Path, name: str, *extra: str) -> list[str]:
    return ["--preset", "smoke", "--name", name, "--experiment", "fused",
            "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}", "--storage", str(store / "ray"),
            "--no-report", *extra]  # the report: its own tests (tests/test_report.py, the smoke sweep's)


def uri(store: Path) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


def expected(**overrides) -> dict:
    configs = grid.build_trials("smoke", families=["pro_vlae", "teacher_student"], betas=[1.0, 4.0],
                                seeds=[0], overrides={"device": "cpu", **overrides})
    return {c.run_name: c for c in configs}


def histories(run_id: str, store: Path) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri(store))
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
            if k not in record.TIMINGS}  # timings differ; the model's numbers do not


def test_group_trainable_pickles(local_ray):
    from ray import cloudpickle, tune

    assert pickle.loads(pickle.dumps(train_group)) is train_group
    ctx = TrackingContext("sqlite:////tmp/x.db", "1", "sweep", "parent")
    wrapped = tune.with_parameters(train_group, tracking=ctx, threads=1, kernels="batched")
    assert callable(cloudpickle.loads(cloudpickle.dumps(wrapped)))


def test_fused_sweep_records_what_the_solo_sweep_does(local_ray, store, capsys, check_sweep_runs):
    want = expected(**smoke.quick({"dtype": "float64", "batch_size": "8"}))
    assert main(sweep_args(store, "solo", *GRID, *FLOAT64)) == 0
    solo = check_sweep_runs(uri(store), "fused", "solo", want)
    fused_args = sweep_args(store, "fused2", *GRID, *FLOAT64, "--fuse", "2", "--fused-kernels", "batched")
    assert main(fused_args) == 0
    out = capsys.readouterr().out
    for name in want:  # the summary is per trial, not per group
        assert f"\n{name} " in out
    fused = check_sweep_runs(uri(store), "fused", "fused2", want)
    trial_ids = {r.data.tags["ray_trial_id"] for r in fused.values()}
    assert len(trial_ids) == 2  # two Tune trials: one group per family, two members each
    for name in want:
        a, b = histories(solo[name].info.run_id, store), histories(fused[name].info.run_id, store)
        assert a.keys() == b.keys(), name
        for key in a:
            assert [s for s, _ in a[key]] == [s for s, _ in b[key]], (name, key)  # every step once, alike
            assert [v for _, v in b[key]] == pytest.approx([v for _, v in a[key]], rel=1e-7, abs=1e-12), \
                (name, key)

    # The same command again: restored, nothing trained or logged twice.
    assert main(fused_args) == 0
    assert "resuming sweep 'fused2'" in capsys.readouterr().out
    again = check_sweep_runs(uri(store), "fused", "fused2", want)
    assert {n: r.info.end_time for n, r in again.items()} == {n: r.info.end_time for n, r in fused.items()}
    # ... and the folder refuses another grouping rather than mixing two
    assert run_main(main, sweep_args(store, "fused2", *GRID, *FLOAT64, "--fuse", "4")) == 2
    assert "was started with --fuse 2" in capsys.readouterr().err


def test_a_diverging_member_fails_alone(local_ray, store, capsys, check_sweep_runs):
    # beta = 1e39 is finite in the config (float64) but inf in the float32 loss: Inf at step 1.
    args = sweep_args(store, "fused-nan", "--families", "beta_vae", "--betas", "1,1e39", "--fuse", "2",
                      "--fused-kernels", "batched", *smoke.quick_args())
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "1 of 2 trial(s) failed" in out and "TrainingDiverged" in out
    bad = "beta_vae-dsprites-b1e+39-s0"
    want = {c.run_name: c for c in grid.build_trials("smoke", families=["beta_vae"], betas=[1.0, 1e39],
                                                     overrides=smoke.quick({"device": "cpu"}))}
    runs = check_sweep_runs(uri(store), "fused", "fused-nan", want, failed={bad})
    assert runs[bad].data.tags["error"].startswith("TrainingDiverged: loss became")
    assert runs["beta_vae-dsprites-b1-s0"].data.tags["ray_trial_id"] == runs[bad].data.tags["ray_trial_id"]


def test_bad_fuse_is_refused_before_anything_starts(store, capsys):
    assert run_main(main, sweep_args(store, "fused-bad", "--fuse", "0")) == 2
    assert capsys.readouterr().err.strip() == "error: --fuse must be auto or >= 1 (trials per fused group), got 0"
    assert not (store / "ray" / "fused-bad").exists()


def test_bfloat16_on_a_cpu_without_it_is_refused_before_anything_starts(store, capsys, monkeypatch):
    from provlae import device

    monkeypatch.setattr(device, "_cpu_has_bf16", lambda: False)
    args = sweep_args(store, "fused-bf16", "--fuse", "2", "--set", "dtype=bfloat16")
    assert run_main(main, args) == 2
    assert capsys.readouterr().err.strip().startswith("error: dtype bfloat16: this CPU has no bfloat16")
    assert not (store / "ray" / "fused-bf16").exists()  # refused before the sweep folder (and Ray, MLflow)
