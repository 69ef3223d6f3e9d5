"""Sweep memory: how many copies of the dataset do 2 concurrent trials hold?

Every trial loads its dataset from the node's cache, memory-mapped, so N trials on a node share one copy
through the page cache. This runs 2 trials at once, as two processes (threads pinned to 1). Each builds
its trainer exactly as a sweep trial does (``Trainer(cfg)``: data from the cache), trains a few steps and
evaluates, then reads every image through the trainer's own batch path (``evaluate.batches_to_float``,
as evaluation and training epochs do) so that every page of the dataset is touched by both trials.
The processes' proportional set size (PSS, /proc/<pid>/smaps_rollup: a page shared by both counts half
in each) is sampled, first on a tiny dataset (the baseline: interpreter, torch, model, buffers), then on
the measured one:

    data_copies = (PSS held on the dataset - PSS held on the baseline) / dataset bytes

where "held" is the sum over both processes once both have finished the phase, trainer and data alive
(the peaks, including evaluation's transient buffers, are printed too).

One shared copy gives ~1; a private copy per trial would give ~2. Default: the full procedural dSprites
(737,280 images, 3.0 GB; generated into the node's cache the first time, which takes a while).
--quick: a 200,000-image procedural subset (800 MB) in a throwaway cache.

    python benchmarks/sweep_memory.py [--quick]

Prints the figures, then one JSON line last: {"name": "sweep_memory", "data_copies": ...}
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = 1.25
BASELINE_IMAGES = 1024
QUICK_IMAGES = 200_000
READ_BATCH = 4096
EVAL_IMAGES = 512  # one evaluation batch: the same evaluation buffers in both phases
SAMPLE_S = 0.05


def config(subset: int | None):
    from provlae.config import TrialConfig

    return TrialConfig.from_dict(dict(family="beta_vae", dataset="dsprites", subset=subset, steps_per_stage=2,
                                      batch_size=64, log_every=1000, eval_subset=EVAL_IMAGES,
                                      mi_samples=100, factor_train_votes=50, factor_eval_votes=25, device="cpu"))


def prepare(subsets) -> None:
    """Build the cache entries (run in its own process, so this one maps nothing)."""
    from provlae import data

    for subset in subsets:
        data.load("dsprites", subset=subset, seed=0)


def trial(subsets, barrier) -> None:
    import torch

    from provlae.train import Trainer

    torch.set_num_threads(1)
    barrier.wait()
    for subset in subsets:  # the phases: baseline, then the measured dataset
        trainer = Trainer(config(subset))
        trainer.run()
        read_all(trainer)
        barrier.wait()  # both trials are done with the phase ...
        barrier.wait()  # ... and their memory has been measured
        del trainer


def read_all(trainer) -> None:
    """Every image once, through the trainer's batch path (what its epochs and evaluations read)."""
    import torch

    from provlae.evaluate import batches_to_float

    n = trainer.images.shape[0]
    for start in range(0, n, READ_BATCH):
        index = torch.arange(start, min(start + READ_BATCH, n))
        batches_to_float(trainer.images, index, trainer.data.pixel_scale, trainer.device)


def pss_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Pss", "Pss_Anon", "Pss_File"):
                out[key] = int(value.split()[0])
    out["Pss_Data"] = images_pss_kb(pid)
    return out


def images_pss_kb(pid: int) -> int:
    """PSS of the process's mappings of cached image files (the dataset itself)."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=6)
            if len(first) >= 5 and "-" in first[0] and not line.startswith(("Pss", "Rss")):
                inside = line.rstrip().endswith("images.npy")
            elif inside and line.startswith("Pss:"):
                total += int(line.split()[1])
    return total


class Sampler(threading.Thread):
    """Peak of the summed PSS of some processes, per phase."""

    def __init__(self, pids: list[int]):
        super().__init__(daemon=True)
        self.pids, self.phase, self.peaks, self.stop = pids, None, {}, threading.Event()

    def sample(self) -> dict[str, int]:
        rows = [pss_kb(p) for p in self.pids]
        return {k: sum(r[k] for r in rows) for k in ("Pss", "Pss_Anon", "Pss_File", "Pss_Data")}

    def run(self) -> None:
        while not self.stop.is_set():
            phase = self.phase
            try:
                total = self.sample()
            except (FileNotFoundError, ProcessLookupError):
                break
            if phase is not None and total["Pss"] > self.peaks.get(phase, {}).get("Pss", -1):
                self.peaks[phase] = total
            time.sleep(SAMPLE_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_IMAGES:,}-image procedural subset")
    opts = parser.parse_args()
    measured = QUICK_IMAGES if opts.quick else None
    subsets = [BASELINE_IMAGES, measured]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="sweep-memory-") as tmp:
        if opts.quick:
            os.environ["PROVLAE_HOME"] = tmp  # a throwaway cache; the full set uses the node's cache
        start = time.perf_counter()
        prep = ctx.Process(target=prepare, args=(subsets,))
        prep.start()
        prep.join()
        if prep.exitcode:
            raise SystemExit("building the dataset failed")
        prepared = time.perf_counter() - start

        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=trial, args=(subsets, barrier)) for _ in range(2)]
        for p in procs:
            p.start()
        sampler = Sampler([p.pid for p in procs])
        sampler.start()
        barrier.wait()  # both trials imported torch
        start = time.perf_counter()
        held = {}
        for phase in ("baseline", "data"):
            sampler.phase = phase
            barrier.wait()  # both trials finished the phase, their trainers (and data) still held
            sampler.phase = None
            held[phase] = sampler.sample()
            barrier.wait()
        for p in procs:
            p.join()
        sampler.stop.set()
        trials_s = time.perf_counter() - start

    n = measured or 737_280
    data_kb = n * 64 * 64 / 1024
    base, data = held["baseline"], held["data"]
    copies = (data["Pss"] - base["Pss"]) / data_kb
    mb = 1 / 1024
    label = "full procedural dSprites" if measured is None else "procedural dSprites subset (--quick)"
    print(f"dataset: {label}, {n:,} images, {data_kb * mb:,.0f} MB; 2 concurrent trials, each reading "
          f"every image")
    for name, phase in (("baseline", f"baseline ({BASELINE_IMAGES} images)"), ("data", "dataset")):
        h, p = held[name], sampler.peaks[name]
        print(f"PSS of the 2 trials, {phase:<24} held {h['Pss'] * mb:6.0f} MB (anon {h['Pss_Anon'] * mb:.0f}, "
              f"file {h['Pss_File'] * mb:.0f}); peak {p['Pss'] * mb:6.0f} MB")
    print(f"PSS of the mapped image files: {data['Pss_Data'] * mb:.0f} MB ({data['Pss_Data'] / data_kb:.3f} "
          f"copies)")
    print(f"data copies held: {copies:.3f} (target <= {TARGET}); dataset prepared in {prepared:.0f} s, "
          f"trials ran {trials_s:.0f} s")
    print(json.dumps({"name": "sweep_memory", "data_copies": round(copies, 3)}))


if __name__ == "__main__":
    main()
