"""What the fault tests of the sweeps share (tests/test_sweep_faults.py, tests/test_sweep_outage.py): a sweep
command on a local Ray and a store, the one long trial they stop, its runs and the uninterrupted reference."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import smoke

from sweeps import grid

ROOT = Path(__file__).resolve().parents[1]
# long enough to be stopped mid-stage: the preset's width
LONG = smoke.quick({"steps_per_stage": 60, "checkpoint_every": 10, **smoke.WIDE})


def sweep_cmd(store: Path, name: str, *extra: str, uri: str | None = None) -> list[str]:
    return [sys.executable, "sweeps/full_grid.py", "--preset", "smoke", "--name", name, "--experiment", name,
            "--tracking-uri", uri or f"sqlite:///{store / 'mlflow.db'}", "--storage", str(store / "ray"), *extra]


def long_args(**overrides) -> list[str]:
    return ["--families", "pro_vlae", *[f"--set={k}={v}" for k, v in {**LONG, **overrides}.items()]]


def the_trial(**overrides):
    (cfg,) = grid.build_trials("smoke", families=["pro_vlae"],
                               overrides={"device": "cpu", **{k: str(v) for k, v in {**LONG, **overrides}.items()}})
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


def reference_run(cfg) -> tuple[dict, list[tuple[int, float]]]:
    """The trial trained in this process, uninterrupted: its final metrics and its loss history."""
    import torch

    from provlae.train import Trainer

    losses = []

    def on_event(event):  # the first value at a step is the one a run keeps
        if "loss" in event.metrics and (not losses or event.step > losses[-1][0]):
            losses.append((event.step, float(event.metrics["loss"])))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trial
    try:
        final = Trainer(cfg).run(on_event)
    finally:
        torch.set_num_threads(threads)
    return final, losses


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
    (folder,) = [p for p in (store / "ray" / sweep).iterdir() if p.is_dir() and p.name.startswith("pro_vlae")]
    return folder
