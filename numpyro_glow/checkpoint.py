"""The checkpoint format: open arrays and JSON metadata in one ``.npz`` file.

A checkpoint is a NumPy ``.npz`` archive (a zip of ``.npy`` files) that is
read with ``np.load(path, allow_pickle=False)``, so loading it cannot run code:

- every array is stored under the path of its leaf in the saved pytree, the
  keys joined by ``/`` (``state/ema/glow.level0/coupling/w1``);
- the metadata is one JSON object, UTF-8, stored as the ``uint8`` array
  ``__metadata__``. It holds ``format`` (``"numpyro-glow"``), ``version``
  (:data:`VERSION`), ``kind`` and whatever the writer adds (the configuration,
  the step, the data description, library versions).

Reading validates the file against a *template*, the pytree the reader's own
configuration builds (arrays or ``jax.ShapeDtypeStruct``): every name, shape and
dtype must match, no array may be missing or extra, and the values must be
finite; anything else is a ``ValueError`` that names the file and what was
expected against what was found.

Writing is atomic: the archive goes to a temporary file in the same folder,
is flushed and fsynced, then renamed over the target (``os.replace``) and the
folder fsynced, so a crash at any point leaves either the previous file or the
new one, never a mix. The temporary file is removed if the write fails.

The only pickle this module opens is the explicit, trusted conversion of an old
``checkpoint.pkl`` (:func:`convert_pickle`), behind ``--trust-pickle``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .data import _ArrayUnpickler

__all__ = [
    "FORMAT",
    "VERSION",
    "convert_pickle",
    "dumps",
    "flatten",
    "read",
    "read_metadata",
    "write",
]

FORMAT = "numpyro-glow"
VERSION = 1
METADATA = "__metadata__"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = tuple(bytes([0x80, p]) for p in range(2, 6))


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON: non-finite floats become ``null`` (``allow_nan=False`` holds)."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kwargs)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Mapping):
        return {str(k): _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    return obj


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten(tree: Any, prefix: str) -> dict[str, Any]:
    """The leaves of ``tree`` by name: ``prefix/key/key/...``. ``ValueError`` if
    two leaves get the same name (a key that contains ``/``)."""
    out: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join([prefix, *(_key_name(e) for e in path)])
        if name in out or name == METADATA:
            raise ValueError(f"two arrays of the checkpoint would be named {name!r}")
        out[name] = leaf
    return out


def write(path: str | os.PathLike, arrays: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
    """Write ``arrays`` (name -> array) and ``metadata`` (JSON-able) atomically."""
    path = Path(path)
    meta = {"format": FORMAT, "version": VERSION, **metadata}
    payload = {name: np.asarray(a) for name, a in arrays.items()}
    for name, a in payload.items():
        if a.dtype.kind not in "biufc":  # np.savez would pickle an object array
            raise ValueError(f"{path}: array {name!r} has dtype {a.dtype}; expected numbers")
    payload[METADATA] = np.frombuffer(dumps(meta).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private; a checkpoint is not
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _conversion_hint(path: Path) -> str:
    return (
        f"{path}: this is a pickle checkpoint (the format of numpyro-glow 0.1's checkpoint.pkl). "
        "Loading a pickle can run arbitrary code, so numpyro-glow no longer reads them. If you "
        f"trust this file, convert it once with: numpyro-glow convert-checkpoint --trust-pickle "
        f"{path}"
    )


def _open(path: str | os.PathLike) -> tuple[Path, Any]:
    """The open ``NpzFile`` of a checkpoint, after the checks that need no template."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] in _PICKLE_PROTOCOLS:
        raise ValueError(_conversion_hint(path))
    if head != _ZIP_MAGIC:
        raise ValueError(
            f"{path}: expected a numpyro-glow checkpoint (an .npz archive), "
            f"got a file that starts with {head!r}"
        )
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(
            f"{path}: expected a numpyro-glow checkpoint (an .npz archive); it is truncated "
            f"or corrupt: {e}"
        ) from e
    return path, npz


def _member(path: Path, npz: Any, name: str) -> np.ndarray:
    try:
        return npz[name]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise ValueError(
            f"{path}: the array {name!r} cannot be read (truncated or corrupt file): {e}"
        ) from e


def _metadata(path: Path, npz: Any) -> dict:
    if METADATA not in npz.files:
        raise ValueError(
            f"{path}: expected a numpyro-glow checkpoint with a {METADATA!r} entry; "
            f"found only {sorted(npz.files)[:5]}"
        )
    raw = _member(path, npz, METADATA)
    try:
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError(f"expected a uint8 vector, got {raw.dtype}{raw.shape}")
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: the checkpoint's metadata is not JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: expected format {FORMAT!r} in the metadata, found {found!r}")
    version = meta.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {version!r}; this numpyro-glow reads versions "
            f"up to {VERSION} (a newer numpyro-glow wrote it?)"
        )
    return meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint, without reading its arrays.

    ``FileNotFoundError`` if missing; ``ValueError`` naming the file if it is a
    pickle (with the conversion command), not an ``.npz``, truncated, or not a
    numpyro-glow checkpoint."""
    path, npz = _open(path)
    with npz:
        return _metadata(path, npz)


def _describe(a: Any) -> str:
    return f"{np.dtype(a.dtype).name}{tuple(a.shape)}"


def _listing(names: set[str], limit: int = 4) -> str:
    shown = sorted(names)[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in shown) + more


def read(path: str | os.PathLike, templates: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
    """Read a checkpoint into pytrees shaped like ``templates`` and its metadata.

    ``templates`` maps a prefix (``"state"``, ``"params"``) to the pytree the
    file must hold under it; the file must hold exactly those arrays, each of
    the template's shape and dtype, with finite values.
    Returns ``({prefix: pytree of NumPy arrays}, metadata)``.
    """
    path, npz = _open(path)
    with npz:
        meta = _metadata(path, npz)
        expected: dict[str, Any] = {}
        for prefix, template in templates.items():
            expected.update(flatten(template, prefix))
        found = set(npz.files) - {METADATA}
        missing, extra = set(expected) - found, found - set(expected)
        what = f"the {meta.get('kind', 'checkpoint')} its configuration builds"
        if missing:
            raise ValueError(
                f"{path}: missing {len(missing)} array(s) of {what}: {_listing(missing)}"
            )
        if extra:
            raise ValueError(
                f"{path}: {len(extra)} unexpected array(s), not part of {what}: {_listing(extra)}"
            )
        values = {}
        for name, want in expected.items():
            a = _member(path, npz, name)
            if a.shape != tuple(want.shape) or a.dtype != np.dtype(want.dtype):
                raise ValueError(
                    f"{path}: array {name!r}: expected {_describe(want)}, found {_describe(a)}"
                )
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                bad = int(a.size - np.isfinite(a).sum())
                raise ValueError(
                    f"{path}: array {name!r} holds {bad} NaN or infinite value(s); expected "
                    "finite values"
                )
            values[name] = a
    trees = {}
    for prefix, template in templates.items():
        leaves, treedef = jax.tree_util.tree_flatten(template)
        names = list(flatten(template, prefix))
        assert len(names) == len(leaves)
        trees[prefix] = jax.tree_util.tree_unflatten(treedef, [values[n] for n in names])
    return trees, meta


class _CheckpointUnpickler(_ArrayUnpickler):
    """NumPy's array globals and optax's optimiser states, which are
    ``NamedTuple`` classes (building one runs no code but ``tuple.__new__``)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "optax":
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and issubclass(found, tuple) and hasattr(found, "_fields"):
                return found
        return super().find_class(module, name)


def convert_pickle(source: str | os.PathLike, *, trust_pickle: bool) -> dict[str, Any]:
    """Load an old pickle checkpoint for conversion to the open format.

    Only with ``trust_pickle=True``, the caller's statement that the file comes
    from a source it trusts. Even then the file is read by an unpickler that
    resolves only the globals a 0.1 checkpoint holds (NumPy's array
    reconstruction and optax's ``NamedTuple`` optimiser states), so a crafted
    file is refused instead of run. Returns the unpickled dict (format
    ``"numpyro-glow/1"``) for the caller to write in the open format.
    """

    if not trust_pickle:
        raise ValueError(
            f"{source}: converting a pickle checkpoint loads it, which can run code; pass "
            "--trust-pickle (trust_pickle=True) only for a file you trust"
        )
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint not found: {source}")
    with open(source, "rb") as f:
        try:
            state = _CheckpointUnpickler(f).load()
        except Exception as e:
            raise ValueError(f"{source}: not a readable pickle checkpoint: {e}") from e
    if not isinstance(state, dict) or state.get("format") != "numpyro-glow/1":
        raise ValueError(
            f"{source}: expected a numpyro-glow 0.1 pickle checkpoint (a dict with format "
            f"'numpyro-glow/1'), got {type(state).__name__}"
        )
    return state
