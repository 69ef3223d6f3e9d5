"""Fused trial group vs the same trials solo: img/s of K members trained as one ``FusedTrainer`` against
the same K trials trained one after another, each in its own ``Trainer``.

Both sides: the same device, the same K configs (the paper's dSprites trial: pro-VLAE, levels 3, z_dim 2,
batch 128; members differ in seed and beta), the same number of steps per trial, the same data (one dataset
object). Every trainer is warmed up for a few steps before its timed steps (and the process before the
first trainer), CUDA is synchronized around every timed span, each timed span is one ``run(until=...)``
call (a batched group stacks its members' state at the start of a call and writes it back at the end), and
the timed steps stay inside the first stage (steps_per_stage is set past them), so no stage-end evaluation
is timed. img/s counts the images of all K members: K * steps * batch / seconds
(solo: the sum of the K trials' timed seconds).

On a CPU both kernels of the group are timed and printed (``sequential``: the members' own steps in turn,
``batched``: one vmap over the stacked members); the JSON ratio is the one of ``--kernels`` (auto:
sequential on a CPU, batched on CUDA). Runs are interleaved (solo, then each kernel, per repeat) so drifts
in machine load hit every side, and the best of the repeats is kept.

Targets: ratio >= 0.9 on a CPU (sequential: a group costs no more than its trials in turn);
ratio >= 5 at --k 8 on a GPU with the paper's dSprites config (batched: one launch per layer for the group).

    python benchmarks/fused_throughput.py [--quick] [--k 4] [--device auto] [--kernels auto] [--steps N]
        [--batch-size 128] [--family pro_vlae] [--dtype float32] [--subset N] [--repeats N] [--threads N]
Last line: {"name": "fused_throughput", "ratio": ..., "k": ..., "fused_img_s": ..., "solo_img_s": ...,
            "device": ..., "kernels": ...}
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from provlae import data
from provlae.config import TrialConfig
from provlae.device import resolve_device
from provlae.errors import ConfigError
from provlae.fused import KERNELS, FusedTrainer, resolve_kernels
from provlae.models.families import family_names
from provlae.train import Trainer

PAPER_BATCH = 128  # the paper's dSprites batch (sweeps/grid.py PRESETS["paper"])
CPU_SUBSET = 4096  # images on a CPU (the full set on CUDA); a step's cost does not depend on the set's size
# --quick checks the code paths: a narrow network (8 channels, 32 units), whose img/s are not the paper config's
QUICK = dict(batch_size=32, steps=12, warmup=2, repeats=1, width=dict(channels=8, hidden=32))
FULL_CPU = dict(steps=20, warmup=3, repeats=3)
FULL_CUDA = dict(steps=200, warmup=10, repeats=3)


def configs(args, device: str) -> list[TrialConfig]:
    """K trial configs that differ only in seed and beta, with the timed steps inside the first stage."""
    base = dict(family=args.family, dataset="dsprites", levels=3, z_dim=2, batch_size=args.batch_size,
                subset=args.subset, device=device, dtype=args.dtype,
                steps_per_stage=args.warmup + args.steps + 1,  # no stage end: evaluation is not timed
                log_every=50, **args.width)
    return [TrialConfig.from_dict({**base, "seed": i, "beta": 1.0 + i}) for i in range(args.k)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fused(cfgs: list[TrialConfig], ds, kernels: str, warmup: int, steps: int) -> float:
    """img/s of the K members as one group (all K members' images)."""
    fz = FusedTrainer(cfgs, dataset=ds, kernels=kernels)
    device = fz.members[0].device
    fz.run(until=warmup)
    _sync(device)
    t0 = time.perf_counter()
    fz.run(until=warmup + steps)
    _sync(device)
    seconds = time.perf_counter() - t0
    assert all(m.step == warmup + steps for m in fz.members)
    return len(cfgs) * steps * cfgs[0].batch_size / seconds


def time_solo(cfgs: list[TrialConfig], ds, warmup: int, steps: int) -> float:
    """img/s of the K trials trained one after another (the sum of their timed seconds)."""
    seconds = 0.0
    for cfg in cfgs:
        trainer = Trainer(cfg, dataset=ds)
        trainer.run(until=warmup)
        _sync(trainer.device)
        t0 = time.perf_counter()
        trainer.run(until=warmup + steps)
        _sync(trainer.device)
        seconds += time.perf_counter() - t0
        assert trainer.step == warmup + steps
        del trainer
    return len(cfgs) * steps * cfgs[0].batch_size / seconds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short run (< 60 s on 2 cores)")
    p.add_argument("--k", type=int, default=4, help="members in the group (default 4)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--kernels", default="auto", choices=KERNELS,
                   help="the group's kernels the JSON reports (default auto: sequential on CPU, batched on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per trial (default: 20 on CPU, "
                   f"200 on CUDA, {QUICK['steps']} with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before the timed ones")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default {PAPER_BATCH} (the paper's dSprites batch); {QUICK['batch_size']} with --quick")
    p.add_argument("--family", default="pro_vlae", choices=family_names())
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    p.add_argument("--subset", type=int, default=None,
                   help=f"dSprites images (0: the full 737,280; default: full on CUDA, {CPU_SUBSET} on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats, best kept (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's setting; 1 gives a per-core figure that other "
                        "jobs on the machine disturb least)")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error(f"--k must be >= 1, got {args.k}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    defaults = QUICK if args.quick else (FULL_CUDA if device.type == "cuda" else FULL_CPU)
    args.batch_size = args.batch_size or defaults.get("batch_size", PAPER_BATCH)
    args.steps = args.steps or defaults["steps"]
    args.warmup = defaults["warmup"] if args.warmup is None else args.warmup
    args.repeats = args.repeats or defaults["repeats"]
    args.width = defaults.get("width", {})
    if args.subset is None:
        args.subset = None if device.type == "cuda" else CPU_SUBSET
    elif args.subset == 0:
        args.subset = None
    chosen = resolve_kernels(args.kernels, device)
    timed = ["sequential", "batched"] if device.type == "cpu" else [chosen]
    try:
        cfgs = configs(args, str(device))
    except ConfigError as e:
        print(f"error: {e}")
        return 2

    t0 = time.perf_counter()
    ds = data.load("dsprites", subset=args.subset, seed=0)
    print(f"data: dSprites {len(ds)} images ({time.perf_counter() - t0:.1f} s to load)", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"family {args.family} ({cfgs[0].channels} channels, {cfgs[0].hidden} units), K {args.k}, "
          f"batch {args.batch_size}, {args.steps} timed steps per trial "
          f"(+{args.warmup} warm-up), dtype {args.dtype}, device {device} ({name}), torch {torch.__version__}",
          flush=True)

    solo, fused = [], {k: [] for k in timed}
    try:
        Trainer(cfgs[0], dataset=ds).run(until=args.warmup + 1)  # the process's first steps, untimed
        for _ in range(args.repeats):
            solo.append(time_solo(cfgs, ds, args.warmup, args.steps))
            for kernels in timed:
                fused[kernels].append(time_fused(cfgs, ds, kernels, args.warmup, args.steps))
    except ConfigError as e:
        print(f"error: {e}")
        return 2

    s = max(solo)
    print(f"solo, {args.k} trials in turn : {s:9.1f} img/s  (runs: {', '.join(f'{v:.1f}' for v in solo)})")
    best = {k: max(v) for k, v in fused.items()}
    for kernels in timed:
        mark = "  <- JSON" if kernels == chosen else ""
        print(f"fused K={args.k}, {kernels:10s}: {best[kernels]:9.1f} img/s  ratio {best[kernels] / s:6.3f}  "
              f"(runs: {', '.join(f'{v:.1f}' for v in fused[kernels])}){mark}")
    f = best[chosen]
    result = {"name": "fused_throughput", "ratio": round(f / s, 4), "k": args.k, "fused_img_s": round(f, 2),
              "solo_img_s": round(s, 2), "device": device.type, "kernels": chosen,
              "kernels_requested": args.kernels, "batch_size": args.batch_size, "steps": args.steps,
              "family": args.family, "dtype": args.dtype}
    if len(timed) > 1:
        result["ratio_by_kernels"] = {k: round(v / s, 4) for k, v in best.items()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
