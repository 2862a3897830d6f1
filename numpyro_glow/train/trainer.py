"""The :class:`Trainer`: a :class:`~.density.Density` and the data of a run,
moving the :class:`~.density.TrainState` through init, resume, steps,
evaluations and checkpoints."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import checkpoint, parallel, stream
from ..data import ImageData
from .checkpoints import _host_fields_of, _write_state
from .config import TrainConfig
from .density import DataInfo, Density, TrainState, _arrays_only, _carried, _copy, _rejoin

Array = jax.Array

__all__ = ["Trainer"]


class Trainer:
    """A :class:`Density` and the data of a run: the state's init, resume, steps,
    evaluations and checkpoints."""

    def __init__(
        self,
        config: TrainConfig,
        train: ImageData,
        validation: ImageData,
        num_classes: int | None = None,
    ):
        """``num_classes`` (default: from ``train``'s labels) counts the classes of
        the whole data set, which a small split may not all contain."""
        self.config = config
        self.train_data, self.validation = train, validation
        if config.model.conditional and train.y is None:
            raise ValueError(f"{train.name}: a conditional model needs labels, the data has none")
        if config.batch_size > len(train.x):
            raise ValueError(
                f"batch_size (--batch-size): expected at most the {len(train.x)} training images "
                f"(after holding out validation), got {config.batch_size}"
            )
        classes = (num_classes or train.num_classes) if config.model.conditional else None
        self.info = DataInfo(train.levels, tuple(train.x.shape[1:]), classes)
        self.density = Density.of(config, self.info)
        if self.density.mesh is not None:
            parallel.check_batch_size(config.batch_size, self.density.mesh)
        self.num_classes = classes
        self.step_key = self.density.replicate(jax.random.PRNGKey(config.seed + 1))
        self._permutation: tuple[int, np.ndarray] | None = None
        # a streamed set: this process's rows of every batch, through grain
        self._stream = None
        if isinstance(train, stream.StreamImages):
            self._stream = stream.batches(
                train, config.batch_size, config.seed, jax.process_index(), jax.process_count()
            )
        self._iterator: Any = None
        self._position: dict | None = None  # the data position of the checkpoint resumed

    # batches ------------------------------------------------------------------
    def batch(self, step: int) -> tuple[Array, Array | None]:
        """The training batch of ``step``: a function of (seed, step) only, so a
        resumed run sees the same batches as an uninterrupted one. With several
        devices it is split over them along axis 0. A streamed set
        (``stream:DIR``) is read through grain (:func:`~numpyro_glow.stream.batches`),
        each process reading only its own rows."""
        if self._stream is not None:
            return self._place_local(self._stream[step])
        n, b = len(self.train_data.x), self.config.batch_size
        epoch, i = divmod(step, n // b)
        if self._permutation is None or self._permutation[0] != epoch:
            perm = np.random.default_rng((self.config.seed, epoch)).permutation(n)
            self._permutation = (epoch, perm)
        idx = self._permutation[1][i * b : (i + 1) * b]
        y = None if self.num_classes is None else self.train_data.y[idx]
        return self.density.place(self.train_data.x[idx], y)

    def batches(self, start: int) -> Iterator[tuple[Array, Array | None]]:
        """The batches of steps ``start``, ``start + 1``, ...; for a streamed set
        from grain's iterator, read ahead in ``loader_threads`` threads, and
        placed at the position the resumed checkpoint recorded."""
        if self._stream is None:
            return (self.batch(step) for step in itertools.count(start))
        self._iterator = stream.iterate(self._stream, self.config.loader_threads)
        position = self._position or {"next_index": start}
        if position.get("next_index") != start:
            raise ValueError(f"the checkpoint's data position {position} is not its step {start}")
        if start:
            self._iterator.set_state(position)
        return (self._place_local(item) for item in self._iterator)

    def data_position(self) -> dict | None:
        """Where the streamed input stands (grain's iterator state, JSON), or
        ``None`` when the batches are a function of the step alone."""
        return None if self._iterator is None else self._iterator.get_state()

    def _place_local(self, item: Any) -> tuple[Array, Array | None]:
        k, y = item if isinstance(item, tuple) else (item, None)
        y = None if self.num_classes is None else y
        return self.density.place_local(k, y)

    # the state -----------------------------------------------------------------
    def init_state(self) -> TrainState:
        """A fresh state, replicated over the devices. The data-dependent ActNorm
        initialisation runs on one device, so it is the same for every device count."""
        # a larger first batch than a training step's, for the ActNorm statistics
        n_init = min(len(self.train_data.x), 512)
        k = jnp.asarray(self.train_data.x[:n_init])
        y = None if self.num_classes is None else jnp.asarray(self.train_data.y[:n_init])
        state = self.density.init_state(jax.random.PRNGKey(self.config.seed), k, y)
        return self.density.replicate(state)

    def resume(self, path: str | os.PathLike) -> TrainState:
        """The state of the training checkpoint ``path``, checked against this
        trainer's model (``ValueError`` naming the file and what differs)."""
        path = Path(path)
        trees, meta = checkpoint.read(path, {"state": _arrays_only(self.density.state_template())})
        if meta.get("kind") != "train":
            raise ValueError(
                f"{path}: expected a training checkpoint (kind 'train'), got {meta.get('kind')!r}"
            )
        saved = DataInfo.from_dict(meta["data"])
        if saved != self.info:
            raise ValueError(f"{path}: the checkpoint models {saved}; the data give {self.info}")
        state = self.density.replicate(jax.tree.map(jnp.asarray, trees["state"]))
        self._position = meta.get("data_position")
        return state._replace(**_host_fields_of(path, meta))

    def step(self, state: TrainState, k: Array, y: Array | None) -> TrainState:
        """``state`` after one training step on the batch ``(k, y)``. The state's
        buffers are donated: use only the returned state."""
        return _rejoin(self.density.train_step(_carried(state), k, y, self.step_key), state)

    def check_finite(self, state: TrainState, last_checkpoint: str) -> None:
        """``FloatingPointError`` if a loss since the start was NaN or infinite
        (this waits for the device)."""
        first = int(state.first_nonfinite)
        if first >= 0:
            raise FloatingPointError(
                f"training stopped: the loss was not finite at step {first} (found at step "
                f"{int(state.step)}). The last good checkpoint is {last_checkpoint}; try a "
                "lower --learning-rate or --grad-clip"
            )

    def evaluate(self, state: TrainState, **record: Any) -> TrainState:
        """``state`` with the validation score of its parameter average recorded:
        the best (a copy of the average) replaced if it improved, else the count
        of evaluations without improvement raised. ``record`` adds fields to the
        history entry."""
        val = self.density.bits_per_dim(state.ema, self.validation, jax.random.PRNGKey(7))
        step = int(state.step)
        if val < state.best_score:
            state = state._replace(
                best=_copy(state.ema), best_score=val, best_step=step, bad_evals=0
            )
        else:
            state = state._replace(bad_evals=state.bad_evals + 1)
        batch = self.config.batch_size
        entry = {
            "step": step,
            "train_bpd": float(state.loss) / (batch * self.density.num_dims * math.log(2.0)),
            "validation_bpd": val,
            **record,
            "best_validation_bpd": state.best_score,
        }
        return state._replace(history=(*state.history, entry))

    def save(self, state: TrainState, folder: Path) -> None:
        """Write ``folder/best.npz`` (the best parameters), then
        ``folder/checkpoint.npz`` (the state), each atomically."""
        _write_state(folder, state, self.density, self.config, self.data_position())
