"""The multi-scale Glow density, built inside a NumPyro model or guide."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import Array

from . import nets
from .distribution import FlowDistribution
from .transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Chain,
    GlowTransform,
    Inv1x1Conv,
    Inv1x1ConvLU,
    Logitify,
    Scan,
    Split,
    Squeeze,
    lu_factors,
    split_channels,
)

__all__ = ["glow", "glow_step", "default_unroll", "num_parameters"]


def default_unroll(depth: int) -> int | bool:
    """``lax.scan``'s ``unroll`` for the K steps of a level, per backend: rolled
    (``1``) on CPU, four steps per loop iteration (``4``) on accelerators. Both
    keep the compile time flat in depth (the loop body holds one or four steps).

    On CPU the conditioners' convolutions are :func:`~numpyro_glow.nets.conv2d_same`'s
    matrix products, which run as fast inside the rolled loop as outside it.
    The rolled loop then trains 1.00-1.52x as fast as the unrolled one at
    32x32x3 and 0.92-1.05x at 28x28x1 (128 channels; two ``benchmarks/peers.py``
    runs, so equal within noise or faster), and its first train step compiles in
    0.45-0.62x the time (7.6 s against 16.8 s at 32x32x3; ``benchmarks/README.md``).
    On an H100 at the paper's CIFAR-10 size (L=3, K=32, 512 channels),
    ``unroll=4`` trains 1.12x faster than ``1`` and compiles in 13 s against
    9 s, where fully unrolled levels train 1.20x faster but compile in 104 s.
    """
    return 1 if jax.default_backend() == "cpu" else 4


@functools.lru_cache(maxsize=64)
def _rotations(seed: int, level: int, depth: int, channels: int, lu: bool) -> dict[str, np.ndarray]:
    """Random rotations for the 1x1 convolutions of one level, and (for LU) their
    fixed permutations and signs: NumPy constants, built once, never traced."""
    rng = np.random.default_rng((seed, level))
    ws = []
    for _ in range(depth):
        q, r = np.linalg.qr(rng.standard_normal((channels, channels)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        ws.append(q.astype(np.float32))
    if not lu:
        return {"weight": np.stack(ws)}
    perm, lower, upper, log_s, sign_s = (
        np.stack(f) for f in zip(*map(lu_factors, ws), strict=True)
    )
    return {"perm": perm, "lower": lower, "upper": upper, "log_s": log_s, "sign_s": sign_s}


def glow_step(
    params: dict[str, Any],
    constants: dict[str, Array],
    coupling: str = "affine",
    event_dim: int = 3,
    net: Callable = nets.conv_net,
    scale: str = "sigmoid",
) -> Chain:
    """One flow step, ActNorm, 1x1 convolution, coupling, from its parameters.

    ``params`` holds ``actnorm`` (``loc``, ``log_scale``), ``conv`` (``weight``, or
    ``lower``, ``upper``, ``log_s`` for LU) and ``coupling`` (the net's params);
    ``constants`` the LU ``perm`` and ``sign_s``. With every array stacked on a
    leading axis this is the stacked step that :class:`Scan` runs.
    """
    conv = params["conv"]
    if "weight" in conv:
        mix = Inv1x1Conv(conv["weight"], event_dim)
    else:
        mix = Inv1x1ConvLU(
            constants["perm"],
            conv["lower"],
            conv["upper"],
            conv["log_s"],
            constants["sign_s"],
            event_dim,
        )
    if coupling == "affine":
        couple = AffineCoupling(net, params["coupling"], event_dim, scale=scale)
    else:
        couple = AdditiveCoupling(net, params["coupling"], event_dim)
    act = params["actnorm"]
    return Chain([ActNorm(act["loc"], act["log_scale"], event_dim), mix, couple])


def _lazy(fn: Callable[[], Array]) -> Callable[[], Array]:
    """Evaluate ``fn`` at most once, and only if asked (ActNorm's data init)."""
    return functools.cache(fn)


def glow(
    name: str,
    event_shape: tuple[int, int, int],
    *,
    levels: int = 3,
    depth: int = 32,
    hidden_channels: int = 512,
    coupling: str = "affine",
    lu: bool = True,
    learn_top: bool = True,
    num_classes: int | None = None,
    y: Array | None = None,
    alpha: float | None = 0.05,
    temperature: float = 1.0,
    init_data: Array | None = None,
    seed: int = 0,
    unroll: int | bool | None = None,
    dropout: float = 0.0,
    reversible: bool = False,
    precision: str = "float32",
) -> FlowDistribution:
    r"""A multi-scale Glow over images in :math:`[0, 1]`, event shape ``(H, W, C)``.

    Call it inside a NumPyro model or guide: it registers its parameters under
    ``name`` with :func:`numpyro.param` (one site per level, ``name + ".level0"``,
    ..., the split priors ``name + ".level0.prior"``, the top prior
    ``name + ".top"``, the class prior ``name + ".classes"``), so ``SVI``,
    ``Predictive``, ``substitute`` and ``seed`` work as usual, and returns a
    :class:`FlowDistribution` with a standard normal base of scale
    ``temperature`` and the flow below as its transform (data to latent; the
    distribution samples through its inverse)::

        Logitify(alpha)                         # [0, 1] -> reals (alpha=None: no Logitify)
        level_l = Chain([Squeeze(),             # (H, W, C) -> (H/2, W/2, 4C)
                         Scan(depth x [ActNorm, 1x1 conv (LU if lu), coupling]),
                         Split(prior, inner=level_{l+1})   # levels but the last
                         or ActNorm(top prior)             # the last level
                         Squeeze().inv])

    The latent has the data's shape; the learned top prior (``learn_top``) and the
    class-conditional prior (``num_classes``; ``y`` holds integer labels, one per
    image) are an :class:`ActNorm` with full-shape parameters at the bottom of the
    last level.

    **Data-dependent initialisation.** Pass the batch the model observes (in
    :math:`[0, 1]`, dequantized) as ``init_data``. The first time the parameters are
    created (``SVI.init(key, batch)``, where NumPyro calls each parameter's init
    function), each level's steps are built one after another on that batch, and
    every ActNorm is set to the per-channel mean and standard deviation of its
    input, so that its output on the batch has zero mean and unit variance per
    channel (Glow, section 3.1). Once the parameters exist (every later step),
    their init functions are never called and ``init_data`` costs nothing.

    **Dropout.** With ``dropout > 0`` and a random key available (inside
    ``numpyro.handlers.seed``, as under ``SVI``), the coupling networks drop hidden
    units with that probability, a fresh mask per call; build the model with
    ``dropout=0`` to evaluate. The masks do not depend on the data, so every
    draw is an exact bijection with its own exact log-determinant.

    ``seed`` fixes the random rotations (and so the LU permutations and signs,
    constants built with NumPy); ``unroll`` is ``lax.scan``'s (default:
    :func:`default_unroll`).

    **Mixed precision.** ``precision="bfloat16"`` runs the coupling networks'
    convolutions in ``bfloat16`` (:func:`~numpyro_glow.nets.conv_net_bfloat16`);
    their outputs are cast back to ``float32`` before the scale and shift, so
    every log-determinant, ActNorm, 1x1 convolution and prior stays ``float32``.
    It pays on accelerators with bfloat16 units; on a CPU without them it is
    slower (``benchmarks/README.md``).

    **Reversible gradients.** With ``reversible=True`` each level's
    :class:`Scan` computes its gradient without storing the K steps'
    activations: the backward pass recomputes each step's input from its output
    with the step's inverse, then takes that step's vector-Jacobian product (see
    :class:`Scan`). Training memory no longer grows with ``depth``, for roughly
    one extra inverse and forward pass per step; values are unchanged, gradients
    agree with plain autodiff up to the float32 drift of the recomputation.
    Forward-mode autodiff (``jax.jvp``) through the flow is then unavailable.
    The memory saving needs the rolled scan, ``unroll=1`` (see
    ``benchmarks/memory.py``).
    """
    event_shape = tuple(event_shape)
    if len(event_shape) != 3:
        raise ValueError(f"glow: expected event_shape (H, W, C), got {event_shape}")
    height, width, channels = event_shape
    if levels < 1 or depth < 1:
        raise ValueError(f"glow: expected levels >= 1 and depth >= 1, got {levels}, {depth}")
    if height % 2**levels or width % 2**levels:
        raise ValueError(
            f"glow: {levels} levels halve H and W {levels} times, so they must be divisible "
            f"by {2**levels}; got event_shape {event_shape}"
        )
    if coupling not in ("affine", "additive"):
        raise ValueError(f"glow: expected coupling 'affine' or 'additive', got {coupling!r}")
    batch_shape: tuple[int, ...] = ()
    if num_classes is not None:
        if y is None:
            raise ValueError("glow: num_classes is set, so y (integer labels) is required")
        y = jnp.asarray(y)
        batch_shape = y.shape
    elif y is not None:
        raise ValueError("glow: y was given but num_classes is None")
    if init_data is not None:
        init_data = jnp.asarray(init_data, jnp.float32)
        if init_data.shape[1:] != event_shape:
            raise ValueError(
                f"glow: expected init_data of shape (N, {height}, {width}, {channels}), "
                f"got {init_data.shape}"
            )
    if unroll is None:
        unroll = default_unroll(depth)
    # XLA:CPU's convolutions run at half its matrix-product rate (their weight
    # gradients 17x slower inside a rolled scan): conv2d_same on CPU, cuDNN on GPUs
    net = nets.conv_net_for(precision, matmul_convs=jax.default_backend() == "cpu")

    head: list[GlowTransform] = [Logitify(alpha)] if alpha is not None else []
    squeeze = Squeeze()
    h_in = _lazy(lambda: Chain([*head, squeeze])(init_data)) if init_data is not None else None

    step_stacks, priors, shape = [], [], (height, width, channels)
    for level in range(levels):
        h, w, c = shape[0] // 2, shape[1] // 2, shape[2] * 4
        c_a, c_b = c // 2, c - c // 2
        consts = _rotations(seed, level, depth, c, lu)
        constants = {k: consts[k] for k in ("perm", "sign_s") if k in consts}
        c_out = 2 * c_b if coupling == "affine" else c_b

        def init_level(
            key, consts=consts, constants=constants, c=c, c_a=c_a, c_out=c_out, h_in=h_in
        ):
            keys = jax.random.split(key, depth)
            net_params = jax.vmap(lambda k: nets.conv_net_init(k, c_a, c_out, hidden_channels))(
                keys
            )
            conv = {k: jnp.asarray(consts[k]) for k in consts if k not in ("perm", "sign_s")}
            loc, log_scale = jnp.zeros((depth, c)), jnp.zeros((depth, c))
            params = {
                "actnorm": {"loc": loc, "log_scale": log_scale},
                "conv": conv,
                "coupling": net_params,
            }
            if h_in is None:
                return params
            x = h_in()
            # one compiled step, reused for the K steps (eager op-by-op was slow)
            apply_step = jax.jit(lambda p, c, x: glow_step(p, c, coupling, net=net)(x))
            for k in range(depth):
                mean = jnp.mean(x, axis=(0, 1, 2))
                std = jnp.std(x, axis=(0, 1, 2))
                loc, log_scale = loc.at[k].set(mean), log_scale.at[k].set(jnp.log(std + 1e-6))
                params["actnorm"] = {"loc": loc, "log_scale": log_scale}
                x = apply_step(_index(params, k), _index(constants, k), x)
            return params

        params = numpyro.param(f"{name}.level{level}", init_level)
        params = _with_dropout(params, dropout, depth)
        steps = Scan(
            glow_step(params, {k: jnp.asarray(v) for k, v in constants.items()}, coupling, net=net),
            unroll,
            reversible=reversible,
        )
        step_stacks.append(steps)
        if level < levels - 1:
            priors.append(
                numpyro.param(f"{name}.level{level}.prior", nets.zero_conv_init(c_a, 2 * c_b))
            )
            if h_in is not None:
                h_in = _lazy(
                    lambda h_in=h_in, steps=steps: squeeze(split_channels(steps(h_in()))[0])
                )
            shape = (h, w, c_a)
        else:
            top_shape = (h, w, c)

    top = _top_prior(name, top_shape, learn_top, num_classes, y)
    inner: GlowTransform | None = None
    for level in reversed(range(levels)):
        if level == levels - 1:
            middle = [top] if top is not None else []
        else:
            middle = [Split(nets.zero_conv, priors[level], inner=inner)]
        inner = Chain([squeeze, step_stacks[level], *middle, squeeze.inv])
    flow = Chain([*head, inner]) if head else inner
    base = dist.Normal(0.0, temperature).expand(batch_shape + event_shape).to_event(3)
    return FlowDistribution(base, flow)


def _with_dropout(params: dict, rate: float, depth: int) -> dict:
    """Attach per-step dropout keys to the coupling networks' parameters."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"glow: expected 0 <= dropout < 1, got {rate}")
    key = numpyro.prng_key() if rate > 0 else None
    if key is None:
        return params
    spec = {"key": jax.random.split(key, depth), "rate": jnp.full((depth,), rate)}
    return {**params, "coupling": {**params["coupling"], "dropout": spec}}


def _index(tree: Any, k: int) -> Any:
    return jax.tree.map(lambda a: a[k], tree)


def _top_prior(name, shape, learn_top, num_classes, y) -> ActNorm | None:
    """The learned (class-conditional) prior of the last level, as an ActNorm with
    full-shape parameters: ``eps = (h - mean) / std``."""
    if not learn_top and num_classes is None:
        return None
    h, w, c = shape
    loc, log_scale = jnp.zeros(shape), jnp.zeros(shape)
    if learn_top:
        top = numpyro.param(f"{name}.top", {"loc": loc, "log_scale": log_scale})
        loc, log_scale = top["loc"], top["log_scale"]
    if num_classes is not None:
        table = numpyro.param(f"{name}.classes", jnp.zeros((num_classes, 2 * c)))
        per_class = table[y][..., None, None, :]  # (batch, 1, 1, 2c): per channel
        loc = loc + per_class[..., :c]
        log_scale = log_scale + per_class[..., c:]
    return ActNorm(loc, log_scale, event_dim=3)


def num_parameters(params: dict[str, Any], name: str | None = None) -> int:
    """The number of scalars in ``params`` (a dict of NumPyro parameter values), or
    in those a :func:`glow` named ``name`` registered."""
    return sum(
        math.prod(jnp.shape(a))
        for key, value in params.items()
        if name is None or key == name or key.startswith(name + ".")
        for a in jax.tree.leaves(value)
    )
