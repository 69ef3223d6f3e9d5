"""An example dataset of your own: procedural bars with ground-truth factors.

One white rectangle on a black 64x64 image; four factors in row-major order (last fastest): width (4),
height (4), posX (8), posY (8), so 1,024 images. Like the built-in datasets it has a file format of its own,
``bars.npz`` (``images`` (N, 64, 64) uint8 0/1, ``classes`` (N, 4) int, ``factor_sizes`` (4,) int), which
``python -m provlae data generate bars --out DIR`` writes, and a procedural generator that trains without
any file. Use it without touching the package:

    python -m provlae train --plugin examples.bars --set dataset=bars --set family=vlae --out runs/bars
    python sweeps/full_grid.py --preset smoke --plugin examples.bars --datasets bars,dsprites
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from provlae.data import ProceduralSpec, register
from provlae.data.npyio import NpzReader, write_npy_chunks
from provlae.data.registry import check_array, check_grid
from provlae.errors import DataError

SIZE = 64
WIDTHS = np.array([6, 12, 18, 24])  # pixels
HEIGHTS = np.array([6, 12, 18, 24])
CENTRES = np.linspace(14, 50, 8)  # the rectangle's centre, pixels


@register("bars")
class Bars(ProceduralSpec):
    version = "bars-1"  # bump when the rendered pixels change: it keys the cache
    loader = "bars-npz-1"
    factor_names = ("width", "height", "posX", "posY")
    factor_sizes = (4, 4, 8, 8)
    image_hwc = (SIZE, SIZE, 1)
    pixel_scale = 1.0  # binary pixels
    default_filename = "bars.npz"
    path_hint = "bars.npz (images (N, 64, 64) uint8, classes (N, 4) int, factor_sizes (4,) int)"
    display_order = 10  # after the built-in datasets

    def claims(self, path: Path) -> bool:
        return path.name == self.default_filename and path.is_file()

    def render(self, classes: np.ndarray) -> np.ndarray:
        self.check_classes(classes)
        w, h = WIDTHS[classes[:, 0]], HEIGHTS[classes[:, 1]]
        cx, cy = CENTRES[classes[:, 2]], CENTRES[classes[:, 3]]
        grid = np.arange(SIZE) + 0.5
        inside_x = np.abs(grid[None, :] - cx[:, None]) < w[:, None] / 2  # (n, W)
        inside_y = np.abs(grid[None, :] - cy[:, None]) < h[:, None] / 2  # (n, H)
        return (inside_y[:, :, None] & inside_x[:, None, :]).astype(np.uint8)  # (n, H, W)

    def values(self, classes: np.ndarray) -> np.ndarray:
        c = np.asarray(classes)
        return np.stack([WIDTHS[c[:, 0]], HEIGHTS[c[:, 1]], CENTRES[c[:, 2]], CENTRES[c[:, 3]]], 1).astype(float)

    def write(self, out: Path, sizes: tuple[int, ...], chunks: Iterator, compress: bool) -> None:
        classes, images = [], []
        for cls, _, imgs in chunks:
            classes.append(cls)
            images.append(imgs[..., 0])
        save = np.savez_compressed if compress else np.savez
        with open(out, "wb") as f:  # a file object: savez would append .npz to the temporary name
            save(f, images=np.concatenate(images), classes=np.concatenate(classes).astype(np.int64),
                 factor_sizes=np.asarray(sizes, dtype=np.int64))

    def _extract(self, path: Path, directory: Path) -> dict:
        with NpzReader(path) as z:
            for key, what in (("images", "(N, 64, 64) uint8 images"), ("classes", "(N, 4) integer classes"),
                              ("factor_sizes", "(4,) integer factor sizes")):
                z.require(key, what)
            sizes = tuple(int(s) for s in z.read("factor_sizes"))
            if len(sizes) != 4:
                raise DataError(f"{path}: key 'factor_sizes' has {len(sizes)} entries, expected 4")
            n = int(np.prod(sizes))
            check_array(path, "classes", *z.header("classes"), (n, 4), "integer")
            check_array(path, "images", *z.header("images"), (n, SIZE, SIZE), "uint8")
            classes = z.read("classes").astype(np.int64)
            check_grid(classes, sizes, path, "classes")
            images = z.read("images")
        write_npy_chunks(directory / "factors.npy", classes.shape, np.int64, [classes])
        write_npy_chunks(directory / "images.npy", (n, SIZE, SIZE, 1), np.uint8, [images[..., None]])
        return {"factor_sizes": list(sizes)}
