"""The paper's study as one Ray Tune run: datasets x families x betas x seeds, each trial tracked in MLflow.

    python sweeps/full_grid.py --preset demo                      # local Ray, minutes on a laptop CPU
    ray job submit --working-dir . -- python sweeps/full_grid.py --preset paper --gpus-per-trial 0.25
    python sweeps/full_grid.py --preset smoke --betas 1,4 --seeds 2 --set lr=1e-3 --dry-run

Re-running the same command resumes an interrupted sweep. At the end the study report is written (its
path and the MLflow runs table's URL are the last two lines). Exit status: 0 all trials finished, 1 some
failed (or did not finish), 2 a user error found before anything started.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provlae import plugins  # noqa: E402
from provlae.errors import ConfigError  # noqa: E402
from provlae.fused import make_groups  # noqa: E402
from provlae.plan import make_plan  # noqa: E402
from sweeps import grid  # noqa: E402
from sweeps.cli import add_sweep_args, plan_target, registered, resolve_common, run_main  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    plugins.preload(argv)  # the plug-ins' families and datasets are choices too
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(grid.PRESETS), default="paper",
                        help="axes and scale: paper (full study), demo (minutes on CPU), smoke (tests)")
    parser.add_argument("--datasets", help=f"comma list of {registered('datasets')} (default: the preset's)")
    parser.add_argument("--families", help=f"comma list of {registered('families')} (default: the preset's)")
    parser.add_argument("--betas", help="comma list of beta > 0 (default: the preset's)")
    parser.add_argument("--seeds", help="a count N (seeds 0..N-1) or a comma list '0,3,7'")
    parser.add_argument("--fuse", default="1", metavar="K|auto",
                        help="train up to K trials that differ only in seed and beta as one fused group "
                             "(one batched network per Tune trial; default 1: every trial alone); auto: as "
                             "many as the grid allows and the device holds (1 on a CPU)")
    parser.add_argument("--fused-kernels", choices=("auto", "batched", "sequential"), default="auto",
                        help="a fused group's kernels: batched (stacked, one vmap; the GPU's path), sequential "
                             "(members in turn), auto (batched on CUDA, sequential on CPU)")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="skip the study report at the end (report/index.html in the sweep folder, and "
                             "the parent run's artifact report/index.html)")
    add_sweep_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    auto = args.fuse.strip().lower() == "auto"
    if not auto and not (args.fuse.strip().isdigit() and int(args.fuse) >= 1):
        raise ConfigError(f"--fuse must be auto or >= 1 (trials per fused group), got {args.fuse}")
    options = resolve_common(args, default_name=f"full_grid-{args.preset}", fuse=1 if auto else int(args.fuse),
                             fused_kernels=args.fused_kernels, report=args.report)
    configs = grid.build_trials(
        args.preset,
        datasets=grid.parse_list(args.datasets) if args.datasets else None,
        families=grid.parse_list(args.families) if args.families else None,
        betas=grid.parse_betas(args.betas) if args.betas else None,
        seeds=grid.parse_seeds(args.seeds) if args.seeds else None,
        overrides=options.overrides, data=options.data)
    why = None
    if auto:
        options, why = fuse_auto(configs, options)
        print(f"--fuse auto: {options.fuse} ({why})", flush=True)
    groups = make_groups(configs, options.fuse) if options.fuse > 1 else [[c] for c in configs]
    plan = make_plan(groups, plan_target(options))
    if options.dry_run:
        for cfg in configs:
            print(f"{cfg.run_name:<36} steps={cfg.total_steps:<8} batch={cfg.batch_size:<4} "
                  f"z_dim={cfg.z_dim} subset={cfg.subset} device={cfg.device}")
        print(f"trials: {len(configs)}")
        if options.fuse > 1:
            for n, group in enumerate(groups, 1):
                print(f"group {n} ({len(group)} trials): {', '.join(c.run_name for c in group)}")
            print(f"fused groups: {len(groups)} (Tune trials)")
        print("\n".join(plan.lines()))
        return 0
    from sweeps.launch import run_sweep  # imports Ray: only when the sweep really runs

    description = {"preset": args.preset, "datasets": ",".join(sorted({c.dataset for c in configs})),
                   "families": ",".join(sorted({c.family for c in configs})),
                   "betas": ",".join(f"{b:g}" for b in sorted({c.beta for c in configs})),
                   "seeds": ",".join(str(s) for s in sorted({c.seed for c in configs})),
                   "overrides": " ".join(f"{k}={v}" for k, v in sorted(options.overrides.items())),
                   "fuse": options.fuse, **({"fuse_auto": why} if why else {}), **plan.params()}
    return run_sweep(configs, options, description)


def fuse_auto(configs: list, options):
    """``--fuse auto``: the options with K chosen (``provlae.plan.choose_fuse``), and why. A sweep folder
    already started keeps the K it was started with. On a GPU one member's memory is probed on this
    machine's device, so the driver must have one."""
    from dataclasses import replace

    from provlae.plan import choose_fuse, largest_group
    from sweeps.sweep_folder import GRID_MANIFEST, read_json

    saved = read_json(options.folder, GRID_MANIFEST)
    if saved is not None:
        return replace(options, fuse=int(saved.get("fuse", 1))), f"the K sweep {options.name!r} was started with"
    device = configs[0].device if configs else "cpu"
    if device != "cuda":
        k, why = choose_fuse("cpu", largest_group(configs))
        return replace(options, fuse=k), why
    if options.fused_kernels == "sequential":
        raise ConfigError("--fuse auto sizes groups for the batched kernels of a GPU: pass --fuse K with "
                          "--fused-kernels sequential")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--fuse auto probes one member's memory on a GPU, and this machine has none: run the "
                          "driver on a GPU node, or pass --fuse K")
    from provlae.calibrate import member_memory

    member, free = member_memory(configs[0])
    k, why = choose_fuse("cuda", largest_group(configs), member, free)
    return replace(options, fuse=k), why


if __name__ == "__main__":
    sys.exit(run_main(main))
