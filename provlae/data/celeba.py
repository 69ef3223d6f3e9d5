"""CelebA: aligned face photos, loader only, no factors (qualitative results).

``path`` is the ``img_align_celeba/`` folder of JPEGs (or its parent). Each image (178x218) is cropped to
the box (15, 45, 163, 193) around the face and resized to 64x64 RGB, as the pro-VLAE authors do. Rows
are the files in name order. The full set is decoded once into the node's cache (memory-mapped after);
a subset decodes only its own files.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from provlae.data import cache
from provlae.data.npyio import write_npy_chunks
from provlae.data.registry import Dataset, DatasetSpec, chunk_ranges, register, subset_indices
from provlae.errors import DataError
from provlae.progress import Progress

FOLDER = "img_align_celeba"
CROP = (15, 45, 163, 193)  # PIL box: left, upper, right, lower
SIZE = 64
SUFFIXES = (".jpg", ".jpeg", ".png")
CHUNK = 1024


@register("celeba")
class CelebA(DatasetSpec):
    pixel_scale = 1 / 255
    display_order, has_factors = 3, False
    default_filename = FOLDER
    path_hint = f"the {FOLDER}/ folder of aligned CelebA JPEGs"

    def claims(self, path: Path) -> bool:
        return path.is_dir() and (path.name == FOLDER or (path / FOLDER).is_dir())

    def open(self, path: Path, **options) -> Dataset:
        folder, files = _listing(path)
        return self._decoded(folder, files, np.arange(len(files)), {"subset": None})

    def open_subset(self, path: Path, subset: int, seed: int, **options) -> Dataset:
        folder, files = _listing(path)
        rows = subset_indices(len(files), subset, seed)
        return self._decoded(folder, files, rows, {"subset": int(subset), "seed": int(seed)})

    def _decoded(self, folder: Path, files: list[str], rows: np.ndarray, key: dict) -> Dataset:
        st = folder.stat()
        parts = {"loader": "celeba-1", "folder": str(folder), "mtime_ns": st.st_mtime_ns,
                 "files": len(files), "names": hashlib.sha256("\n".join(files).encode()).hexdigest(), **key}

        def build(directory: Path) -> None:
            with Progress(len(rows), label="decoding celeba", unit="images") as bar:
                write_npy_chunks(directory / "images.npy", (len(rows), SIZE, SIZE, 3), np.uint8,
                                 _decode_chunks(folder, files, rows, bar))
            write_npy_chunks(directory / "factors.npy", (len(rows), 0), np.int64,
                             [np.zeros((len(rows), 0), np.int64)])

        arrays, _ = cache.cached_arrays(self.name, parts, ("images", "factors"), build)
        return Dataset(self.name, arrays["images"], arrays["factors"], (), (), self.pixel_scale, str(folder))


def _listing(path: Path) -> tuple[Path, list[str]]:
    folder = path / FOLDER if path.name != FOLDER and (path / FOLDER).is_dir() else path
    if not folder.is_dir():
        raise DataError(f"{path}: not a directory, expected the {FOLDER}/ folder of CelebA JPEGs")
    files = sorted(e.name for e in os.scandir(folder) if e.name.lower().endswith(SUFFIXES) and e.is_file())
    if not files:
        raise DataError(f"{folder}: no images, expected CelebA JPEGs (000001.jpg, ...)")
    return folder, files


def _decode_chunks(folder: Path, files: list[str], rows: np.ndarray, bar: Progress):
    for start, stop in chunk_ranges(len(rows), CHUNK):
        yield np.stack([decode(folder / files[i]) for i in rows[start:stop]])
        bar.update(stop - start)


def decode(file: Path) -> np.ndarray:
    """One aligned CelebA image -> (64, 64, 3) uint8: crop the face box, resize."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            if im.width < CROP[2] or im.height < CROP[3]:
                raise DataError(f"{file}: image is {im.width}x{im.height}, expected at least "
                                f"{CROP[2]}x{CROP[3]} for the crop box {CROP} (aligned CelebA is 178x218)")
            face = im.convert("RGB").crop(CROP).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            return np.asarray(face, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{file}: not a readable image ({e})") from None
