"""Tests for numpyro_glow.data: every format is built here, small, in tmp_path."""

import gzip
import os
import pickle
import re
import struct
import sys

import numpy as np
import pytest

from numpyro_glow import data
from numpyro_glow.data import ImageData, Splits, load, split, train_validation_split

PIL_Image = pytest.importorskip("PIL.Image")


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- ImageData


def _images(n=5, h=4, w=3, c=1, levels=256, labels=True, seed=0):
    rng = _rng(seed)
    x = rng.integers(0, levels, (n, h, w, c)).astype(np.uint8 if levels <= 256 else np.int16)
    y = rng.integers(0, 3, n).astype(np.int32) if labels else None
    return ImageData(x=x, y=y, levels=levels, name="toy")


def test_imagedata_fields_and_num_classes():
    d = _images()
    assert d.x.shape == (5, 4, 3, 1) and d.levels == 256 and d.name == "toy"
    assert d.num_classes == int(d.y.max()) + 1
    assert _images(labels=False).num_classes is None
    assert "toy" in repr(d) and "uint8(5, 4, 3, 1)" in repr(d)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=np.zeros((2, 4, 4), np.uint8)), r"\(N, H, W, C\).*3-D"),
        (dict(x=np.zeros((2, 4, 4, 1), np.float32)), "integer pixels.*float32"),
        (dict(x=np.full((2, 4, 4, 1), 17, np.uint8), levels=17), r"\[0, 16\].*\[17, 17\]"),
        (dict(x=np.full((2, 4, 4, 1), -1, np.int16)), r"\[0, 255\].*\[-1, -1\]"),
        (dict(y=np.zeros(3, np.int32)), "expected 2 labels, got 3"),
        (dict(y=np.zeros(2, np.float32)), "integer array of labels"),
        (dict(y=np.array([0, -1])), "labels must be >= 0"),
        (dict(levels=1), "levels must be an integer >= 2, got 1"),
        (dict(levels=2.0), "levels must be an integer >= 2"),
    ],
)
def test_imagedata_validation(kwargs, match):
    args = dict(x=np.zeros((2, 4, 4, 1), np.uint8), y=None, levels=256, name="bad")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as info:
        ImageData(**args)
    assert "bad" in str(info.value)


def test_to_unit_default_centres_in_open_interval():
    x = np.array([0, 1, 15, 16], np.uint8).reshape(4, 1, 1, 1)
    d = ImageData(x=x, y=None, levels=17, name="t")
    z = d.to_unit()
    assert z.dtype == np.float32 and z.shape == x.shape
    np.testing.assert_allclose(z.ravel(), (np.array([0, 1, 15, 16]) + 0.5) / 17, rtol=1e-6)
    assert (z > 0).all() and (z < 1).all()
    full = ImageData(
        x=np.array([0, 255], np.uint8).reshape(2, 1, 1, 1), y=None, levels=256, name="t"
    )
    zf = full.to_unit()
    assert 0 < zf.min() and zf.max() < 1
    # explicit noise, broadcast noise, and checks
    np.testing.assert_array_equal(d.to_unit(np.zeros(x.shape)), x.astype(np.float32) / 17)
    u = _rng().uniform(size=x.shape)
    np.testing.assert_allclose(d.to_unit(u), (x + u) / 17, rtol=1e-6)
    assert d.to_unit(np.float32(0.25)).dtype == np.float32
    with pytest.raises(ValueError, match="broadcast"):
        d.to_unit(np.zeros((3, 1, 1, 1)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        d.to_unit(np.full(x.shape, 1.5))


def test_subset():
    d = _images(n=6)
    s = d.subset([4, 1])
    np.testing.assert_array_equal(s.x, d.x[[4, 1]])
    np.testing.assert_array_equal(s.y, d.y[[4, 1]])
    assert s.levels == d.levels and s.name == d.name
    assert d.subset(2).x.shape == (1, 4, 3, 1)
    assert d.subset(slice(0, 3)).x.shape[0] == 3
    mask = np.arange(6) % 2 == 0
    np.testing.assert_array_equal(d.subset(mask).y, d.y[mask])
    assert _images(labels=False).subset([0]).y is None


# --------------------------------------------------------------------------- splits


@pytest.mark.parametrize(
    "n, test_size, seed",
    [(1797, 0.2, 0), (10, 0.2, 0), (11, 0.3, 7), (50, 0.25, 123), (7, 2, 1), (101, 0.1, 42)],
)
def test_split_matches_sklearn(n, test_size, seed):
    model_selection = pytest.importorskip("sklearn.model_selection")
    d = ImageData(x=np.zeros((n, 1, 1, 1), np.uint8), y=np.arange(n), levels=2, name="idx")
    s = split(d, test_size=test_size, seed=seed)
    train, test = model_selection.train_test_split(
        np.arange(n), test_size=test_size, random_state=seed
    )
    np.testing.assert_array_equal(s.train.y, train)
    np.testing.assert_array_equal(s.test.y, test)


def test_split_errors():
    d = _images(n=3)
    for bad in (0.0, 1.0, -0.1, 3, 0, True, "0.2"):
        with pytest.raises(ValueError, match="test_size"):
            split(d, test_size=bad)
    with pytest.raises(ValueError, match="cannot split 1 images"):
        split(_images(n=1), test_size=0.5)


def test_train_validation_split_disjoint_and_covers():
    d = ImageData(x=np.zeros((40, 2, 2, 1), np.uint8), y=np.arange(40), levels=2, name="i")
    s = train_validation_split(d, validation_size=0.1, seed=3)
    assert isinstance(s, Splits)
    assert len(s.test.y) == 4 and len(s.train.y) == 36
    assert not set(s.train.y) & set(s.test.y)
    assert sorted([*s.train.y, *s.test.y]) == list(range(40))
    # the same mechanism as split
    t = split(d, test_size=0.1, seed=3)
    np.testing.assert_array_equal(s.test.y, t.test.y)
    with pytest.raises(ValueError, match="validation_size"):
        train_validation_split(d, validation_size=1.5)


# --------------------------------------------------------------------------- digits


def test_digits():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    s = load("digits")
    assert (s.train.x.shape, s.test.x.shape) == ((1437, 8, 8, 1), (360, 8, 8, 1))
    assert s.train.x.dtype == np.uint8 and s.train.levels == 17 and s.test.levels == 17
    assert s.train.num_classes == 10 and s.train.name == "digits"
    assert s.train.x.max() == 16 and s.train.x.min() == 0

    ref = load_digits()
    tr, te = train_test_split(np.arange(1797), test_size=0.2, random_state=0)
    np.testing.assert_array_equal(s.train.x[..., 0], ref.images[tr])
    np.testing.assert_array_equal(s.test.x[..., 0], ref.images[te])
    np.testing.assert_array_equal(s.train.y, ref.target[tr])
    np.testing.assert_array_equal(s.test.y, ref.target[te])

    other = load("digits", test_size=0.5, seed=1)
    assert other.test.x.shape[0] == 899


def test_missing_extras_give_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=re.escape('pip install "numpyro-glow[examples]"')):
        load("digits")
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match="Pillow.*numpyro-glow\\[examples\\]"):
        load(f"folder:{tmp_path}")


def test_unknown_spec_lists_forms():
    for spec in ("imagenet:/x", "mnist", "mnist:", "digits:foo", ""):
        with pytest.raises(ValueError, match="mnist:DIR.*cifar10:DIR.*npz:PATH.*folder:DIR"):
            load(spec)


# --------------------------------------------------------------------------- MNIST


def _idx(arr, magic):
    head = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write(path, payload, gz):
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _mnist_dir(root, gz=False, dotted=False, n_train=6, n_test=4, seed=0):
    rng = _rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    paths = {}
    for i, (name, arr) in enumerate(arrays.items()):
        magic = 0x803 if "images" in name else 0x801
        fname = name.replace("-idx", ".idx") if dotted else name
        this_gz = gz if gz in (True, False) else i % 2 == 0  # "mixed"
        paths[name] = _write(root / fname, _idx(arr, magic), this_gz)
    return arrays, paths


@pytest.mark.parametrize("gz", [False, True, "mixed"])
@pytest.mark.parametrize("dotted", [False, True])
def test_mnist_round_trip(tmp_path, gz, dotted):
    arrays, _ = _mnist_dir(tmp_path / "m", gz=gz, dotted=dotted)
    s = load(f"mnist:{tmp_path / 'm'}")
    assert s.train.x.shape == (6, 28, 28, 1) and s.test.x.shape == (4, 28, 28, 1)
    assert s.train.x.dtype == np.uint8 and s.train.levels == 256 and s.train.name == "mnist"
    np.testing.assert_array_equal(s.train.x[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(s.test.x[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(s.train.y, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(s.test.y, arrays["t10k-labels-idx1-ubyte"])
    assert s.train.x.flags.writeable


def test_mnist_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load(f"mnist:{tmp_path / 'nope'}")
    _, paths = _mnist_dir(tmp_path / "m")
    paths["t10k-labels-idx1-ubyte"].unlink()
    with pytest.raises(FileNotFoundError) as info:
        load(f"mnist:{tmp_path / 'm'}")
    msg = str(info.value)
    assert "t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz" in msg
    assert "train-images" not in msg and str(tmp_path / "m") in msg


def _corrupt(path, how):
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if how == "magic":
        raw = struct.pack(">I", 0x804) + raw[4:]
    elif how == "truncated":
        raw = raw[:-5]
    elif how == "extra":
        raw = raw + b"\0"
    elif how == "short_header":
        raw = raw[:6]
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "how, match",
    [
        ("magic", "bad IDX magic.*expected 0x00000803, got 0x00000804"),
        ("truncated", r"does not match its header \(6, 28, 28\): expected 4720 bytes, got 4715"),
        ("extra", "expected 4720 bytes, got 4721"),
        ("short_header", "truncated IDX header"),
    ],
)
def test_mnist_corrupt(tmp_path, gz, how, match):
    _, paths = _mnist_dir(tmp_path / "m", gz=gz)
    bad = paths["train-images-idx3-ubyte"]
    _corrupt(bad, how)
    with pytest.raises(ValueError, match=match) as info:
        load(f"mnist:{tmp_path / 'm'}")
    assert str(bad) in str(info.value)


def test_mnist_bad_gzip_and_count_mismatch(tmp_path):
    _, paths = _mnist_dir(tmp_path / "a", gz=True)
    bad = paths["t10k-images-idx3-ubyte"]
    bad.write_bytes(b"this is not gzip at all")
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*gzip"):
        load(f"mnist:{tmp_path / 'a'}")
    # a gzip stream cut short
    _, paths = _mnist_dir(tmp_path / "b", gz=True)
    bad = paths["train-labels-idx1-ubyte"]
    bad.write_bytes(bad.read_bytes()[:-12])
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*gzip"):
        load(f"mnist:{tmp_path / 'b'}")
    # labels header says 5 labels, images 6
    _, paths = _mnist_dir(tmp_path / "c")
    lab = paths["train-labels-idx1-ubyte"]
    lab.write_bytes(_idx(np.zeros(5), 0x801))
    with pytest.raises(ValueError, match=re.escape(str(lab)) + ".*expected 6 labels.*got 5"):
        load(f"mnist:{tmp_path / 'c'}")


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR_NAMES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


def _cifar_dir(root, n=4, seed=0, str_keys=False, protocol=pickle.HIGHEST_PROTOCOL):
    rng = _rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in _CIFAR_NAMES:
        d = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        lab = [int(v) for v in rng.integers(0, 10, n)]
        batch = {"data": d, "labels": lab} if str_keys else {b"data": d, b"labels": lab}
        batch[b"batch_label"] = b"training batch"
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        out[name] = (d, lab)
    return out


@pytest.mark.parametrize("subdir", [False, True])
@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_round_trip(tmp_path, subdir, protocol):
    where = tmp_path / "c" / "cifar-10-batches-py" if subdir else tmp_path / "c"
    batches = _cifar_dir(where, protocol=protocol)
    s = load(f"cifar10:{tmp_path / 'c'}")
    assert s.train.x.shape == (20, 32, 32, 3) and s.test.x.shape == (4, 32, 32, 3)
    assert s.train.x.dtype == np.uint8 and s.train.levels == 256 and s.train.name == "cifar10"
    train_data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_lab = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # channel-major rows: value of channel c, row h, column w sits at c*1024 + h*32 + w
    n, h, w, c = 7, 5, 30, 2
    assert s.train.x[n, h, w, c] == train_data[n, c * 1024 + h * 32 + w]
    np.testing.assert_array_equal(
        s.train.x, train_data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    )
    np.testing.assert_array_equal(s.train.y, train_lab)
    np.testing.assert_array_equal(s.test.y, batches["test_batch"][1])
    assert s.train.x.flags.c_contiguous


def test_cifar10_str_keys(tmp_path):
    _cifar_dir(tmp_path, str_keys=True)
    assert load(f"cifar10:{tmp_path}").test.x.shape == (4, 32, 32, 3)


def test_cifar10_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load(f"cifar10:{tmp_path / 'nope'}")
    _cifar_dir(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3$"):
        load(f"cifar10:{tmp_path / 'c'}")


def _pwn_payload(target):
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(target),))

    return pickle.dumps({b"data": Evil(), b"labels": []})


@pytest.mark.parametrize(
    "payload, match",
    [
        (pickle.dumps([1, 2, 3]), "expected a pickled dict.*got list"),
        (
            pickle.dumps({b"labels": [0]}),
            r"expected keys b'data' and b'labels', got keys b'labels'",
        ),
        (
            pickle.dumps({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}),
            r"shape \(N, 3072\).*got uint8\(4, 3000\)",
        ),
        (
            pickle.dumps({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}),
            "dtype uint8.*got float32",
        ),
        (
            pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}),
            "4 integers, one per image",
        ),
        (b"garbage, not a pickle", "not a CIFAR-10 pickle batch"),
        (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)})[:-20], "not a CIFAR-10 pickle"),
        ("pwn", "refusing to load global"),
    ],
)
def test_cifar10_corrupt(tmp_path, payload, match):
    _cifar_dir(tmp_path)
    bad = tmp_path / "data_batch_2"
    if payload == "pwn":
        payload = _pwn_payload(tmp_path / "pwned")
    bad.write_bytes(payload)
    with pytest.raises(ValueError, match=match) as info:
        load(f"cifar10:{tmp_path}")
    assert str(bad) in str(info.value)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- npz


def test_npz_with_and_without_labels(tmp_path):
    rng = _rng(1)
    x = rng.integers(0, 256, (10, 6, 5, 3)).astype(np.uint8)
    y = rng.integers(0, 4, 10)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    s = load(f"npz:{tmp_path / 'a.npz'}", test_size=0.3, seed=2)
    assert s.train.x.shape == (7, 6, 5, 3) and s.test.x.shape == (3, 6, 5, 3)
    assert s.train.levels == 256 and s.train.x.dtype == np.uint8 and s.train.y.dtype == np.int32
    ref = split(ImageData(x=x, y=y, levels=256, name="r"), test_size=0.3, seed=2)
    np.testing.assert_array_equal(s.train.x, ref.train.x)
    np.testing.assert_array_equal(s.test.y, ref.test.y)

    # (N, H, W) gets a channel axis; int64 pixels become uint8; no labels
    x3 = rng.integers(0, 200, (5, 4, 4))
    np.savez_compressed(tmp_path / "b.npz", x=x3)
    s = load(f"npz:{tmp_path / 'b.npz'}")
    assert s.train.y is None and s.train.num_classes is None
    assert s.train.x.shape == (4, 4, 4, 1) and s.train.x.dtype == np.uint8
    both = np.concatenate([s.train.x, s.test.x])[..., 0]
    assert sorted(map(bytes, both)) == sorted(map(bytes, x3.astype(np.uint8)))


def test_npz_levels(tmp_path):
    x = _rng().integers(0, 17, (5, 3, 3))
    np.savez(tmp_path / "l.npz", x=x, levels=np.array(17))
    s = load(f"npz:{tmp_path / 'l.npz'}")
    assert s.train.levels == 17 and s.train.x.dtype == np.uint8
    big = _rng().integers(0, 1024, (5, 3, 3)).astype(np.uint16)
    big[0, 0, 0] = 1023
    np.savez(tmp_path / "big.npz", x=big, levels=1024)
    s = load(f"npz:{tmp_path / 'big.npz'}")
    assert s.train.levels == 1024 and s.train.x.dtype == np.int16
    assert max(s.train.x.max(), s.test.x.max()) == 1023


def test_npz_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load(f"npz:{tmp_path / 'nope.npz'}")


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(images=np.zeros((2, 3, 3), np.uint8)), r"expected an array 'x'.*\['images'\]"),
        (dict(x=np.full((2, 3, 3), np.nan, np.float32)), "integer pixels.*float32, containing NaN"),
        (dict(x=np.zeros((2, 3, 3), np.float64)), "integer pixels.*got dtype float64;"),
        (dict(x=np.zeros((2, 3), np.uint8)), r"shape \(N, H, W\).*got shape \(2, 3\)"),
        (dict(x=np.full((2, 3, 3), 300)), "values up to 300.*'levels'"),
        (dict(x=np.full((2, 3, 3), 17), levels=17), r"\[0, 16\].*got maximum 17"),
        (dict(x=np.full((2, 3, 3), -2)), "values >= 0.*got minimum -2"),
        (dict(x=np.zeros((2, 3, 3), np.uint8), levels=np.array([2, 3])), "'levels' to be one"),
        (dict(x=np.zeros((2, 3, 3), np.uint8), levels=1), r"'levels' in \[2, 2\*\*31\]"),
        (dict(x=np.zeros((2, 3, 3), np.uint8), y=np.zeros(3, int)), "2 labels, got 3"),
        (dict(x=np.zeros((2, 3, 3), np.uint8), y=np.zeros(2)), "1-D integer labels"),
        (dict(x=np.zeros((2, 3, 3), np.uint8), y=np.array([0, -1])), "labels >= 0"),
    ],
)
def test_npz_invalid(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match) as info:
        load(f"npz:{path}")
    assert str(path) in str(info.value)


def test_npz_not_an_archive(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"definitely not a zip file")
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        load(f"npz:{junk}")
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(npy)) + r".*single.*\.npy"):
        load(f"npz:{npy}")


# --------------------------------------------------------------------------- image folders


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL_Image.fromarray(arr).save(path)


def test_folder_classes_grayscale(tmp_path):
    rng = _rng(3)
    imgs = {}
    # class folders sorted by name: "cat" -> 0, "dog" -> 1; mixed extensions and case
    for cls, names in {"dog": ["b.PNG", "a.bmp", "c.gif"], "cat": ["x.png", "y.Png"]}.items():
        for fname in names:
            a = rng.integers(0, 256, (6, 5)).astype(np.uint8)
            _save(tmp_path / "f" / cls / fname, a)
            imgs[(cls, fname)] = a
    (tmp_path / "f" / "dog" / "notes.txt").write_text("not an image")
    s = load(f"folder:{tmp_path / 'f'}", test_size=0.4, seed=0)
    assert s.train.x.shape == (3, 6, 5, 1) and s.test.x.shape == (2, 6, 5, 1)
    assert s.train.x.dtype == np.uint8 and s.train.levels == 256

    # the unsplit order: sorted classes, sorted files; labels are class indices
    order = [
        ("cat", "x.png"),
        ("cat", "y.Png"),
        ("dog", "a.bmp"),
        ("dog", "b.PNG"),
        ("dog", "c.gif"),
    ]
    full = data._load_folder(tmp_path / "f", "f")
    np.testing.assert_array_equal(full.y, [0, 0, 1, 1, 1])
    for i, key in enumerate(order):
        np.testing.assert_array_equal(full.x[i, ..., 0], imgs[key])
    ref = split(full, test_size=0.4, seed=0)
    np.testing.assert_array_equal(s.train.x, ref.train.x)
    np.testing.assert_array_equal(s.train.y, ref.train.y)


def test_folder_flat_rgb_and_mixed(tmp_path):
    rng = _rng(4)
    rgb = [rng.integers(0, 256, (4, 7, 3)).astype(np.uint8) for _ in range(3)]
    for i, a in enumerate(rgb):
        _save(tmp_path / "flat" / f"im{i}.png", a)
    full = data._load_folder(tmp_path / "flat", "flat")
    assert full.y is None and full.x.shape == (3, 4, 7, 3)
    for i, a in enumerate(rgb):
        np.testing.assert_array_equal(full.x[i], a)
    s = load(f"folder:{tmp_path / 'flat'}", test_size=1)
    assert s.train.x.shape == (2, 4, 7, 3) and s.test.y is None

    # a grayscale image among RGB ones: all RGB, the gray one replicated
    gray = rng.integers(0, 256, (4, 7)).astype(np.uint8)
    _save(tmp_path / "flat" / "im9.png", gray)
    rgba = np.dstack([rgb[0], np.full((4, 7), 255, np.uint8)])
    _save(tmp_path / "flat" / "im8.png", rgba)
    mixed = data._load_folder(tmp_path / "flat", "flat")
    assert mixed.x.shape == (5, 4, 7, 3)
    np.testing.assert_array_equal(mixed.x[3], rgb[0])  # im8: RGBA -> RGB
    np.testing.assert_array_equal(mixed.x[4], np.repeat(gray[..., None], 3, axis=-1))


def test_folder_bilevel_is_grayscale(tmp_path):
    _save(tmp_path / "a.png", np.eye(4, dtype=bool))
    _save(tmp_path / "b.png", np.zeros((4, 4), np.uint8))
    full = data._load_folder(tmp_path, "f")
    assert full.x.shape == (2, 4, 4, 1)
    np.testing.assert_array_equal(full.x[0, ..., 0], np.eye(4) * 255)


def test_folder_top_level_images_ignored_with_warning(tmp_path):
    for cls in ("a", "b"):
        _save(tmp_path / cls / "1.png", np.zeros((2, 2), np.uint8))
    _save(tmp_path / "stray.png", np.zeros((2, 2), np.uint8))
    with pytest.warns(UserWarning, match="stray.png"):
        s = load(f"folder:{tmp_path}", test_size=0.5)
    assert s.train.x.shape[0] + s.test.x.shape[0] == 2


def test_folder_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no image files.*empty"):
        load(f"folder:{tmp_path / 'empty'}")
    _save(tmp_path / "cls" / "a" / "1.png", np.zeros((2, 2), np.uint8))
    (tmp_path / "cls" / "b").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "cls" / "b"))):
        load(f"folder:{tmp_path / 'cls'}")


def test_folder_size_mismatch(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    _save(tmp_path / "b.png", np.zeros((8, 8), np.uint8))
    _save(tmp_path / "c.png", np.zeros((6, 10), np.uint8))
    with pytest.raises(ValueError, match=r"c\.png.*expected 8x8.*got 10x6"):
        load(f"folder:{tmp_path}")


def test_folder_unreadable_images(tmp_path):
    _save(tmp_path / "a" / "ok.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "a" / "fake.jpg").write_text("this is text, not a JPEG")
    with pytest.raises(ValueError, match=r"fake\.jpg.*not a readable image"):
        load(f"folder:{tmp_path / 'a'}")
    # a PNG whose header is fine but whose pixel data is cut off
    _save(tmp_path / "b" / "ok.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "b" / "cut.png", _rng().integers(0, 256, (4, 4)).astype(np.uint8))
    cut = tmp_path / "b" / "cut.png"
    cut.write_bytes(cut.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"cut\.png.*not a readable image"):
        load(f"folder:{tmp_path / 'b'}")
    # 16-bit grayscale
    _save(tmp_path / "c" / "deep.png", np.full((4, 4), 40000, np.uint16))
    with pytest.raises(ValueError, match=r"deep\.png.*8-bit"):
        load(f"folder:{tmp_path / 'c'}")


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    np.savez(tmp_path / "h.npz", x=np.zeros((4, 2, 2), np.uint8))
    assert load("npz:~/h.npz", test_size=0.5).test.x.shape == (2, 2, 2, 1)
