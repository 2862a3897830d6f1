"""Training a Glow density on images by SVI: dequantization as inference,
validation-based early stopping, parameter averaging, atomic checkpoints.

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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.svi import SVIState

from . import nets, parallel
from .data import ImageData, Splits, train_validation_split
from .data import load as load_data
from .glow import glow, num_parameters
from .transforms import AffineCoupling, Chain, Inv1x1Conv, Squeeze, random_rotation

Array = jax.Array

__all__ = [
    "GlowConfig",
    "TrainConfig",
    "Trainer",
    "density_model",
    "dequantization_guide",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]


@dataclass(frozen=True)
class GlowConfig:
    """Architecture of the density (the arguments of :func:`~numpyro_glow.glow`)."""

    levels: int = 2
    depth: int = 8
    hidden_channels: int = 64
    coupling: str = "affine"
    lu: bool = True
    learn_top: bool = True
    conditional: bool = False
    alpha: float | None = 0.05
    dropout: float = 0.1
    seed: int = 0
    reversible: bool = False  # recompute activations in the backward pass (memory flat in depth)
    precision: str = "float32"  # or "bfloat16": mixed-precision coupling convolutions


@dataclass(frozen=True)
class TrainConfig:
    """What :func:`train` does; the command line sets these fields."""

    data: str = "digits"
    out_dir: str = "runs/digits"
    model: GlowConfig = field(default_factory=GlowConfig)
    steps: int = 10000
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.5
    grad_clip: float = 50.0
    ema_decay: float = 0.995
    dequantization: str = "variational"  # or "uniform"
    validation_size: float = 0.1
    eval_every: int = 250
    checkpoint_every: int = 500
    patience: int = 8  # evaluations without a better validation score before stopping
    temperatures: tuple[float, ...] = (0.5, 0.7, 0.85, 1.0)
    seed: int = 0
    progress: bool = True
    # data parallel: None or 1 = one device; N = each batch split over the first N of
    # jax.devices(); "all" = all of them (see numpyro_glow.parallel)
    devices: int | str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["model"] = GlowConfig(**d["model"])
        d["temperatures"] = tuple(d["temperatures"])
        return cls(**d)


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


# --- checkpoints -------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (a picklable dict of NumPy arrays and plain values) atomically:
    to a temporary file in the same folder, then ``os.replace``, so a crash never
    leaves a half-written file where the last good checkpoint was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(jax.device_get(state), f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


CHECKPOINT_KEYS = (
    "format",
    "config",
    "step",
    "svi_state",
    "ema",
    "best",
    "history",
    "bad_evals",
    "data",
)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; ``FileNotFoundError`` if
    missing, ``ValueError`` naming the file if it is not a numpyro-glow checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except Exception as e:  # truncated, garbage, wrong format
        raise ValueError(
            f"{path}: expected a numpyro-glow checkpoint (a pickled dict), could not read it: {e}"
        ) from e
    if not isinstance(state, dict) or state.get("format") != "numpyro-glow/1":
        raise ValueError(
            f"{path}: expected a numpyro-glow checkpoint with format 'numpyro-glow/1', "
            f"got {type(state).__name__}"
        )
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint is missing {missing}")
    return state


# --- the trainer --------------------------------------------------------------------
class Trainer:
    """Everything a run needs, built from a :class:`TrainConfig` and the data."""

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
        self.levels = train.levels
        self.event_shape = tuple(train.x.shape[1:])
        self.num_dims = math.prod(self.event_shape)
        if config.model.conditional and train.y is None:
            raise ValueError(f"{train.name}: a conditional model needs labels, the data has none")
        if config.model.conditional:
            self.num_classes = num_classes or train.num_classes
        else:
            self.num_classes = None
        if config.dequantization not in ("uniform", "variational"):
            raise ValueError(
                f"expected dequantization 'uniform' or 'variational', got {config.dequantization!r}"
            )
        kwargs = dict(levels=self.levels, config=config.model, num_classes=self.num_classes)
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
            parallel.check_batch_size(config.batch_size, self.mesh)
            replicated = parallel.replicated_sharding(self.mesh)
            jit = functools.partial(jax.jit, out_shardings=replicated)
        self._update = jit(self.svi.update)
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

    # devices -----------------------------------------------------------------
    def replicate(self, tree):
        """``tree`` copied to every device of the mesh (unchanged on one device)."""
        return tree if self.mesh is None else parallel.replicate(tree, self.mesh)

    def place(self, k: np.ndarray | Array, y: np.ndarray | Array | None = None):
        """A batch as device arrays: split along axis 0 over the mesh when its
        length divides evenly over the devices, else replicated."""
        if self.mesh is None:
            return jnp.asarray(k), None if y is None else jnp.asarray(y)
        if len(k) % self.mesh.devices.size:
            return parallel.replicate((k, y), self.mesh)
        return parallel.shard_batch((k, y), self.mesh)

    # batches ------------------------------------------------------------------
    def batch(self, step: int) -> tuple[Array, Array | None]:
        """The training batch of ``step``: a function of (seed, step) only, so a
        resumed run sees the same batches as an uninterrupted one. With several
        devices it is split over them along axis 0."""
        n, b = len(self.train_data.x), self.config.batch_size
        per_epoch = max(n // b, 1)
        epoch, i = divmod(step, per_epoch)
        perm = np.random.default_rng((self.config.seed, epoch)).permutation(n)
        idx = perm[i * b : (i + 1) * b]
        y = None if self.num_classes is None else self.train_data.y[idx]
        return self.place(self.train_data.x[idx], y)

    def init(self) -> SVIState:
        """The SVI state, replicated over the devices. The data-dependent ActNorm
        initialisation runs on one device, so it is the same for every device count."""
        # a larger first batch than a training step's, for the ActNorm statistics
        n_init = min(len(self.train_data.x), 512)
        k = jnp.asarray(self.train_data.x[:n_init])
        y = None if self.num_classes is None else jnp.asarray(self.train_data.y[:n_init])
        return self.replicate(self.svi.init(jax.random.PRNGKey(self.config.seed), k, y))

    def step_key(self, step: int) -> Array:
        return self.replicate(jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 1), step))

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

    def sample(
        self, params: dict, key: Array, n: int, temperature: float, label=None
    ) -> np.ndarray:
        """``n`` images in [0, 1] from the model at ``temperature`` (of class ``label``)."""
        y = None
        if self.num_classes is not None:
            y = jnp.full((n,), 0 if label is None else label, jnp.int32)
        config = dataclasses.replace(self.config.model, dropout=0.0)
        density = numpyro.handlers.substitute(numpyro.handlers.seed(glow_from_config, key), params)(
            config, self.event_shape, self.num_classes, y, temperature
        )
        shape = () if density.batch_shape else (n,)
        return np.clip(np.asarray(density.sample(key, shape)), 0.0, 1.0)


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


def _ema(ema: dict, params: dict, decay: float) -> dict:
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


# --- the run -------------------------------------------------------------------------
def train(config: TrainConfig, *, resume: bool = False, data: Splits | None = None) -> dict:
    """Train, evaluate, checkpoint and sample; returns the final metrics.

    Writes into ``config.out_dir``: ``checkpoint.pkl`` (atomically, every
    ``checkpoint_every`` steps and at the end), ``metrics.jsonl`` (one JSON object
    per evaluation), ``samples.png`` (a grid, one row per temperature) and
    ``summary.json``. The validation set is carved from the training split;
    the best parameters on it (averaged, EMA) are kept and evaluated on the test
    split at the end. ``resume=True`` continues from ``checkpoint.pkl``, with the
    same batches and noise as an uninterrupted run.
    """
    out = Path(config.out_dir)
    ckpt_path = out / "checkpoint.pkl"
    splits = data if data is not None else load_data(config.data, seed=config.seed)
    parts = train_validation_split(splits.train, config.validation_size, config.seed)
    trainer = Trainer(config, parts.train, parts.test, _num_classes(splits))
    metrics_path = out / "metrics.jsonl"
    primary = jax.process_index() == 0  # with several processes, the first one writes
    out.mkdir(parents=True, exist_ok=True)

    svi_state = trainer.init()  # also sets up SVI's parameter transforms
    if resume:
        state = load_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(state["config"])
        same = dict(steps=config.steps, progress=config.progress, devices=config.devices)
        if dataclasses.replace(saved, **same) != config:
            raise ValueError(
                f"{ckpt_path}: the checkpoint was written with another configuration; "
                "resume with the same options (only --steps and --devices may change)"
            )
        svi_state = jax.tree.map(jnp.asarray, state["svi_state"])
        svi_state = trainer.replicate(SVIState(*svi_state))
        step0, ema, best, history = state["step"], state["ema"], state["best"], state["history"]
        bad_evals = state["bad_evals"]
        # the evaluations after the checkpoint will run again: keep the file in step
        if primary:
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    else:
        step0, history = 0, []
        ema = trainer.svi.get_params(svi_state)
        best = {"params": ema, "validation_bpd": math.inf, "step": 0}
        bad_evals = 0
        if primary:
            metrics_path.write_text("")

    def checkpoint(step):
        if not primary:
            return
        save_checkpoint(
            ckpt_path,
            {
                "format": "numpyro-glow/1",
                "config": config.to_dict(),
                "step": step,
                "svi_state": tuple(svi_state),
                "ema": ema,
                "best": best,
                "history": history,
                "bad_evals": bad_evals,
                "data": {
                    "levels": trainer.levels,
                    "event_shape": trainer.event_shape,
                    "num_classes": trainer.num_classes,
                },
            },
        )

    bar = _progress(config, step0)
    t_start, seen, t_window = time.perf_counter(), 0, time.perf_counter()
    stopped_early = False
    step = step0
    for step in range(step0, config.steps):
        k, y = trainer.batch(step)
        svi_state = svi_state._replace(rng_key=trainer.step_key(step))
        new_state, loss = trainer._update(svi_state, k, y)
        loss = float(loss)
        if not math.isfinite(loss):
            bar.close()
            raise FloatingPointError(
                f"training stopped at step {step}: the loss is {loss}. The last good "
                f"checkpoint is {ckpt_path} (step {_ckpt_step(ckpt_path)}); try a lower "
                "--learning-rate or --grad-clip"
            )
        svi_state = new_state
        ema = _ema(ema, trainer.svi.get_params(svi_state), config.ema_decay)
        seen += len(k)
        done = step + 1
        bpd = loss / (len(k) * trainer.num_dims * math.log(2.0))
        rate = seen / max(time.perf_counter() - t_window, 1e-9)
        bar.set_postfix(loss=f"{loss:.1f}", bpd=f"{bpd:.3f}", img_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
        if done % config.eval_every == 0 or done == config.steps:
            val = trainer.bits_per_dim(ema, trainer.validation, jax.random.PRNGKey(7))
            record = {
                "step": done,
                "train_bpd": bpd,
                "validation_bpd": val,
                "images_per_sec": seen / max(time.perf_counter() - t_window, 1e-9),
                "elapsed_s": time.perf_counter() - t_start,
            }
            if val < best["validation_bpd"]:
                best, bad_evals = {"params": ema, "validation_bpd": val, "step": done}, 0
            else:
                bad_evals += 1
            record["best_validation_bpd"] = best["validation_bpd"]
            history.append(record)
            if primary:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            seen, t_window = 0, time.perf_counter()
            if bad_evals >= config.patience:
                stopped_early = True
        if done % config.checkpoint_every == 0 or stopped_early:
            checkpoint(done)
        if stopped_early:
            break
    bar.close()
    final_step = step + 1 if config.steps > step0 else step0
    checkpoint(final_step)

    test_bpd = trainer.bits_per_dim(best["params"], splits.test, jax.random.PRNGKey(11))
    test_uniform = trainer.bits_per_dim(
        best["params"], splits.test, jax.random.PRNGKey(11), uniform=True
    )
    grid = _sample_grid(trainer, best["params"], config.temperatures)
    samples_path = out / "samples.png"
    if primary:
        _save_png(grid, samples_path)
    summary = {
        "data": config.data,
        "test_bpd": test_bpd,
        "test_bpd_uniform_dequantization": test_uniform,
        "dequantization": config.dequantization,
        "best_validation_bpd": best["validation_bpd"],
        "best_step": best["step"],
        "steps_run": final_step,
        "stopped_early": stopped_early,
        "wall_time_s": time.perf_counter() - t_start,
        "num_parameters": num_parameters(best["params"]),
        "num_parameters_glow": num_parameters(best["params"], "glow"),
        "train_images": len(parts.train.x),
        "validation_images": len(parts.test.x),
        "test_images": len(splits.test.x),
        "checkpoint": str(ckpt_path),
        "metrics": str(metrics_path),
        "samples": str(samples_path),
    }
    if primary:
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"final": True, **summary}) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _num_classes(splits: Splits) -> int | None:
    labels = [d.y for d in (splits.train, splits.test) if d.y is not None]
    return max(int(y.max()) + 1 for y in labels) if labels else None


def _ckpt_step(path: Path) -> str:
    try:
        return str(load_checkpoint(path)["step"])
    except (FileNotFoundError, ValueError):
        return "none written yet"


def _progress(config: TrainConfig, step0: int):
    from tqdm.auto import tqdm  # a dependency of numpyro

    return tqdm(
        total=config.steps,
        initial=step0,
        desc="train",
        dynamic_ncols=True,
        disable=not config.progress,
        mininterval=0.5,
    )


def _sample_grid(trainer: Trainer, params: dict, temperatures, n: int = 10) -> np.ndarray:
    """One row per temperature; with classes, column j is class j mod num_classes."""
    rows = []
    for i, t in enumerate(temperatures):
        key = jax.random.PRNGKey(100 + i)
        if trainer.num_classes is None:
            rows.append(trainer.sample(params, key, n, t))
        else:
            rows.append(
                np.concatenate(
                    [
                        trainer.sample(
                            params, jax.random.fold_in(key, j), 1, t, label=j % trainer.num_classes
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
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)
