"""dSprites: 2D shapes on a 64x64 binary canvas (Matthey et al. 2017), real file and procedural twin.

Factors: shape 3 (square, ellipse, heart), scale 6 (0.5..1), orientation 40 (0..2pi), posX 32, posY 32
(0..1). The real file's constant colour column is dropped.

The generator point-samples each pixel centre against the shape, transformed by scale, rotation and
position: binary, no noise. At scale 1 the square is 19 px wide, the ellipse 25 x 12.5 px, the heart
23 px; centres span 14.3..50.3 px so a rotated object never leaves the frame. Every step of every factor
changes the pixels: the sizes and centre range were chosen by checking all 737,280 x 4 neighbouring
pairs, and tests re-check a sample plus the risky small-scale rotations. As in the real set, the two ends
of the orientation range (0 and 2pi) give equal images; they are not neighbours.
"""
from __future__ import annotations

import math
import time
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from provlae.data.npyio import NpyStreamWriter, NpzReader, write_npy_chunks
from provlae.data.registry import (ProceduralSpec, check_array, check_grid, reduced_grid_classes,
                                   register)
from provlae.errors import DataError

SHAPES = ("square", "ellipse", "heart")
SCALES = np.linspace(0.5, 1.0, 6)
ORIENTATIONS = np.linspace(0.0, 2 * np.pi, 40)
POSITIONS = np.linspace(0.0, 1.0, 32)

SIZE = 64
RADIUS = 12.5  # px: object "radius" at scale 1; shapes below are in these units
# px: centre range of posX/posY 0..1. Steps are 1.16 px (> 1 px, so every step moves the outline across a
# pixel centre); the range is off the half-pixel lattice so no centre makes an object's raster symmetric.
CENTRE_LO, CENTRE_HI = 14.3, 50.3
EXTENT = 1.07  # largest distance of a canonical shape's point from its centre (units of RADIUS)
WINDOW = 2 * int(np.ceil(RADIUS * EXTENT)) + 2  # px: a box around the centre that holds any object

# libm cos/sin of the 40 angles: the same bits on every CPU (numpy's SIMD versions may differ in an ulp)
_COS = np.array([math.cos(t) for t in ORIENTATIONS])
_SIN = np.array([math.sin(t) for t in ORIENTATIONS])

LATENTS_NAMES = ("color", "shape", "scale", "orientation", "posX", "posY")
EXTRACT_CHUNK = 16384


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points (u right, v down; units of RADIUS) in the canonical upright shape."""
    if shape == 0:  # square, side 1.5
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == 1:  # ellipse, semi-axes 1 x 0.5
        return u * u + 4.0 * v * v <= 1.0
    # heart: (x^2 + y^2 - 1)^3 <= x^2 y^3 with y up, centred on its bounding box, radius ~1.07
    x, y = 1.25 * u, 0.118 - 1.25 * v
    r = x * x + y * y - 1.0
    return r * r * r <= x * x * y * y * y


def _centre(pos_class: np.ndarray) -> np.ndarray:
    return (CENTRE_LO + (CENTRE_HI - CENTRE_LO) * POSITIONS[pos_class]).astype(np.float32)


def _window_offsets(centre: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(centre).astype(np.int64) - WINDOW // 2, 0, SIZE - WINDOW)


def _render_chunk(classes: np.ndarray) -> np.ndarray:
    """(n, 5) classes -> (n, 64, 64) uint8 in {0, 1}; work is done in a window around each object."""
    n = len(classes)
    shape, scale, orient, px, py = classes.T
    cx, cy = _centre(px), _centre(py)
    ox, oy = _window_offsets(cx), _window_offsets(cy)
    ar = np.arange(WINDOW)
    dx = (ox[:, None] + ar + 0.5).astype(np.float32) - cx[:, None]  # (n, W) pixel centre - object centre
    dy = (oy[:, None] + ar + 0.5).astype(np.float32) - cy[:, None]
    inv = 1.0 / (RADIUS * SCALES[scale])
    cos, sin = (_COS[orient] * inv).astype(np.float32), (_SIN[orient] * inv).astype(np.float32)
    # rotate the sampling points by -theta == rotate the shape by +theta; (n, W, W) rows = y, cols = x
    u = (cos[:, None] * dx)[:, None, :] + (sin[:, None] * dy)[:, :, None]
    v = (cos[:, None] * dy)[:, :, None] - (sin[:, None] * dx)[:, None, :]
    window = np.empty((n, WINDOW, WINDOW), dtype=bool)
    for s in np.unique(shape):
        sel = shape == s
        window[sel] = _inside(int(s), u[sel], v[sel])
    out = np.zeros((n, SIZE, SIZE), dtype=np.uint8)
    out[np.arange(n)[:, None, None], (oy[:, None] + ar)[:, :, None], (ox[:, None] + ar)[:, None, :]] = window
    return out


@register("dsprites")
class DSprites(ProceduralSpec):
    version = "dsprites-proc-1"
    factor_names = ("shape", "scale", "orientation", "posX", "posY")
    factor_sizes = (3, 6, 40, 32, 32)
    pixel_scale = 1.0
    image_hwc = (SIZE, SIZE, 1)
    chunk = 8192
    default_filename = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
    loader = "dsprites-npz-1"
    path_hint = "the dSprites .npz (imgs, latents_classes, latents_values, metadata)"
    optional_factors = (0,)  # shape: out of MIG / MIG-sup unless include_shape (the paper's protocol)
    display_order, paper = 0, True
    paper_config = {"z_dim": 2, "batch_size": 128, "epochs_per_stage": 30, "fade_in_steps": 5000}

    # ------------------------------------------------------------------------------------- procedural

    def render(self, classes: np.ndarray) -> np.ndarray:
        self.check_classes(classes)
        classes = np.asarray(classes, dtype=np.int64)
        out = np.empty((len(classes), SIZE, SIZE), dtype=np.uint8)
        for start in range(0, len(classes), 2048):  # bounds the float temporaries (~25 MB each)
            out[start:start + 2048] = _render_chunk(classes[start:start + 2048])
        return out

    def values(self, classes: np.ndarray) -> np.ndarray:
        shape, scale, orient, px, py = np.asarray(classes).T
        return np.stack([shape + 1.0, SCALES[scale], ORIENTATIONS[orient], POSITIONS[px], POSITIONS[py]],
                        axis=1)

    def write(self, out: Path, sizes: tuple[int, ...], chunks: Iterator, compress: bool) -> None:
        """The real .npz layout: imgs, latents_classes, latents_values, metadata (colour column first)."""
        n = int(np.prod(sizes))
        file_classes = np.zeros((n, 6), dtype=np.int64)
        file_values = np.ones((n, 6), dtype=np.float64)  # colour value 1.0 as in the real set
        method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        with zipfile.ZipFile(out, "w", compression=method, compresslevel=1 if compress else None,
                             allowZip64=True) as zf:
            with zf.open("imgs.npy", "w", force_zip64=True) as f:
                writer = NpyStreamWriter(f, (n, SIZE, SIZE), np.uint8)
                start = 0
                for cls, full_cls, images in chunks:
                    stop = start + len(cls)
                    file_classes[start:stop, 1:] = cls
                    file_values[start:stop, 1:] = self.values(full_cls)
                    writer.write(images[..., 0] if images.ndim == 4 else images)
                    start = stop
                writer.check_complete()
            possible = _possible_values(sizes, self.factor_sizes)
            meta = {"latents_sizes": np.array([1, *sizes]), "latents_names": LATENTS_NAMES,
                    "latents_possible_values": possible,
                    "title": "dSprites (procedural)", "version": self.version,
                    "description": "Procedurally rendered dSprites factor grid, generated by provlae.",
                    "date": time.strftime("%Y-%m-%d")}
            for key, array in (("latents_classes", file_classes), ("latents_values", file_values),
                               ("metadata", np.array(meta, dtype=object))):
                with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=True)

    # ------------------------------------------------------------------------------------------- files

    def claims(self, path: Path) -> bool:
        if path.suffix != ".npz" or not path.is_file():
            return False
        try:
            with zipfile.ZipFile(path) as zf:
                return "imgs.npy" in zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return False

    def _extract(self, path: Path, directory: Path) -> dict:
        """Validate a dSprites .npz and stream its images into an uncompressed .npy."""
        with NpzReader(path) as z:
            z.require("metadata", "a pickled dict with 'latents_sizes'")
            z.require("latents_classes", "(N, 6) integer factor classes")
            z.require("latents_values", "(N, 6) float factor values")
            z.require("imgs", "(N, 64, 64) uint8 images")
            sizes = _read_sizes(path, z.read_pickled("metadata"))
            n = int(np.prod(sizes))
            shape, dtype = z.header("latents_classes")
            check_array(path, "latents_classes", shape, dtype, (n, 6), "integer")
            shape, dtype = z.header("latents_values")
            check_array(path, "latents_values", shape, dtype, (n, 6), "float")
            shape, dtype = z.header("imgs")
            check_array(path, "imgs", shape, dtype, (n, SIZE, SIZE), "uint8")
            classes = z.read("latents_classes").astype(np.int64)
            if (classes[:, 0] != 0).any():
                raise DataError(f"{path}: key 'latents_classes' column 0 (colour) is not all 0, expected 0")
            check_grid(classes[:, 1:], sizes, path, "latents_classes")
            write_npy_chunks(directory / "factors.npy", (n, 5), np.int64, [classes[:, 1:]])
            write_npy_chunks(directory / "images.npy", (n, SIZE, SIZE, 1), np.uint8,
                             (_binary(path, c)[..., None] for c in z.iter_rows("imgs", EXTRACT_CHUNK)))
        return {"factor_sizes": list(sizes)}


def _binary(path: Path, images: np.ndarray) -> np.ndarray:
    if images.max(initial=0) > 1:
        raise DataError(f"{path}: key 'imgs' has pixel value {images.max()}, expected binary pixels 0/1")
    return images


def _read_sizes(path: Path, meta) -> tuple[int, ...]:
    """Factor sizes from metadata['latents_sizes'] = [1 (colour), shape, scale, orientation, posX, posY]."""
    if not isinstance(meta, dict) or "latents_sizes" not in meta:
        raise DataError(f"{path}: key 'metadata' has no 'latents_sizes', expected a dict with "
                        f"'latents_sizes' [1, 3, 6, 40, 32, 32]")
    try:
        sizes = tuple(int(s) for s in np.asarray(meta["latents_sizes"]).ravel())
    except (TypeError, ValueError):
        sizes = ()
    if len(sizes) != 6 or sizes[0] != 1 or min(sizes) < 1:
        raise DataError(f"{path}: key 'metadata' latents_sizes is {meta['latents_sizes']!r}, expected "
                        f"6 positive sizes with colour first and equal to 1, e.g. [1, 3, 6, 40, 32, 32]")
    return sizes[1:]


def _possible_values(sizes: tuple[int, ...], full_sizes: tuple[int, ...]) -> dict:
    keep = reduced_grid_classes(sizes, full_sizes)
    return {"color": np.array([1.0]), "shape": keep[0] + 1.0, "scale": SCALES[keep[1]],
            "orientation": ORIENTATIONS[keep[2]], "posX": POSITIONS[keep[3]], "posY": POSITIONS[keep[4]]}
