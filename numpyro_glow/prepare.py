"""``numpyro-glow prepare SOURCE OUT``: any data set the package reads, written
as the streaming format of :mod:`numpyro_glow.stream`.

A folder of images is decoded in parallel threads (Pillow releases the GIL
while it decodes), every image checked, optionally resized and center-cropped
to ``size x size``; MNIST, CIFAR-10, an ``.npz`` and the digits are read with
:func:`numpyro_glow.data.load` and cut into shards. The work is a fixed plan
of shards; each shard is written to a temporary file and renamed into place,
and the list of finished shards is rewritten atomically after each, so an
interrupted run resumes where it stopped (run the same command again) and
never leaves a half-written shard under a shard's name. ``manifest.json`` is
written last: a folder without it is not a data set yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import data as _data
from .stream import FORMAT, MANIFEST, VERSION, fingerprint

__all__ = ["STATE", "prepare"]

STATE = ".prepare-state.json"  # the plan and the finished shards of a prepare in progress
_SHARD_BYTES = 64 << 20  # default shard size: about 64 MiB of pixels
_BLOCK = 4096  # files whose headers are read at once


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def _write_npy(path: Path, a: np.ndarray) -> dict:
    """Write ``a`` as ``.npy`` atomically; its file name, header size and fingerprint."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.lib.format.write_array(f, a, allow_pickle=False)

    _write_atomically(path, write)
    offset = path.stat().st_size - a.nbytes
    return {"file": path.name, "offset": int(offset), "fingerprint": fingerprint(path)}


# --- sources ---------------------------------------------------------------------------


class _Folder:
    """A folder of image files (classes in subfolders, as ``folder:DIR`` reads them),
    decoded one file per call."""

    def __init__(self, root: Path, size: int | None, pool: ThreadPoolExecutor, skip_bad: bool):
        pil = _data._require("PIL.Image", "Pillow", "prepare of an image folder")
        self.pil, self.size, self.skip_bad = pil, size, skip_bad
        self.errors = (OSError, ValueError, SyntaxError, pil.DecompressionBombError)
        _data._require_dir(root, "image folder")
        try:
            classes = sorted(
                p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
            files, labels = _data._folder_files(root, classes)
        except PermissionError as e:
            raise PermissionError(f"{e.filename}: cannot read the folder ({e.strerror})") from e
        self.files, self.classes = files, classes
        self.labels = np.asarray(labels, np.int32) if classes else None
        self.bad: list[str] = []
        # pass 1, headers only: the common size (without --size) and gray or color;
        # in blocks, so that the pending work does not grow with the number of files
        sizes: dict[tuple[int, int], Path] = {}  # the first file of each size
        self.gray = True
        for lo in range(0, len(files), _BLOCK):
            block = files[lo : lo + _BLOCK]
            for path, head in zip(block, pool.map(self._header, block), strict=True):
                if head is not None:
                    sizes.setdefault(head[0], path)
                    self.gray &= head[1]
        if not sizes:
            raise ValueError(f"{root}: no readable image among {len(files)} files")
        if size is None:
            if len(sizes) > 1:
                (s0, first), (s1, other) = list(sizes.items())[:2]
                raise ValueError(
                    f"{other}: images of several sizes ({s1[0]}x{s1[1]} here, {s0[0]}x{s0[1]} "
                    f"like {first}); pass --size S to resize and center-crop every image to S x S"
                )
            w, h = next(iter(sizes))
        else:
            w = h = size
        self.shape = (h, w, 1 if self.gray else 3)

    def _fail(self, path: Path, why: str) -> None:
        if not self.skip_bad:
            raise ValueError(f"{path}: not a readable image ({why}); pass --skip-bad to skip it")
        self.bad.append(str(path))

    def _header(self, path: Path) -> tuple[tuple[int, int], bool] | None:
        try:
            with self.pil.open(path) as im:
                if im.mode.startswith("I") or im.mode == "F":
                    raise ValueError(f"a {im.mode!r} image, expected 8 bits per channel")
                return im.size, _data._is_gray(im)
        except self.errors as e:
            self._fail(path, f"{type(e).__name__}: {e}")
            return None

    def decode(self, i: int) -> np.ndarray | None:
        """Image ``i`` as ``uint8 (H, W, C)``; ``None`` if it is bad and skipped."""
        path = self.files[i]
        try:
            with self.pil.open(path) as im:
                im = im.convert("L" if self.gray else "RGB")
                if self.size is not None:
                    im = _square(im, self.size, self.pil)
                a = np.asarray(im, dtype=np.uint8)
        except self.errors as e:
            if str(path) not in self.bad:
                self._fail(path, f"{type(e).__name__}: {e}")
            return None
        if a.shape[:2] != self.shape[:2]:
            self._fail(path, f"size {a.shape[1]}x{a.shape[0]}, expected {self.shape[1]}x"
                             f"{self.shape[0]}")  # fmt: skip
            return None
        return a.reshape(self.shape)

    def plan(self) -> list[str]:
        return [str(p) for p in self.files]


def _square(im: Any, size: int, pil: Any) -> Any:
    """The largest centered square of ``im``, resized to ``size x size``."""
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    return im.resize((size, size), pil.Resampling.BICUBIC) if s != size else im


# --- the plan ----------------------------------------------------------------------------


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _check_out(out: Path, plan: str) -> dict | None:
    """The finished shards of a prepare of the same plan in ``out``; ``ValueError``
    if ``out`` holds something else (nothing in it is changed)."""
    manifest, state = out / MANIFEST, out / STATE
    if manifest.is_file():
        raise ValueError(
            f"{out} already holds a prepared data set ({manifest}); nothing was changed. "
            "Choose another OUT, or remove the folder to prepare it again"
        )
    if state.is_file():
        try:
            saved = json.loads(state.read_text())
        except ValueError as e:
            raise ValueError(f"{state}: unreadable progress file ({e}); remove {out}") from e
        if saved.get("plan") != plan:
            raise ValueError(
                f"{out} holds an unfinished prepare of another source or other options "
                f"({state}: {saved.get('source')!r}); finish it with its own command, or "
                "choose another OUT"
            )
        return saved
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder for OUT")
    return None


class _Bar:
    def __init__(self, total: int, show: bool):
        self.total, self.show, self.done, self.t0 = total, show, 0, time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        if self.show:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            print(f"\rprepare: {self.done}/{self.total} images ({rate:.0f}/s)", end="",
                  file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.show:
            print(file=sys.stderr)


def prepare(
    source: str,
    out: str | os.PathLike,
    *,
    size: int | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    shard_size: int | None = None,
    skip_bad: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write ``source`` as a prepared (streaming) data set in the folder ``out``.

    Args:
        source: ``folder:DIR`` (or a plain directory), ``npz:PATH``, ``mnist:DIR``,
            ``cifar10:DIR`` or ``digits``, as :func:`numpyro_glow.data.load` reads them.
        out: a new or empty folder, or one an interrupted ``prepare`` of the same
            source and options left (it resumes).
        size: resize and center-crop every image to ``size x size`` (default: keep
            the size; then all images must have one).
        test_size, seed: the held-out split of sets without an official one.
        shard_size: images per shard (default: about 64 MiB of pixels).
        skip_bad: skip unreadable images (counted in the manifest) instead of
            stopping at the first with a ``ValueError`` naming it.
        workers: decoding threads (default: the CPU count).
        progress: a progress line on stderr.

    Returns:
        The manifest (also in ``out/manifest.json``).
    """
    out = Path(out).expanduser()
    kind, sep, rest = source.partition(":")
    if not sep and Path(source).expanduser().is_dir():
        kind, rest = "folder", source
    kind = kind.strip().lower()
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        if kind == "folder":
            src = _Folder(Path(rest).expanduser(), size, pool, skip_bad)
            items = np.arange(len(src.files))
            train_i, test_i = _data._split_indices(len(items), test_size, seed, "--test-size")
            parts = {"train": train_i, "test": test_i}
            levels, classes, shape = 256, len(src.classes) or None, src.shape
            listing = src.plan()
            get = src.decode
        else:
            if size is not None:
                raise ValueError(f"--size applies to image folders, not to {source!r}")
            splits = _data.load(source, test_size=test_size, seed=seed)
            arrays = {"train": splits.train, "test": splits.test}
            levels, shape = splits.train.levels, tuple(splits.train.x.shape[1:])
            classes = _num_classes(splits)
            parts = {p: np.arange(len(d.x)) for p, d in arrays.items()}
            h = hashlib.sha256()
            for d in arrays.values():
                h.update(np.ascontiguousarray(d.x).tobytes())
            listing = [h.hexdigest()]
            src = None
        dtype = np.dtype(_data._pixel_dtype(levels))
        per_shard = shard_size or max(1, _SHARD_BYTES // (int(np.prod(shape)) * dtype.itemsize))
        options = dict(size=size, test_size=test_size, seed=seed, shard_size=per_shard)
        plan = _digest({"source": source, "options": options, "files": listing})
        saved = _check_out(out, plan)
        out.mkdir(parents=True, exist_ok=True)
        state = saved or {"plan": plan, "source": source, "done": {}}
        _write_json(out / STATE, state)
        bar = _Bar(sum(len(v) for v in parts.values()), progress)
        records: dict[str, list[dict]] = {"train": [], "test": []}
        try:
            for part, index in parts.items():
                for n, (lo, hi) in enumerate(_chunks(len(index), per_shard)):
                    name = f"{part}-{n:05d}"
                    rec = state["done"].get(name)
                    if rec is None:
                        if src is not None:
                            got = list(pool.map(get, index[lo:hi].tolist()))
                            keep = [j for j, a in enumerate(got) if a is not None]
                            x = np.stack([got[j] for j in keep]) if keep else None
                            x = x if x is not None else np.empty((0, *shape), dtype)
                            rows = index[lo:hi][keep]
                            y = None if src.labels is None else src.labels[rows]
                            bad = (hi - lo) - len(keep)
                        else:
                            d = arrays[part]
                            x = np.asarray(d.x[lo:hi], dtype)
                            y, bad = d.y[lo:hi] if d.y is not None else None, 0
                        rec = _write_npy(out / f"{name}.npy", np.ascontiguousarray(x))
                        rec.update(count=len(x), skipped=bad)
                        if y is not None:
                            labels = np.ascontiguousarray(y, dtype="<i4")
                            rec["labels"] = _write_npy(out / f"{name}.labels.npy", labels)
                        state["done"][name] = rec
                        _write_json(out / STATE, state)
                    records[part].append(rec)
                    bar.add(hi - lo)
        finally:
            bar.close()
    skipped = sum(r["skipped"] for rs in records.values() for r in rs)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "shape": list(shape),
        "dtype": dtype.str,
        "levels": levels,
        "num_classes": classes,
        "classes": list(src.classes) if src is not None and src.classes else None,
        "images": {p: sum(r["count"] for r in rs) for p, rs in records.items()},
        "skipped": skipped,
        "bad_files": (src.bad[:1000] if src is not None else []),
        "options": options,
        "plan": plan,
        "splits": records,
    }
    _write_json(out / MANIFEST, manifest)
    (out / STATE).unlink()
    return manifest


def _num_classes(splits: Any) -> int | None:
    labels = [d.y for d in (splits.train, splits.test) if d.y is not None and d.y.size]
    return max(int(y.max()) + 1 for y in labels) if labels else None
