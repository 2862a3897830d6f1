r"""The plate-aware part of :class:`~numpyro_glow.AutoGlow`: which latent sites
belong to the members of a plate, how their values and data are laid out member
by member, and the member flow shared by all members.

Given the sites outside the plate (the *globals* :math:`z_g`), the members
:math:`i = 1, \dots, G` of a plate are conditionally independent, so the guide
factorises as

.. math::

    q(z_g, z_1, \dots, z_G) = q_g(z_g) \prod_{i=1}^{G} q(z_i \mid z_g, x_i),

with :math:`z_g = F(\epsilon_g)` a Glow flow over the globals and every member's
latents (a vector of :math:`m` coordinates: every local site's value at that
member, other plates' axes included) drawn by the member flow

.. math::

    z_i = \mu_i + \sigma_i \odot \big(b(c_i) + e^{a(c_i)} \odot
          h_K \circ \dots \circ h_1(\epsilon_i;\, c_i)\big), \qquad
    \epsilon_i \sim \mathcal N(0, I_m),

whose networks are shared by all members. The context
:math:`c_i = (z_g - z_g^{(0)}, \tilde x_i, \tilde\mu_i, \log\sigma_i)` holds the
globals' unconstrained values relative to their initial values (the values,
not their white noise: when the optimiser moves the globals' location, every
member moves with it as the network has learned, instead of lagging behind as
in a mean-field guide), the member's observed data inside the plate,
standardised (amortisation), and its own free location and scale,
standardised and without gradient (so that the shared networks can tell
members apart where the data are not inside the plate).
:math:`h_k` are affine couplings over the member's coordinates (for
:math:`m \ge 2`) and :math:`b, a` an MLP of the context, :math:`a` bounded to
:math:`(-3, 1)`. Its log-determinant is

.. math::

    \log|\det J| = \textstyle\sum_j \big(\log\sigma_{ij} + a_j(c_i)\big)
                 + \sum_k \log|\det J_{h_k}| .

Everything is zero at initialisation but :math:`\mu_i, \sigma_i`, so the guide
starts as ``AutoNormal`` on the members.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from numpyro.distributions import Distribution, constraints

from . import nets
from .transforms import AffineCoupling
from .transforms.base import GlowTransform, check_event
from .transforms.coupling import _SCALES

__all__ = [
    "PlateLayout",
    "member_map",
    "member_context",
    "location_stats",
    "PlateFlow",
    "MemberPosterior",
]


@dataclass(frozen=True)
class _Site:
    """A site's unconstrained value shape (the plate's axis at ``axis``)."""

    name: str
    shape: tuple[int, ...]
    axis: int | None  # the plate's axis in the value; None for a global site

    @property
    def per_member(self) -> int:
        return math.prod(self.shape) // (1 if self.axis is None else self.shape[self.axis])


def _plate_axis(site: dict, plate: str, shape: tuple[int, ...]) -> int | None:
    """The axis of ``plate`` in a value of ``shape`` at ``site``, or ``None``."""
    for frame in site["cond_indep_stack"]:
        if frame.name == plate:
            batch = len(site["fn"].batch_shape)
            axis = batch + frame.dim
            if axis < 0 or shape[axis] != frame.size:
                raise ValueError(
                    f"AutoGlow: site {site['name']!r} has shape {shape}, expected the plate "
                    f"{plate!r} of size {frame.size} on its axis {frame.dim} of the batch"
                )
            return axis
    return None


def latent_frames(trace: Mapping[str, dict]) -> dict[str, int]:
    """The plates around the model's latent sites, each with the number of latent
    coordinates inside it (in the traced, possibly subsampled, shapes)."""
    sizes: dict[str, int] = {}
    for site in trace.values():
        if site["type"] == "sample" and not site["is_observed"]:
            for frame in site["cond_indep_stack"]:
                size = int(np.prod(jnp.shape(site["value"]), dtype=int))
                sizes[frame.name] = sizes.get(frame.name, 0) + size
    return sizes


def subsampled_plates(trace: Mapping[str, dict]) -> list[str]:
    """The subsampled plates (``subsample_size`` below the size) around latent sites."""
    around = latent_frames(trace)
    return sorted(
        name
        for name, site in trace.items()
        if site["type"] == "plate"
        and name in around
        and site["args"][1] is not None
        and site["args"][1] != site["args"][0]
    )


class PlateLayout:
    """Where the globals and each member's coordinates are in the model's
    unconstrained latents, and where each member's data are.

    :param trace: the prototype trace (the plate at its subsample size ``B``).
    :param init_locs: the unconstrained initial values by site, in model order.
    :param plate: the plate whose members are local.
    :param size: the plate's full size ``G``.
    """

    def __init__(
        self, trace: Mapping[str, dict], init_locs: Mapping[str, Array], plate: str, size: int
    ):
        self.plate = plate
        self.size = int(size)
        self.sites: list[_Site] = []
        frame = None
        for name, value in init_locs.items():
            site = trace[name]
            shape = tuple(jnp.shape(value))
            self.sites.append(_Site(name, shape, _plate_axis(site, plate, shape)))
            frame = frame or next((f for f in site["cond_indep_stack"] if f.name == plate), None)
        if frame is None:
            raise ValueError(f"AutoGlow: no latent site is inside the plate {plate!r}")
        self.subsample = frame.size
        self.data: list[_Site] = []
        for name, site in trace.items():
            if site["type"] == "sample" and site["is_observed"]:
                fn_shape = tuple(site["fn"].batch_shape + site["fn"].event_shape)
                shape = tuple(jnp.broadcast_shapes(fn_shape, jnp.shape(site["value"])))
                axis = _plate_axis(site, plate, shape)
                if axis is not None:
                    self.data.append(_Site(name, shape, axis))
        self.global_dim = sum(s.per_member for s in self.globals)
        self.member_dim = sum(s.per_member for s in self.locals)
        self.data_dim = sum(s.per_member for s in self.data)

    @property
    def globals(self) -> list[_Site]:
        return [s for s in self.sites if s.axis is None]

    @property
    def locals(self) -> list[_Site]:
        return [s for s in self.sites if s.axis is not None]

    @property
    def subsampled(self) -> bool:
        return self.subsample != self.size

    # --- values ---------------------------------------------------------------
    def pack_globals(self, values: Mapping[str, Array]) -> Array:
        """``(..., global_dim)`` from the global sites' unconstrained values."""
        parts = [_rows(values[s.name], len(s.shape)) for s in self.globals]
        return jnp.concatenate(parts, -1) if parts else jnp.zeros((0,))

    def unpack_globals(self, z: Array) -> dict[str, Array]:
        """The global sites' values from ``(..., global_dim)``."""
        out, start = {}, 0
        for s in self.globals:
            n = math.prod(s.shape)
            out[s.name] = z[..., start : start + n].reshape(z.shape[:-1] + s.shape)
            start += n
        return out

    def pack_members(self, values: Mapping[str, Array], sites: list[_Site] | None = None) -> Array:
        """``(B, m)``: every member's coordinates, from values with the plate's axis
        at ``B`` (the local sites by default, or the observed ``self.data``)."""
        parts = []
        for s in self.locals if sites is None else sites:
            value = jnp.asarray(values[s.name])
            # the plate's axis at this call's size; other axes broadcast to the site's
            shape = list(s.shape)
            shape[s.axis] = value.shape[s.axis - len(s.shape) + value.ndim]
            value = jnp.broadcast_to(value, shape)
            parts.append(jnp.moveaxis(value, s.axis, 0).reshape(shape[s.axis], -1))
        return jnp.concatenate(parts, -1)

    def unpack_members(self, z: Array) -> dict[str, Array]:
        """The local sites' values (the plate's axis of ``z``'s size) from ``(B, m)``."""
        out, start = {}, 0
        b = z.shape[0]
        for s in self.locals:
            n = s.per_member
            moved = list(s.shape)
            moved.pop(s.axis)
            block = z[:, start : start + n].reshape((b, *moved))
            out[s.name] = jnp.moveaxis(block, 0, s.axis)
            start += n
        return out

    def flat_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """``(global_index, member_index)`` into AutoContinuous's flat latent vector
        (sites in model order, each raveled), of shapes ``(global_dim,)`` and
        ``(G, m)``; only without subsampling, where that vector has every member."""
        index = {}
        start = 0
        for s in self.sites:
            n = math.prod(s.shape)
            index[s.name] = np.arange(start, start + n).reshape(s.shape)
            start += n
        g = [index[s.name].reshape(-1) for s in self.globals]
        members = [
            np.moveaxis(index[s.name], s.axis, 0).reshape(self.size, -1) for s in self.locals
        ]
        return (np.concatenate(g) if g else np.zeros(0, int)), np.concatenate(members, -1)


def _rows(x: Array, ndim: int) -> Array:
    """``x`` with its last ``ndim`` axes raveled into one."""
    x = jnp.asarray(x)
    return x.reshape(x.shape[: x.ndim - ndim] + (-1,))


# --- the member flow -----------------------------------------------------------------


def location_stats(loc: Array) -> tuple[Array, Array]:
    """The mean and (plus one) standard deviation of every member's location
    ``(G, m)``, by which :func:`member_context` standardises them."""
    return jnp.mean(loc, 0), jnp.std(loc, 0) + 1.0


def member_context(
    globals_: Array,
    features: Array | None,
    loc: Array,
    scale: Array,
    loc_stats: tuple[Array, Array],
) -> Array:
    """``(..., B, c)``: each member's context, from the globals (relative to
    their initial values) ``(..., global_dim)``, its standardised data
    ``(B, data_dim)`` (or ``None``) and its free location and scale ``(B, m)``,
    standardised by ``loc_stats`` (mean and standard deviation over every
    member) and without gradient."""
    b = loc.shape[0]
    batch = globals_.shape[:-1]
    mean, sd = loc_stats
    own = lax.stop_gradient(jnp.concatenate([(loc - mean) / sd, jnp.log(scale)], -1))
    parts = [jnp.broadcast_to(globals_[..., None, :], (*batch, b, globals_.shape[-1]))]
    if features is not None:
        parts.append(jnp.broadcast_to(features, (*batch, *features.shape)))
    parts.append(jnp.broadcast_to(own, (*batch, *own.shape)))
    return jnp.concatenate(parts, -1)


def _conditioned(ctx: Array):
    """``net(params, x)`` reading ``x`` and the member's context together."""

    def net(params, x):
        return nets.mlp(
            params, jnp.concatenate([x, jnp.broadcast_to(ctx, x.shape[:-1] + ctx.shape[-1:])], -1)
        )

    return net


def member_map(
    params: Mapping[str, Any],
    ctx: Array,
    loc: Array,
    scale: Array,
    masks: Array | None,
    x: Array,
    inverse: bool,
) -> tuple[Array, Array]:
    r"""The member flow (module docstring) applied to ``x`` of shape ``(..., B, m)``:
    noise to latents, or latents to noise with ``inverse``; returns the result and
    the log-determinant of that direction, of shape ``(..., B)``.

    ``params`` holds ``"affine"`` (an MLP from the context to :math:`b, a`) and,
    for :math:`m \ge 2`, ``"couplings"`` (``K`` stacked MLPs, one per row of
    ``masks``)."""
    check_event("member flow", x, 2, loc.shape[-1])
    h = nets.mlp(params["affine"], ctx)
    shift, raw = jnp.split(h, 2, axis=-1)
    log_a = _SCALES["bounded"](raw)
    couplings = []
    if masks is not None:
        net = _conditioned(ctx)
        for k in range(masks.shape[0]):
            p = jax.tree.map(lambda a, k=k: a[k], params["couplings"])
            couplings.append(AffineCoupling(net, p, 1, scale="bounded", mask=masks[k]))
    outer = jnp.sum(log_a + jnp.log(scale), -1)
    if not inverse:
        log_det = 0.0
        for c in couplings:
            x, ld = c.forward_and_log_det(x)
            log_det = log_det + ld
        z = loc + scale * (shift + jnp.exp(log_a) * x)
        return z, log_det + outer
    u = ((x - loc) / scale - shift) * jnp.exp(-log_a)
    log_det = -outer
    for c in reversed(couplings):
        u, ld = c.inverse_and_log_det(u)
        log_det = log_det + ld
    return u, log_det


class PlateFlow(GlowTransform):
    r"""The plate-aware guide's map from white noise to the whole latent vector
    (AutoContinuous's flat layout), without subsampling: the globals through
    their flow, every member through the member flow given the globals' noise.

    .. math::

        z_g = F(\epsilon_g), \qquad z_i = M(\epsilon_i; c_i(z_g)),\qquad
        \log|\det J| = \log|\det J_F(\epsilon_g)| + \textstyle\sum_i \log|\det J_M(\epsilon_i)|;

    the inverse recovers :math:`\epsilon_g = F^{-1}(z_g)` and each member's
    noise given :math:`z_g`. Block triangular, so a NeuTra reparametrisation
    or ``get_posterior`` sees one bijection with an exact log-determinant.
    """

    event_dim = 1

    def __init__(
        self,
        global_flow: GlowTransform | None,
        member_params: Any,
        loc: Array,
        scale: Array,
        features: Array | None,
        masks: Array | None,
        global_index: Array,
        member_index: Array,
        global_origin: Array,
    ):
        self.global_flow = global_flow
        self.member_params = member_params
        self.loc = loc
        self.scale = scale
        self.features = features
        self.masks = masks
        self.global_index = global_index
        self.member_index = member_index
        self.global_origin = global_origin

    def _map(self, x: Array, inverse: bool) -> tuple[Array, Array]:
        xg = x[..., self.global_index]
        xl = x[..., self.member_index]
        log_det = jnp.zeros(x.shape[:-1], x.dtype)
        if self.global_flow is None:
            yg, z_g = xg, xg
        elif inverse:
            yg, log_det = self.global_flow.inverse_and_log_det(xg)
            z_g = xg
        else:
            yg, log_det = self.global_flow.forward_and_log_det(xg)
            z_g = yg
        shifted = z_g - self.global_origin
        stats = location_stats(self.loc)
        ctx = member_context(shifted, self.features, self.loc, self.scale, stats)
        yl, ld = member_map(self.member_params, ctx, self.loc, self.scale, self.masks, xl, inverse)
        y = jnp.zeros_like(x).at[..., self.global_index].set(yg).at[..., self.member_index].set(yl)
        return y, log_det + jnp.sum(ld, -1)

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        return self._map(x, inverse=False)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        return self._map(y, inverse=True)

    def tree_flatten(self):
        names = (
            "global_flow",
            "member_params",
            "loc",
            "scale",
            "features",
            "masks",
            "global_index",
            "member_index",
            "global_origin",
        )
        return tuple(getattr(self, n) for n in names), (names, {})


class MemberPosterior(Distribution):
    """A minibatch of members' latents, ``(B, m)`` as one event: drawn by
    ``forward(noise)``, scored by ``density(z)`` (the STL or plain log density)."""

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    reparametrized_params: list = []

    def __init__(self, forward, density, shape: tuple[int, int]):
        self._forward = forward
        self._density = density
        super().__init__(batch_shape=(), event_shape=shape)

    def sample(self, key, sample_shape=()):
        return self._forward(jax.random.normal(key, tuple(sample_shape) + self.event_shape))

    def log_prob(self, value):
        return self._density(value)
