"""The operators one training step dispatches, per member and step: a solo trainer against fused groups of
K members with the batched kernels (K = 1, 8, 16, 40) — on a launch-bound GPU each one is a kernel launch,
so this CPU count is the proxy of what fusing saves there.

Counted with the torch profiler on the CPU over a few steps inside the first stage (no evaluation):
top-level ``aten::`` operators (those not called from another one), views and other metadata-only
operators left out; what a run does once (a group stacking and writing back its members' state) is
subtracted (two runs of different lengths). Ratio: the solo trainer's operators per step over a group's per member-step.

    python benchmarks/launch_count.py [--quick] [--ks 1,8,16,40] [--steps 3]

--quick: K = 1, 8, one profiled step (seconds). Target: K = 40 at >= 20x fewer operators per member-step than
solo. The network is narrow (8 channels, 32 units): the counts are those of the default width, counted sooner.
Last line: {"name": "launch_count", "solo_ops_per_step": ..., "per_member_step": {K: ...}, "ratio": {K: ...}}
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from provlae import data  # noqa: E402
from provlae.config import TrialConfig  # noqa: E402
from provlae.fused import FusedTrainer  # noqa: E402
from provlae.train import Trainer  # noqa: E402

CONFIG = dict(dataset="dsprites", family="pro_vlae", subset=512, batch_size=8, steps_per_stage=1000, log_every=1000,
              channels=8, hidden=32,  # the counts do not depend on the width: a narrow network, counted sooner
              device="cpu")
METADATA = {"aten::view", "aten::select", "aten::slice", "aten::reshape", "aten::as_strided", "aten::detach",
            "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::unsqueeze", "aten::squeeze",
            "aten::alias", "aten::_unsafe_view", "aten::empty", "aten::empty_like", "aten::empty_strided",
            "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::_reshape_alias", "aten::unbind",
            "aten::split", "aten::chunk", "aten::narrow", "aten::flatten", "aten::unflatten", "aten::squeeze_",
            "aten::unsqueeze_", "aten::expand_as", "aten::view_as", "aten::detach_", "aten::contiguous",
            "aten::result_type", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::size",
            "aten::stride", "aten::numel", "aten::dim", "aten::is_same_size", "aten::set_", "aten::zero_"}


def operators_per_step(trainer, steps: int) -> float:
    """Top-level compute operators one training step dispatches: a run of 2 x ``steps`` steps less a run of
    ``steps`` (after two warm-up steps), so what a run does once — a group stacking its members' state at
    its start and writing it back at its end, as it does at stage ends and checkpoints — is not counted."""
    trainer.run(until=trainer.step + 2)
    return (operators(trainer, 2 * steps) - operators(trainer, steps)) / steps


def operators(trainer, steps: int) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.run(until=trainer.step + steps)
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in METADATA:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 1, 8")
    parser.add_argument("--ks", help="group sizes (default 1,8,16,40)")
    parser.add_argument("--steps", type=int, default=None,
                        help="profiled steps (default 3; 1 with --quick: every step dispatches the same)")
    args = parser.parse_args(argv)
    ks = [int(k) for k in (args.ks or ("1,8" if args.quick else "1,8,16,40")).split(",")]
    if args.steps is None:
        args.steps = 1 if args.quick else 3
    if args.steps < 1 or min(ks) < 1:
        parser.error("--steps and every K must be >= 1")
    torch.set_num_threads(1)
    base = TrialConfig.from_dict(CONFIG)
    ds = data.load(base.dataset, subset=base.subset, seed=base.data_seed)
    solo = operators_per_step(Trainer(base, dataset=ds), args.steps)
    print(f"solo: {solo:.0f} operators per step", flush=True)
    per, ratio = {}, {}
    for k in ks:
        members = [base.with_overrides({"seed": s, "beta": 1.0 + s % 4}) for s in range(k)]
        group = FusedTrainer(members, dataset=ds, kernels="batched")
        per[k] = operators_per_step(group, args.steps) / k
        ratio[k] = solo / per[k]
        print(f"fused K={k:<3d} batched: {per[k]:7.1f} operators per member-step: {ratio[k]:5.1f}x fewer than solo",
              flush=True)
        del group
    print(json.dumps({"name": "launch_count", "solo_ops_per_step": round(solo, 1),
                      "per_member_step": {str(k): round(v, 2) for k, v in per.items()},
                      "ratio": {str(k): round(v, 2) for k, v in ratio.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
