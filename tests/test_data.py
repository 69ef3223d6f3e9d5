"""provlae.data: loaders on tiny files written here in the real formats, the procedural generators, the
cache, subsets and the ``data`` CLI. Nothing here renders a full dataset."""
from __future__ import annotations

import colorsys
import gzip
import io
import os
import struct
import threading
import zipfile

import h5py
import numpy as np
import pytest
from PIL import Image

from provlae import data
from provlae.__main__ import main as cli_main
from provlae.data import dsprites, shapes3d
from provlae.data.registry import grid_classes, reduced_grid_classes
from provlae.errors import ConfigError, DataError
from provlae.progress import Progress

DSP = data.DATASETS["dsprites"]
S3D = data.DATASETS["shapes3d"]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A fresh data home (and so a fresh dataset cache) per test."""
    monkeypatch.setenv("PROVLAE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tmp_leftovers(root):
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


# ------------------------------------------------------------------------------ writers of real formats


def write_dsprites(path, sizes=(3, 2, 2, 2, 2), *, images=None, skip=(), replace=None, metadata=None):
    """A dSprites-format .npz over a reduced grid; ``replace`` overrides members, ``skip`` drops them."""
    n = int(np.prod(sizes))
    classes = np.concatenate([np.zeros((n, 1), np.int64), grid_classes(sizes)], axis=1)
    rng = np.random.default_rng(0)
    members = {
        "imgs": rng.integers(0, 2, (n, 64, 64), dtype=np.uint8) if images is None else images,
        "latents_classes": classes,
        "latents_values": classes.astype(np.float64),
        "metadata": np.array(metadata if metadata is not None else
                             {"latents_sizes": np.array([1, *sizes]),
                              "latents_names": dsprites.LATENTS_NAMES}, dtype=object),
    }
    members.update(replace or {})
    np.savez_compressed(path, **{k: v for k, v in members.items() if k not in skip})
    return members


def write_shapes3d(path, sizes=(2, 2, 2, 2, 2, 2), *, skip=(), replace=None):
    n = int(np.prod(sizes))
    classes = grid_classes(sizes)
    values = [shapes3d.HUES, shapes3d.HUES, shapes3d.HUES, shapes3d.SCALES, np.arange(4.0),
              shapes3d.ORIENTATIONS]
    members = {"images": np.random.default_rng(1).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
               "labels": np.stack([values[k][classes[:, k]] for k in range(6)], axis=1)}
    members.update(replace or {})
    with h5py.File(path, "w") as f:
        for k, v in members.items():
            if k not in skip:
                f.create_dataset(k, data=v)
    return members


def write_idx(path, array, magic=None):
    header = magic if magic is not None else bytes([0, 0, 8, array.ndim])
    raw = header + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def mnist_arrays(n_train=5, n_test=3):
    rng = np.random.default_rng(2)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), np.arange(n_train) % 10,
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), (np.arange(n_test) + 7) % 10)


# ------------------------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
    assert {"dsprites", "shapes3d", "mnist", "celeba"} <= set(data.DATASETS)
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        data.load("nope")
    with pytest.raises(ConfigError, match="path is required"):
        data.load("mnist")
    with pytest.raises(ConfigError, match="path is required"):
        data.load("celeba")
    with pytest.raises(ConfigError, match="unknown option"):
        data.load("dsprites", colour=True)


def test_register_a_new_dataset(tmp_path):
    @data.register("tiny_test_set")
    class Tiny(data.DatasetSpec):
        def open(self, path, **options):
            images = np.zeros((4, 8, 8, 1), np.uint8)
            return data.Dataset(self.name, images, np.arange(4)[:, None], ("k",), (4,), 1 / 255, str(path))

    try:
        ds = data.load("tiny_test_set", tmp_path, subset=2, seed=0)
        assert ds.name == "tiny_test_set" and len(ds) == 2 and ds.image_shape == (1, 8, 8)
    finally:
        del data.DATASETS["tiny_test_set"]


# ------------------------------------------------------------------------------------- dSprites file


def test_dsprites_npz_loads_memory_mapped(tmp_path, home):
    path = tmp_path / "dsprites.npz"
    members = write_dsprites(path, sizes=(3, 2, 3, 2, 2))
    ds = data.load("dsprites", path)
    assert isinstance(ds.images, np.memmap) and ds.images.shape == (72, 64, 64, 1)
    assert ds.image_shape == (1, 64, 64) and len(ds) == 72 and ds.pixel_scale == 1.0
    assert ds.factor_names == ("shape", "scale", "orientation", "posX", "posY")
    assert ds.factor_sizes == (3, 2, 3, 2, 2)  # from metadata, not hard-coded
    np.testing.assert_array_equal(ds.images[..., 0], members["imgs"])
    np.testing.assert_array_equal(ds.factors, members["latents_classes"][:, 1:])
    assert ds.factors.dtype == np.int64
    assert not tmp_leftovers(home)


@pytest.mark.parametrize("change, key, expected", [
    ({"skip": ("imgs",)}, "imgs", "missing key"),
    ({"skip": ("metadata",)}, "metadata", "missing key"),
    ({"skip": ("latents_classes",)}, "latents_classes", "missing key"),
    ({"replace": {"imgs": np.zeros((48, 64, 64), np.float32)}}, "imgs", "expected uint8"),
    ({"replace": {"imgs": np.zeros((48, 32, 32), np.uint8)}}, "imgs", r"expected \(48, 64, 64\)"),
    ({"replace": {"imgs": np.full((48, 64, 64), 255, np.uint8)}}, "imgs", "expected binary"),
    ({"replace": {"latents_classes": np.zeros((48, 6), np.float32)}}, "latents_classes", "expected integer"),
    ({"replace": {"latents_classes": np.zeros((48, 6), np.int64)}}, "latents_classes", "row-major"),
    ({"replace": {"latents_values": np.zeros((48, 5))}}, "latents_values", r"expected \(48, 6\)"),
    ({"metadata": {"latents_sizes": [1, 3, 2, 2]}}, "metadata", "expected 6 positive sizes"),
    ({"metadata": {"names": 1}}, "metadata", "latents_sizes"),
    ({"metadata": {"latents_sizes": np.array([1, 3, 2, 2, 2, 3])}}, "latents_classes", r"expected \(72, 6\)"),
])
def test_dsprites_bad_files_name_file_and_key(tmp_path, change, key, expected):
    path = tmp_path / "bad.npz"
    write_dsprites(path, sizes=(3, 2, 2, 2, 2), **change)
    with pytest.raises(DataError, match=expected) as err:
        data.load("dsprites", path)
    assert str(path) in str(err.value) and f"'{key}'" in str(err.value)


def test_dsprites_metadata_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getpid, ())

    path = tmp_path / "evil.npz"
    write_dsprites(path, replace={"metadata": np.array({"latents_sizes": Evil()}, dtype=object)})
    with pytest.raises(DataError, match="'metadata' could not be unpickled.*refusing"):
        data.load("dsprites", path)


def test_missing_and_non_archive_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.load("dsprites", tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz: not a readable .npz"):
        data.load("dsprites", tmp_path / "junk.npz")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="junk.h5: not a readable HDF5"):
        data.load("shapes3d", tmp_path / "junk.h5")


def test_truncated_npz_member(tmp_path):
    path = tmp_path / "cut.npz"
    write_dsprites(path)
    np.savez(path, **dict(np.load(path, allow_pickle=True)))  # uncompressed, so we can cut the payload
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["imgs.npy"] = members["imgs.npy"][:-1000]
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    with pytest.raises(DataError, match="'imgs' is truncated"):
        data.load("dsprites", path)


# ------------------------------------------------------------------------------------- 3DShapes file


def test_shapes3d_h5_labels_become_classes(tmp_path):
    path = tmp_path / "3dshapes.h5"
    members = write_shapes3d(path, sizes=(2, 3, 2, 2, 1, 2))
    ds = data.load("shapes3d", path)
    assert isinstance(ds.images, np.memmap) and ds.images.shape == (48, 64, 64, 3)
    assert ds.factor_sizes == (2, 3, 2, 2, 1, 2) and ds.pixel_scale == pytest.approx(1 / 255)
    assert ds.factor_names == ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
    np.testing.assert_array_equal(ds.images, members["images"])
    np.testing.assert_array_equal(ds.factors, grid_classes((2, 3, 2, 2, 1, 2)))


@pytest.mark.parametrize("change, key, expected", [
    ({"skip": ("labels",)}, "labels", "missing key"),
    ({"skip": ("images",)}, "images", "missing key"),
    ({"replace": {"images": np.zeros((64, 64, 64, 3), np.float32)}}, "images", "expected uint8"),
    ({"replace": {"images": np.zeros((64, 64, 64), np.uint8)}}, "images", r"expected \(64, 64, 64, 3\)"),
    ({"replace": {"labels": np.zeros((64, 5))}}, "labels", r"expected \(N, 6\)"),
    ({"replace": {"labels": np.zeros((64, 6), np.int32)}}, "labels", "expected float"),
    ({"replace": {"labels": np.zeros((64, 6))}}, "labels", "64 rows, expected 1 "),
])
def test_shapes3d_bad_files_name_file_and_key(tmp_path, change, key, expected):
    path = tmp_path / "bad.h5"
    write_shapes3d(path, **change)
    with pytest.raises(DataError, match=expected) as err:
        data.load("shapes3d", path)
    assert str(path) in str(err.value) and f"'{key}'" in str(err.value)


def test_shapes3d_rows_out_of_grid_order(tmp_path):
    path = tmp_path / "shuffled.h5"
    members = write_shapes3d(path)
    write_shapes3d(path, replace={"labels": members["labels"][::-1]})
    with pytest.raises(DataError, match="'labels' is not the factor grid in row-major order"):
        data.load("shapes3d", path)


# ---------------------------------------------------------------------------------------- MNIST, CelebA


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_idx_files_padded(tmp_path, suffix):
    xtr, ytr, xte, yte = mnist_arrays()
    for stem, arr in (("train-images-idx3-ubyte", xtr), ("train-labels-idx1-ubyte", ytr),
                      ("t10k-images-idx3-ubyte", xte), ("t10k-labels-idx1-ubyte", yte)):
        write_idx(tmp_path / (stem + suffix), arr)
    ds = data.load("mnist", tmp_path)
    assert ds.images.shape == (8, 32, 32, 1) and ds.image_shape == (1, 32, 32)
    assert ds.factor_names == ("digit",) and ds.factor_sizes == (10,)
    np.testing.assert_array_equal(ds.images[:5, 2:30, 2:30, 0], xtr)
    np.testing.assert_array_equal(ds.images[5:, 2:30, 2:30, 0], xte)
    assert ds.images[:, :2].max() == 0 and ds.images[:, :, 30:].max() == 0  # zero padding
    np.testing.assert_array_equal(ds.factors[:, 0], np.concatenate([ytr, yte]))
    big = data.load("mnist", tmp_path, size=64)
    assert big.images.shape == (8, 64, 64, 1)
    np.testing.assert_array_equal(big.images[:, ::2, ::2], ds.images)


def test_mnist_npz_and_errors(tmp_path):
    xtr, ytr, xte, yte = mnist_arrays()
    np.savez(tmp_path / "mnist.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    ds = data.load("mnist", tmp_path / "mnist.npz", subset=4, seed=0)
    assert ds.images.shape == (4, 32, 32, 1) and not isinstance(ds.images, np.memmap)
    assert data.load("mnist", tmp_path).images.shape == (8, 32, 32, 1)  # a folder holding mnist.npz
    np.savez(tmp_path / "no_ytest.npz", x_train=xtr, y_train=ytr, x_test=xte)
    with pytest.raises(DataError, match=r"no_ytest.npz: missing key 'y_test'"):
        data.load("mnist", tmp_path / "no_ytest.npz")
    np.savez(tmp_path / "float.npz", x_train=xtr.astype(np.float32), y_train=ytr, x_test=xte, y_test=yte)
    with pytest.raises(DataError, match=r"float.npz: key 'x_train' has dtype float32, expected uint8"):
        data.load("mnist", tmp_path / "float.npz")
    with pytest.raises(ConfigError, match="size"):
        data.load("mnist", tmp_path / "mnist.npz", size=48)
    idx = tmp_path / "idx"
    idx.mkdir()
    for stem, arr in (("train-images-idx3-ubyte", xtr), ("train-labels-idx1-ubyte", ytr),
                      ("t10k-images-idx3-ubyte", xte)):
        write_idx(idx / stem, arr, magic=b"\0\0\x08\x09" if stem.startswith("t10k") else None)
    with pytest.raises(DataError, match="missing.*t10k-labels-idx1-ubyte"):
        data.load("mnist", idx)
    write_idx(idx / "t10k-labels-idx1-ubyte", yte)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: header 'magic' is 00000809, expected"):
        data.load("mnist", idx)


def test_celeba_crop_resize_subset_and_errors(tmp_path):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90)]
    for i, colour in enumerate(colours):
        im = Image.new("RGB", (178, 218), (255, 255, 255))
        im.paste(colour, (15, 45, 163, 193))  # exactly the crop box
        im.save(folder / f"{i + 1:06d}.jpg", quality=95)
    ds = data.load("celeba", tmp_path)  # the parent folder works too
    assert ds.images.shape == (4, 64, 64, 3) and ds.factors.shape == (4, 0) and ds.factor_sizes == ()
    assert ds.pixel_scale == pytest.approx(1 / 255)
    np.testing.assert_allclose(ds.images[:, 8:56, 8:56].mean(axis=(1, 2)), colours, atol=4)
    sub = data.load("celeba", folder, subset=2, seed=5)
    rows = np.sort(np.random.default_rng(5).choice(4, 2, replace=False))
    np.testing.assert_array_equal(sub.images, ds.images[rows])
    Image.new("RGB", (100, 100)).save(folder / "000005.jpg")
    with pytest.raises(DataError, match="000005.jpg: image is 100x100, expected at least 163x193"):
        data.load("celeba", folder)
    (folder / "000005.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="000005.jpg: not a readable image"):
        data.load("celeba", folder)


# -------------------------------------------------------------------------------- procedural dSprites


def test_dsprites_render_is_binary_deterministic_and_batch_independent():
    rows = np.random.default_rng(0).choice(737_280, 300, replace=False)
    classes = grid_classes(DSP.factor_sizes, rows)
    a = DSP.render(classes)
    assert a.shape == (300, 64, 64) and a.dtype == np.uint8 and set(np.unique(a)) == {0, 1}
    np.testing.assert_array_equal(a, DSP.render(classes))
    np.testing.assert_array_equal(a[::-1][:7], DSP.render(classes[::-1][:7]))
    assert (a.reshape(300, -1).sum(1) >= 20).all()  # the smallest object still covers > 20 px
    with pytest.raises(ConfigError, match="out of range"):
        DSP.render(np.array([[3, 0, 0, 0, 0]]))


def _neighbours_differ(spec, base: np.ndarray, factor: int) -> np.ndarray:
    nxt = base.copy()
    nxt[:, factor] += 1
    a, b = spec.render(base), spec.render(nxt)
    return (a != b).reshape(len(base), -1).any(axis=1)


@pytest.mark.parametrize("factor", range(1, 5))
def test_dsprites_every_factor_step_changes_the_image(factor):
    sizes = np.array(DSP.factor_sizes)
    rng = np.random.default_rng(factor)
    base = rng.integers(0, sizes, (400, 5))
    base[:, factor] = rng.integers(0, sizes[factor] - 1, 400)
    assert _neighbours_differ(DSP, base, factor).all()


def test_dsprites_small_rotations_change_the_image():
    """The riskiest steps: all 39 rotation steps of the smallest objects at 8 x 8 positions."""
    o, x, y = np.meshgrid(np.arange(39), np.arange(0, 32, 4), np.arange(1, 32, 4), indexing="ij")
    for shape in range(3):
        base = np.stack([np.full(o.size, shape), np.zeros(o.size, int), o.ravel(), x.ravel(), y.ravel()], 1)
        assert _neighbours_differ(DSP, base, 2).all(), dsprites.SHAPES[shape]


def test_dsprites_shapes_differ_and_fit_the_frame():
    classes = np.array([[s, 5, o, p, p] for s in range(3) for o in (0, 5) for p in (0, 16, 31)])
    images = DSP.render(classes)
    assert len({im.tobytes() for im in images}) == len(images)
    area = images.reshape(6, 3, -1).sum(-1)  # (shape x orientation, position)
    np.testing.assert_allclose(area[:, [0, 2]], area[:, [1, 1]], rtol=0.15)  # same object at the edges
    reach = dsprites.RADIUS * dsprites.EXTENT  # no object reaches out of the 64 px frame
    assert dsprites.CENTRE_LO - reach >= 0 and dsprites.CENTRE_HI + reach <= 64
    widths = images[(classes[:, 2] == 0) & (classes[:, 3] == 16)].any(axis=1).sum(axis=1)
    assert ((widths >= 12) & (widths <= 26)).all()  # upright objects at scale 1


# -------------------------------------------------------------------------------- procedural 3DShapes


def test_shapes3d_layout_floor_bottom_wall_top_object_middle():
    # floor red (hue 0), wall hue 0.5 (cyan), object hue 0.3 (green); smallest and largest objects
    classes = np.array([[0, 5, 3, sc, sh, o] for sc in (0, 7) for sh in range(4) for o in (0, 14)])
    images = S3D.render(classes)
    assert images.shape == (16, 64, 64, 3) and images.dtype == np.uint8

    def hue(pixel):
        return colorsys.rgb_to_hsv(*(pixel / 255.0))[0]

    for im in images:
        assert hue(im[2, 2]) == pytest.approx(0.5, abs=0.02) and hue(im[2, 61]) == pytest.approx(0.5, abs=0.02)
        assert hue(im[61, 2]) == pytest.approx(0.0, abs=0.02) and hue(im[61, 61]) == pytest.approx(0.0, abs=0.02)
        assert hue(im[40, 32]) == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("factor", range(6))
def test_shapes3d_every_factor_step_changes_the_image(factor):
    sizes = np.array(S3D.factor_sizes)
    rng = np.random.default_rng(10 + factor)
    base = rng.integers(0, sizes, (12, 6))
    base[:, factor] = rng.integers(0, sizes[factor] - 1, 12)
    assert _neighbours_differ(S3D, base, factor).all()


def test_shapes3d_orientation_turns_every_shape():
    """Orientation must change the object itself, not just the room: compare object pixels only."""
    for shape in range(4):
        classes = np.array([[0, 0, 3, 4, shape, o] for o in (6, 7)])
        a, b = S3D.render(classes).astype(int)
        object_px = (np.abs(a - b).sum(-1) > 0) & (a[..., 1] > a[..., 0])  # greenish = object
        assert object_px.sum() >= 10, shapes3d.SHAPES[shape]


# ------------------------------------------------------------------------------- subsets and the cache


@pytest.fixture
def small_grids(monkeypatch):
    """Shrink the procedural grids so a 'full' build takes milliseconds."""
    monkeypatch.setattr(type(DSP), "factor_sizes", (3, 2, 2, 2, 2))
    monkeypatch.setattr(type(S3D), "factor_sizes", (2, 1, 2, 1, 4, 2))


def test_subset_equals_rows_of_the_full_set(small_grids, home):
    for spec in (DSP, S3D):
        full = data.load(spec.name)
        n = int(np.prod(spec.factor_sizes))
        assert isinstance(full.images, np.memmap) and len(full) == n
        np.testing.assert_array_equal(full.factors, grid_classes(spec.factor_sizes))
        sub = data.load(spec.name, subset=7, seed=3)
        rows = np.sort(np.random.default_rng(3).choice(n, 7, replace=False))
        np.testing.assert_array_equal(sub.images, full.images[rows])
        np.testing.assert_array_equal(sub.factors, full.factors[rows])
        again = data.load(spec.name, subset=7, seed=3)
        np.testing.assert_array_equal(again.images, sub.images)
        other = data.load(spec.name, subset=7, seed=4)
        assert not np.array_equal(other.factors, sub.factors)
    assert not tmp_leftovers(home)


def test_subset_rows_match_the_real_grid_rows(home):
    """A subset of the full (unshrunk) grid renders the same pixels as rendering those rows directly."""
    ds = data.load("dsprites", subset=64, seed=11)
    rows = np.sort(np.random.default_rng(11).choice(737_280, 64, replace=False))
    np.testing.assert_array_equal(ds.factors, grid_classes(DSP.factor_sizes, rows))
    np.testing.assert_array_equal(ds.images[..., 0], DSP.render(grid_classes(DSP.factor_sizes, rows)))
    assert ds.images.shape == (64, 64, 64, 1)


@pytest.mark.parametrize("subset", [0, -3, 49, 2.5, True, "5"])
def test_bad_subsets(small_grids, subset):
    with pytest.raises(ConfigError, match="subset"):
        data.load("dsprites", subset=subset)
    with pytest.raises(ConfigError, match="seed"):
        data.load("dsprites", subset=5, seed=None)


def test_damaged_cache_entry_is_rebuilt(small_grids, home):
    first = data.load("dsprites")
    (images_file,) = home.rglob("images.npy")
    images_file.unlink()
    np.testing.assert_array_equal(data.load("dsprites").images, first.images)


def test_cache_is_reused_and_built_once_under_concurrency(small_grids, monkeypatch, home):
    calls = []
    render = type(DSP).render

    def counting_render(self, classes):
        calls.append(len(classes))
        threading.Event().wait(0.2)  # hold the build open so the other loader must wait for it
        return render(self, classes)

    monkeypatch.setattr(type(DSP), "render", counting_render)
    results = []
    threads = [threading.Thread(target=lambda: results.append(data.load("dsprites"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    built = len(calls)
    assert len(results) == 2 and built >= 1
    np.testing.assert_array_equal(results[0].images, results[1].images)
    (images_file,) = home.rglob("images.npy")
    mtime = images_file.stat().st_mtime_ns
    data.load("dsprites")
    assert len(calls) == built and images_file.stat().st_mtime_ns == mtime
    assert sum(calls) == 48  # every row rendered exactly once
    assert not tmp_leftovers(home)


def test_real_file_cache_follows_the_file(tmp_path, home):
    path = tmp_path / "d.npz"
    write_dsprites(path)
    first = data.load("dsprites", path)
    assert np.array_equal(data.load("dsprites", path).images, first.images)
    assert len(list(home.rglob("manifest.json"))) == 1
    members = write_dsprites(path, images=np.zeros((48, 64, 64), np.uint8))
    os.utime(path, ns=(1, 1))  # a new mtime: a new cache entry
    assert data.load("dsprites", path).images.max() == 0 and members["imgs"].max() == 0
    assert len(list(home.rglob("manifest.json"))) == 2


# ----------------------------------------------------------------------------------- generate + load


@pytest.mark.parametrize("compress", [False, True])
def test_generate_dsprites_round_trip(tmp_path, compress):
    sizes = (3, 2, 3, 2, 2)
    out = data.generate("dsprites", tmp_path / "d.npz", factor_sizes=sizes, chunk=17, compress=compress)
    with np.load(out, allow_pickle=True) as z:  # the real format, readable the way users read it
        assert set(z.files) == {"imgs", "latents_classes", "latents_values", "metadata"}
        meta = z["metadata"][()]
        assert list(meta["latents_sizes"]) == [1, *sizes]
        assert meta["latents_names"] == ("color", "shape", "scale", "orientation", "posX", "posY")
        values, file_classes = z["latents_values"], z["latents_classes"]
    keep = reduced_grid_classes(sizes, DSP.factor_sizes)
    classes = grid_classes(sizes)
    full = np.stack([keep[k][classes[:, k]] for k in range(5)], axis=1)
    np.testing.assert_array_equal(file_classes[:, 1:], classes)
    np.testing.assert_allclose(values[:, 2], dsprites.SCALES[full[:, 1]])
    np.testing.assert_allclose(values[:, 3], dsprites.ORIENTATIONS[full[:, 2]])
    ds = data.load("dsprites", out)
    assert ds.factor_sizes == sizes
    np.testing.assert_array_equal(ds.images[..., 0], DSP.render(full))
    assert not tmp_leftovers(tmp_path)


def test_generate_shapes3d_round_trip(tmp_path):
    sizes = (2, 1, 2, 2, 4, 2)
    out = data.generate("shapes3d", tmp_path, factor_sizes=sizes, chunk=10)
    assert out == tmp_path / "3dshapes.h5"
    with h5py.File(out, "r") as f:
        assert f["images"].shape == (64, 64, 64, 3) and f["images"].dtype == np.uint8
        assert f["labels"].shape == (64, 6) and f["labels"].dtype == np.float64
        labels = f["labels"][:]
    np.testing.assert_allclose(np.unique(labels[:, 0]), [0.0, 0.9])
    np.testing.assert_allclose(np.unique(labels[:, 4]), [0, 1, 2, 3])
    np.testing.assert_allclose(np.unique(labels[:, 5]), [-30, 30])
    ds = data.load("shapes3d", out)
    keep = reduced_grid_classes(sizes, S3D.factor_sizes)
    classes = grid_classes(sizes)
    full = np.stack([keep[k][classes[:, k]] for k in range(6)], axis=1)
    assert ds.factor_sizes == sizes
    np.testing.assert_array_equal(ds.factors, classes)
    np.testing.assert_array_equal(ds.images, S3D.render(full))
    assert not tmp_leftovers(tmp_path)


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="factor_sizes"):
        data.generate("dsprites", tmp_path / "x.npz", factor_sizes=(3, 7, 1, 1, 1))
    with pytest.raises(ConfigError, match="chunk"):
        data.generate("dsprites", tmp_path / "x.npz", chunk=0)
    with pytest.raises(ConfigError, match="no generator"):
        data.generate("mnist", tmp_path / "x.npz")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ CLI and progress


def run_cli(*argv):
    return cli_main(["data", *argv])


def test_cli_generate_and_check(tmp_path, capsys):
    out = tmp_path / "d.npz"
    assert run_cli("generate", "dsprites", "--out", str(out), "--factor-sizes", "3,1,2,2,2") == 0
    assert "wrote" in capsys.readouterr().out
    assert run_cli("check", str(out)) == 0
    text = capsys.readouterr().out
    assert "dsprites" in text and "24 x (1, 64, 64)" in text and "orientation 2" in text
    h5 = tmp_path / "s.h5"
    write_shapes3d(h5)
    assert run_cli("check", str(h5), "--dataset", "shapes3d") == 0
    assert "floor_hue 2" in capsys.readouterr().out
    (tmp_path / "bad.npz").write_bytes(b"junk")
    assert run_cli("check", str(tmp_path / "bad.npz")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.npz" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        run_cli("generate", "mnist", "--out", str(out))


def test_progress_prints_only_on_terminals_or_when_forced():
    quiet = io.StringIO()
    with Progress(10, stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    with Progress(10, label="gen", stream=loud, show=True, interval=0) as bar:
        bar.update(4)
        bar.update(6)
    lines = loud.getvalue().splitlines()
    assert lines[0].startswith("gen: 4/10 rows") and "rows/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("gen: 10 rows in")

