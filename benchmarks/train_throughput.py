"""Trainer img/s vs a bare PyTorch loop over the same network, batch and data, in one process.

The bare loop is the least a training loop can do: index a batch from the uint8 tensor, forward, the
beta-VAE/VLAE loss, backward, Adam step. The trainer adds its family hooks, NaN checks, progress events
and stage bookkeeping; the ratio says what they cost. Target: ratio >= 0.95, for the trainer and for a
fused group of one (``FusedTrainer`` with the device's kernels; the batched kernels' figure is printed too).

    python benchmarks/train_throughput.py [--quick] [--family vlae] [--device cpu]
Last line: {"name": "train_throughput", "trainer_img_s": ..., "bare_img_s": ..., "ratio": ...,
            "fused1_img_s": ..., "fused1_ratio": ...}
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from provlae import data
from provlae.config import TrialConfig
from provlae.device import images_tensor, resolve_device
from provlae.fused import FusedTrainer
from provlae.models import LadderVAE, build_family
from provlae.models.families import bernoulli_nll, gaussian_kl
from provlae.train import Trainer


def bare_loop(cfg: TrialConfig, ds, steps: int) -> float:
    """img/s of a plain loop: same network, data, batch size, optimizer."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    family = build_family(cfg)
    model = LadderVAE(ds.image_shape, family.level_dims(), cfg.channels, cfg.hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    images = images_tensor(ds.images, device)
    gates = family.gates(0, 0, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, b = images.shape[0], cfg.batch_size

    def one_step():
        idx = torch.randint(n, (b,), generator=gen).to(images.device)
        x = images[idx].to(device).permute(0, 3, 1, 2).to(dtype=torch.float32,
                                                          memory_format=torch.contiguous_format).mul_(ds.pixel_scale)
        out = model(x, gates)
        loss = bernoulli_nll(out.logits, x).mean()
        for mu, logvar in zip(out.mu, out.logvar):
            if mu is not None:
                loss = loss + cfg.beta * gaussian_kl(mu, logvar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    _sync(device)
    return steps * b / (time.perf_counter() - t0)


def trainer_loop(cfg: TrialConfig, ds, steps: int, kernels: str | None = None) -> float:
    """img/s of Trainer.run (or, with ``kernels``, a fused group of one) over the same steps; the stage-end
    evaluation is timed and left out."""
    group = None if kernels is None else FusedTrainer([cfg], dataset=ds, kernels=kernels)
    trainer = Trainer(cfg, dataset=ds) if group is None else group.members[0]
    evaluate, eval_s = trainer.evaluate, []

    def timed_evaluate():
        _sync(trainer.device)
        t = time.perf_counter()
        result = evaluate()
        eval_s.append(time.perf_counter() - t)
        return result

    trainer.evaluate = timed_evaluate
    t0 = time.perf_counter()
    (trainer if group is None else group).run()
    return steps * cfg.batch_size / (time.perf_counter() - t0 - sum(eval_s))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short run (< 60 s on 2 cores)")
    p.add_argument("--family", default="vlae")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    steps_per_stage = 15 if args.quick else 70
    cfg = TrialConfig.from_dict(dict(family=args.family, dataset="dsprites", subset=4096, batch_size=args.batch_size,
                                     steps_per_stage=steps_per_stage, device=args.device, log_every=10,
                                     mi_samples=100, factor_train_votes=50, factor_eval_votes=50, eval_subset=256))
    steps = cfg.total_steps
    ds = data.load("dsprites", subset=cfg.subset, seed=0)
    bare, ours, fused, batched = [], [], [], []
    for _ in range(1 if args.quick else args.repeats):  # interleaved so drifts in machine load hit all
        bare.append(bare_loop(cfg, ds, steps))
        ours.append(trainer_loop(cfg, ds, steps))
        fused.append(trainer_loop(cfg, ds, steps, kernels="auto"))
        batched.append(trainer_loop(cfg, ds, steps, kernels="batched"))
    b, t, f = max(bare), max(ours), max(fused)
    print(f"family {args.family}, batch {cfg.batch_size}, {steps} steps, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    for label, runs in (("bare loop", bare), ("trainer", ours), ("fused K=1", fused),
                        ("  batched", batched)):
        print(f"{label:<10}: {max(runs):8.1f} img/s  (runs: {', '.join(f'{v:.1f}' for v in runs)})")
    print(json.dumps({"name": "train_throughput", "trainer_img_s": round(t, 2), "bare_img_s": round(b, 2),
                      "ratio": round(t / b, 4), "fused1_img_s": round(f, 2), "fused1_ratio": round(f / b, 4),
                      "fused1_batched_img_s": round(max(batched), 2)}))


if __name__ == "__main__":
    main()
