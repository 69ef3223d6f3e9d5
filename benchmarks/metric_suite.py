"""The evaluation stage's cost: each metric of the suite on one stored representation, and
``analysis evaluate`` over N runs on two Ray workers against one.

Part 1 scores one representation as the evaluation stage reads it (``provlae.representation``, 20,000
stored points of the dSprites grid 3x6x40x32x32, 6 latents imitating a trained encoder: four encode one
factor each, one mixes two, one is inactive) with disentanglement_lib's defaults: 10,000 train and 5,000
test points. Each metric's seconds (one core). DCI fits one GradientBoostingClassifier per factor with
sklearn's defaults, as disentanglement_lib does: by far the slowest.

Part 2 builds a sqlite MLflow store with N trial runs (cells of four seeds) that each store such a
representation, then times ``analysis.evaluate.evaluate`` (force: every metric again) on a local Ray of one
CPU and of two; the ratio is the speed-up (the driver reads and logs, the tasks compute).

    python benchmarks/metric_suite.py [--quick] [--runs N] [--metrics LIST] [--skip-dci]

--quick: 1,000/500 points, 4 runs, DCI left out (about a minute). Part 2's metrics default to every one but
DCI (``--metrics`` to choose).
Last line: {"name": "metric_suite", "seconds": {metric: s}, "evaluate_1_worker_s": ..., "evaluate_2_workers_s":
..., "ratio": ..., ...}
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provlae import representation  # noqa: E402
from provlae.metrics import scoring  # noqa: E402
from provlae.metrics.names import SUITE, UDR  # noqa: E402

SIZES = (3, 6, 40, 32, 32)  # dSprites: shape, scale, orientation, x, y
STORED = 20_000


def synthetic(seed: int, n: int = STORED) -> representation.Representation:
    """``n`` points of the dSprites grid (the same for every seed) and a 6-latent code of them that
    imitates a trained encoder; ``seed`` changes the encoder (which latent holds which factor, the noise)."""
    grid = np.random.default_rng(0)
    factors = np.stack([grid.integers(s, size=n) for s in SIZES], 1)
    rng = np.random.default_rng(seed + 1)
    scaled = factors / (np.array(SIZES) - 1) * 2 - 1
    latents = [scaled[:, 1], np.sin(scaled[:, 2] * np.pi), scaled[:, 3], scaled[:, 4],
               0.5 * (scaled[:, 3] + scaled[:, 4]), np.zeros(n)]
    std = np.array([0.05, 0.1, 0.05, 0.05, 0.2, 1.0]) * rng.uniform(0.8, 1.2, 6)
    mu = np.stack(latents, 1)[:, rng.permutation(6)] + rng.normal(size=(n, 6)) * std * 0.3
    logvar = np.broadcast_to(2 * np.log(std), mu.shape).astype(np.float32)
    mu = mu.astype(np.float32)
    return representation.Representation(
        stage=0, step=1000, mu=mu, logvar=np.ascontiguousarray(logvar), index=np.arange(n) * 7,
        factors=factors, kl=representation.kl_per_latent(mu, logvar), in_use=np.ones(6, bool),
        level=np.repeat([1, 2, 3], 2))


def suite_seconds(train: int, test: int, metrics: tuple[str, ...], folder: Path) -> dict:
    """Each metric's seconds on one core (BLAS and OpenMP pools at one thread, as in a Ray task)."""
    from threadpoolctl import threadpool_limits

    rep = representation.read(representation.write(folder / "stage0.npz", synthetic(0)))
    with threadpool_limits(1):
        out = scoring.score(rep.codes, rep.factors, metrics, train=train, test=test)
    for name in metrics:
        values = ", ".join(f"{k} {v:.3f}" for k, v in out["values"].items() if k in SUITE[name])
        print(f"  {name:<11} {out['seconds'][name]:8.2f} s   {values}", flush=True)
    seeds = [synthetic(s) for s in range(4)]
    start = time.perf_counter()
    with threadpool_limits(1):
        result = scoring.udr_scores([r.codes for r in seeds], [r.kl for r in seeds], [r.index for r in seeds])
    udr_s = time.perf_counter() - start
    print(f"  {'udr':<11} {udr_s:8.2f} s   4 seeds on {result['points']} images: "
          f"{', '.join(f'{v:.3f}' for v in result['model_scores'])}", flush=True)
    return {**out["seconds"], UDR: udr_s}


def build_store(folder: Path, runs: int) -> str:
    from mlflow import MlflowClient

    from analysis import record

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("bench", artifact_location=str(folder / "artifacts"))
    parent = client.create_run(exp, run_name="bench", tags={record.ROLE_TAG: record.SWEEP_ROLE,
                                                            record.SWEEP_TAG: "bench"}).info.run_id
    for i in range(runs):
        beta, seed = 1.0 + i // 4, i % 4
        name = f"pro_vlae-dsprites-b{beta:g}-s{seed}"
        run = client.create_run(exp, run_name=name, tags={
            record.ROLE_TAG: record.TRIAL_ROLE, record.SWEEP_TAG: "bench", record.PARENT_TAG: parent,
            record.KEY_TAG: name, "family": "pro_vlae", "dataset": "dsprites"}).info.run_id
        for key, value in (("family", "pro_vlae"), ("dataset", "dsprites"), ("beta", beta), ("seed", seed)):
            client.log_param(run, key, str(value))
        path = representation.write(folder / "reps" / name / "stage0.npz", synthetic(i))
        client.log_artifact(run, str(path), record.REPRESENTATION_DIR)
        client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return uri


def evaluate_seconds(uri: str, metrics: tuple[str, ...], cpus: int) -> float:
    import ray

    from analysis.evaluate import evaluate
    from analysis.ray_cluster import init_ray

    init_ray(None, num_cpus=cpus)
    try:
        start = time.perf_counter()
        outcome = evaluate("bench", uri, metrics=metrics, force=True, say=lambda line: None)
        elapsed = time.perf_counter() - start
    finally:
        ray.shutdown()
    if outcome.failures:
        raise SystemExit(f"error: evaluation failed: {outcome.failures[0]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000/500 points, 4 runs, no DCI")
    parser.add_argument("--runs", type=int, help="runs evaluated in part 2 (default 16; 4 with --quick)")
    parser.add_argument("--metrics", help="part 2's metrics (default: all but dci)")
    parser.add_argument("--skip-dci", action="store_true", help="leave DCI out of part 1")
    args = parser.parse_args(argv)
    train, test = (1_000, 500) if args.quick else (10_000, 5_000)
    runs = args.runs or (4 if args.quick else 16)
    part1 = tuple(m for m in SUITE if not (m == "dci" and (args.quick or args.skip_dci)))
    part2 = scoring_names(args.metrics) if args.metrics else tuple(m for m in (*SUITE, UDR) if m != "dci")
    if runs < 2:
        parser.error("--runs must be at least 2")
    import torch  # noqa: F401  (loaded before the clock starts: the stored format does not need it)

    with tempfile.TemporaryDirectory(prefix="provlae-metric-suite-") as tmp:
        folder = Path(tmp)
        print(f"Part 1: the suite on one stored representation ({STORED} points stored, {train}/{test} "
              f"train/test, dSprites factors {'x'.join(map(str, SIZES))}, 6 latents); one core", flush=True)
        seconds = suite_seconds(train, test, part1, folder)
        uri = build_store(folder, runs)
        print(f"Part 2: analysis evaluate over {runs} runs ({', '.join(part2)}; every run again)", flush=True)
        one = evaluate_seconds(uri, part2, 1)
        print(f"  1 Ray worker : {one:7.1f} s", flush=True)
        two = evaluate_seconds(uri, part2, 2)
        print(f"  2 Ray workers: {two:7.1f} s   speed-up {one / two:.2f}x", flush=True)
    print(json.dumps({"name": "metric_suite", "train_points": train, "test_points": test,
                      "seconds": {k: round(v, 3) for k, v in seconds.items()},
                      "runs": runs, "evaluate_metrics": list(part2), "evaluate_1_worker_s": round(one, 2),
                      "evaluate_2_workers_s": round(two, 2), "ratio": round(one / two, 3)}))
    return 0


def scoring_names(text: str) -> tuple[str, ...]:
    from provlae.metrics.names import check_names

    try:
        return check_names(text)
    except ValueError as e:
        raise SystemExit(f"error: --metrics: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
