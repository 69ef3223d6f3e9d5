"""3DShapes: an object in a room (Burgess & Kim 2018), real .h5 file and procedural twin.

Factors: floor_hue 10, wall_hue 10, object_hue 10 (hues k/10), scale 8 (0.75..1.25), shape 4 (cube,
cylinder, sphere, capsule), orientation 15 (-30..30 degrees).

The generator ray-casts a tiny scene: a floor (y = 0), a back wall (z = WALL_Z) and the object standing at
the origin, lit by a directional light, with cast shadows, a specular highlight and 3x3 supersampling.
Orientation orbits the camera about the object's vertical axis, so the wall/floor edge tilts, the cube's
silhouette turns, and the shading and shadow of every shape move across it (the light stays put).

Colour is linear in the three hues, so each geometry (scale, shape, orientation) — 480 of them — is ray-cast
once into four per-pixel coefficient maps; an image is then

    rgb = 255 * (A * object_rgb + F * floor_rgb + W * wall_rgb + S)        (S: white highlight)

which makes rendering 480,000 images a few vectorised multiply-adds per pixel.
"""
from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from provlae.data import cache
from provlae.data.npyio import write_npy_chunks
from provlae.data.registry import (ProceduralSpec, check_array, check_grid, register)
from provlae.errors import DataError

HUES = np.arange(10) / 10.0
SCALES = np.linspace(0.75, 1.25, 8)
SHAPES = ("cube", "cylinder", "sphere", "capsule")
ORIENTATIONS = np.linspace(-30.0, 30.0, 15)  # degrees

SIZE = 64
SUPERSAMPLE = 3
CAMERA_DISTANCE, CAMERA_HEIGHT, LOOK_AT_HEIGHT = 4.6, 2.0, 0.55
FOCAL = 88.0  # px
WALL_Z = 2.2
LIGHT = np.array([-0.55, 1.0, -0.75]) / np.linalg.norm([-0.55, 1.0, -0.75])  # towards the light
AMBIENT, DIFFUSE, SPECULAR, SHININESS = 0.35, 0.65, 0.3, 24.0
EPS = 1e-6
EXTRACT_CHUNK = 4096
VERSION = "shapes3d-proc-1"  # bump whenever rendered pixels change: it keys the caches

# full-saturation, full-value colours of the 10 hues, (10, 3) float32
HUE_RGB = np.array([colorsys.hsv_to_rgb(h, 1.0, 1.0) for h in HUES], dtype=np.float32)


# ----------------------------------------------------------------------------------- ray intersections
# Each takes ray origins o (P, 3) and unit directions d (P, 3) and returns (t (P,), normal (P, 3)) of the
# nearest hit in front of the origin, t = inf where the ray misses.


def _nearest(*hits):
    t = np.full(len(hits[0][0]), np.inf)
    n = np.zeros((len(t), 3))
    for ti, ni in hits:
        closer = ti < t
        t = np.where(closer, ti, t)
        n = np.where(closer[:, None], ni, n)
    return t, n


def _box(o, d, half, height):
    lo, hi = np.array([-half, 0.0, -half]), np.array([half, height, half])
    d = np.where(np.abs(d) < 1e-12, 1e-12, d)
    t1, t2 = (lo - o) / d, (hi - o) / d
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_in, t_out = near.max(axis=1), far.min(axis=1)
    hit = (t_in <= t_out) & (t_in > EPS)
    axis = near.argmax(axis=1)
    normal = np.zeros_like(o)
    normal[np.arange(len(o)), axis] = -np.sign(d[np.arange(len(o)), axis])
    return np.where(hit, t_in, np.inf), normal


def _sphere(o, d, centre, radius):
    oc = o - centre
    b = np.einsum("ij,ij->i", oc, d)
    c = np.einsum("ij,ij->i", oc, oc) - radius * radius
    disc = b * b - c
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    t = np.where((disc >= 0) & (t > EPS), t, np.inf)
    return t, (o + np.where(np.isfinite(t), t, 0.0)[:, None] * d - centre) / radius


def _cylinder_side(o, d, radius, y0, y1):
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
    c = o[:, 0] ** 2 + o[:, 2] ** 2 - radius * radius
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    y = o[:, 1] + t * d[:, 1]
    t = np.where((disc >= 0) & (a > 1e-12) & (t > EPS) & (y >= y0) & (y <= y1), t, np.inf)
    p = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    normal = np.stack([p[:, 0], np.zeros(len(p)), p[:, 2]], axis=1) / radius
    return t, normal


def _disc_cap(o, d, radius, y):
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (y - o[:, 1]) / d[:, 1]
    p = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    t = np.where((t > EPS) & (p[:, 0] ** 2 + p[:, 2] ** 2 <= radius * radius), t, np.inf)
    return t, np.broadcast_to(np.array([0.0, 1.0, 0.0]), o.shape)


def _object(o, d, shape: int, scale: float):
    """The object standing on the floor at the origin; all shapes about one unit tall at scale 1."""
    if shape == 0:  # cube, side 0.95
        return _box(o, d, 0.475 * scale, 0.95 * scale)
    if shape == 1:  # cylinder, radius 0.45, height 1.0
        r, h = 0.45 * scale, 1.0 * scale
        return _nearest(_cylinder_side(o, d, r, 0.0, h), _disc_cap(o, d, r, h))
    if shape == 2:  # sphere, radius 0.55
        r = 0.55 * scale
        return _sphere(o, d, np.array([0.0, r, 0.0]), r)
    r, h = 0.38 * scale, 1.2 * scale  # capsule: radius 0.38, height 1.2
    return _nearest(_cylinder_side(o, d, r, r, h - r), _sphere(o, d, np.array([0.0, r, 0.0]), r),
                    _sphere(o, d, np.array([0.0, h - r, 0.0]), r))


def _camera_rays(orientation_deg: float):
    """Origin (3,) and unit directions (64 * 64 * SS^2, 3), samples of a pixel contiguous."""
    phi = math.radians(orientation_deg)
    eye = np.array([CAMERA_DISTANCE * math.sin(phi), CAMERA_HEIGHT, -CAMERA_DISTANCE * math.cos(phi)])
    forward = np.array([0.0, LOOK_AT_HEIGHT, 0.0]) - eye
    forward /= np.linalg.norm(forward)
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    up = np.cross(forward, right)
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    rows = (np.arange(SIZE)[:, None] + sub).ravel()  # (64 * SS,)
    # (64, SS, 64, SS) sample grid -> (64, 64, SS, SS) so each pixel's samples are contiguous
    y = ((SIZE / 2 - rows) / FOCAL).reshape(SIZE, SUPERSAMPLE, 1, 1)
    x = ((rows - SIZE / 2) / FOCAL).reshape(1, 1, SIZE, SUPERSAMPLE)
    y, x = np.broadcast_arrays(y, x)
    x, y = x.transpose(0, 2, 1, 3).reshape(-1, 1), y.transpose(0, 2, 1, 3).reshape(-1, 1)
    d = forward + x * right + y * up
    return eye, d / np.linalg.norm(d, axis=1, keepdims=True)


def coefficient_maps(scale: int, shape: int, orientation: int) -> np.ndarray:
    """(4, 64 * 64) float64 maps A, F, W, S of one geometry, already multiplied by 255."""
    eye, d = _camera_rays(ORIENTATIONS[orientation])
    o = np.broadcast_to(eye, d.shape)
    t_obj, n_obj = _object(o, d, shape, SCALES[scale])
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = np.where(d[:, 1] < 0, -eye[1] / d[:, 1], np.inf)
        t_wall = np.where(d[:, 2] > 0, (WALL_Z - eye[2]) / d[:, 2], np.inf)
    is_obj = np.isfinite(t_obj) & (t_obj <= np.minimum(t_floor, t_wall))
    is_floor = ~is_obj & (t_floor <= t_wall)
    is_wall = ~is_obj & ~is_floor & np.isfinite(t_wall)
    n_obj = np.where(is_obj[:, None], n_obj, 0.0)
    # object: Lambert + Blinn-Phong highlight (attached shadows via n.l < 0)
    n_dot_l = np.clip(n_obj @ LIGHT, 0.0, None)
    half = LIGHT - d
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    spec = SPECULAR * np.clip(np.einsum("ij,ij->i", n_obj, half), 0.0, None) ** SHININESS * (n_dot_l > 0)
    # room: Lambert, darkened where the object casts its shadow
    t_bg = np.where(is_floor, t_floor, np.where(is_wall, t_wall, 0.0))
    p = eye + t_bg[:, None] * d
    shadow = np.isfinite(_object(p, np.broadcast_to(LIGHT, p.shape), shape, SCALES[scale])[0])
    lit = ~shadow * DIFFUSE
    maps = np.stack([
        is_obj * (AMBIENT + DIFFUSE * n_dot_l),
        is_floor * (AMBIENT + lit * LIGHT[1]),  # floor normal (0, 1, 0)
        is_wall * (AMBIENT + lit * -LIGHT[2]),  # wall normal (0, 0, -1)
        is_obj * spec,
    ])
    return maps.reshape(4, SIZE * SIZE, SUPERSAMPLE * SUPERSAMPLE).mean(axis=2) * 255.0


N_GEOMETRIES = len(SCALES) * len(SHAPES) * len(ORIENTATIONS)
_MAPS = np.zeros((N_GEOMETRIES, 4, SIZE * SIZE), dtype=np.float32)  # filled lazily, geometry-major
_MAPS_READY = np.zeros(N_GEOMETRIES, dtype=bool)


def _compute_maps(geometries) -> None:
    for g in geometries:
        _MAPS[g] = coefficient_maps(*(int(i) for i in np.unravel_index(g, (8, 4, 15))))
        _MAPS_READY[g] = True


def _load_all_maps() -> None:
    """All 480 geometries (~10 s to ray-cast) from the node's dataset cache, ray-cast there once."""

    def build(directory: Path) -> None:
        _compute_maps(np.flatnonzero(~_MAPS_READY))
        write_npy_chunks(directory / "maps.npy", _MAPS.shape, _MAPS.dtype, [_MAPS])

    arrays, _ = cache.cached_arrays("shapes3d", {"coefficient_maps": VERSION}, ("maps",), build)
    _MAPS[:] = arrays["maps"]
    _MAPS_READY[:] = True


def geometry_maps(geometry: np.ndarray) -> np.ndarray:
    """(n, 4, 64 * 64) float32 maps of geometry indices (scale, shape, orientation) in grid order."""
    missing = np.unique(geometry[~_MAPS_READY[geometry]])
    if len(missing) > 48:
        _load_all_maps()
    else:
        _compute_maps(missing)
    if len(geometry) == N_GEOMETRIES and (geometry == np.arange(N_GEOMETRIES)).all():
        return _MAPS  # an aligned block of the grid: no gather
    return _MAPS[geometry]




@register("shapes3d")
class Shapes3D(ProceduralSpec):
    version = VERSION
    factor_names = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
    factor_sizes = (10, 10, 10, 8, 4, 15)
    pixel_scale = 1 / 255
    image_hwc = (SIZE, SIZE, 3)
    chunk = 2400  # rows per chunk (5 floor/wall/object-hue blocks of the 480 geometries)
    default_filename = "3dshapes.h5"
    loader = "shapes3d-h5-1"
    path_hint = "3dshapes.h5 (HDF5 with 'images' (N, 64, 64, 3) uint8 and 'labels' (N, 6) float64)"
    display_order, paper = 1, True
    # Fade-in as the authors' scripts (train_pro-VLAE.sh) ran it: off for 3DShapes (the paper's text
    # describes it for both; --set fade_in_steps=5000 turns it on).
    paper_config = {"z_dim": 3, "batch_size": 100, "epochs_per_stage": 15, "fade_in_steps": 0}

    # ------------------------------------------------------------------------------------- procedural

    def render(self, classes: np.ndarray) -> np.ndarray:
        self.check_classes(classes)
        classes = np.asarray(classes, dtype=np.int64)
        out = np.empty((len(classes), SIZE, SIZE, 3), dtype=np.uint8)
        for start in range(0, len(classes), 480):
            out[start:start + 480] = _render_chunk(classes[start:start + 480])
        return out

    def values(self, classes: np.ndarray) -> np.ndarray:
        fh, wh, oh, sc, sh, ori = np.asarray(classes).T
        return np.stack([HUES[fh], HUES[wh], HUES[oh], SCALES[sc], sh.astype(np.float64), ORIENTATIONS[ori]],
                        axis=1)

    def write(self, out: Path, sizes: tuple[int, ...], chunks: Iterator, compress: bool) -> None:
        """The real .h5 layout: ``images`` (N, 64, 64, 3) uint8 and ``labels`` (N, 6) float64."""
        import h5py

        n = int(np.prod(sizes))
        extra = {"chunks": (min(n, 256), SIZE, SIZE, 3), "compression": "gzip", "compression_opts": 1} \
            if compress else {}
        with h5py.File(out, "w") as f:
            images = f.create_dataset("images", (n, SIZE, SIZE, 3), dtype=np.uint8, **extra)
            labels = f.create_dataset("labels", (n, 6), dtype=np.float64)
            start = 0
            for _, full_cls, imgs in chunks:
                images[start:start + len(imgs)] = imgs
                labels[start:start + len(imgs)] = self.values(full_cls)
                start += len(imgs)

    # ------------------------------------------------------------------------------------------- files

    def claims(self, path: Path) -> bool:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"

    def _extract(self, path: Path, directory: Path) -> dict:
        import h5py

        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise DataError(f"{path}: not a readable HDF5 file ({e}), expected 3dshapes.h5") from None
        with f:
            for key, want in (("images", "(N, 64, 64, 3) uint8"), ("labels", "(N, 6) float64")):
                if not isinstance(f.get(key), h5py.Dataset):
                    raise DataError(f"{path}: missing key '{key}' (expected a dataset of {want}; "
                                    f"found keys: {', '.join(sorted(f.keys())) or 'none'})")
            images, labels = f["images"], f["labels"]
            check_array(path, "labels", labels.shape, labels.dtype, (None, 6), "float")
            n = labels.shape[0]
            check_array(path, "images", images.shape, images.dtype, (n, SIZE, SIZE, 3), "uint8")
            classes, sizes = _label_classes(labels[:])
            check_grid(classes, sizes, path, "labels")
            write_npy_chunks(directory / "factors.npy", classes.shape, np.int64, [classes])
            chunks = (images[s:s + EXTRACT_CHUNK] for s in range(0, n, EXTRACT_CHUNK))
            write_npy_chunks(directory / "images.npy", (n, SIZE, SIZE, 3), np.uint8, chunks)
        return {"factor_sizes": list(sizes)}


def _label_classes(labels: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Float labels -> classes: each column's sorted unique values (to 1e-6) numbered 0, 1, ..."""
    classes, sizes = [], []
    for column in np.round(labels.astype(np.float64), 6).T:
        uniq, cls = np.unique(column, return_inverse=True)
        classes.append(cls.ravel())
        sizes.append(len(uniq))
    return np.stack(classes, axis=1).astype(np.int64), tuple(sizes)


def _render_chunk(classes: np.ndarray) -> np.ndarray:
    """(n, 6) classes -> (n, 64, 64, 3) uint8 by the linear colour model in the module docstring."""
    fh, wh, oh, sc, sh, ori = classes.T
    maps = geometry_maps((sc * 4 + sh) * 15 + ori)  # (n, 4, 4096)
    # channels-first so the inner loops run over 4096 contiguous pixels, not 3 channels
    rgb = maps[:, 0, None, :] * HUE_RGB[oh][:, :, None]  # (n, 3, 4096)
    rgb += maps[:, 1, None, :] * HUE_RGB[fh][:, :, None]
    rgb += maps[:, 2, None, :] * HUE_RGB[wh][:, :, None]
    rgb += maps[:, 3, None, :]
    rgb += 0.5
    np.clip(rgb, 0.0, 255.0, out=rgb)
    return rgb.astype(np.uint8).transpose(0, 2, 1).reshape(len(classes), SIZE, SIZE, 3)
