"""The checkpoints of runs: writing a run's state (``checkpoint.npz``) and best
parameters (``best.npz``), reading either back into a :class:`~.density.Density`
and its parameters (:func:`load_model`, what :func:`numpyro_glow.load_glow`
builds on), checking that a run may resume, and converting the pickles of
numpyro-glow 0.1. The file format itself is :mod:`numpyro_glow.checkpoint`."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import checkpoint
from .config import TrainConfig, _may_change_on_resume, _resume_difference
from .density import DataInfo, Density, TrainState, _arrays_only, _host_fields

__all__ = ["BEST", "CHECKPOINT", "convert_checkpoint", "load_model"]

CHECKPOINT = "checkpoint.npz"  # the last good training state (to resume)
BEST = "best.npz"  # the parameters of the best validation score (to use)


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from .._version import __version__

    found = {"numpyro_glow": __version__, "python": platform.python_version()}
    for name in ("jax", "jaxlib", "numpyro", "numpy", "optax"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _metadata(density: Density, config: TrainConfig, kind: str, **more: Any) -> dict:
    return {
        "kind": kind,
        "config": config.to_dict(),
        "data": {"spec": config.data, **density.info.to_dict()},
        "versions": _library_versions(),
        **more,
    }


def _write_state(
    folder: Path,
    state: TrainState,
    density: Density,
    config: TrainConfig,
    data_position: dict | None = None,
) -> None:
    """``best.npz`` and ``checkpoint.npz``; ``data_position`` (the streamed
    input's iterator state) goes into the checkpoint's metadata."""
    arrays = jax.device_get(_arrays_only(state))
    checkpoint.write(
        folder / BEST,
        checkpoint.flatten(arrays.best, "params"),
        _metadata(density, config, "model", step=state.best_step, validation_bpd=state.best_score),
    )
    host = {**_host_fields(state), "history": list(state.history)}
    if data_position is not None:
        host["data_position"] = data_position
    checkpoint.write(
        folder / CHECKPOINT,
        checkpoint.flatten(arrays, "state"),
        _metadata(density, config, "train", step=int(arrays.step), **host),
    )


def _host_fields_of(path: Path, meta: dict) -> dict[str, Any]:
    """The host fields of a training checkpoint's metadata (``ValueError`` if absent)."""
    try:
        score = meta["best_score"]
        host = {
            "best_score": math.inf if score is None else float(score),
            "best_step": int(meta["best_step"]),
            "bad_evals": int(meta["bad_evals"]),
            "history": tuple(dict(r) for r in meta["history"]),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the checkpoint's metadata lacks the run's progress: {e}") from e
    return host


def _read_config(path: Path, meta: dict) -> tuple[TrainConfig, DataInfo]:
    try:
        config = TrainConfig.from_dict(meta["config"])
        info = DataInfo.from_dict(meta["data"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the checkpoint's configuration is not valid: {e}") from e
    return config, info


def load_model(path: str | os.PathLike) -> tuple[Density, dict, dict]:
    """The density, the best parameters and the metadata of a checkpoint.

    ``path`` is a training checkpoint (``checkpoint.npz``: its best
    parameters are taken) or a model file (``best.npz``). The file is read
    without pickle and checked against the model its own configuration
    builds: ``FileNotFoundError`` if missing, ``ValueError`` naming the file
    and what was expected if it is anything else (an old pickle checkpoint,
    with the command that converts it). The density runs on one device.
    """
    path = Path(path)
    meta = checkpoint.read_metadata(path)
    config, info = _read_config(path, meta)
    density = Density.of(dataclasses.replace(config, devices=None), info)
    kind = meta.get("kind")
    if kind == "model":
        params_template = jax.eval_shape(density.svi.get_params, density.state_template().svi)
        trees, meta = checkpoint.read(path, {"params": params_template})
        params = trees["params"]
    elif kind == "train":
        trees, meta = checkpoint.read(path, {"state": _arrays_only(density.state_template())})
        params = trees["state"].best
    else:
        raise ValueError(f"{path}: expected kind 'train' or 'model' in the metadata, got {kind!r}")
    return density, jax.tree.map(jnp.asarray, params), meta


def _check_resumable(path: Path, config: TrainConfig) -> None:
    """``ValueError`` naming the first option that differs from the checkpoint's."""
    meta = checkpoint.read_metadata(path)
    saved, _ = _read_config(path, meta)
    if meta.get("kind") != "train":
        raise ValueError(f"{path}: expected a training checkpoint, got kind {meta.get('kind')!r}")
    difference = _resume_difference(saved, config)
    if difference:
        raise ValueError(
            f"{path}: cannot resume with other options: {difference}. Resume with the "
            f"checkpoint's options (these may change: {_may_change_on_resume()})"
        )


def convert_checkpoint(
    source: str | os.PathLike, folder: str | os.PathLike | None = None, *, trust_pickle: bool
) -> Path:
    """Convert a pickle ``checkpoint.pkl`` of numpyro-glow 0.1 to ``checkpoint.npz``
    and ``best.npz`` in ``folder`` (default: the pickle's folder). Loading the
    pickle runs any code it holds: ``trust_pickle=True`` states that the file is
    trusted. The result is read back and checked like any checkpoint. Returns
    the path of ``checkpoint.npz``."""
    source = Path(source)
    old = checkpoint.convert_pickle(source, trust_pickle=trust_pickle)
    folder = Path(folder) if folder is not None else source.parent
    target = folder / CHECKPOINT
    for p in (target, folder / BEST):
        if p.exists():
            raise ValueError(f"{p} exists; move it away first (nothing was converted)")
    config, info = _read_config(source, {"config": old["config"], "data": _old_data(old)})
    density = Density.of(config, info)
    template = _arrays_only(density.state_template())
    svi_leaves = jax.tree.leaves(old["svi_state"])
    svi_def = jax.tree.structure(template.svi)
    if len(svi_leaves) != svi_def.num_leaves:
        raise ValueError(
            f"{source}: the SVI state has {len(svi_leaves)} arrays; this configuration's "
            f"optimiser has {svi_def.num_leaves}"
        )
    best = old["best"]
    state = TrainState(
        step=np.int32(old["step"]),
        svi=jax.tree.unflatten(svi_def, svi_leaves),
        ema=old["ema"],
        best=best["params"],
        loss=np.float32(0.0),
        first_nonfinite=np.int32(-1),
        best_score=float(best["validation_bpd"]),
        best_step=int(best["step"]),
        bad_evals=int(old["bad_evals"]),
        history=tuple(old["history"]),
    )
    _write_state(folder, state, density, config)
    load_model(target)  # read back: names, shapes, dtypes, finiteness
    return target


def _old_data(old: dict) -> dict:
    data = dict(old["data"])
    data["event_shape"] = list(data["event_shape"])
    return data
