"""The multi-scale Glow density, built inside a NumPyro model or guide.

:func:`glow` works in three stages: it checks every argument (before any
parameter is registered), registers each level's parameters (with their
data-dependent initialisation) and builds its steps, then nests the levels into
one flow. The coupling kinds it knows are the table :data:`COUPLINGS`; adding a
kind is adding one entry.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
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
    SplineCoupling,
    Split,
    Squeeze,
    rotation_constants,
    split_channels,
)

__all__ = [
    "COUPLINGS",
    "CouplingKind",
    "glow",
    "glow_step",
    "default_unroll",
    "num_parameters",
    "rotation_constants",
]


def default_unroll(depth: int | None = None) -> int:
    """``lax.scan``'s ``unroll`` for the K steps of a level on the current backend:
    rolled (``1``) on CPU, four steps per loop iteration (``4``) on accelerators.
    Both keep the compile time flat in depth (the loop body holds one or four
    steps). :doc:`/performance` (section *Options*, ``unroll``) has the
    measurements behind the choice and the commands that reproduce them.

    ``depth`` is deprecated and ignored (the choice does not depend on it);
    passing it warns.
    """
    if depth is not None:
        warnings.warn(
            "default_unroll: the depth argument is ignored and deprecated; call default_unroll()",
            DeprecationWarning,
            stacklevel=2,
        )
    return 1 if jax.default_backend() == "cpu" else 4


@dataclasses.dataclass(frozen=True)
class CouplingKind:
    """How :func:`glow_step` builds one kind of coupling.

    ``width(c_b)`` is the number of channels the conditioner network returns when
    the coupling transforms ``c_b`` channels (the network's parameters are
    :func:`~numpyro_glow.nets.conv_net_init` of that width in :func:`glow`);
    ``make(net, params, event_dim, scale)`` builds the coupling transform from
    the network and its parameters (``scale`` is :class:`AffineCoupling`'s
    choice; other kinds may ignore it).
    """

    width: Callable[[int], int]
    make: Callable[[Callable, Any, int, str], GlowTransform]


#: Bins of the ``"spline"`` coupling of :func:`glow`.
SPLINE_BINS = 8

#: The coupling kinds :func:`glow` and :func:`glow_step` accept, by name.
COUPLINGS: dict[str, CouplingKind] = {
    "affine": CouplingKind(
        width=lambda c_b: 2 * c_b,
        make=lambda net, params, event_dim, scale: AffineCoupling(
            net, params, event_dim, scale=scale
        ),
    ),
    "additive": CouplingKind(
        width=lambda c_b: c_b,
        make=lambda net, params, event_dim, scale: AdditiveCoupling(net, params, event_dim),
    ),
    # rational-quadratic spline on [-4, 4] with 8 bins (the scale option is affine-only)
    "spline": CouplingKind(
        width=lambda c_b: (3 * SPLINE_BINS - 1) * c_b,
        make=lambda net, params, event_dim, scale: SplineCoupling(
            net, params, event_dim, num_bins=SPLINE_BINS
        ),
    ),
}


def _coupling_kind(coupling: str, where: str) -> CouplingKind:
    if coupling not in COUPLINGS:
        raise ValueError(f"{where}: expected coupling in {sorted(COUPLINGS)}, got {coupling!r}")
    return COUPLINGS[coupling]


#: The entries of :func:`rotation_constants` that stay fixed (not parameters).
_CONSTANTS = ("perm", "sign_s")


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
    ``constants`` the LU ``perm`` and ``sign_s``. ``coupling`` names an entry of
    :data:`COUPLINGS`. With every array stacked on a leading axis this is the
    stacked step that :class:`Scan` runs.
    """
    kind = _coupling_kind(coupling, "glow_step")
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
    couple = kind.make(net, params["coupling"], event_dim, scale)
    act = params["actnorm"]
    return Chain([ActNorm(act["loc"], act["log_scale"], event_dim), mix, couple])


def _lazy(fn: Callable[[], Array]) -> Callable[[], Array]:
    """Evaluate ``fn`` at most once, and only if asked (ActNorm's data init)."""
    return functools.cache(fn)


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    """:func:`glow`'s arguments, checked, and what follows from them."""

    event_shape: tuple[int, int, int]
    levels: int
    depth: int
    hidden_channels: int
    coupling: str
    lu: bool
    learn_top: bool
    num_classes: int | None
    y: Array | None
    batch_shape: tuple[int, ...]
    head: tuple[GlowTransform, ...]  # (Logitify(alpha),) or ()
    temperature: float
    init_data: Array | None
    seed: int
    unroll: int | bool
    dropout: float
    reversible: bool
    net: Callable

    def level_shape(self, level: int) -> tuple[int, int, int]:
        """The (squeezed) event shape the steps of ``level`` see."""
        h, w, c = self.event_shape
        for _ in range(level):  # each level keeps half of the squeezed channels
            h, w, c = h // 2, w // 2, (4 * c) // 2
        return h // 2, w // 2, 4 * c


def _plan(
    *,
    name,
    event_shape,
    levels,
    depth,
    hidden_channels,
    coupling,
    lu,
    learn_top,
    num_classes,
    y,
    alpha,
    temperature,
    init_data,
    seed,
    unroll,
    dropout,
    reversible,
    precision,
) -> _Plan:
    """Check every argument of :func:`glow`; raise ``ValueError`` on the first bad one."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"glow: expected a non-empty string name, got {name!r}")
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
    if hidden_channels < 1:
        raise ValueError(f"glow: expected hidden_channels >= 1, got {hidden_channels}")
    _coupling_kind(coupling, "glow")
    batch_shape: tuple[int, ...] = ()
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"glow: expected num_classes >= 1, got {num_classes}")
        if y is None:
            raise ValueError("glow: num_classes is set, so y (integer labels) is required")
        y = jnp.asarray(y)
        batch_shape = y.shape
    elif y is not None:
        raise ValueError("glow: y was given but num_classes is None")
    if not isinstance(temperature, jax.core.Tracer) and not np.all(np.asarray(temperature) > 0):
        # a traced temperature (sampling under jit) is the caller's to check
        raise ValueError(f"glow: expected temperature > 0, got {temperature}")
    if init_data is not None:
        init_data = jnp.asarray(init_data, jnp.float32)
        if init_data.shape[1:] != event_shape:
            raise ValueError(
                f"glow: expected init_data of shape (N, {height}, {width}, {channels}), "
                f"got {init_data.shape}"
            )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"glow: expected 0 <= dropout < 1, got {dropout}")
    if unroll is None:
        # the reversible backward pass saves its memory only in the rolled scan
        unroll = 1 if reversible else default_unroll()
    head = (Logitify(alpha),) if alpha is not None else ()
    # XLA:CPU's convolutions run at half its matrix-product rate (their weight
    # gradients 17x slower inside a rolled scan): conv2d_same on CPU, cuDNN on GPUs
    net = nets.conv_net_for(precision, matmul_convs=jax.default_backend() == "cpu")
    dropout, reversible = float(dropout), bool(reversible)
    checked = locals()  # the checked arguments and what follows, named as _Plan's fields
    return _Plan(**{field.name: checked[field.name] for field in dataclasses.fields(_Plan)})


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
    last level. ``coupling`` names an entry of :data:`COUPLINGS` (``"affine"``,
    ``"additive"``, ``"spline"``). Every argument is checked before any parameter is
    registered; a bad one raises ``ValueError``.

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
    draw is an exact bijection with its own exact log-determinant. The flow then
    holds the masks' integer PRNG keys: ``jax.grad`` with the flow *object* as
    its argument needs ``allow_int=True`` (gradients with respect to the
    parameters, as SVI takes them, are unaffected).

    ``seed`` fixes the random rotations (and so the LU permutations and signs:
    :func:`rotation_constants`, with the level as its stream); ``unroll`` is
    ``lax.scan``'s (default: :func:`default_unroll`, or ``1`` with
    ``reversible=True``).

    **Mixed precision.** ``precision="bfloat16"`` runs the coupling networks'
    convolutions in ``bfloat16`` (:func:`~numpyro_glow.nets.conv_net_bfloat16`);
    their outputs are cast back to ``float32`` before the scale and shift, so
    every log-determinant, ActNorm, 1x1 convolution and prior stays ``float32``.
    It pays on accelerators with bfloat16 units; on a CPU without them it is
    slower (:doc:`/performance`).

    **Reversible gradients.** With ``reversible=True`` each level's
    :class:`Scan` computes its gradient without storing the K steps'
    activations: the backward pass recomputes each step's input from its output
    with the step's inverse, then takes that step's vector-Jacobian product (see
    :class:`Scan`). Training memory no longer grows with ``depth``, for roughly
    one extra inverse and forward pass per step; values are unchanged, gradients
    agree with plain autodiff up to the float32 drift of the recomputation.
    Forward-mode autodiff (``jax.jvp``) through the flow is then unavailable.
    The memory saving needs the rolled scan, so ``reversible=True`` runs it
    (``unroll=1``) on every backend unless ``unroll`` is given
    (:doc:`/performance`, *Options*).
    """
    plan = _plan(**locals())  # every argument, checked
    h_in = None
    if plan.init_data is not None:
        h_in = _lazy(lambda: Chain([*plan.head, Squeeze()])(plan.init_data))
    step_stacks, priors = [], []
    for level in range(plan.levels):
        steps, prior, h_in = _level(name, level, plan, h_in)
        step_stacks.append(steps)
        priors.append(prior)
    return _assemble(plan, step_stacks, priors, _top_prior(name, plan))


def _level(
    name: str, level: int, plan: _Plan, h_in: Callable[[], Array] | None
) -> tuple[Scan, Any, Callable[[], Array] | None]:
    """Register one level's parameters and build its steps.

    Returns the level's :class:`Scan`, its split prior's parameters (``None`` for
    the last level) and, if ``h_in`` (the level's input on ``init_data``, lazy) is
    given, the next level's input, lazy too."""
    c = plan.level_shape(level)[-1]
    c_a = c // 2
    consts = rotation_constants(plan.seed, level, plan.depth, c, plan.lu)
    init = functools.partial(_init_level, plan=plan, consts=consts, h_in=h_in)
    params = numpyro.param(f"{name}.level{level}", init)
    constants = {k: jnp.asarray(consts[k]) for k in _CONSTANTS if k in consts}
    step = glow_step(_with_dropout(params, plan), constants, plan.coupling, net=plan.net)
    steps = Scan(step, plan.unroll, reversible=plan.reversible)
    if level == plan.levels - 1:
        return steps, None, None
    prior = numpyro.param(f"{name}.level{level}.prior", nets.zero_conv_init(c_a, 2 * (c - c_a)))
    if h_in is None:
        return steps, prior, None
    return steps, prior, _lazy(lambda: Squeeze()(split_channels(steps(h_in()))[0]))


def _init_level(
    key: Array, plan: _Plan, consts: dict, h_in: Callable[[], Array] | None
) -> dict[str, Any]:
    """The initial parameters of one level's K steps, stacked on a leading axis:
    identity ActNorms, the rotations ``consts``, and coupling networks whose last
    layer is zero. With ``h_in`` (the level's input on ``init_data``) the steps
    are run one after another on it and each ActNorm is set to the per-channel
    mean and standard deviation of its input."""
    c = consts["lower" if plan.lu else "weight"].shape[-1]
    c_a, c_b, depth = c // 2, c - c // 2, plan.depth
    width = COUPLINGS[plan.coupling].width(c_b)
    net_params = jax.vmap(lambda k: nets.conv_net_init(k, c_a, width, plan.hidden_channels))(
        jax.random.split(key, depth)
    )
    loc, log_scale = jnp.zeros((depth, c)), jnp.zeros((depth, c))
    params = {
        "actnorm": {"loc": loc, "log_scale": log_scale},
        "conv": {k: jnp.asarray(v) for k, v in consts.items() if k not in _CONSTANTS},
        "coupling": net_params,
    }
    if h_in is None:
        return params
    x = h_in()
    constants = {k: consts[k] for k in _CONSTANTS if k in consts}
    # one compiled step, reused for the K steps (eager op-by-op was slow)
    apply_step = jax.jit(lambda p, c, x: glow_step(p, c, plan.coupling, net=plan.net)(x))
    for k in range(depth):
        mean = jnp.mean(x, axis=(0, 1, 2))
        std = jnp.std(x, axis=(0, 1, 2))
        loc, log_scale = loc.at[k].set(mean), log_scale.at[k].set(jnp.log(std + 1e-6))
        params["actnorm"] = {"loc": loc, "log_scale": log_scale}
        x = apply_step(_index(params, k), _index(constants, k), x)
    return params


def _assemble(
    plan: _Plan, step_stacks: list[Scan], priors: list[Any], top: ActNorm | None
) -> FlowDistribution:
    """Nest the levels, deepest first, into one flow and wrap it in the density."""
    squeeze = Squeeze()
    inner: GlowTransform | None = None
    for level in reversed(range(plan.levels)):
        if level == plan.levels - 1:
            middle = [top] if top is not None else []
        else:
            middle = [Split(nets.zero_conv, priors[level], inner=inner)]
        inner = Chain([squeeze, step_stacks[level], *middle, squeeze.inv])
    flow = Chain([*plan.head, inner]) if plan.head else inner
    base = dist.Normal(0.0, plan.temperature).expand(plan.batch_shape + plan.event_shape)
    return FlowDistribution(base.to_event(3), flow)


def _with_dropout(params: dict, plan: _Plan) -> dict:
    """Attach per-step dropout keys to the coupling networks' parameters."""
    key = numpyro.prng_key() if plan.dropout > 0 else None
    if key is None:
        return params
    spec = {"key": jax.random.split(key, plan.depth), "rate": jnp.full((plan.depth,), plan.dropout)}
    return {**params, "coupling": {**params["coupling"], "dropout": spec}}


def _index(tree: Any, k: int) -> Any:
    return jax.tree.map(lambda a: a[k], tree)


def _top_prior(name: str, plan: _Plan) -> ActNorm | None:
    """The learned (class-conditional) prior of the last level, as an ActNorm with
    full-shape parameters: ``eps = (h - mean) / std``."""
    if not plan.learn_top and plan.num_classes is None:
        return None
    shape = plan.level_shape(plan.levels - 1)
    c = shape[-1]
    loc, log_scale = jnp.zeros(shape), jnp.zeros(shape)
    if plan.learn_top:
        top = numpyro.param(f"{name}.top", {"loc": loc, "log_scale": log_scale})
        loc, log_scale = top["loc"], top["log_scale"]
    if plan.num_classes is not None:
        table = numpyro.param(f"{name}.classes", jnp.zeros((plan.num_classes, 2 * c)))
        per_class = table[plan.y][..., None, None, :]  # (batch, 1, 1, 2c): per channel
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
