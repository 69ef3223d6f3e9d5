"""Sweep overhead: K smoke trials through Ray Tune + MLflow vs the same K trials run in-process.

Both sides do the same work per trial (build the trainer, train, evaluate, write the figures) on one thread,
one trial at a time. The Tune side is the real sweep path (``sweeps.launch.run_sweep``: a local Ray
started here, Tuner, checkpoints, the MLflow sqlite store, one run per trial), so its wall time includes
Ray's start-up, worker processes and their imports.

    python benchmarks/sweep_overhead.py [--quick] [--trials K]

Prints the figures, then one JSON line last:
{"name": "sweep_overhead", "overhead_s_per_trial": ..., "tune_s": ..., "inprocess_s": ..., "trials": K}
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_S = 3.0  # per trial


QUICK = {"steps_per_stage": 2, "eval_subset": 200, "mi_samples": 100, "factor_train_votes": 50,
         "factor_eval_votes": 25}  # lighter smoke trials: the overhead does not depend on them


def trial_configs(k: int, quick: bool):
    from sweeps import grid

    overrides = {"device": "cpu", **(QUICK if quick else {})}
    configs = grid.build_trials("smoke", seeds=list(range((k + 3) // 4)), overrides=overrides)
    return sorted(configs, key=lambda c: c.seed)[:k]  # each family in turn


def warm_up(cfg) -> None:
    """Generate the cached dataset and import the trainer outside both timings."""
    from provlae.train import Trainer

    Trainer(cfg)


def run_inprocess(configs) -> float:
    import torch

    from provlae.train import Trainer

    torch.set_num_threads(1)
    start = time.perf_counter()
    for cfg in configs:
        trainer = Trainer(cfg)
        trainer.run()
        with tempfile.TemporaryDirectory() as folder:
            trainer.write_figures(folder)
    return time.perf_counter() - start


def run_tune(configs, work: Path) -> tuple[float, float]:
    """Seconds for the whole sweep (ray.init included) and for ray.init alone."""
    import ray

    from sweeps import tracking
    from sweeps.cli import SweepOptions
    from sweeps.launch import REPO_ROOT, run_sweep

    uri = f"sqlite:///{work / 'mlflow.db'}"
    tracking.open_experiment(tracking.client(uri), "overhead")  # a store's tables are made once, not per sweep
    options = SweepOptions(name="overhead", experiment="overhead", tracking_uri=uri, storage=str(work / "ray"),
                           max_failures=0, max_concurrent=1, report=False)  # Tune + MLflow alone
    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    ray_init_s = time.perf_counter() - start
    with open(work / "sweep.log", "w") as log, contextlib.redirect_stdout(log):
        status = run_sweep(configs, options, {"benchmark": "sweep_overhead"})
    elapsed = time.perf_counter() - start
    ray.shutdown()
    if status != 0:
        raise SystemExit(f"the sweep failed (status {status}); see {work / 'sweep.log'}")
    return elapsed, ray_init_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 lighter smoke trials (under a minute)")
    parser.add_argument("--trials", type=int, help="K (default 8; 6 with --quick)")
    opts = parser.parse_args()
    k = opts.trials or (6 if opts.quick else 8)
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        work = Path(tmp)
        os.environ["PROVLAE_HOME"] = str(work / "home")  # the Ray workers inherit it
        configs = trial_configs(k, opts.quick)
        warm_up(configs[0])
        inprocess_s = run_inprocess(configs)
        tune_s, ray_init_s = run_tune(configs, work)
    overhead = (tune_s - inprocess_s) / k
    print(f"trials: {k} smoke trials ({configs[0].steps_per_stage} steps per stage), one at a time, 1 thread each")
    print(f"in-process (Trainer.run + figures):    {inprocess_s:7.1f} s")
    print(f"Ray Tune + MLflow (ray.init included): {tune_s:7.1f} s (ray.init {ray_init_s:.1f} s)")
    print(f"overhead per trial: {overhead:.2f} s (target <= {TARGET_S:.0f} s); without ray.init "
          f"{(tune_s - ray_init_s - inprocess_s) / k:.2f} s")
    print(json.dumps({"name": "sweep_overhead", "overhead_s_per_trial": round(overhead, 3),
                      "tune_s": round(tune_s, 2), "inprocess_s": round(inprocess_s, 2), "trials": k}))


if __name__ == "__main__":
    main()
