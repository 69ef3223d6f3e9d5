"""``python -m provlae calibrate``: measure what training and one evaluation cost on this machine's device,
in under a minute, into the throughput table (``provlae.throughput``) that sweep plans read.

On a subset of the dataset (throughput per image does not depend on how many images are resident): a few
warm-up steps, then as many timed steps as ``seconds`` allows, for a solo trainer and for a fused group of
each K asked; then one stage-end evaluation at the last stage (the most latents: a trial's dearest) of
``eval_images`` images, with the config's estimator settings.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from provlae import data as datasets
from provlae.config import TrialConfig
from provlae.device import device_name, resolve_device
from provlae.errors import ConfigError
from provlae.fused import FusedTrainer, resolve_kernels
from provlae.throughput import Measurement
from provlae.train import Trainer

SUBSET = 8192  # images resident while measuring
EVAL_IMAGES = 4096
WARMUP = 3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(base: TrialConfig, fuse: Sequence[int] = (1,), seconds: float = 6.0, kernels: str = "auto",
              say: Callable[[str], None] = print, eval_images: int = EVAL_IMAGES) -> list[Measurement]:
    """One measurement per K of ``fuse`` (1: solo) for ``base``'s family, dataset, batch size and dtype on
    its device; the evaluation (of ``eval_images`` images, at most SUBSET; plans scale it by the images a
    trial evaluates) is measured once and shared by them."""
    if not 1 <= eval_images <= SUBSET:
        raise ConfigError(f"--eval-images must be 1 to {SUBSET}, got {eval_images}")
    device = resolve_device(base.device)
    cfg = base.with_overrides({"subset": min(SUBSET, base.subset or SUBSET), "device": str(device),
                               "eval_subset": eval_images})
    timed = cfg.with_overrides({"steps_per_stage": 10**6})  # no stage end inside the timed steps
    ds = datasets.load(cfg.dataset, path=cfg.data_path, subset=cfg.subset, seed=cfg.data_seed)
    name = device_name(device)
    eval_s, n_eval = evaluation_seconds(cfg, ds, device)
    say(f"evaluation: {eval_s:.2f} s for {n_eval} images (last stage)")
    out = []
    for k in fuse:
        if k == 1:
            trainer, used = Trainer(timed, dataset=ds), "solo"
        else:
            used = resolve_kernels(kernels, device)
            members = [timed.with_overrides({"seed": timed.seed + i}) for i in range(k)]
            trainer = FusedTrainer(members, dataset=ds, kernels=used)
        img_s = k * cfg.batch_size * steps_per_second(trainer, device, seconds)
        m = Measurement(device=device.type, device_name=name, dataset=cfg.dataset, family=cfg.family,
                        batch_size=cfg.batch_size, fuse=k, kernels=used, dtype=cfg.dtype, compile=cfg.compile,
                        train_img_s=img_s, eval_s=eval_s, eval_images=n_eval, source="calibrate",
                        measured_at=time.time(), mi_samples=cfg.mi_samples)
        say(f"{'solo' if k == 1 else f'fused K={k} ({used})'}: {img_s:.0f} img/s")
        out.append(m)
        del trainer
    return out


def steps_per_second(trainer, device: torch.device, seconds: float) -> float:
    """Warm up, then time steps for about ``seconds`` (inside the first stage: no evaluation)."""
    trainer.run(until=WARMUP)
    sync(device)
    t0 = time.perf_counter()
    trainer.run(until=WARMUP + 2)
    sync(device)
    rate = 2 / max(time.perf_counter() - t0, 1e-9)
    n = max(2, int(rate * seconds))
    start = trainer.step
    t0 = time.perf_counter()
    trainer.run(until=start + n)
    sync(device)
    return n / (time.perf_counter() - t0)


def at_last_stage(cfg: TrialConfig, ds) -> Trainer:
    """A trainer one step into ``cfg``'s last stage (2 steps per stage; the stage ends on the way are not
    evaluated): what a trial's dearest evaluation, the one with the most latents, is measured on."""
    cfg = cfg.with_overrides({"steps_per_stage": 2})
    trainer = Trainer(cfg, dataset=ds)
    trainer.evaluate = dict  # the stage ends on the way: an empty result, no evaluation
    trainer.run(until=cfg.stage_steps * (cfg.num_stages - 1) + 1)
    del trainer.evaluate
    return trainer


def evaluation_seconds(cfg: TrialConfig, ds, device: torch.device) -> tuple[float, int]:
    """One evaluation at the last stage, timed."""
    trainer = at_last_stage(cfg, ds)
    sync(device)
    t0 = time.perf_counter()
    trainer.evaluate()
    sync(device)
    return time.perf_counter() - t0, len(trainer.eval_index())


def member_memory(cfg: TrialConfig, steps: int = 2) -> tuple[int, int]:
    """(one member's peak GPU memory in bytes over a few training steps, the device's memory this process
    can still allocate) for ``--fuse auto``. The dataset's device copy, which a group's members share, is
    made first and left out of the peak."""
    import gc

    from provlae.device import available_memory, images_tensor

    device = resolve_device(cfg.device)
    if device.type != "cuda":
        raise ValueError("member_memory probes a CUDA device")
    ds = datasets.load(cfg.dataset, path=cfg.data_path, subset=cfg.subset, seed=cfg.data_seed)
    images_tensor(ds.images, device)  # the shared copy, before the count starts
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(cfg.with_overrides({"steps_per_stage": max(cfg.steps_per_stage, steps + 1)}), dataset=ds)
    trainer.run(until=steps)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return int(peak), available_memory(device)[0]
