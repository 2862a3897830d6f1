"""Training a Glow density on images by SVI: dequantization as inference,
validation-based early stopping, parameter averaging, open checkpoints.

The model observes integer pixels ``k`` through a latent dequantization noise
``u`` in :math:`[0, 1)^D`, with :math:`x = (k + u) / L` for ``L`` pixel levels::

    u ~ Uniform(0, 1)^D                    (site "dequant")
    x = (k + u) / L ~ glow(...)            (site "x", observed)
    factor -D log L                        (site "discretization": p(k + u) = p(x) / L^D)

With the guide ``q(u | k)`` the ELBO is the dequantization bound
:math:`\\log P(k) \\ge E_q[\\log p(k + u) - \\log q(u|k)]`: uniform dequantization
(``q`` uniform, the bound of RealNVP and Glow) or variational dequantization
(``q`` a small flow conditioned on ``k``, as in Flow++). The SVI loss per image
divided by :math:`D \\log 2` is then bits per dimension.

The pieces: :class:`GlowConfig` and :class:`TrainConfig` hold every option (the
command line is generated from their fields); :class:`Density` is the model of
a configuration on images of a :class:`DataInfo` shape, as compiled functions;
:class:`TrainState` is the one state a run carries; :class:`Trainer` adds the
data and moves the state through init, resume, step, evaluation and
checkpointing; :func:`train` composes them; :func:`load_model` turns a
checkpoint back into a density and its parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.svi import SVIState

from . import checkpoint, nets, parallel
from .data import ImageData, Splits, train_validation_split
from .data import load as load_data
from .distribution import FlowDistribution
from .glow import COUPLINGS, glow, num_parameters
from .options import POSITIVE, Check, Validated, at_least, between, option
from .transforms import AffineCoupling, Chain, Inv1x1Conv, Squeeze, random_rotation

Array = jax.Array

__all__ = [
    "CHECKPOINT",
    "BEST",
    "DataInfo",
    "Density",
    "GlowConfig",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "convert_checkpoint",
    "default_out_dir",
    "density_model",
    "dequantization_guide",
    "load_model",
    "train",
]

CHECKPOINT = "checkpoint.npz"  # the last good training state (to resume)
BEST = "best.npz"  # the parameters of the best validation score (to use)
RUN_FILES = (CHECKPOINT, BEST, "metrics.jsonl", "samples.png", "summary.json")

DATA_HELP = (
    "digits (scikit-learn's 8x8 digits, embedded), mnist:DIR, cifar10:DIR, npz:PATH or folder:DIR"
)


def _alpha(text: str) -> float | None:
    """``--alpha``: a number, or ``none`` for no Logitify."""
    return None if text.strip().lower() == "none" else float(text)


def _devices(text: str) -> int | str:
    """``--devices``: a positive integer or ``all``."""
    import argparse

    if text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return int(text)


NON_NEGATIVE = at_least(0)
DEVICES = Check(
    lambda v: v == "all" or (isinstance(v, int) and v >= 1), "a positive integer or 'all'"
)


@dataclass(frozen=True)
class GlowConfig(Validated):
    """Architecture of the density (the arguments of :func:`~numpyro_glow.glow`)."""

    levels: int = option(
        2, "Glow's number of scales L (not the number of pixel values)", check=at_least(1)
    )
    depth: int = option(8, "flow steps K per level", check=at_least(1))
    hidden_channels: int = option(
        64, "hidden channels of each coupling's convolutional net", check=at_least(1)
    )
    coupling: str = option("affine", "coupling layer", choices=tuple(COUPLINGS))
    lu: bool = option(
        True, "a dense 1x1 convolution weight instead of the LU-factored one", flag="--dense"
    )
    learn_top: bool = option(True, "a fixed standard normal top prior instead of a learned one")
    conditional: bool = option(
        False, "class-conditional top prior (the data must have labels; sample with --label)"
    )
    alpha: float | None = option(
        0.05,
        "Logitify's alpha: pixels squeezed into [alpha/2, 1 - alpha/2] before the logit "
        "('none': no Logitify)",
        check=between(0, 1),
        parse=_alpha,
    )
    dropout: float = option(
        0.1, "dropout rate on the coupling nets' hidden units, in training", check=between(0, 1)
    )
    seed: int = option(0, "seed of the 1x1 convolutions' random rotations", check=NON_NEGATIVE)
    reversible: bool = option(
        False, "recompute activations through the inverse in the backward pass (less memory)"
    )
    precision: str = option(
        "float32",
        "bfloat16: mixed-precision coupling convolutions, float32 log-determinants",
        choices=("float32", "bfloat16"),
    )


@dataclass(frozen=True)
class TrainConfig(Validated):
    """What :func:`train` does; ``numpyro-glow train``'s options are these fields.

    Every field is checked on construction (``ValueError`` naming the field,
    its flag, what was expected and what came).
    """

    data: str = option("digits", DATA_HELP, metavar="SPEC")
    out_dir: str | None = option(
        None,
        "output folder (default: runs/digits for the digits, runs/<kind>-<name>-<hash of the "
        "path> for a data set read from a path, so two data sets never share one)",
        flag="--out",
        resume=True,
    )
    model: GlowConfig = option(GlowConfig(), "the architecture")
    steps: int = option(
        10000,
        "training steps (raise it with --resume to train longer)",
        check=at_least(1),
        resume=True,
    )
    batch_size: int = option(64, "images per training step", check=at_least(1))
    learning_rate: float = option(
        2e-3, "AdamW learning rate, after a linear warm-up", check=POSITIVE
    )
    warmup_steps: int = option(200, "steps of the learning-rate warm-up", check=NON_NEGATIVE)
    weight_decay: float = option(
        0.5, "AdamW's decoupled weight decay", check=at_least(0, "a number")
    )
    grad_clip: float = option(50.0, "clip gradients to this global norm", check=POSITIVE)
    ema_decay: float = option(
        0.995, "decay of the parameter average that is evaluated", check=between(0, 1)
    )
    dequantization: str = option(
        "variational",
        "q(u | k): a learned conditional flow, or uniform noise",
        choices=("uniform", "variational"),
    )
    validation_size: float = option(
        0.1,
        "fraction of the training split held out for validation",
        check=between(0, 1, low_open=True),
    )
    eval_every: int = option(250, "steps between validation evaluations", check=at_least(1))
    checkpoint_every: int = option(500, "steps between checkpoints", check=at_least(1), resume=True)
    patience: int = option(
        8,
        "evaluations without a better validation score before stopping early",
        check=at_least(1),
        resume=True,
    )
    temperatures: tuple[float, ...] = option(
        (0.5, 0.7, 0.85, 1.0),
        "sampling temperatures of samples.png, one row each",
        check=POSITIVE,
        resume=True,
    )
    seed: int = option(
        0,
        "seed of the splits, batches, noise, initialisation and 1x1 rotations",
        check=NON_NEGATIVE,
    )
    progress: bool = option(True, "no progress bar", resume=True)
    devices: int | str | None = option(
        None,
        "split each batch over the first N of jax.devices(), or 'all' (default: one; with "
        "--distributed: all); the batch size must be a multiple of the device count",
        check=DEVICES,
        parse=_devices,
        metavar="N|all",
        resume=True,
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The configuration of ``d`` (as :meth:`to_dict` writes it); fields that
        ``d`` lacks keep their defaults, unknown fields are a ``ValueError``."""
        d = dict(d)
        model = dict(d.pop("model", {}))
        for c, values in ((GlowConfig, model), (cls, d)):
            unknown = set(values) - {f.name for f in dataclasses.fields(c)}
            if unknown:
                raise ValueError(f"unknown {c.__name__} option(s): {sorted(unknown)}")
        if "temperatures" in d and isinstance(d["temperatures"], list):
            d["temperatures"] = tuple(d["temperatures"])
        return cls(model=GlowConfig(**model), **d)


def canonical_data(spec: str) -> str:
    """``spec`` with its path made absolute (``~`` expanded, links resolved), so
    two spellings of one data set compare equal."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        return spec.strip()
    return f"{kind.strip().lower()}:{Path(rest).expanduser().resolve()}"


def default_out_dir(spec: str) -> str:
    """``runs/digits`` for the digits; ``runs/<kind>-<name>-<hash>`` for a data set
    read from a path (the hash of the absolute path, so two data sets never
    share a folder)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        return str(Path("runs") / (kind.strip().lower() or "run"))
    full = canonical_data(spec)
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(full.split(":", 1)[1]).stem)
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return str(Path("runs") / f"{kind.strip().lower()}-{name or 'data'}-{digest}")


def _resume_difference(saved: TrainConfig, config: TrainConfig) -> str | None:
    """The first option that matters for resuming and differs, in words; ``None``."""
    from .options import flag_of

    pairs = [(TrainConfig, saved, config), (GlowConfig, saved.model, config.model)]
    for cls, old, new in pairs:
        for f in dataclasses.fields(cls):
            if f.metadata.get("resume") or f.name == "model":  # the model: its own fields
                continue
            a, b = getattr(old, f.name), getattr(new, f.name)
            if f.name == "data":
                a, b = canonical_data(a), canonical_data(b)
            if a != b:
                return f"{flag_of(f)} is {b!r} here but {a!r} in the checkpoint"
    return None


def _may_change_on_resume() -> str:
    from .options import flag_of

    return ", ".join(
        flag_of(f) for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume")
    )


# --- the model and the guides ----------------------------------------------------
def glow_from_config(
    config: GlowConfig,
    event_shape: tuple[int, ...],
    num_classes: int | None = None,
    y: Array | None = None,
    temperature: float = 1.0,
    init_data: Array | None = None,
):
    """:func:`~numpyro_glow.glow` named ``"glow"`` with the architecture of ``config``."""
    return glow(
        "glow",
        event_shape,
        levels=config.levels,
        depth=config.depth,
        hidden_channels=config.hidden_channels,
        coupling=config.coupling,
        lu=config.lu,
        learn_top=config.learn_top,
        num_classes=num_classes if config.conditional else None,
        y=y if config.conditional else None,
        alpha=config.alpha,
        temperature=temperature,
        init_data=init_data,
        seed=config.seed,
        dropout=config.dropout,
        reversible=config.reversible,
        precision=config.precision,
    )


def density_model(
    k: Array,
    y: Array | None = None,
    *,
    levels: int,
    config: GlowConfig,
    num_classes: int | None = None,
    temperature: float = 1.0,
) -> None:
    """Integer pixels ``k`` (``(B, H, W, C)``) observed through dequantization."""
    batch, event_shape = k.shape[0], tuple(k.shape[1:])
    with numpyro.plate("batch", batch):
        u = numpyro.sample("dequant", dist.Uniform(0.0, 1.0).expand(event_shape).to_event(3))
    x = (k + u) / levels
    density = glow_from_config(config, event_shape, num_classes, y, temperature, init_data=x)
    with numpyro.plate("batch", batch):
        numpyro.sample("x", density, obs=x)
    numpyro.factor("discretization", -batch * math.prod(event_shape) * math.log(levels))


def _dequant_flow(name: str, k: Array, levels: int, hidden: int = 32, steps: int = 2) -> Chain:
    """A small flow from white noise to logit(u), conditioned on the pixels:
    squeeze, then ``steps`` x (1x1 convolution, affine coupling whose net also
    sees the squeezed image), unsqueeze."""
    context = Squeeze()(k / (levels - 1) - 0.5)
    c = context.shape[-1]
    parts: list = [Squeeze()]
    for i in range(steps):
        w = numpyro.param(f"{name}.conv{i}", lambda key: random_rotation(key, c))
        net = numpyro.param(
            f"{name}.net{i}",
            lambda key, i=i: nets.conv_net_init(key, c // 2 + c, 2 * (c - c // 2), hidden),
        )
        parts += [
            Inv1x1Conv(w),
            AffineCoupling(_context_net, {"net": net, "context": context}, scale="exp"),
        ]
    parts.append(Squeeze().inv)
    return Chain(parts)


def _context_net(params: dict, x_a: Array) -> Array:
    """Glow's conv net on the coupling's half and the conditioning image."""
    return nets.conv_net(params["net"], jnp.concatenate([x_a, params["context"]], axis=-1))


def dequantization_guide(
    k: Array,
    y: Array | None = None,
    *,
    levels: int,
    config: GlowConfig,
    num_classes: int | None = None,
    temperature: float = 1.0,
    variational: bool = False,
) -> None:
    """``q(u | k)``: uniform, or (``variational``) a conditional flow then a sigmoid."""
    batch, event_shape = k.shape[0], tuple(k.shape[1:])
    if not variational:
        q = dist.Uniform(0.0, 1.0).expand(event_shape).to_event(3)
    else:
        flow = _dequant_flow("dequant", k, levels)
        base = dist.Normal(0.0, 1.0).expand((batch, *event_shape)).to_event(3)
        q = dist.TransformedDistribution(base, [flow, dist.transforms.SigmoidTransform()])
    with numpyro.plate("batch", batch):
        numpyro.sample("dequant", q)


# --- the data a model is built for -------------------------------------------------
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


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    found = {"numpyro_glow": __version__, "python": platform.python_version()}
    for name in ("jax", "jaxlib", "numpyro", "numpy", "optax"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


# --- the model of a configuration, compiled ------------------------------------------
# fields of TrainConfig that change nothing a Density compiles
_RUN_ONLY = (
    "data",
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
        if config.dequantization == "variational":
            uniform_guide = _partial(dequantization_guide, variational=False, **kwargs)
            self._loss_uniform = jit(
                lambda key, params, k, y: elbo.loss(key, params, eval_model, uniform_guide, k, y)
            )
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
        images in [0, 1] at ``temperature`` (of classes ``y``, conditional models)."""
        from numpyro.handlers import seed, substitute

        config = dataclasses.replace(self.config.model, dropout=0.0)
        return substitute(seed(glow_from_config, 0), params)(
            config, self.event_shape, self.num_classes, y, temperature
        )

    def _sample_fn(self, params: dict, key: Array, temperature: Array, y: Array | None, n: int):
        d = self.density(params, temperature, y)
        return jnp.clip(d.sample(key, () if d.batch_shape else (n,)), 0.0, 1.0)

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


# --- checkpoints ----------------------------------------------------------------------
def _metadata(density: Density, config: TrainConfig, kind: str, **more: Any) -> dict:
    return {
        "kind": kind,
        "config": config.to_dict(),
        "data": {"spec": config.data, **density.info.to_dict()},
        "versions": _library_versions(),
        **more,
    }


def _write_state(folder: Path, state: TrainState, density: Density, config: TrainConfig) -> None:
    arrays = jax.device_get(_arrays_only(state))
    checkpoint.write(
        folder / BEST,
        checkpoint.flatten(arrays.best, "params"),
        _metadata(density, config, "model", step=state.best_step, validation_bpd=state.best_score),
    )
    host = {**_host_fields(state), "history": list(state.history)}
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


# --- the trainer -----------------------------------------------------------------------
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

    # batches ------------------------------------------------------------------
    def batch(self, step: int) -> tuple[Array, Array | None]:
        """The training batch of ``step``: a function of (seed, step) only, so a
        resumed run sees the same batches as an uninterrupted one. With several
        devices it is split over them along axis 0."""
        n, b = len(self.train_data.x), self.config.batch_size
        epoch, i = divmod(step, n // b)
        if self._permutation is None or self._permutation[0] != epoch:
            perm = np.random.default_rng((self.config.seed, epoch)).permutation(n)
            self._permutation = (epoch, perm)
        idx = self._permutation[1][i * b : (i + 1) * b]
        y = None if self.num_classes is None else self.train_data.y[idx]
        return self.density.place(self.train_data.x[idx], y)

    def batches(self, start: int) -> Iterator[tuple[Array, Array | None]]:
        """The batches of steps ``start``, ``start + 1``, ..."""
        return (self.batch(step) for step in itertools.count(start))

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
        _write_state(folder, state, self.density, self.config)


# --- the run folder ----------------------------------------------------------------------
class RunFolder:
    """The output folder of a run, which never loses work: it refuses to start a
    run where one exists unless told to ``resume`` it or ``overwrite`` it; a
    new run that fails before it wrote a checkpoint or an evaluation leaves
    no file and no folder behind."""

    def __init__(self, path: Path, *, resume: bool, overwrite: bool, primary: bool = True):
        if resume and overwrite:
            raise ValueError("--resume continues a run and --overwrite replaces it: pass one")
        self.path, self.resume, self.overwrite, self.primary = path, resume, overwrite, primary
        self.checkpoint, self.best = path / CHECKPOINT, path / BEST
        self.metrics = path / "metrics.jsonl"
        old = [name for name in (*RUN_FILES, "checkpoint.pkl") if (path / name).exists()]
        if resume and not self.checkpoint.is_file():
            hint = (
                " (an old pickle checkpoint: convert it first)" if "checkpoint.pkl" in old else ""
            )
            raise FileNotFoundError(f"nothing to resume: {self.checkpoint} not found{hint}")
        if old and not (resume or overwrite):
            raise ValueError(
                f"{path} already holds a run ({', '.join(old)}); pass --resume to continue it, "
                "--overwrite to replace it, or --out to write elsewhere"
            )
        self._created = [p for p in (path, *path.parents) if not p.exists()]
        self.saved_step: int | None = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            return
        fresh = self.primary and not self.resume and self.saved_step is None
        if fresh and self.metrics.is_file() and not self.metrics.stat().st_size:
            self.metrics.unlink()  # a new run that recorded nothing leaves nothing
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break

    def last_checkpoint(self) -> str:
        """The last checkpoint this run wrote, in words."""
        if self.saved_step is None:
            return "none yet (nothing was written)"
        return f"{self.checkpoint} (step {self.saved_step})"

    def start(self, state: TrainState) -> None:
        """Create the folder; on ``overwrite`` remove the old run's files; write
        ``metrics.jsonl`` anew (with the history of a resumed run)."""
        history = state.history
        if self.resume:
            self.saved_step = int(state.step)
        if not self.primary:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
        _write_text(self.metrics, "".join(checkpoint.dumps(r) + "\n" for r in history))

    def log(self, record: dict) -> None:
        if self.primary:
            with open(self.metrics, "a") as f:
                f.write(checkpoint.dumps(record) + "\n")

    def save(self, trainer: Trainer, state: TrainState) -> None:
        """Checkpoint ``state`` unless this step is already saved; the best
        parameters too when they changed."""
        step = int(state.step)
        if step == self.saved_step:
            return
        trainer.check_finite(state, self.last_checkpoint())
        if self.primary:
            trainer.save(state, self.path)
        self.saved_step = step


def _replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary path)``, then rename it over ``path``; on failure remove it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _replace_atomically(path, lambda tmp: tmp.write_text(text))


# --- the run -------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: Splits | None = None,
) -> dict:
    """Train, evaluate, checkpoint and sample; returns the summary.

    Writes into ``config.out_dir`` (default :func:`default_out_dir` of the
    data): ``checkpoint.npz`` (the training state, every ``checkpoint_every``
    steps, on an early stop and at the end), ``best.npz`` (the parameters of
    the best validation score, with it), ``metrics.jsonl`` (one JSON object per
    evaluation), ``samples.png`` (a grid, one row per temperature) and
    ``summary.json``. The validation set is carved from the training split;
    the best parameters on it (averaged, EMA) are evaluated on the test split
    at the end.

    A folder that holds a run is refused unless ``resume`` (continue from its
    checkpoint, with the same batches and noise as an uninterrupted run; the
    options that matter must be the checkpoint's, and are compared before any
    data are read) or ``overwrite``. A non-finite loss raises
    ``FloatingPointError`` at the next check (evaluation, checkpoint or
    progress update), keeping the last good checkpoint.
    """
    out = Path(config.out_dir or default_out_dir(config.data))
    primary = jax.process_index() == 0  # with several processes, the first one writes
    with RunFolder(out, resume=resume, overwrite=overwrite, primary=primary) as run:
        if resume:
            _check_resumable(run.checkpoint, config)
        splits = data if data is not None else load_data(config.data, seed=config.seed)
        parts = train_validation_split(splits.train, config.validation_size, config.seed)
        trainer = Trainer(config, parts.train, parts.test, _num_classes(splits))
        t_start = time.perf_counter()
        state = trainer.resume(run.checkpoint) if resume else trainer.init_state()
        run.start(state)
        state, stopped_early = _fit(trainer, state, run, t_start)
        run.save(trainer, state)
        return _finish(trainer, state, splits, run, stopped_early, t_start)


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


class _Clock:
    """Training throughput: the first step (which compiles) and the evaluations
    left out."""

    def __init__(self) -> None:
        self.images, self.t0, self.started = 0, time.perf_counter(), False

    def count(self, state: TrainState, images: int) -> None:
        if not self.started:  # wait for the first step, then start counting
            jax.block_until_ready(state.loss)
            self.started = True
            self.restart()
        else:
            self.images += images

    def pause(self) -> float | None:
        """Images per second since the last restart (call once the device is done);
        ``None`` if no step was counted."""
        rate = self.images / max(time.perf_counter() - self.t0, 1e-9) if self.images else None
        self.images = 0
        return rate

    def restart(self) -> None:
        self.t0 = time.perf_counter()


def _advance(
    trainer: Trainer,
    state: TrainState,
    batches: Iterator[tuple[Array, Array | None]],
    clock: _Clock,
    bar: _Progress,
    last_checkpoint: Callable[[], str],
) -> TrainState:
    """What the loop does at every step: take the next batch, dispatch the
    compiled step (without waiting for it), count, tick the bar."""
    k, y = next(batches)
    state = trainer.step(state, k, y)
    clock.count(state, trainer.config.batch_size)
    bar.update(state, trainer, last_checkpoint)
    return state


def _fit(
    trainer: Trainer, state: TrainState, run: RunFolder, t_start: float
) -> tuple[TrainState, bool]:
    """The training loop: steps, evaluations, checkpoints, early stopping. Nothing
    waits for the device except evaluations, checkpoints and progress updates."""
    config = trainer.config
    start = int(state.step)
    bar, clock, stopped = _Progress(config, start), _Clock(), False
    try:
        batches = trainer.batches(start)
        for done in range(start + 1, config.steps + 1):
            state = _advance(trainer, state, batches, clock, bar, run.last_checkpoint)
            if done % config.eval_every == 0 or done == config.steps:
                trainer.check_finite(state, run.last_checkpoint())  # waits for the device
                rate = clock.pause()
                elapsed = time.perf_counter() - t_start
                state = trainer.evaluate(state, images_per_sec=rate, elapsed_s=elapsed)
                run.log(state.history[-1])
                stopped = state.bad_evals >= config.patience
                clock.restart()
            if done % config.checkpoint_every == 0 or stopped:
                run.save(trainer, state)
            if stopped:
                break
    finally:
        bar.close()
    return state, stopped


def _finish(
    trainer: Trainer,
    state: TrainState,
    splits: Splits,
    run: RunFolder,
    stopped_early: bool,
    t_start: float,
) -> dict:
    """Test-set scores of the best parameters, the sample grid and the summary."""
    density, best = trainer.density, state.best
    test_bpd = density.bits_per_dim(best, splits.test, jax.random.PRNGKey(11))
    test_uniform = density.bits_per_dim(best, splits.test, jax.random.PRNGKey(11), uniform=True)
    grid = _sample_grid(density, best, trainer.config.temperatures)
    samples_path = run.path / "samples.png"
    if run.primary:
        _save_png(grid, samples_path)
    summary = {
        "data": trainer.config.data,
        "test_bpd": test_bpd,
        "test_bpd_uniform_dequantization": test_uniform,
        "dequantization": trainer.config.dequantization,
        "best_validation_bpd": state.best_score,
        "best_step": state.best_step,
        "steps_run": int(state.step),
        "stopped_early": stopped_early,
        "wall_time_s": time.perf_counter() - t_start,
        "num_parameters": num_parameters(best),
        "num_parameters_glow": num_parameters(best, "glow"),
        "train_images": len(trainer.train_data.x),
        "validation_images": len(trainer.validation.x),
        "test_images": len(splits.test.x),
        "checkpoint": str(run.checkpoint),
        "best": str(run.best),
        "metrics": str(run.metrics),
        "samples": str(samples_path),
    }
    if run.primary:
        run.log({"final": True, **summary})
        _write_text(run.path / "summary.json", checkpoint.dumps(summary, indent=2) + "\n")
    return json.loads(checkpoint.dumps(summary))


def _num_classes(splits: Splits) -> int | None:
    labels = [d.y for d in (splits.train, splits.test) if d.y is not None]
    return max(int(y.max()) + 1 for y in labels) if labels else None


class _Progress:
    """tqdm's bar; the loss shown (and checked for NaN) at most every half second,
    the only times the loop waits for the device besides evaluations."""

    def __init__(self, config: TrainConfig, start: int, file: Any = None):
        from tqdm.auto import tqdm  # a dependency of numpyro

        self.bar = tqdm(
            total=config.steps,
            initial=start,
            desc="train",
            dynamic_ncols=True,
            disable=not config.progress,
            mininterval=0.5,
            file=file,
        )
        self.enabled, self.shown = config.progress, time.perf_counter()
        self.images, self.batch = 0, config.batch_size

    def update(
        self, state: TrainState, trainer: Trainer, last_checkpoint: Callable[[], str]
    ) -> None:
        self.bar.update(1)
        if not self.enabled:
            return
        self.images += self.batch
        now = time.perf_counter()
        if now - self.shown < 0.5:
            return
        trainer.check_finite(state, last_checkpoint())
        loss = float(state.loss)
        bpd = loss / (self.batch * trainer.density.num_dims * math.log(2.0))
        rate = self.images / (now - self.shown)
        self.bar.set_postfix(loss=f"{loss:.1f}", bpd=f"{bpd:.3f}", img_s=f"{rate:.0f}")
        self.shown, self.images = time.perf_counter(), 0

    def close(self) -> None:
        self.bar.close()


def _sample_grid(density: Density, params: dict, temperatures, n: int = 10) -> np.ndarray:
    """One row per temperature; with classes, column j is class j mod num_classes."""
    rows = []
    for i, t in enumerate(temperatures):
        key = jax.random.PRNGKey(100 + i)
        if density.num_classes is None:
            rows.append(density.sample(params, key, n, t))
        else:
            rows.append(
                np.concatenate(
                    [
                        density.sample(
                            params, jax.random.fold_in(key, j), 1, t, label=j % density.num_classes
                        )
                        for j in range(n)
                    ]
                )
            )
    return np.stack(rows)  # (rows, n, H, W, C)


def _save_png(grid: np.ndarray, path: Path, scale: int | None = None, pad: int = 1) -> None:
    """Write a (rows, cols, H, W, C) grid of [0, 1] images as one PNG, atomically."""
    from PIL import Image

    rows, cols, h, w, c = grid.shape
    scale = scale or max(1, 64 // max(h, w))
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i in range(rows):
        for j in range(cols):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y0 : y0 + h, x0 : x0 + w] = grid[i, j]
    img = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
    img = np.repeat(np.repeat(img, scale, 0), scale, 1)
    image = Image.fromarray(img[..., 0] if c == 1 else img)
    _replace_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


# --- the old pickle checkpoints --------------------------------------------------------------
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
