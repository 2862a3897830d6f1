"""Image data sets for density estimation, as integer pixel arrays.

Every loader returns :class:`ImageData`: integer pixels of shape ``(N, H, W, C)``
(channels last), values in ``[0, levels - 1]``, optional integer class labels, and
the number of pixel values ``levels``. :func:`load` reads one of these formats and
returns a train/test :class:`Splits`:

``"digits"``
    scikit-learn's embedded 8x8 digits (1797 images, values 0..16, ``levels=17``,
    shape ``(N, 8, 8, 1)``, labels 0..9). Needs scikit-learn; no download.
    Seeded split with :func:`split`.
``"mnist:DIR"``
    The four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` in ``DIR``, each
    plain or gzipped (``.gz``); the ``train-images.idx3-ubyte`` spelling is also
    accepted. Official train/test split, ``levels=256``, shape ``(N, 28, 28, 1)``
    (any size the IDX header gives). Fashion-MNIST files have the same format.
``"cifar10:DIR"``
    The python pickle batches ``data_batch_1`` .. ``data_batch_5`` and
    ``test_batch`` in ``DIR`` or in ``DIR/cifar-10-batches-py``. Official split,
    ``levels=256``, shape ``(N, 32, 32, 3)``. The pickles are read with an
    unpickler that only accepts the NumPy globals such files contain, so a
    hostile file cannot run code.
``"npz:PATH"``
    A NumPy ``.npz`` archive with an integer array ``x`` of shape ``(N, H, W)`` or
    ``(N, H, W, C)``, an optional integer array ``y`` of shape ``(N,)`` and an
    optional scalar ``levels`` (default 256, which needs ``x.max() < 256``).
    Seeded split with :func:`split`.
``"folder:DIR"``
    Image files (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif``, any case) read
    with Pillow. If ``DIR`` has subdirectories, each one (in sorted order) is a
    class and its images (searched recursively) get that class index as label;
    otherwise the images directly in ``DIR`` are read, without labels. All images
    must have one size. If every image is grayscale ``C=1``, otherwise all are
    converted to RGB (``C=3``). 8-bit images only, ``levels=256``. Seeded split.
``"stream:DIR"``
    A data set ``numpyro-glow prepare`` wrote (:mod:`numpyro_glow.stream`): its
    train and test splits as :class:`~numpyro_glow.stream.StreamImages`, read from
    disk when indexed, never whole.

:func:`split` reproduces scikit-learn's ``train_test_split(..., test_size,
random_state=seed)`` index for index, without needing scikit-learn, and
:func:`train_validation_split` applies the same split to hold out a validation set.

NumPy is the only import-time dependency. Pillow (``folder:``) and scikit-learn
(``digits``) are imported when needed; install them with
``pip install "numpyro-glow[examples]"``.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import math
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ImageData", "Splits", "load", "reduce_bits", "split", "train_validation_split"]

_EXTRA = 'pip install "numpyro-glow[examples]"'
_SPEC_FORMS = (
    '"digits", "mnist:DIR", "cifar10:DIR", "npz:PATH", "folder:DIR" or "stream:DIR" '
    '(for example "mnist:~/data/mnist")'
)
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_LABEL_DTYPE = np.int32


# --------------------------------------------------------------------------- containers


def _pixel_dtype(levels: int) -> np.dtype:
    """The smallest of uint8 / int16 / int32 that holds ``levels - 1``."""
    if levels <= 256:
        return np.dtype(np.uint8)
    if levels <= 2**15:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def _is_int_dtype(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.integer)


def _describe(a: Any) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype}{a.shape}"
    return type(a).__name__


@dataclass(frozen=True, eq=False)
class ImageData:
    """A set of images as integer pixels, with optional class labels.

    Attributes:
        x: integer pixels of shape ``(N, H, W, C)``, channels last (usually
            ``uint8``; ``int16``/``int32`` when ``levels > 256``), with values in
            ``[0, levels - 1]``.
        y: integer class labels of shape ``(N,)`` (values ``>= 0``), or ``None``.
        levels: the number of pixel values: 256 for 8-bit images, 17 for the
            scikit-learn digits (values 0..16). At least 2.
        name: a short name for the data set, used in messages.

    The fields are checked on construction; a :class:`ValueError` says what was
    expected and what came. Instances are immutable, compare by identity, and
    their arrays are not copied.
    """

    x: np.ndarray
    y: np.ndarray | None
    levels: int
    name: str

    def __post_init__(self) -> None:
        name = self.name
        levels = self.levels
        if isinstance(levels, bool) or not isinstance(levels, int | np.integer):
            raise ValueError(f"{name}: levels must be an integer >= 2, got {levels!r}")
        if levels < 2:
            raise ValueError(f"{name}: levels must be an integer >= 2, got {levels}")
        object.__setattr__(self, "levels", int(levels))

        x = np.asarray(self.x)
        if x.ndim != 4:
            raise ValueError(
                f"{name}: x must have shape (N, H, W, C), got {x.ndim}-D array of shape {x.shape}"
            )
        if not _is_int_dtype(x):
            raise ValueError(f"{name}: x must hold integer pixels, got dtype {x.dtype}")
        if x.size:
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi > levels - 1:
                raise ValueError(
                    f"{name}: pixel values must lie in [0, {levels - 1}] (levels={levels}), "
                    f"got values in [{lo}, {hi}]"
                )
        object.__setattr__(self, "x", x)

        if self.y is not None:
            y = np.asarray(self.y)
            if y.ndim != 1 or not _is_int_dtype(y):
                raise ValueError(
                    f"{name}: y must be a 1-D integer array of labels, got {_describe(y)}"
                )
            if y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{name}: y must have one label per image: expected {x.shape[0]} labels, "
                    f"got {y.shape[0]}"
                )
            if y.size and int(y.min()) < 0:
                raise ValueError(f"{name}: labels must be >= 0, got {int(y.min())}")
            object.__setattr__(self, "y", y)

    def __repr__(self) -> str:
        y = "None" if self.y is None else f"{self.y.dtype}{self.y.shape}"
        return (
            f"ImageData(name={self.name!r}, x={self.x.dtype}{self.x.shape}, y={y}, "
            f"levels={self.levels})"
        )

    @property
    def num_classes(self) -> int | None:
        """``max(y) + 1``, or ``None`` when there are no labels (or no images)."""
        if self.y is None or self.y.size == 0:
            return None
        return int(self.y.max()) + 1

    def to_unit(self, u: np.ndarray | float | None = None) -> np.ndarray:
        """Map the pixels into the unit interval: ``(x + u) / levels`` as float32.

        Pixel value ``k`` stands for the cell ``[k / levels, (k + 1) / levels)``.
        ``u`` is the position inside the cell: by default 0.5, the cell centres, so
        the result lies strictly inside (0, 1) (from ``0.5 / levels`` to
        ``1 - 0.5 / levels``). For uniform dequantization pass noise
        ``u ~ Uniform[0, 1)`` of shape ``x.shape`` (or any shape that broadcasts to
        it); ``u`` must lie in ``[0, 1]``.

        Returns:
            A float32 array of shape ``x.shape``.
        """
        u = np.float32(0.5) if u is None else np.asarray(u, dtype=np.float32)
        try:
            shape = np.broadcast_shapes(self.x.shape, np.shape(u))
        except ValueError:
            shape = None
        if shape != self.x.shape:
            raise ValueError(
                f"{self.name}: u must broadcast to x's shape {self.x.shape}, got shape "
                f"{np.shape(u)}"
            )
        if np.size(u) and (np.min(u) < 0 or np.max(u) > 1):
            raise ValueError(
                f"{self.name}: u must lie in [0, 1], got values in [{np.min(u)}, {np.max(u)}]"
            )
        return ((self.x.astype(np.float32) + u) / np.float32(self.levels)).astype(np.float32)

    def subset(self, idx: np.ndarray | Sequence[int] | slice | int) -> ImageData:
        """The images (and labels) at ``idx``: an index array, a boolean mask, a slice
        or one integer (which keeps the leading axis)."""
        if isinstance(idx, int | np.integer):
            idx = [int(idx)]
        elif not isinstance(idx, slice):
            idx = np.asarray(idx)
        y = None if self.y is None else self.y[idx]
        return ImageData(x=self.x[idx], y=y, levels=self.levels, name=self.name)


@dataclass(frozen=True, eq=False)
class Splits:
    """A train/test pair (or train/validation, from :func:`train_validation_split`)."""

    train: ImageData
    test: ImageData


# --------------------------------------------------------------------------- splits


def _split_indices(n: int, test_size: float, seed: int, what: str) -> tuple[np.ndarray, ...]:
    """The indices of scikit-learn's ``ShuffleSplit(1, test_size, random_state=seed)``."""
    if isinstance(test_size, bool) or not isinstance(test_size, int | float | np.number):
        raise ValueError(f"{what} must be a float in (0, 1) or an int count, got {test_size!r}")
    if isinstance(test_size, int | np.integer):
        n_test = int(test_size)
        if not 0 < n_test < n:
            raise ValueError(f"{what}={n_test} must be between 1 and N - 1 = {n - 1} images")
    else:
        if not 0.0 < float(test_size) < 1.0:
            raise ValueError(f"{what} must be a fraction in (0, 1), got {test_size!r}")
        n_test = math.ceil(float(test_size) * n)
    n_train = n - n_test
    if n_train <= 0 or n_test <= 0:
        raise ValueError(
            f"cannot split {n} images with {what}={test_size!r}: "
            f"it gives {n_train} train and {n_test} held-out images"
        )
    rng = np.random.RandomState(seed)
    perm = rng.permutation(n)
    return perm[n_test : n_test + n_train], perm[:n_test]


def split(data: ImageData, test_size: float = 0.2, seed: int = 0) -> Splits:
    """Shuffle and split ``data`` into train and test sets.

    Index for index the same as scikit-learn's
    ``train_test_split(np.arange(N), test_size=test_size, random_state=seed)``: the
    test set is the first ``ceil(test_size * N)`` entries of
    ``np.random.RandomState(seed).permutation(N)`` and the train set is the rest, both
    in permuted order.

    Args:
        data: the images to split.
        test_size: a fraction in (0, 1), or an integer number of test images.
        seed: the seed of NumPy's legacy ``RandomState``.
    """
    train, test = _split_indices(data.x.shape[0], test_size, seed, "test_size")
    return Splits(train=data.subset(train), test=data.subset(test))


def train_validation_split(data: ImageData, validation_size: float = 0.1, seed: int = 0) -> Splits:
    """Hold out a validation set from ``data`` (usually a training set).

    The same mechanism as :func:`split`; returns ``Splits(train=..., test=validation)``.
    """
    train, val = _split_indices(data.x.shape[0], validation_size, seed, "validation_size")
    return Splits(train=data.subset(train), test=data.subset(val))


# --------------------------------------------------------------------------- bits


def _bits_shift(levels: int, n_bits: int, name: str) -> int:
    """``b - n_bits`` for data of ``levels = 2**b``; ``ValueError`` otherwise."""
    bits = levels.bit_length() - 1
    if levels != 2**bits or not 1 <= n_bits <= bits:
        raise ValueError(
            f"--n-bits: {name} has {levels} pixel levels; expected a power of two 2**b with "
            f"1 <= n_bits <= b (e.g. --n-bits 5 for 8-bit images), got n_bits={n_bits}"
        )
    return bits - n_bits


def reduce_bits(data: Any, n_bits: int | None) -> Any:
    """``data`` (an :class:`ImageData`, a streamed split or a :class:`Splits` of
    them) with its pixels reduced to ``2**n_bits`` levels: ``k // 2**(b - n_bits)``
    for data of ``2**b`` levels, the Glow paper's reduction (5 bits on CelebA-HQ).
    ``None`` returns ``data`` unchanged. ``ValueError`` unless the data have a
    power-of-two number of levels of at least ``2**n_bits``."""
    if n_bits is None:
        return data
    if isinstance(data, Splits):
        return Splits(reduce_bits(data.train, n_bits), reduce_bits(data.test, n_bits))
    if not isinstance(data, ImageData):
        return data.reduce_bits(n_bits)  # a streamed split reduces as it reads
    shift = _bits_shift(data.levels, n_bits, data.name)
    return ImageData(data.x >> shift, data.y, 2**n_bits, data.name)


# --------------------------------------------------------------------------- load


def load(spec: str, *, test_size: float = 0.2, seed: int = 0) -> Splits:
    """Load an image data set and split it into train and test sets.

    Args:
        spec: ``"digits"``, ``"mnist:DIR"``, ``"cifar10:DIR"``, ``"npz:PATH"``,
            ``"folder:DIR"`` or ``"stream:DIR"`` (see the module docstring for each
            format). ``~`` in a path is expanded.
        test_size: the held-out fraction (or count) for the formats without an
            official split (digits, npz, folder); MNIST and CIFAR-10 use their
            official test sets and ignore it.
        seed: the split's seed, for the same formats.

    Raises:
        FileNotFoundError: a directory or file is missing.
        ValueError: an unknown spec, or a file that is corrupt or does not hold
            what the format expects; the message names the file.
        ImportError: Pillow or scikit-learn is needed and not installed.
    """
    if not isinstance(spec, str):
        raise ValueError(f"spec must be a string, one of {_SPEC_FORMS}; got {spec!r}")
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not rest:
        return split(_load_digits(), test_size, seed)
    if sep and rest and kind in ("mnist", "cifar10", "npz", "folder", "stream"):
        path = Path(rest).expanduser()
        if kind == "stream":
            from .stream import open_stream

            return open_stream(path, spec)
        if kind == "mnist":
            return _load_mnist(path)
        if kind == "cifar10":
            return _load_cifar10(path)
        if kind == "npz":
            return split(_load_npz(path, spec), test_size, seed)
        return split(_load_folder(path, spec), test_size, seed)
    raise ValueError(f"unknown data spec {spec!r}; expected {_SPEC_FORMS}")


def _require(module: str, package: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs {package}, which is not installed; install it with {_EXTRA}"
        ) from e


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} directory not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} path is not a directory: {path}")


# --- digits


def _load_digits() -> ImageData:
    datasets = _require("sklearn.datasets", "scikit-learn", 'load("digits")')
    digits = datasets.load_digits()
    images = np.asarray(digits.images)
    x = images.astype(np.uint8)[..., None]
    if not np.array_equal(x[..., 0], images):  # values 0..16, stored as float64
        raise ValueError("digits: expected integer pixel values 0..16 from scikit-learn")
    y = np.asarray(digits.target).astype(_LABEL_DTYPE)
    return ImageData(x=x, y=y, levels=17, name="digits")


# --- MNIST (IDX files)

_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", 0x00000803),
    "train_labels": ("train-labels-idx1-ubyte", 0x00000801),
    "test_images": ("t10k-images-idx3-ubyte", 0x00000803),
    "test_labels": ("t10k-labels-idx1-ubyte", 0x00000801),
}


def _mnist_candidates(base: str) -> list[str]:
    dotted = base.replace("-idx", ".idx", 1)
    return [base, base + ".gz", dotted, dotted + ".gz"]


def _open_maybe_gzip(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def _idx_header(path: Path, magic: int) -> tuple[int, ...]:
    """Read and check an IDX header (magic, then one big-endian uint32 per dimension)."""
    kind = "images" if magic == 0x00000803 else "labels"
    try:
        with _open_maybe_gzip(path) as f:
            head = f.read(4)
            if len(head) < 4:
                raise ValueError(
                    f"{path}: truncated IDX file: expected a 4-byte magic number, "
                    f"got {len(head)} bytes"
                )
            got = int.from_bytes(head, "big")
            if got != magic:
                raise ValueError(
                    f"{path}: bad IDX magic number for {kind}: expected 0x{magic:08x}, "
                    f"got 0x{got:08x}"
                )
            ndim = magic & 0xFF
            raw = f.read(4 * ndim)
    except _GZIP_ERRORS as e:
        raise ValueError(f"{path}: not a valid gzip file ({e})") from e
    if len(raw) < 4 * ndim:
        raise ValueError(
            f"{path}: truncated IDX header: expected {4 * ndim} bytes of dimensions, got {len(raw)}"
        )
    return tuple(int(d) for d in np.frombuffer(raw, dtype=">u4"))


def _idx_body(path: Path, dims: tuple[int, ...]) -> np.ndarray:
    offset = 4 + 4 * len(dims)
    count = math.prod(dims)
    try:
        with _open_maybe_gzip(path) as f:
            data = f.read()
    except _GZIP_ERRORS as e:
        raise ValueError(f"{path}: not a valid gzip file ({e})") from e
    if len(data) != offset + count:
        raise ValueError(
            f"{path}: IDX size does not match its header {dims}: expected "
            f"{offset + count} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=offset).reshape(dims).copy()


def _load_mnist(root: Path) -> Splits:
    _require_dir(root, "MNIST")
    paths: dict[str, Path] = {}
    missing = []
    for key, (base, _) in _MNIST_FILES.items():
        found = [root / c for c in _mnist_candidates(base) if (root / c).is_file()]
        if found:
            paths[key] = found[0]
        else:
            missing.append(" or ".join(_mnist_candidates(base)))
    if missing:
        raise FileNotFoundError(f"MNIST files missing in {root}: looked for " + "; ".join(missing))

    # check every header before reading any pixels
    dims = {key: _idx_header(paths[key], _MNIST_FILES[key][1]) for key in _MNIST_FILES}
    for part in ("train", "test"):
        n_img, n_lab = dims[f"{part}_images"][0], dims[f"{part}_labels"][0]
        if n_img != n_lab:
            raise ValueError(
                f"{paths[part + '_labels']}: expected {n_img} labels, one per image in "
                f"{paths[part + '_images']}, got {n_lab}"
            )
    if dims["train_images"][1:] != dims["test_images"][1:]:
        raise ValueError(
            f"{paths['test_images']}: expected images of size {dims['train_images'][1:]} "
            f"like {paths['train_images']}, got {dims['test_images'][1:]}"
        )

    def part(name: str) -> ImageData:
        x = _idx_body(paths[f"{name}_images"], dims[f"{name}_images"])[..., None]
        y = _idx_body(paths[f"{name}_labels"], dims[f"{name}_labels"]).astype(_LABEL_DTYPE)
        return ImageData(x=x, y=y, levels=256, name="mnist")

    return Splits(train=part("train"), test=part("test"))


# --- CIFAR-10 (python pickles)

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_SUBDIR = "cifar-10-batches-py"


@functools.cache
def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # NumPy < 2
        from numpy.core import multiarray, numeric
    found = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for mod in ("numpy.core", "numpy._core"):
        found[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        found[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            found[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    import _codecs

    found[("_codecs", "encode")] = _codecs.encode  # how protocol 2 pickles bytes
    return found


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that only resolves the NumPy globals an array pickle needs."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _numpy_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, UnicodeDecodeError, MemoryError) as e:  # fmt: skip
        raise ValueError(
            f"{path}: not a CIFAR-10 pickle batch (expected a pickled dict with b'data' "
            f"and b'labels'): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(batch, dict):
        raise ValueError(
            f"{path}: expected a pickled dict with keys b'data' and b'labels', "
            f"got {type(batch).__name__}"
        )

    def get(key: str) -> Any:
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
        keys = sorted(repr(k) for k in batch)
        raise ValueError(f"{path}: expected keys b'data' and b'labels', got keys {', '.join(keys)}")

    data, labels = np.asarray(get("data")), np.asarray(get("labels"))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise ValueError(
            f"{path}: expected b'data' of shape (N, 3072) and dtype uint8 "
            f"(3x32x32 channel-major pixels), got {_describe(data)}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not _is_int_dtype(labels):
        raise ValueError(
            f"{path}: expected b'labels' as {data.shape[0]} integers, one per image, "
            f"got {_describe(labels)}"
        )
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), labels.astype(_LABEL_DTYPE)


def _load_cifar10(root: Path) -> Splits:
    _require_dir(root, "CIFAR-10")
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    for base in (root, root / _CIFAR_SUBDIR):
        if all((base / n).is_file() for n in names):
            break
    else:
        base = root / _CIFAR_SUBDIR if (root / _CIFAR_SUBDIR).is_dir() else root
        missing = [n for n in names if not (base / n).is_file()]
        hint = ""
        if (root / "cifar-10-python.tar.gz").exists():
            hint = " (extract cifar-10-python.tar.gz there first)"
        raise FileNotFoundError(
            f"CIFAR-10 batches missing in {base}: expected {', '.join(names)} in {root} or "
            f"in {root / _CIFAR_SUBDIR}; missing {', '.join(missing)}{hint}"
        )

    train = [_cifar_batch(base / n) for n in _CIFAR_TRAIN]
    test_x, test_y = _cifar_batch(base / _CIFAR_TEST)
    return Splits(
        train=ImageData(
            x=np.concatenate([b[0] for b in train]),
            y=np.concatenate([b[1] for b in train]),
            levels=256,
            name="cifar10",
        ),
        test=ImageData(x=test_x, y=test_y, levels=256, name="cifar10"),
    )


# --- npz


def _load_npz(path: Path, name: str) -> ImageData:
    if not path.exists():
        raise FileNotFoundError(f"npz file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"npz path is a directory, expected a .npz file: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz archive ({e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path}: expected a .npz archive holding an array 'x', got a single "
            f"{_describe(archive)} array (.npy); save with np.savez(path, x=..., y=...)"
        )
    with archive:
        keys = set(archive.files)
        if "x" not in keys:
            raise ValueError(
                f"{path}: expected an array 'x' (and optionally 'y', 'levels'), "
                f"got arrays {sorted(keys)}"
            )
        try:
            x = archive["x"]
            y = archive["y"] if "y" in keys else None
            levels_arr = archive["levels"] if "levels" in keys else None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{path}: corrupt array in .npz archive ({e})") from e

    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(
            f"{path}: expected 'x' of shape (N, H, W) or (N, H, W, C), got shape {x.shape}"
        )
    if not _is_int_dtype(x):
        nan = ""
        if np.issubdtype(x.dtype, np.inexact) and np.isnan(x).any():
            nan = ", containing NaN"
        raise ValueError(
            f"{path}: expected integer pixels in 'x', got dtype {x.dtype}{nan}; "
            f"store the integer pixel values (e.g. uint8) and, if not 256, a scalar 'levels'"
        )
    lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
    if lo < 0:
        raise ValueError(f"{path}: expected pixel values >= 0 in 'x', got minimum {lo}")

    if levels_arr is None:
        if hi > 255:
            raise ValueError(
                f"{path}: 'x' has values up to {hi}, above the default 255 (levels=256); "
                f"add a scalar array 'levels' (the number of pixel values) to the file"
            )
        levels = 256
    else:
        if levels_arr.size != 1 or not _is_int_dtype(levels_arr):
            raise ValueError(
                f"{path}: expected 'levels' to be one integer, got {_describe(levels_arr)}"
            )
        levels = int(levels_arr.reshape(()))
        if levels < 2 or levels > 2**31:
            raise ValueError(f"{path}: expected 'levels' in [2, 2**31], got {levels}")
        if hi > levels - 1:
            raise ValueError(
                f"{path}: pixel values must lie in [0, {levels - 1}] (levels={levels}), "
                f"got maximum {hi}"
            )

    if y is not None:
        if y.ndim != 1 or not _is_int_dtype(y):
            raise ValueError(f"{path}: expected 'y' as 1-D integer labels, got {_describe(y)}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{path}: expected one label per image in 'y': {x.shape[0]} labels, "
                f"got {y.shape[0]}"
            )
        if y.size and int(y.min()) < 0:
            raise ValueError(f"{path}: expected labels >= 0 in 'y', got {int(y.min())}")
        y = y.astype(_LABEL_DTYPE)

    x = x.astype(_pixel_dtype(levels), copy=False)
    return ImageData(x=x, y=y, levels=levels, name=name)


# --- image folders


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS and not p.name.startswith(".")


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def _is_gray(im: Any) -> bool:
    if im.mode in ("1", "L", "LA", "La"):
        return True
    if im.mode == "P":  # a palette of grays only (grayscale GIFs load this way)
        pal = im.getpalette()
        if pal:
            rgb = np.asarray(pal[: len(pal) // 3 * 3]).reshape(-1, 3)
            return bool((rgb == rgb[:, :1]).all())
    return False


def _folder_files(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """The image files of ``root`` in sorted order and their class labels: the
    files under each class folder of ``classes``, or (none) those directly in ``root``."""
    files: list[Path] = []
    labels: list[int] = []
    if classes:
        for label, cls in enumerate(classes):
            cdir = root / cls
            found = sorted(p for p in cdir.rglob("*") if _is_image(p) and not _hidden(p, cdir))
            if not found:
                raise FileNotFoundError(
                    f"class folder {cdir} has no image files "
                    f"({', '.join(_IMAGE_EXTENSIONS)}, any case)"
                )
            files += found
            labels += [label] * len(found)
        loose = [p for p in root.iterdir() if _is_image(p)]
        if loose:
            warnings.warn(
                f"{root}: ignoring {len(loose)} image file(s) at the top level (e.g. "
                f"{loose[0].name}) because the class subdirectories {classes} hold the data",
                stacklevel=4,
            )
    else:
        files = sorted(p for p in root.iterdir() if _is_image(p))
        if not files:
            raise FileNotFoundError(
                f"no image files ({', '.join(_IMAGE_EXTENSIONS)}, any case) in {root}"
            )
    return files, labels


def _load_folder(root: Path, name: str) -> ImageData:
    _require_dir(root, "image folder")
    pil = _require("PIL.Image", "Pillow", 'load("folder:...")')

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = _folder_files(root, classes)

    errors = (OSError, ValueError, SyntaxError, pil.DecompressionBombError)
    # pass 1: headers only (size, mode), before decoding any pixels
    size0: tuple[int, int] | None = None
    all_gray = True
    for p in files:
        try:
            with pil.open(p) as im:
                size, mode, gray = im.size, im.mode, _is_gray(im)
        except errors as e:
            raise ValueError(f"{p}: not a readable image ({type(e).__name__}: {e})") from e
        if mode.startswith("I") or mode == "F":
            raise ValueError(
                f"{p}: expected an 8-bit image, got Pillow mode {mode!r} "
                f"(16-bit or float images are not supported; levels is 256)"
            )
        if size0 is None:
            size0 = size
        elif size != size0:
            raise ValueError(
                f"{p}: all images must have one size: expected {size0[0]}x{size0[1]} "
                f"(width x height, like {files[0]}), got {size[0]}x{size[1]}"
            )
        all_gray &= gray

    # pass 2: decode
    target = "L" if all_gray else "RGB"
    x = np.empty((len(files), size0[1], size0[0], 1 if all_gray else 3), dtype=np.uint8)
    for i, p in enumerate(files):
        try:
            with pil.open(p) as im:
                arr = np.asarray(im.convert(target), dtype=np.uint8)
        except errors as e:
            raise ValueError(f"{p}: not a readable image ({type(e).__name__}: {e})") from e
        x[i] = arr.reshape(x.shape[1:])
    y = np.asarray(labels, dtype=_LABEL_DTYPE) if classes else None
    return ImageData(x=x, y=y, levels=256, name=name)
