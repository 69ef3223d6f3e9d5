"""Subcommands of the main CLI's ``data`` command:

    python -m provlae data generate {dsprites,shapes3d,...} --out PATH [--chunk N] [--compress] [--plugin M]
    python -m provlae data check PATH [--dataset NAME] [--plugin M]

Handlers return an exit status; user errors propagate as ``ProvlaeError`` for the main CLI to print.
"""
from __future__ import annotations

import argparse
import time

from provlae.data.api import detect, generate, load
from provlae.data.registry import DATASETS, ProceduralSpec, dataset_names


def add_subcommands(subparsers) -> None:
    """Add ``generate`` and ``check`` to the subparsers object of the ``data`` command.

    Each parser's ``func`` default is its handler: ``args.func(args)`` returns the exit status.
    """
    procedural = [n for n in dataset_names() if isinstance(DATASETS[n], ProceduralSpec)]
    gen = subparsers.add_parser("generate", help="write a procedural dataset in the real file format")
    gen.add_argument("dataset", choices=procedural)
    gen.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                     help="a module of your own that registers datasets (loaded before parsing)")
    gen.add_argument("--out", required=True, help="output file, or a directory for the real file name")
    gen.add_argument("--chunk", type=int, default=None, help="rows rendered per chunk")
    gen.add_argument("--compress", action="store_true", help="deflate (npz) / gzip (h5) the images")
    gen.add_argument("--factor-sizes", type=_sizes, default=None, metavar="N,N,...",
                     help="a reduced grid (evenly spaced classes per factor), for small test files")
    gen.set_defaults(func=_generate)

    check = subparsers.add_parser("check", help="validate a dataset file and describe it")
    check.add_argument("path")
    check.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                       help="a module of your own that registers datasets (loaded before parsing)")
    check.add_argument("--dataset", choices=dataset_names(), default=None,
                       help="dataset name (default: recognised from the file)")
    check.set_defaults(func=_check)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _generate(args: argparse.Namespace) -> int:
    start = time.monotonic()
    out = generate(args.dataset, args.out, chunk=args.chunk, factor_sizes=args.factor_sizes,
                   compress=args.compress)
    size = out.stat().st_size
    shown = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    print(f"wrote {out} ({shown}) in {time.monotonic() - start:.1f} s")
    return 0


def _check(args: argparse.Namespace) -> int:
    name = args.dataset or detect(args.path)
    ds = load(name, args.path)
    print(f"dataset:     {ds.name}")
    print(f"source:      {ds.source}")
    print(f"images:      {len(ds):,} x {ds.image_shape} (C, H, W) uint8, pixel scale {ds.pixel_scale:.6g}")
    factors = ", ".join(f"{n} {s}" for n, s in zip(ds.factor_names, ds.factor_sizes)) or "none"
    print(f"factors:     {factors}")
    return 0
