"""MIG + MIG-sup: provlae.metrics.mig_scores vs a plain chunked reference, on the same synthetic code.

The code imitates a trained encoder on a 4-factor grid with 6 latents: four latents each encode one
factor (posterior std log-uniform in [0.03, 0.15]), one mixes two factors (std 0.2), one is inactive
(mean ~0, log-variance ~0). Both sides get the same z and the same sample points, so their MI matrices
must agree to float precision; the reference (benchmarks/_reference_mig.py) evaluates the same estimator
the way Chen et al.'s code does: full float32 log-density matrices and logsumexp, chunk by chunk,
marginal then every factor slice, on the same device. Timings are the best of a few runs; on a shared
machine compare runs made side by side, or use --threads 1 for a per-core figure that contention on
the other cores disturbs least.

Without --quick it also times mig_scores alone on a dSprites-size code (737,280 points = the
3x6x40x32x32 grid, 6 latents, S = 10,000 sample points, shape excluded so 4 factors are used) and
extrapolates the reference from its measured ns per (sample point x point x latent) of work.

    python benchmarks/metrics_speed.py [--quick] [--device cpu|cuda] [--threads N]
Last line: {"name": "metrics_speed", "ours_s": ..., "reference_s": ..., "ratio": ..., "max_abs_diff": ...}
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference_mig import reference_mig

from provlae.metrics import mig_scores
from provlae.metrics._inputs import draw_z, sample_points

QUICK_GRID = (4, 10, 32, 32)  # 40,960 points
QUICK_SAMPLES = 5000
DSPRITES_GRID = (3, 6, 40, 32, 32)  # 737,280 points; factor 0 (shape) excluded


def synthetic_code(sizes: tuple[int, ...], used: list[int], seed: int = 0):
    """(mu, logvar, factors) on the full grid `sizes`: latents 0-3 encode factors used[0..3], latent 4
    mixes used[0] and used[1], latent 5 is inactive."""
    rng = np.random.default_rng(seed)
    factors = np.stack(np.unravel_index(np.arange(int(np.prod(sizes))), sizes), 1).astype(np.int64)
    n = len(factors)
    std_value = (factors / (np.asarray(sizes) - 1) - 0.5) * 3.4  # each factor spread over [-1.7, 1.7]
    mu, sigma = np.empty((n, 6)), np.empty((n, 6))
    for j, k in enumerate(used[:4]):
        mu[:, j] = std_value[:, k] + 0.05 * rng.standard_normal(n)
        sigma[:, j] = np.exp(rng.uniform(np.log(0.03), np.log(0.15), n))
    mu[:, 4] = 0.7 * (std_value[:, used[0]] + std_value[:, used[1]]) + 0.05 * rng.standard_normal(n)
    sigma[:, 4] = 0.2
    mu[:, 5] = 0.01 * rng.standard_normal(n)
    sigma[:, 5] = np.exp(0.5 * 0.02 * rng.standard_normal(n))
    return mu.astype(np.float32), (2 * np.log(sigma)).astype(np.float32), factors


def work(n: int, samples: int, sizes, used, latents: int = 6) -> float:
    """Log-density evaluations of the estimator: (1 + sum_k 1/|v_k|) S N per latent."""
    return latents * samples * n * (1 + sum(1 / sizes[k] for k in used))


def compare(device: str) -> dict:
    sizes, used = QUICK_GRID, [0, 1, 2, 3]
    mu, logvar, factors = synthetic_code(sizes, used)
    z = draw_z(mu.astype(np.float64), logvar.astype(np.float64), seed=0)
    idx = sample_points(len(mu), QUICK_SAMPLES, seed=0)
    ours_s, ours_cpu, ours = _best(lambda: mig_scores(mu, logvar, factors, sizes, z=z, samples=QUICK_SAMPLES,
                                                      seed=0, device=device), repeats=3)
    ref_s, ref_cpu, ref = _best(lambda: reference_mig(z, mu, logvar, factors, sizes, idx, used, device),
                                repeats=1)
    diff = max(np.nanmax(np.abs(ours["mi_normalized"] - ref["mi_normalized"])),
               abs(ours["mig"] - ref["mig"]), abs(ours["mig_sup"] - ref["mig_sup"]))
    evals = work(len(mu), len(idx), sizes, used)
    print(f"quick: grid {sizes}, N={len(mu)}, S={len(idx)}, 6 latents, {evals:.3g} log-densities")
    print(f"  ours      {ours_s:8.2f} s (cpu {ours_cpu:7.2f} s)   {ours_s / evals * 1e9:6.3f} ns/eval   "
          f"MIG {ours['mig']:.4f}  MIG-sup {ours['mig_sup']:.4f}")
    print(f"  reference {ref_s:8.2f} s (cpu {ref_cpu:7.2f} s)   {ref_s / evals * 1e9:6.3f} ns/eval   "
          f"MIG {ref['mig']:.4f}  MIG-sup {ref['mig_sup']:.4f}")
    print(f"  ratio {ref_s / ours_s:.1f}x   max |diff| {diff:.2e}")
    return {"ours_s": ours_s, "reference_s": ref_s, "ratio": ref_s / ours_s, "max_abs_diff": float(diff),
            "reference_ns_per_eval": ref_s / evals * 1e9}


def full_size(device: str, reference_ns: float) -> dict:
    sizes, used = DSPRITES_GRID, [1, 2, 3, 4]
    mu, logvar, factors = synthetic_code(sizes, used)
    ours_s, ours_cpu, out = _best(lambda: mig_scores(mu, logvar, factors, sizes, samples=10000, seed=0,
                                                     exclude_factors=(0,), device=device),
                                  repeats=1)
    ref_s = work(len(mu), 10000, sizes, used) * reference_ns * 1e-9
    print(f"dSprites size: N={len(mu)}, S=10000, 6 latents, factors {used} of {sizes}")
    print(f"  ours {ours_s:.1f} s (cpu {ours_cpu:.1f} s; MIG {out['mig']:.4f}, MIG-sup {out['mig_sup']:.4f})")
    print(f"  reference extrapolated {ref_s:.0f} s ({ref_s / 60:.1f} min) -> {ref_s / ours_s:.1f}x")
    return {"full_ours_s": ours_s, "full_reference_extrapolated_s": ref_s}


def _best(fn, repeats: int):
    """Wall and process CPU seconds of the fastest of `repeats` runs (the machine may be shared), and
    the result."""
    best, out = (float("inf"), 0.0), None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return (*best, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the comparison (under a minute)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of both sides: torch's intra-op threads for the reference, "
                        "worker threads for ours (default: torch's setting)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    result = {"name": "metrics_speed", **compare(args.device)}
    if not args.quick:
        result.update(full_size(args.device, result["reference_ns_per_eval"]))
    result = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in result.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
