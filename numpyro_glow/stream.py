"""Image sets larger than memory: the streaming format, its lazy reader and the
grain input pipeline.

A prepared data set (``numpyro-glow prepare``, :func:`numpyro_glow.prepare.prepare`)
is a folder::

    manifest.json             what the folder holds (written last, atomically)
    train-00000.npy ...       uint8 pixels (n, H, W, C), plain .npy, one per shard
    train-00000.labels.npy    int32 labels (n,), when the set has labels
    test-00000.npy ...        the test split, likewise

The shards are plain NumPy ``.npy`` files: fixed-shape decoded pixels, so an
image is one ``pread`` at a known offset, with nothing to decode and nothing
that could run code. They are not memory-mapped: reads go through the page
cache, so the process's own memory does not grow with the data set.

``data.load("stream:DIR")`` opens such a folder in time independent of its
size (one ``stat`` per shard; the shard's header and a fingerprint of its
first and last bytes are checked when it is first read). Its splits are
:class:`StreamImages`, which quack like :class:`~numpyro_glow.data.ImageData`
(``x``, ``y``, ``levels``, ``name``, ``num_classes``, ``subset``) but read
pixels only when indexed: ``x[i]``, ``x[a:b]`` and ``x[index_array]``.

:func:`batches` is the training input on grain: a :class:`grain.MapDataset`
whose element ``s`` is this process's part of the batch of step ``s``, a
function of ``(seed, step)`` only. grain is an optional dependency
(``pip install "numpyro-glow[stream]"``), imported when :func:`batches` runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import _bits_shift

__all__ = [
    "FORMAT",
    "MANIFEST",
    "ShardedArray",
    "StreamImages",
    "batches",
    "fingerprint",
    "open_stream",
]

FORMAT = "numpyro-glow-stream"
VERSION = 1
MANIFEST = "manifest.json"
_PROBE = 1 << 16  # bytes at each end of a shard that its fingerprint covers
_STREAM_EXTRA = 'pip install "numpyro-glow[stream]"'


def fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a shard's size, its first and its last 64 KiB: cheap at any
    size, and different for a shard of another data set."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_PROBE))
        f.seek(max(size - _PROBE, 0))
        h.update(f.read(_PROBE))
    return h.hexdigest()


@dataclass(frozen=True)
class _Shard:
    """One ``.npy`` file of a split: ``count`` items of ``item_shape`` and
    ``dtype`` after a header of ``offset`` bytes."""

    path: Path
    count: int
    offset: int
    fingerprint: str


class ShardedArray:
    """A read-only array over the ``.npy`` shards of one split, read on demand.

    ``len``, ``shape``, ``dtype`` and ``ndim`` as for an array; indexing with an
    integer, a slice or an integer array returns a NumPy array with the items
    read from disk (``os.pread``). ``index`` restricts the view to those items
    (:meth:`take`); ``shift`` divides the values by ``2**shift`` on the way out
    (fewer bits per pixel, :func:`reduce_bits`).
    """

    def __init__(
        self,
        shards: Sequence[_Shard],
        item_shape: tuple[int, ...],
        dtype: np.dtype,
        index: np.ndarray | None = None,
        shift: int = 0,
    ):
        self.shards = tuple(shards)
        self.item_shape, self.dtype = tuple(item_shape), np.dtype(dtype)
        self.item_bytes = math.prod(self.item_shape) * self.dtype.itemsize
        self.starts = np.cumsum([0] + [s.count for s in self.shards])
        self.index, self.shift = index, shift
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    # what pickling (grain's worker processes) carries: no file descriptors
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1]) if self.index is None else len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.item_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.item_shape)

    def take(self, idx: np.ndarray) -> ShardedArray:
        """The view of the items ``idx`` (positions in this view)."""
        idx = np.asarray(idx, dtype=np.int64)
        base = idx if self.index is None else self.index[idx]
        return ShardedArray(self.shards, self.item_shape, self.dtype, base, self.shift)

    def shifted(self, shift: int) -> ShardedArray:
        """The view with values divided by ``2**shift`` (rounded down)."""
        return ShardedArray(self.shards, self.item_shape, self.dtype, self.index, shift)

    def __getitem__(self, key: Any) -> np.ndarray:
        n = len(self)
        if isinstance(key, int | np.integer):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"index {key} out of range for {n} items")
            return self._gather(np.array([i]))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1 and self.index is None:
                return self._finish(self._read_range(start, max(stop, start)))
            return self._gather(np.arange(start, stop, step))
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
            raise IndexError(f"expected an int, a slice or a 1-D integer array, got {key!r}")
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for {n} items")
        return self._gather(np.where(idx < 0, idx + n, idx))

    # reading ---------------------------------------------------------------------
    def _finish(self, a: np.ndarray) -> np.ndarray:
        return a >> self.shift if self.shift else a

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        rows = idx if self.index is None else self.index[idx]
        out = np.empty((len(rows), *self.item_shape), self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for j, (s, r) in enumerate(zip(which.tolist(), rows.tolist(), strict=True)):
            flat[j] = np.frombuffer(self._pread(s, r - int(self.starts[s]), 1), np.uint8)
        return self._finish(out)

    def _read_range(self, lo: int, hi: int) -> np.ndarray:
        parts = []
        s = int(np.searchsorted(self.starts, lo, side="right")) - 1
        while lo < hi:
            end = min(hi, int(self.starts[s + 1]))
            raw = self._pread(s, lo - int(self.starts[s]), end - lo)
            parts.append(np.frombuffer(raw, self.dtype).reshape(end - lo, *self.item_shape))
            lo, s = end, s + 1
        if not parts:
            return np.empty((0, *self.item_shape), self.dtype)
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def _pread(self, s: int, first: int, count: int) -> bytes:
        shard = self.shards[s]
        fd = self._fds.get(s)
        if fd is None:
            fd = self._open(s)
        want = count * self.item_bytes
        raw = os.pread(fd, want, shard.offset + first * self.item_bytes)
        if len(raw) != want:
            raise ValueError(
                f"{shard.path}: truncated shard: expected {shard.count} items of "
                f"{self.item_bytes} bytes after a {shard.offset}-byte header, could read "
                f"only {len(raw)} of {want} bytes at item {first}"
            )
        return raw

    def _open(self, s: int) -> int:
        """Open shard ``s`` on first use, checking its header and fingerprint."""
        with self._lock:
            if s in self._fds:
                return self._fds[s]
            shard = self.shards[s]
            _check_shard(shard, (shard.count, *self.item_shape), self.dtype)
            fd = os.open(shard.path, os.O_RDONLY)
            self._fds[s] = fd
            return fd

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def _check_shard(shard: _Shard, shape: tuple[int, ...], dtype: np.dtype) -> None:
    path = shard.path
    if not path.is_file():
        raise FileNotFoundError(f"missing shard {path} (listed in {path.parent / MANIFEST})")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            header = read(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a .npy shard ({e})") from e
    got = (tuple(header[0]), header[1], np.dtype(header[2]))
    if got != (shape, False, dtype) or offset != shard.offset:
        raise ValueError(
            f"{path}: expected a shard of {dtype}{shape} after a {shard.offset}-byte header "
            f"(from {path.parent / MANIFEST}), got {got[2]}{got[0]} after {offset} bytes; "
            "is it a shard of another data set?"
        )
    found = fingerprint(path)
    if found != shard.fingerprint:
        raise ValueError(
            f"{path}: the shard's content is not the one {path.parent / MANIFEST} lists "
            f"(fingerprint {found[:12]}, expected {shard.fingerprint[:12]}): a shard of "
            "another data set, or one changed since prepare wrote it"
        )


class StreamImages:
    """One split of a prepared data set, read lazily; the interface of
    :class:`~numpyro_glow.data.ImageData` (``x``, ``y``, ``levels``, ``name``,
    ``num_classes``, :meth:`subset`) without its arrays in memory.

    ``x`` is a :class:`ShardedArray` of pixels ``(N, H, W, C)``; ``y`` one of
    labels ``(N,)``, or ``None``.
    """

    def __init__(
        self,
        x: ShardedArray,
        y: ShardedArray | None,
        levels: int,
        name: str,
        num_classes: int | None,
    ):
        self.x, self.y, self.levels, self.name = x, y, levels, name
        self._num_classes = num_classes

    def __repr__(self) -> str:
        return f"StreamImages(name={self.name!r}, x={self.x.shape}, levels={self.levels})"

    @property
    def num_classes(self) -> int | None:
        """The number of classes of the whole data set (from its manifest)."""
        return self._num_classes if self.y is not None else None

    def subset(self, idx: np.ndarray | Sequence[int]) -> StreamImages:
        """The images (and labels) at the positions ``idx``, still on disk."""
        idx = np.asarray(idx)
        y = None if self.y is None else self.y.take(idx)
        return StreamImages(self.x.take(idx), y, self.levels, self.name, self._num_classes)

    def reduce_bits(self, n_bits: int) -> StreamImages:
        """The same images with ``2**n_bits`` levels, reduced as they are read
        (:func:`~numpyro_glow.data.reduce_bits`)."""
        shift = _bits_shift(self.levels, n_bits, self.name)
        return StreamImages(self.x.shifted(shift), self.y, 2**n_bits, self.name, self._num_classes)


# --- opening a prepared folder -------------------------------------------------------


def read_manifest(folder: Path) -> dict:
    """The manifest of a prepared folder, checked for the fields the reader uses."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(f"prepared data folder not found: {folder}")
    if not path.is_file():
        hint = ""
        if (folder / ".prepare-state.json").is_file():
            hint = " (prepare did not finish: run the same numpyro-glow prepare command again)"
        raise FileNotFoundError(f"{path} not found: not a prepared data set{hint}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON manifest ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: expected format {FORMAT!r}, got {got!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: expected version {VERSION}, got {meta.get('version')!r}")
    return meta


def open_stream(folder: str | os.PathLike, name: str | None = None) -> Any:
    """The train and test splits (a :class:`~numpyro_glow.data.Splits` of
    :class:`StreamImages`) of the folder ``numpyro-glow prepare`` wrote.

    Checks that every listed shard exists with the size its manifest gives
    (``FileNotFoundError`` / ``ValueError`` naming the shard); reads no pixels.
    """
    from .data import Splits

    folder = Path(folder).expanduser()
    meta = read_manifest(folder)
    try:
        shape = tuple(int(s) for s in meta["shape"])
        dtype = np.dtype(meta["dtype"])
        levels, classes = int(meta["levels"]), meta["num_classes"]
        splits = {part: meta["splits"][part] for part in ("train", "test")}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / MANIFEST}: incomplete manifest ({e!r})") from e
    item = math.prod(shape) * dtype.itemsize
    parts = {}
    for part, records in splits.items():
        xs, ys = [], []
        for r in records:
            xs.append(_listed(folder, r["file"], r["count"], r["offset"], r["fingerprint"], item))
            if r.get("labels"):
                lab = r["labels"]
                ys.append(_listed(folder, lab["file"], r["count"], lab["offset"],
                                  lab["fingerprint"], 4))  # fmt: skip
        x = ShardedArray(xs, shape, dtype)
        y = ShardedArray(ys, (), np.int32) if ys else None
        parts[part] = StreamImages(x, y, levels, name or f"stream:{folder}", classes)
    for part, images in parts.items():
        if len(images.x) == 0:
            raise ValueError(f"{folder / MANIFEST}: the {part} split has no images")
    return Splits(parts["train"], parts["test"])


def _listed(folder: Path, file: str, count: int, offset: int, fp: str, item: int) -> _Shard:
    path = folder / file
    if Path(file).name != file:
        raise ValueError(f"{folder / MANIFEST}: shard names must be plain file names, got {file!r}")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"missing shard {path} (listed in {folder / MANIFEST})") from None
    want = offset + count * item
    if size != want:
        raise ValueError(
            f"{path}: expected {want} bytes ({count} items) as {folder / MANIFEST} lists, "
            f"got {size}: a truncated shard, or one of another data set"
        )
    return _Shard(path, int(count), int(offset), str(fp))


# --- the grain pipeline --------------------------------------------------------------


class _ReadBatch:
    """Reads the images (and labels) at a batch of indices, in one gather: the
    function grain maps over the batches of indices."""

    def __init__(self, data: Any):
        self.x, self.y = data.x, data.y

    def __call__(self, idx: np.ndarray) -> Any:
        idx = np.asarray(idx)
        return self.x[idx] if self.y is None else (self.x[idx], self.y[idx])


def _grain() -> Any:
    try:
        import grain
    except ImportError as e:
        raise ImportError(
            f"streaming data (stream:DIR) needs grain, which is not installed; {_STREAM_EXTRA}"
        ) from e
    return grain


def batches(
    data: Any,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Any:
    """The training batches as a grain ``MapDataset``: element ``s`` is this
    process's rows of the batch of step ``s``.

    grain shuffles the indices of the images with ``seed``, a new order each
    epoch (``shuffle`` then ``repeat``), and cuts them into global batches of
    ``batch_size`` consecutive indices; process ``p`` of ``P`` gets rows
    ``p * batch_size / P`` to ``(p + 1) * batch_size / P`` of each. The batch of
    a step therefore depends on ``(seed, step)`` only, never on the number of
    processes, the workers or where a run was resumed. Items are images, or
    ``(image, label)`` pairs when ``data.y`` is not ``None``.
    """
    grain = _grain()
    if batch_size % process_count:
        raise ValueError(
            f"batch size {batch_size} does not divide over {process_count} processes; "
            f"use a multiple of {process_count}"
        )
    local = batch_size // process_count
    indices = grain.MapDataset.range(len(data.x)).seed(seed).shuffle().repeat(None)
    mine = indices.batch(local)[process_index::process_count]
    return mine.map(_ReadBatch(data))  # one read per batch, in grain's reading threads


def iterate(dataset: Any, threads: int = 2, prefetch: int = 4) -> Any:
    """An iterator over ``dataset`` (:func:`batches`) whose reads run ahead in
    ``threads`` threads, at most ``prefetch`` batches ahead; its position is
    ``get_state()`` / ``set_state()`` (JSON-able)."""
    grain = _grain()
    options = grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))
