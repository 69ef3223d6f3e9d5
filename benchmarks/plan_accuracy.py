"""How good a sweep's plan is: calibrate this machine, plan a small grid from the measurement, run the grid
through Ray Tune and MLflow, and compare the predicted wall time with the measured one.

The grid: pro-VLAE on procedural dSprites (a 4,000-image subset), --trials seeds (default 4), 3 stages of
--steps steps at batch 64, each stage end evaluated on 1,000 images; one CPU per trial, on a local Ray of
--cpus CPUs. Calibration (``provlae.calibrate``) measures the same family, dataset, batch size and thread
count. The sweep's wall time is the driver's, from the command to its exit (Ray's start, the trials' own
start-up and the MLflow record included: the plan leaves those out, which is part of what this measures).

    python benchmarks/plan_accuracy.py [--quick] [--trials N] [--steps S] [--cpus C]

--quick: 2 trials of 3 x 20 steps (the code path, not a useful ratio). Target: within ±25%.
Last line: {"name": "plan_accuracy", "predicted_s": ..., "measured_s": ..., "ratio": ..., ...}
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from provlae.calibrate import calibrate  # noqa: E402
from provlae.config import TrialConfig  # noqa: E402
from provlae.plan import Target, make_plan  # noqa: E402

BASE = dict(family="pro_vlae", dataset="dsprites", subset=4000, batch_size=64, eval_subset=1000,
            mi_samples=1000, factor_train_votes=500, factor_eval_votes=250, log_every=25, device="cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 trials of 3 x 20 steps")
    parser.add_argument("--trials", type=int, help="seeds in the grid (default 4; 2 with --quick)")
    parser.add_argument("--steps", type=int, help="steps per stage (default 150; 20 with --quick)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    args = parser.parse_args(argv)
    trials = args.trials or (2 if args.quick else 4)
    steps = args.steps or (20 if args.quick else 150)
    if trials < 1 or steps < 2 or args.cpus < 1:
        parser.error("--trials, --cpus must be >= 1 and --steps >= 2")
    overrides = {**BASE, "steps_per_stage": steps, "fade_in_steps": steps // 2}
    torch.set_num_threads(1)  # as a trial with one CPU runs
    base = TrialConfig.from_dict(overrides)
    with tempfile.TemporaryDirectory(prefix="provlae-plan-accuracy-") as tmp:
        table = calibrate(base, (1,), seconds=4.0, say=lambda line: print(f"calibrate: {line}", flush=True))
        configs = [base.with_overrides({"seed": s}) for s in range(trials)]
        plan = make_plan([[c] for c in configs], Target("cpu", args.cpus, 1.0), table)
        print("\n".join(plan.lines()), flush=True)
        from sweeps.full_grid import main as grid_main

        argv = ["--preset", "smoke", "--families", "pro_vlae", "--seeds", str(trials), "--name", "plan",
                "--experiment", "plan", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--storage", f"{tmp}/ray",
                "--no-report", *[f"--set={k}={v}" for k, v in overrides.items() if k not in ("family", "dataset")]]
        import ray

        start = time.perf_counter()
        from analysis.ray_cluster import init_ray

        init_ray(None, num_cpus=args.cpus)
        try:
            status = grid_main(argv)
        finally:
            ray.shutdown()
        measured = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"error: the sweep exited with {status}")
    ratio = measured / plan.wall_s
    print(f"predicted {plan.wall_s:.0f} s, measured {measured:.0f} s: measured / predicted = {ratio:.2f}")
    print(json.dumps({"name": "plan_accuracy", "trials": trials, "steps_per_stage": steps, "cpus": args.cpus,
                      "img_s_measured": round(table[0].train_img_s, 1), "eval_s_measured": round(table[0].eval_s, 2),
                      "predicted_s": round(plan.wall_s, 1), "measured_s": round(measured, 1),
                      "ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
