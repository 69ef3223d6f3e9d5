"""Seconds to generate the full procedural dSprites (737,280 rows, 3 GB) and 3DShapes (480,000 rows,
5.9 GB) in their real file formats: render + write, one process, cold caches (3DShapes' ray-cast
geometry maps included), into a temporary directory that is deleted afterwards.

    python benchmarks/generate_data.py [--quick] [--dir DIR]

``--quick`` (well under a minute) times a slice of each grid — every geometry, fewer positions or hues —
and extrapolates linearly to the full size (3DShapes' one-off ray-casting is timed apart and added once).
Last line: {"name": "generate_data", "dsprites_s": ..., "shapes3d_s": ..., "extrapolated": true/false}
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

QUICK_SIZES = {"dsprites": (3, 6, 40, 32, 4), "shapes3d": (10, 10, 1, 8, 4, 15)}  # the slices --quick times


def timed_generate(name: str, out_dir: Path, factor_sizes=None) -> tuple[float, int]:
    from provlae import data

    start = time.perf_counter()
    out = data.generate(name, out_dir, factor_sizes=factor_sizes, progress=False)
    seconds = time.perf_counter() - start
    size = out.stat().st_size
    out.unlink()
    return seconds, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="time a slice and extrapolate")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="provlae-gen-", dir=args.dir))
    os.environ["PROVLAE_HOME"] = str(work / "home")  # cold cache: nothing precomputed
    from provlae import data
    from provlae.data import shapes3d

    results = {}
    try:
        for name in QUICK_SIZES:  # the built-in generators
            spec = data.DATASETS[name]
            n_full = int(np.prod(spec.factor_sizes))
            fixed = 0.0
            if args.quick:
                if name == "shapes3d":  # one-off ray-casting of the 480 geometries, not per row
                    start = time.perf_counter()
                    shapes3d.geometry_maps(np.arange(shapes3d.N_GEOMETRIES))
                    fixed = time.perf_counter() - start
                sizes = QUICK_SIZES[name]
                seconds, size = timed_generate(name, work, sizes)
                n = int(np.prod(sizes))
                total = fixed + seconds * n_full / n
                print(f"{name}: {n:,} of {n_full:,} rows in {seconds:.1f} s ({n / seconds:,.0f} rows/s, "
                      f"{size / 1e9:.2f} GB)" + (f" + {fixed:.1f} s ray-casting" if fixed else "")
                      + f" -> full set extrapolated: {total:.0f} s")
            else:
                total, size = timed_generate(name, work)
                print(f"{name}: {n_full:,} rows, {size / 1e9:.2f} GB in {total:.1f} s "
                      f"({n_full / total:,.0f} rows/s)")
            results[f"{name}_s"] = round(total, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"name": "generate_data", **results, "extrapolated": args.quick}))


if __name__ == "__main__":
    main()
