"""The compiled density of a configuration and the one state a run carries:
:class:`DataInfo` (what a model knows of its images), :class:`TrainState` (a
pytree through init, resume, step, evaluation and checkpoint) and
:class:`Density` (the training step, the evaluation bound and sampling, compiled,
cached per configuration)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.svi import SVIState

from .. import parallel
from ..data import ImageData
from ..distribution import FlowDistribution
from .config import TrainConfig
from .model import check_corruption, density_model, dequantization_guide, glow_from_config

Array = jax.Array

__all__ = ["DataInfo", "Density", "TrainState"]


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know of its images: pixel ``levels``, ``event_shape``
    ``(H, W, C)`` and ``num_classes`` (``None`` for an unconditional model)."""

    levels: int
    event_shape: tuple[int, ...]
    num_classes: int | None = None

    def to_dict(self) -> dict:
        return {
            "levels": self.levels,
            "event_shape": list(self.event_shape),
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DataInfo:
        classes = d.get("num_classes")
        shape = d.get("event_shape")
        if (
            not isinstance(d.get("levels"), int)
            or not isinstance(shape, list)
            or len(shape) != 3
            or not all(isinstance(s, int) and s > 0 for s in shape)
            or not (classes is None or (isinstance(classes, int) and classes > 0))
        ):
            raise ValueError(f"expected levels, event_shape [H, W, C] and num_classes, got {d!r}")
        return cls(d["levels"], tuple(shape), classes)


# --- the one training state -----------------------------------------------------------
class TrainState(NamedTuple):
    """Everything a run carries from step to step, as one pytree.

    The first fields are arrays: they pass through the compiled step (which
    takes their buffers, donated) and are the checkpoint's arrays. The last
    four change only at evaluations, on the host, and are stored in the
    checkpoint's metadata; the score is kept as a Python float, exactly.
    """

    step: Array  # int32: steps done
    svi: SVIState  # parameters, optimiser state, random key
    ema: dict  # the parameter average (decay ``ema_decay``)
    best: dict  # the average at the best validation score
    loss: Array  # float32: the loss of the last step's batch
    first_nonfinite: Array  # int32: the first step whose loss was NaN or inf, -1 while none
    best_score: float = math.inf  # validation bits/dim of ``best`` (inf before any evaluation)
    best_step: int = 0  # the step of ``best``
    bad_evals: int = 0  # evaluations since the best one
    history: tuple = ()  # one dict per evaluation


_HOST_FIELDS = ("best_score", "best_step", "bad_evals", "history")


def _arrays_only(state: TrainState) -> TrainState:
    """``state`` without its host fields (``None``: no leaves)."""
    return state._replace(**dict.fromkeys(_HOST_FIELDS))


def _host_fields(state: TrainState) -> dict[str, Any]:
    return {name: getattr(state, name) for name in _HOST_FIELDS}


def _carried(state: TrainState) -> TrainState:
    """What the compiled step takes (and donates): ``state`` without the best
    parameters, which it does not change, and the host fields."""
    return _arrays_only(state)._replace(best=None)


def _rejoin(new: TrainState, old: TrainState) -> TrainState:
    """The step's output ``new`` with the fields :func:`_carried` left out of ``old``."""
    return new._replace(best=old.best, **_host_fields(old))


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


# --- the model of a configuration, compiled ------------------------------------------
# fields of TrainConfig that change nothing a Density compiles
_RUN_ONLY = (
    "data",
    "n_bits",  # the levels it leaves are the DataInfo's
    "loader_threads",
    "out_dir",
    "steps",
    "batch_size",
    "validation_size",
    "eval_every",
    "checkpoint_every",
    "patience",
    "temperatures",
    "seed",
    "progress",
)


class Density:
    """The density model of a configuration on images of one :class:`DataInfo`, as
    compiled functions: the SVI training step (parameter average and finiteness
    flag inside it, its state donated), the evaluation bound, sampling, and
    the shapes of the state and parameters a checkpoint must hold.

    Build it with :meth:`of`, which returns the same object (and so the same
    compiled functions) for configurations that differ only in what a run
    does around the model (steps, data, seed, ...).
    """

    def __init__(self, config: TrainConfig, info: DataInfo):
        self.config, self.info = config, info
        self.num_classes = info.num_classes if config.model.conditional else None
        self.event_shape = tuple(info.event_shape)
        self.num_dims = math.prod(self.event_shape)
        kwargs = dict(levels=info.levels, config=config.model, num_classes=self.num_classes)
        if config.dequantization == "gaussian":
            check_corruption(info.levels, config.corruption_level, config.model.alpha)
            kwargs["corruption_level"] = config.corruption_level
        self.model = _partial(density_model, **kwargs)
        self.guide = _partial(
            dequantization_guide, variational=config.dequantization == "variational", **kwargs
        )
        self.optimizer = numpyro.optim.optax_to_numpyro(_optax(config))
        self.svi = SVI(self.model, self.guide, self.optimizer, Trace_ELBO())
        # data parallel: batches split over a mesh, parameters and outputs replicated
        self.mesh = parallel.make_mesh(config.devices)
        if self.mesh.devices.size == 1:
            self.mesh, jit = None, jax.jit
        else:
            jit = functools.partial(jax.jit, out_shardings=parallel.replicated_sharding(self.mesh))
        self.train_step = jit(self._train_step, donate_argnums=0)
        # evaluation: the same model without dropout
        eval_kwargs = {**kwargs, "config": dataclasses.replace(config.model, dropout=0.0)}
        eval_model = _partial(density_model, **eval_kwargs)
        elbo = Trace_ELBO()
        self._loss = jit(
            lambda key, params, k, y: elbo.loss(key, params, eval_model, self.guide, k, y)
        )
        # the uniform-dequantization bound of the same model, for comparison
        self._loss_uniform = self._loss
        if config.dequantization != "uniform":
            uniform_model = _partial(density_model, uniform=True, **eval_kwargs)
            uniform_guide = _partial(dequantization_guide, uniform=True, **kwargs)
            self._loss_uniform = jit(
                lambda key, params, k, y: elbo.loss(key, params, uniform_model, uniform_guide, k, y)
            )
        # sampled images are pixels / (L - 1); corrupted ones come as x = pixels / (c + L - 1)
        self._pixel_scale = 1.0
        if config.dequantization == "gaussian":
            self._pixel_scale = (config.corruption_level + info.levels - 1) / (info.levels - 1)
        self._draw = jax.jit(self._sample_fn, static_argnums=(4,))
        self._template: TrainState | None = None

    @classmethod
    def of(cls, config: TrainConfig, info: DataInfo) -> Density:
        """The (cached) density of ``config`` on images of ``info``."""
        defaults = {name: getattr(TrainConfig(), name) for name in _RUN_ONLY}
        return _cached_density(dataclasses.replace(config, **defaults), info)

    # devices -----------------------------------------------------------------
    def replicate(self, tree: Any) -> Any:
        """``tree`` copied to every device of the mesh (unchanged on one device)."""
        return tree if self.mesh is None else parallel.replicate(tree, self.mesh)

    def place(self, k: np.ndarray | Array, y: np.ndarray | Array | None = None):
        """A batch for the compiled functions: on one device as it is (a compiled
        call transfers NumPy arguments itself, faster than ``jnp.asarray``);
        with several, split along axis 0 over the mesh when its length divides
        evenly over the devices, else replicated."""
        if self.mesh is None:
            return k, y
        if len(k) % self.mesh.devices.size:
            return parallel.replicate((k, y), self.mesh)
        return parallel.shard_batch((k, y), self.mesh)

    def place_local(self, k: np.ndarray, y: np.ndarray | None = None):
        """This process's rows of a global batch (:func:`~numpyro_glow.stream.batches`)
        placed as the global batch: with one process as :meth:`place`, with several
        each process contributes its rows to the batch axis."""
        if self.mesh is None or jax.process_count() == 1:
            return self.place(k, y)
        return parallel.shard_local_batch((k, y), self.mesh)

    # the state -----------------------------------------------------------------
    def init_state(self, key: Array, k: Array, y: Array | None) -> TrainState:
        """A fresh state: ``SVI.init`` on the images ``k`` (which set the
        data-dependent ActNorm initialisation), its parameters copied into the
        average and the best."""
        svi_state = self.svi.init(key, k, y)
        # no weak types (SVI's step counter has one): a state read from a checkpoint
        # then has the same types, and the compiled step is reused
        svi_state = jax.tree.map(lambda a: jnp.asarray(a, dtype=a.dtype), svi_state)
        params = self.svi.get_params(svi_state)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            svi=svi_state,
            ema=_copy(params),  # copies: the step donates every buffer of the state once
            best=_copy(params),
            loss=jnp.zeros((), jnp.float32),
            first_nonfinite=jnp.full((), -1, jnp.int32),
        )

    def state_template(self) -> TrainState:
        """The shapes and dtypes of a state (``jax.ShapeDtypeStruct`` leaves),
        traced, not computed."""
        if self._template is None:
            n = 2  # any batch: no parameter's shape depends on it
            k = jax.ShapeDtypeStruct((n, *self.event_shape), np.int32)
            y = None if self.num_classes is None else jax.ShapeDtypeStruct((n,), np.int32)
            self._template = jax.eval_shape(self.init_state, jax.random.PRNGKey(0), k, y)
        return self._template

    def _train_step(self, state: TrainState, k: Array, y: Array | None, key: Array) -> TrainState:
        """One SVI step with the random key ``fold_in(key, step)``, then the
        parameter average and the finiteness flag, all compiled together."""
        svi_state = state.svi._replace(rng_key=jax.random.fold_in(key, state.step))
        svi_state, loss = self.svi.update(svi_state, k, y)
        params = self.svi.get_params(svi_state)
        decay = self.config.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
        first_bad = jnp.where(
            (state.first_nonfinite < 0) & ~jnp.isfinite(loss), state.step, state.first_nonfinite
        )
        return state._replace(
            step=state.step + 1, svi=svi_state, ema=ema, loss=loss, first_nonfinite=first_bad
        )

    # evaluation and sampling ---------------------------------------------------------
    def bits_per_dim(
        self, params: dict, data: ImageData, key: Array, batch: int = 512, uniform: bool = False
    ) -> float:
        """The dequantization bound on ``data`` in bits per dimension (one noise draw
        per image), with the run's guide or (``uniform``) uniform dequantization."""
        loss = self._loss_uniform if uniform else self._loss
        total = 0.0  # chunks of ``batch`` images, split over the devices where they divide
        for start in range(0, len(data.x), batch):
            y = None if self.num_classes is None else data.y[start : start + batch]
            k, y = self.place(data.x[start : start + batch], y)
            total += float(loss(jax.random.fold_in(key, start), params, k, y))
        return total / (len(data.x) * self.num_dims * math.log(2.0))

    def density(
        self, params: dict, temperature: float | Array = 1.0, y: Array | None = None
    ) -> FlowDistribution:
        """The Glow with ``params`` fixed in it, dropout off: the distribution of
        images in [0, 1] at ``temperature`` (of classes ``y``, conditional models).
        With Gaussian dequantization the images are the corrupted pixels divided
        by ``c + L - 1`` (:func:`~.model.corrupt`), so the top pixel value is
        :math:`(L - 1) / (c + L - 1)`, not 1."""
        from numpyro.handlers import seed, substitute

        config = dataclasses.replace(self.config.model, dropout=0.0)
        return substitute(seed(glow_from_config, 0), params)(
            config, self.event_shape, self.num_classes, y, temperature
        )

    def _sample_fn(self, params: dict, key: Array, temperature: Array, y: Array | None, n: int):
        d = self.density(params, temperature, y)
        x = d.sample(key, () if d.batch_shape else (n,))
        if self._pixel_scale != 1.0:
            x = x * self._pixel_scale
        return jnp.clip(x, 0.0, 1.0)

    def sample(
        self, params: dict, key: Array, n: int, temperature: float, label: int | None = None
    ) -> np.ndarray:
        """``n`` images in [0, 1] from the model at ``temperature`` (of class ``label``;
        class 0 if a conditional model gets none)."""
        y = None
        if self.num_classes is not None:
            y = jnp.full((n,), 0 if label is None else label, jnp.int32)
        return np.asarray(self._draw(params, key, jnp.float32(temperature), y, n))


@functools.lru_cache(maxsize=8)
def _cached_density(config: TrainConfig, info: DataInfo) -> Density:
    return Density(config, info)


def _partial(fn: Callable, **kwargs) -> Callable:
    def wrapped(*args, **more):
        return fn(*args, **{**kwargs, **more})

    wrapped.__name__ = getattr(fn, "__name__", "model")
    return wrapped


def _optax(config: TrainConfig):
    import optax

    schedule = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )
