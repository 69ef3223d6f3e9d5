"""GPU suite: one prepared script that measures, on one GPU, what the paper's grid costs there.

On the full paper config (the full procedural dSprites, 737,280 images resident on the GPU; pro-VLAE,
batch 128, levels 3, z_dim 2; float32, TF32 off, as in sweeps/grid.py PRESETS["paper"]) it measures, in
order, printing every figure as soon as it is measured:

  data       generating (first time on a machine) / loading the dataset, and copying it to the GPU
  solo       one trial's training img/s, eager (and its GPU memory: torch.cuda.max_memory_allocated
             over what was allocated before, the resident dataset excluded), and what one step launches:
             CUDA kernels and copies (torch profiler), on a CPU (--tiny) the operators it dispatches
  fused      a fused group of K = 4, 8, 16 members (batched kernels: one vmap over the stacked members)
             img/s counting all members' images, the ratio to solo, the GPU memory and launches per member
  eval       one stage-end evaluation on the full dSprites (Trainer.evaluate(): encoding 737,280 images,
             then MIG / MIG-sup / I(x; z_l) with mi_samples 10,000 and the factor score with the default
             10,000 / 5,000 votes), at the last stage (6 latents: the dearest of a trial's evaluations),
             of a model 5 steps from its initialisation: wide, overlapping posteriors, which the MI
             estimator's pruning (provlae/metrics/_mixture.py) skips least of, so an upper bound
  grid       the paper grid's GPU-hours extrapolated from these figures, for every setting and the best
  compile    one trial's img/s with compile="torch" (a failure is printed and the suite carries on; the
             warm-up's seconds include the compilation), then the grid again if it is the best setting

Every training figure is timed inside stage 0 after a warm-up and a short calibration, over as many steps
as the section's time budget allows; CUDA is synchronized around every timed span; the stage-end
evaluation is never inside a timed training span. The whole suite stays within --budget seconds (default
450, for an 8-minute slot; generating the dataset, ~70 s on a first run, counts): a section that no longer
fits is skipped and says so (--tiny skips none). Compilation is last, as the one step whose time is not
known ahead, and a SIGTERM (``timeout``) prints the figures measured so far as the JSON line.

The paper grid (``sweeps.grid.build_trials("paper")``): 250 trials, 125 per dataset; a dSprites trial is
3 stages x 30 epochs x 737,280 images ~ 66.4M images, a 3DShapes trial 3 x 15 x 480,000 ~ 21.6M. Its
GPU-hours = training images / img/s + evaluations x evaluation seconds, where the evaluations are the
trials' stage ends (3 per progressive trial, 1 per vlae / beta_vae trial: they have one stage), each
charged the measured last-stage cost, a 3DShapes evaluation scaled from the dSprites one by images and
latents (480,000 / 737,280 x z_dim 3 / 2), and 3DShapes training is taken at dSprites' img/s (a 3-channel first and last layer; the rest of the network is the
same). A fused setting trains the grid in the groups ``provlae.fused.make_groups`` forms (members share
dataset and family: 40 trials per beta-swept family, 5 teacher-student trials); a group smaller than K is
charged the step time of the smallest measured K that holds it; members still evaluate one at a time.

    python benchmarks/gpu_suite.py [--budget 450] [--no-compile]
    python benchmarks/gpu_suite.py --tiny          # the same code at toy sizes, on a CPU, in seconds
                                                   # (--quick is the same, as `make bench-quick` runs it)

Without CUDA (and without --tiny) it exits 2 with one line. Last line: one JSON object with every
figure, {"name": "gpu_suite", ...}.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from provlae import data
from provlae import train as train_module
from provlae.calibrate import at_last_stage
from provlae.config import TrialConfig
from provlae.device import images_tensor, resolve_device
from provlae.evaluate import columns_in_use
from provlae.fused import FusedTrainer, make_groups
from provlae.text import first_line
from provlae.train import Trainer
from sweeps.grid import build_trials, dataset_size

START = time.perf_counter()
RESULT: dict = {"name": "gpu_suite"}
ERRORS: dict[str, str] = {}

# (section budget in seconds for the timed steps, warm-up steps, calibration steps, most timed steps)
GPU = dict(ks=(4, 8, 16), solo_s=20.0, fused_s=20.0, compile_s=20.0, warmup=10, calib=20, max_steps=20000,
           min_left={"data": -math.inf, "solo": 40, "fused": 45, "eval": 60, "compile": 90, "grid": -math.inf,
                     "table": -math.inf})
TINY = dict(ks=(2, 3), solo_s=0.4, fused_s=0.4, compile_s=0.4, warmup=2, calib=2, max_steps=200,
            min_left=dict.fromkeys(("data", "solo", "fused", "eval", "compile", "grid", "table"),
                                   -math.inf))  # never skipped
TINY_CONFIG = dict(subset=2048, batch_size=32, mi_samples=300, factor_train_votes=100, factor_eval_votes=50,
                   eval_subset=1024, channels=8, hidden=32)  # a narrow network: the same code paths, sooner


def say(line: str) -> None:
    print(line, flush=True)


def left() -> float:
    return BUDGET - (time.perf_counter() - START)


def record(**figures) -> None:
    RESULT.update({k: (float(f"{v:.5g}") if isinstance(v, float) and math.isfinite(v) else v)
                   for k, v in figures.items()})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def finite(value):
    """``value`` with every non-finite float (an infinite GPU-hours figure, a NaN) as None: valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def result_line(result: dict) -> str:
    return json.dumps(finite(result), allow_nan=False)


def dump_partial(signum, frame) -> None:
    """Killed by a timeout: what was measured so far, as the last line."""
    say(result_line({**RESULT, "errors": ERRORS, "partial": True, "total_s": round(time.perf_counter() - START, 1)}))
    sys.exit(128 + signum)


# ------------------------------------------------------------------------------------------ config


def paper_config(tiny: bool, subset: int | None, device: str) -> TrialConfig:
    """The paper grid's dSprites pro-VLAE trial (seed 0, beta 1), on `device`; --tiny: toy sizes."""
    cfg = next(c for c in build_trials("paper", datasets=["dsprites"], families=["pro_vlae"])
               if c.seed == 0 and c.beta == 1.0)
    over = {"device": device}
    if tiny:
        over.update(TINY_CONFIG)
    if subset is not None:
        over["subset"] = subset or None
    # steps_per_stage stays the paper's (30 epochs of the full set): no stage end inside the timed steps
    return cfg.with_overrides(over)


def members(cfg: TrialConfig, k: int) -> list[TrialConfig]:
    """K configs of one group: seeds 0..K-1, betas cycling through the paper's."""
    betas = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 16.0, 20.0)
    return [cfg.with_overrides({"seed": i, "beta": betas[i % len(betas)]}) for i in range(k)]


# ------------------------------------------------------------------------------------------ timing


def timed_steps(trainer, device, budget_s: float, p: dict) -> tuple[int, float, float]:
    """Warm up, calibrate, then time as many steps as ``budget_s`` allows (the trainer's run(until=)).
    Returns (timed steps, their seconds, warm-up seconds)."""
    limit = trainer.configs[0].stage_steps if hasattr(trainer, "configs") else trainer.cfg.stage_steps
    t0 = time.perf_counter()
    trainer.run(until=p["warmup"])
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.run(until=p["warmup"] + p["calib"])
    sync(device)
    rate = p["calib"] / max(time.perf_counter() - t0, 1e-9)
    n = max(3, min(int(rate * budget_s), p["max_steps"], limit - 1 - p["warmup"] - p["calib"]))
    start = trainer.step
    sync(device)
    t0 = time.perf_counter()
    trainer.run(until=start + n)
    sync(device)
    seconds = time.perf_counter() - t0
    assert trainer.step == start + n, (trainer.step, start + n)
    return n, seconds, warm_s


LAUNCH_STEPS = 2  # steps profiled for the launch count on CUDA (twice: a run's one-off work subtracted)


def launches_per_step(trainer, device: torch.device) -> float | None:
    """What one training step launches: on CUDA its kernels and copies, on a CPU the top-level operators
    it dispatches (benchmarks/launch_count.py, the proxy). A run of 2 x LAUNCH_STEPS steps less one of
    LAUNCH_STEPS, so what a run does once is not counted; on a CPU one step each (every step dispatches
    the same operators). None (and a line) where the profiler fails: the section's speed stands without
    it."""
    try:
        if device.type == "cuda":
            return (kernels(trainer, 2 * LAUNCH_STEPS) - kernels(trainer, LAUNCH_STEPS)) / LAUNCH_STEPS
        from benchmarks.launch_count import operators

        return operators(trainer, 2) - operators(trainer, 1)
    except Exception as e:  # noqa: BLE001 - a profiler without CUPTI, say
        say(f"  launches: not counted ({type(e).__name__}: {first_line(e, '')})")
        return None


def kernels(trainer, steps: int) -> int:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.run(until=trainer.step + steps)
        torch.cuda.synchronize()
    return sum(event.device_type == DeviceType.CUDA for event in prof.events())


def fmt_launches(n: float | None, per: str, device: torch.device) -> str:
    unit = "launches" if device.type == "cuda" else "operators"
    return f"{unit} per {per}: -" if n is None else f"{n:.0f} {unit} per {per}"


class PeakMemory:
    """GPU memory a block allocates at its peak, over what was allocated before it (CUDA only)."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            sync(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base


def mib(nbytes) -> float | None:
    return None if nbytes is None else nbytes / 2 ** 20


def fmt_mib(nbytes) -> str:
    return "n/a (no CUDA)" if nbytes is None else f"{mib(nbytes):.0f} MiB"


# ------------------------------------------------------------------------------------------ sections


def section_data(cfg: TrialConfig, device: torch.device):
    t0 = time.perf_counter()
    ds = data.load(cfg.dataset, subset=cfg.subset, seed=cfg.data_seed)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    images_tensor(ds.images, device)  # the per-process device copy every trainer below shares
    sync(device)
    to_device_s = time.perf_counter() - t0
    nbytes = ds.images.nbytes
    record(data_images=len(ds), data_s=load_s, data_to_device_s=to_device_s, data_gib=nbytes / 2 ** 30)
    say(f"data: {cfg.dataset} {len(ds):,} images ({nbytes / 2 ** 30:.2f} GiB): {load_s:.1f} s to generate/load, "
        f"{to_device_s:.1f} s onto {device}")
    return ds


def section_solo(cfg: TrialConfig, ds, device: torch.device, p: dict, key: str = "solo") -> float | None:
    with PeakMemory(device) as mem:
        trainer = Trainer(cfg, dataset=ds)
        n, seconds, warm_s = timed_steps(trainer, device, p["solo_s" if key == "solo" else "compile_s"], p)
    img_s = n * cfg.batch_size / seconds
    launches = launches_per_step(trainer, device)
    label = "solo eager" if key == "solo" else "solo compile=torch"
    fig = {f"{key}_img_s": img_s, f"{key}_mem_mib": mib(mem.bytes), f"{key}_launches_per_step": launches}
    if key != "solo":
        fig[f"{key}_warmup_s"] = warm_s  # includes the compilation
    record(**fig)
    say(f"{label}: {img_s:9.1f} img/s ({n} steps in {seconds:.1f} s; warm-up {p['warmup']} steps "
        f"{warm_s:.1f} s), GPU memory {fmt_mib(mem.bytes)}, {fmt_launches(launches, 'step', device)}")
    del trainer
    return img_s


def section_fused(cfg: TrialConfig, ds, device: torch.device, k: int, p: dict, solo: float | None) -> float:
    with PeakMemory(device) as mem:
        fz = FusedTrainer(members(cfg, k), dataset=ds, kernels="batched")
        n, seconds, _ = timed_steps(fz, device, p["fused_s"], p)
    img_s = k * n * cfg.batch_size / seconds
    per = None if mem.bytes is None else mem.bytes / k
    ratio = img_s / solo if solo else None
    launches = launches_per_step(fz, device)
    launches = None if launches is None else launches / k
    record(**{f"fused_k{k}_img_s": img_s, f"fused_k{k}_ratio": ratio, f"fused_k{k}_mem_per_member_mib": mib(per),
              f"fused_k{k}_launches_per_member_step": launches})
    memory = (f"GPU memory {fmt_mib(per)} per member ({fmt_mib(mem.bytes)} for the group)" if per is not None
              else f"GPU memory {fmt_mib(None)}")
    vs = f"x{ratio:.2f} solo" if ratio is not None else "no solo figure"
    say(f"fused K={k:<2d} batched: {img_s:9.1f} img/s (all members; {n} steps in {seconds:.1f} s), {vs}, {memory}, "
        f"{fmt_launches(launches, 'member-step', device)}")
    del fz
    return img_s


def section_eval(cfg: TrialConfig, ds, device: torch.device) -> float:
    """One stage-end evaluation at the last stage, timed apart: encoding, then the metrics."""
    trainer = at_last_stage(cfg, ds)
    encode, spans = train_module.encode, {}

    def timed_encode(*args, **kwargs):
        sync(device)
        t = time.perf_counter()
        out = encode(*args, **kwargs)
        sync(device)
        spans["encode"] = time.perf_counter() - t
        return out

    train_module.encode = timed_encode
    try:
        sync(device)
        t0 = time.perf_counter()
        metrics = trainer.evaluate()
        sync(device)
        eval_s = time.perf_counter() - t0
    finally:
        train_module.encode = encode
    n = len(trainer.eval_index())
    latents = sum(len(d) for _, d in columns_in_use(trainer.family, trainer.stage))
    record(eval_s=eval_s, eval_encode_s=spans["encode"], eval_metrics_s=eval_s - spans["encode"], eval_images=n,
           eval_latents=latents, eval_mig=metrics.get("mig"))
    say(f"evaluation (stage {trainer.stage}, {latents} latents, {n:,} images, mi_samples {cfg.mi_samples}, "
        f"votes {cfg.factor_train_votes}/{cfg.factor_eval_votes}): {eval_s:.1f} s "
        f"(encoding {spans['encode']:.1f} s, metrics {eval_s - spans['encode']:.1f} s)")
    del trainer
    return eval_s


def section_grid(speeds: dict[str, float], fused: dict[int, float], eval_s: float | None, tiny: bool) -> None:
    """GPU-hours of the paper grid at every measured setting, and the best."""
    trials = build_trials("paper")
    images = {c.run_name: c.total_steps * c.batch_size for c in trials}
    evals = sum(c.num_stages for c in trials)
    ref = next(c for c in trials if c.dataset == "dsprites")
    eval_total = 0.0 if eval_s is None else sum(  # images x latents, relative to the measured dSprites one
        c.num_stages * eval_s * dataset_size(c.dataset) / dataset_size(ref.dataset) * c.z_dim / ref.z_dim
        for c in trials)
    train_images = sum(images.values())
    hours = {name: (train_images / v + eval_total) / 3600 for name, v in speeds.items() if v}
    for k in fused:
        group_s = 0.0
        for group in make_groups(trials, k):
            g = len(group)
            holds = [m for m in fused if m >= g]
            if g == 1 or not holds:
                rate = speeds.get("solo_eager") if g == 1 else None
                group_s += images[group[0].run_name] / rate if rate else math.inf
                continue
            m = min(holds)  # the step time of the smallest measured group that holds this one
            group_s += images[group[0].run_name] * m / fused[m]
        hours[f"fused_k{k}"] = (group_s + eval_total) / 3600
    best = min(hours, key=hours.get)
    by_dataset = {d: sum(1 for c in trials if c.dataset == d) for d in sorted({c.dataset for c in trials})}
    record(paper_trials=len(trials), paper_train_images=float(train_images), paper_evaluations=evals,
           paper_eval_hours=eval_total / 3600, best_setting=best, gpu_hours_best=hours[best],
           **{f"gpu_hours_{k}": v for k, v in hours.items()})
    note = " (tiny: toy-size figures, not the GPU's)" if tiny else ""
    say(f"paper grid{note}: {len(trials)} trials ({', '.join(f'{n} {d}' for d, n in by_dataset.items())}), "
        f"{train_images / 1e9:.2f}G training images, {evals} evaluations "
        + (f"({eval_total / 3600:.2f} GPU-h of them)" if eval_s is not None
           else "(not counted: no evaluation figure)"))
    for name, h in sorted(hours.items(), key=lambda kv: kv[1]):
        say(f"  {name:14s} {h:9.1f} GPU-hours{'   <- best' if name == best else ''}")


def section_table(cfg: TrialConfig, device: torch.device, name: str, speeds: dict[str, float],
                  fused: dict[int, float], eval_s: float | None) -> None:
    """The measured rates into the throughput table that sweep plans read (``provlae.throughput``)."""
    from provlae.throughput import Measurement, add

    def entry(k: int, kernels: str, img_s: float, compile_mode: str = "none") -> Measurement:
        return Measurement(device=device.type, device_name=name, dataset=cfg.dataset, family=cfg.family,
                           batch_size=cfg.batch_size, fuse=k, kernels=kernels, dtype=cfg.dtype,
                           compile=compile_mode, train_img_s=img_s, eval_s=eval_s,
                           eval_images=RESULT.get("eval_images") if eval_s else None, source="gpu_suite",
                           measured_at=time.time(), mi_samples=cfg.mi_samples)

    entries = [entry(1, "solo", v, "torch" if key == "solo_compile" else "none") for key, v in speeds.items()]
    entries += [entry(k, "batched", v) for k, v in sorted(fused.items())]
    path = add(entries)
    record(table=str(path), table_entries=len(entries))
    say(f"table: {len(entries)} measurement(s) added to {path} (sweep plans read them)")


# ------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", "--quick", action="store_true", dest="tiny",
                   help="toy sizes (subset, few steps, K = 2, 3), runs on a CPU (--quick: the same, for "
                        "`make bench-quick`)")
    p.add_argument("--subset", type=int, default=None,
                   help=f"dSprites images (0: the full set; default: full, --tiny {TINY_CONFIG['subset']})")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole suite (default 450; tiny 50)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time compile='torch' too (default: on, off with --tiny)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's setting)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    global BUDGET
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("error: gpu_suite needs a CUDA device (use --tiny on CPU)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, dump_partial)
    BUDGET = args.budget or (50.0 if args.tiny else 450.0)
    p = TINY if args.tiny else GPU
    with_compile = (not args.tiny) if args.compile is None else args.compile
    device = resolve_device("auto" if args.tiny else "cuda")
    record(launch_unit="CUDA kernels and copies" if device.type == "cuda" else "CPU operators")
    cfg = paper_config(args.tiny, args.subset, str(device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    record(device=device.type, device_name=name, tiny=args.tiny, torch=torch.__version__, batch_size=cfg.batch_size,
           levels=cfg.levels, z_dim=cfg.z_dim, dtype=cfg.dtype, tf32=cfg.tf32, budget_s=BUDGET)
    say(f"gpu_suite on {device} ({name}), torch {torch.__version__}: {cfg.family} {cfg.dataset}, batch "
        f"{cfg.batch_size}, levels {cfg.levels}, z_dim {cfg.z_dim}, {cfg.dtype}, tf32 {cfg.tf32}; "
        f"budget {BUDGET:.0f} s")

    def attempt(section: str, fn, *a):
        if left() < p["min_left"][section]:
            ERRORS[section] = f"skipped: {left():.0f} s left of the budget"
            say(f"{section}: skipped ({left():.0f} s left of the {BUDGET:.0f} s budget)")
            return None
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 - one section's failure must not cost the others
            if device.type == "cuda":
                torch.cuda.empty_cache()
            ERRORS[section] = f"{type(e).__name__}: {e}"
            say(f"{section}: failed: {type(e).__name__}: {first_line(e, '')}")
            return None

    ds = attempt("data", section_data, cfg, device)
    if ds is None:  # nothing to train on: the figures so far and the error, as the JSON line
        record(total_s=time.perf_counter() - START)
        print(result_line({**RESULT, "errors": ERRORS}))
        return 1
    speeds: dict[str, float] = {}
    solo = attempt("solo", section_solo, cfg, ds, device, p)
    if solo:
        speeds["solo_eager"] = solo
    fused: dict[int, float] = {}
    for k in p["ks"]:
        v = attempt("fused", section_fused, cfg, ds, device, k, p, solo)
        if v:
            fused[k] = v
    eval_s = attempt("eval", section_eval, cfg, ds, device)
    attempt("grid", section_grid, speeds, fused, eval_s, args.tiny)
    if with_compile:
        v = attempt("compile", section_solo, cfg.with_overrides({"compile": "torch"}), ds, device, p, "solo_compile")
        if v:
            speeds["solo_compile"] = v
            attempt("grid", section_grid, speeds, fused, eval_s, args.tiny)
    else:
        say("compile: not timed (--no-compile; --tiny leaves it out unless --compile)")
    attempt("table", section_table, cfg, device, name, speeds, fused, eval_s)
    record(total_s=time.perf_counter() - START)
    say(f"total: {time.perf_counter() - START:.1f} s")
    print(result_line({**RESULT, "errors": ERRORS}))
    return 0


BUDGET = 450.0

if __name__ == "__main__":
    sys.exit(main())
