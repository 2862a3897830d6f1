"""AutoGlow: an ``AutoContinuous`` guide built from Glow steps for vectors."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import Array, lax
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import sum_rightmost
from numpyro.infer.autoguide import AutoContinuous, AutoGuide
from numpyro.infer.initialization import init_to_uniform

from . import nets
from .distribution import StickTheLanding
from .plate_guide import (
    MemberPosterior,
    PlateFlow,
    PlateLayout,
    latent_frames,
    location_stats,
    member_context,
    member_map,
    subsampled_plates,
)
from .transforms import AffineCoupling, ArrowAffine, Chain, Inv1x1ConvLU, Scan, SplineCoupling
from .transforms.base import GlowTransform

__all__ = ["AutoGlow", "coupling_masks"]

_COUPLINGS = ("affine", "spline")

#: Each conditioner layer's weights enter multiplied by ``min(1, WIDTH_SCALE / fan_in)``.
WIDTH_SCALE = 10.0
#: The coordinates, from the first, that get dense maps (LU steps, a full-rank head).
DENSE_DIM = 64
#: The largest default conditioner width.
MAX_WIDTH = 128


def coupling_masks(dim: int, num_flows: int) -> np.ndarray:
    r"""The ``(num_flows, dim)`` coupling masks of :class:`AutoGlow`: 1 where a
    coordinate conditions the step, 0 where the step transforms it.

    Mask :math:`M_b` keeps the coordinates whose index has bit :math:`b` equal
    to 0 and transforms those with bit :math:`b` equal to 1, so every
    coordinate :math:`j` is transformed, in some :math:`M_b`, given every
    earlier coordinate :math:`i < j` whose index differs from :math:`j`'s first
    in bit :math:`b`, and coordinate 0 conditions every step :math:`M_b`.
    NumPyro lists a model's sites in model order, global parameters first, so
    these steps can represent "later sites given earlier ones" (a funnel's
    :math:`x \mid v`, a hierarchy's groups given its scale) in one step. With
    :math:`B = \lceil \log_2 d \rceil` bits, one cycle is the complements
    :math:`\bar M_0, \dots, \bar M_{B-1}` (earlier coordinates given later ones)
    followed by :math:`M_{B-1}, \dots, M_0`; ``num_flows`` steps take the last
    ``num_flows`` masks of the cycle repeated, so the generative pass always
    ends with the "earlier conditions later" steps.
    """
    if dim < 2:
        raise ValueError(f"coupling_masks: expected dim >= 2, got {dim}")
    if num_flows < 1:
        raise ValueError(f"coupling_masks: expected num_flows >= 1, got {num_flows}")
    index = np.arange(dim)
    bits = [((index >> b) & 1) == 0 for b in range(max(1, math.ceil(math.log2(dim))))]
    cycle = [~m for m in bits] + bits[::-1]
    repeats = -(-num_flows // len(cycle))
    return np.stack((cycle * repeats)[-num_flows:]).astype(np.float32)


def _multipliers(fan_in: Sequence[int]) -> list[float]:
    """Each layer's weight multiplier ``min(1, WIDTH_SCALE / fan_in)`` (see AutoGlow)."""
    return [min(1.0, WIDTH_SCALE / n) for n in fan_in]


def _rescaled(layers, mult, inverse: bool = False):
    """MLP layers with their weights multiplied (or, ``inverse``, divided) by ``mult``."""
    return [
        {**lay, "w": lay["w"] / c if inverse else lay["w"] * c}
        for lay, c in zip(layers, mult, strict=True)
    ]


class AutoGlow(AutoContinuous):
    r"""A normalizing-flow guide over the whole (unconstrained) latent vector,
    built from Glow steps for vectors and an affine head:

    .. math::

        z = \mu + A\, f_K \circ \dots \circ f_1(\epsilon), \quad
        \epsilon \sim \mathcal N(0, I), \qquad
        f_k = \text{coupling}_k \circ \text{LU}_k
        \;(\text{or } f_k = \text{coupling}_k \text{ for } d > 64),

    where each step is a masked coupling (:func:`coupling_masks`) whose MLP
    conditioner sees the kept coordinates: an affine coupling
    (``coupling="affine"``) with a log-scale bounded to :math:`(-3, 1)` (a step
    may contract a lot but expands by at most :math:`e`, so deep stacks do not
    diverge), or a rational-quadratic spline (``coupling="spline"``,
    :class:`~numpyro_glow.SplineCoupling`); while the dimension :math:`d` is at
    most ``DENSE_DIM`` (64) each step also starts with an invertible linear map
    in LU form (:class:`~numpyro_glow.Inv1x1ConvLU` with ``event_dim=1``).

    **Cost linear in d.** The conditioners' widths are ``min(128, max(32, 2d))``
    and the head :math:`A` is an :class:`~numpyro_glow.transforms.ArrowAffine`:
    a full lower-triangular block over the first ``min(d, DENSE_DIM)``
    coordinates (NumPyro lists a model's sites in model order, global
    parameters first), a dense "arrow" from them to every other coordinate, and
    a first-order recurrence along the others (a Markov chain such as a random
    walk in model order; a site listed after such a chain, a global one
    included, is linked to its last coordinate and to the leading block only
    linearly, and to everything through the couplings). So above 64 latents
    nothing is :math:`d \times d`:
    parameters and the cost of a step grow linearly in :math:`d`. For
    :math:`d \le 64`, :math:`A` is the full lower-triangular matrix of
    :class:`~numpyro.infer.autoguide.AutoMultivariateNormal`, parametrised and
    initialised as there.

    **Scales for Adam.** Adam moves every parameter by about the learning rate
    per step, all the weights into a unit in the same direction at first, so a
    layer's output moves by about the learning rate times its fan-in. Each
    conditioner layer's weights therefore enter multiplied by
    ``min(1, 10 / fan_in)`` (biases, whose fan-in is 1, are not scaled; above
    64 latents, where no linear maps share the work, the last layer's also by
    :math:`1/K`, since the :math:`K` steps' shifts add up coherently too), the
    LU maps' off-diagonal parameters divided by :math:`d` and the head's arrow
    divided by its fan-in, so that one optimiser step changes each map by about the
    learning rate at any size, and 16 steps train at Adam's usual learning
    rates. Every step starts as the identity, so at initialisation the guide is
    :math:`\mathcal N(\mu_0, \sigma_0^2 I)`, with :math:`\mu_0` from
    ``init_loc_fn`` (for :math:`d \le 64` exactly
    ``AutoMultivariateNormal(model, init_loc_fn=init_loc_fn, init_scale=init_scale)``);
    the flow can only add to it.

    With ``stick_the_landing=True`` (default) the guide samples from a
    :class:`~numpyro_glow.StickTheLanding` distribution, so plain
    ``SVI(model, guide, optim, Trace_ELBO())`` differentiates the ELBO by the
    path derivative only (Roeder et al. 2017): one extra inverse pass per
    step, and a gradient whose variance vanishes as the guide approaches the
    posterior.

    **Plates.** With a plate of many members (``local_plate``), the latents
    outside it keep this flow and each member's latents get a flow shared by
    all members and conditioned on the globals, the member's data and its own
    location and scale (:mod:`numpyro_glow.plate_guide`): parameters grow by two
    per member coordinate, and a subsampled plate is supported (a step touches
    the minibatch's members only; ``sample_posterior`` draws every member).

    Everything :class:`~numpyro.infer.autoguide.AutoContinuous` offers works
    (without a subsampled plate):
    ``SVI``, ``sample_posterior``, ``get_transform`` / ``get_posterior`` (hence
    :class:`~numpyro.infer.reparam.NeuTraReparam`), ``Predictive``;
    ``median`` and ``quantiles`` are Monte Carlo estimates (a flow has no
    closed-form quantiles) from ``num_quantile_samples`` draws. How it compares
    with NumPyro's and flowjax's flow guides, and the recipe we recommend, are
    on the docs page "AutoGlow".

    :param model: a NumPyro model with continuous latent sites.
    :param prefix: prefix of the guide's parameter names.
    :param init_loc_fn: per-site initialisation of the location :math:`\mu_0`.
    :param num_flows: number of steps ``K``.
    :param hidden_dims: widths of the coupling MLPs (default two layers of
        ``min(128, max(32, 2 * latent_dim))``).
    :param coupling: ``"affine"`` or ``"spline"``.
    :param num_bins: bins of the spline coupling.
    :param init_scale: initial scale :math:`\sigma_0` of the guide.
    :param stick_the_landing: use the path-derivative (STL) gradient.
    :param num_quantile_samples: draws used by ``median`` and ``quantiles``.
    :param local_plate: the plate whose members get the member flow
        (:mod:`numpyro_glow.plate_guide`; docs page "AutoGlow on plates"):
        ``"auto"`` (default) takes the subsampled plate if there is one, else,
        above ``DENSE_DIM`` latents, the plate holding the most latent
        coordinates; a plate's name takes that plate; ``None`` keeps one flow
        over the whole latent vector (refused with a subsampled plate).
    :param amortize: condition the member flow on each member's observed data
        inside the plate (read once, for every member, when the guide is set up).
    """

    def __init__(
        self,
        model,
        *,
        prefix: str = "auto",
        init_loc_fn=init_to_uniform,
        num_flows: int = 16,
        hidden_dims: Sequence[int] | None = None,
        coupling: str = "affine",
        num_bins: int = 8,
        init_scale: float = 1.0,
        stick_the_landing: bool = True,
        num_quantile_samples: int = 4000,
        local_plate: str | None = "auto",
        amortize: bool = True,
    ):
        if num_flows < 1:
            raise ValueError(f"AutoGlow: expected num_flows >= 1, got {num_flows}")
        if not init_scale > 0:
            raise ValueError(f"AutoGlow: expected init_scale > 0, got {init_scale}")
        if coupling not in _COUPLINGS:
            raise ValueError(f"AutoGlow: expected coupling in {_COUPLINGS}, got {coupling!r}")
        if hidden_dims is not None and (
            len(hidden_dims) == 0 or any(int(h) < 1 for h in hidden_dims)
        ):
            raise ValueError(
                f"AutoGlow: expected hidden_dims to be positive widths, got {hidden_dims!r}"
            )
        self.num_flows = num_flows
        self.coupling = coupling
        self.num_bins = num_bins
        self.stick_the_landing = stick_the_landing
        self._hidden_dims = None if hidden_dims is None else tuple(int(h) for h in hidden_dims)
        self._init_scale = init_scale
        self._num_quantile_samples = num_quantile_samples
        self.local_plate = local_plate
        self.amortize = amortize
        self._layout: PlateLayout | None = None
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args, **kwargs):
        with handlers.block():  # a private look at the model's sites
            # the init strategy supplies values NumPyro cannot sample (ImproperUniform)
            model = handlers.substitute(
                handlers.seed(self.model, 0), substitute_fn=self.init_loc_fn
            )
            trace = handlers.trace(model).get_trace(*args, **kwargs)
        discrete = [
            name
            for name, site in trace.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and getattr(site["fn"], "is_discrete", False)
        ]
        if discrete:
            raise ValueError(
                f"AutoGlow: expected continuous latent sites only, got discrete site(s) "
                f"{discrete}; enumerate them out (funsor) or observe them"
            )
        subsampled = subsampled_plates(trace)
        if len(subsampled) > 1:
            raise ValueError(
                f"AutoGlow: expected at most one subsampled plate around latent sites, "
                f"got {subsampled}"
            )
        if subsampled and self.local_plate not in ("auto", subsampled[0]):
            raise ValueError(
                f"AutoGlow: the plate {subsampled[0]!r} is subsampled, so its members' "
                f"latents must be local; got local_plate={self.local_plate!r} "
                f"(use 'auto' or {subsampled[0]!r})"
            )
        if subsampled:  # AutoContinuous refuses subsampled latents; the layout handles them
            AutoGuide._setup_prototype(self, *args, **kwargs)
        else:
            super()._setup_prototype(*args, **kwargs)
        plate = subsampled[0] if subsampled else self._choose_plate(trace)
        if plate is not None:
            self._setup_members(plate, *args, **kwargs)
        elif self.latent_dim == 1:
            raise ValueError(
                "AutoGlow: the latent dimension is 1, too small to couple; "
                "use AutoNormal or AutoDiagonalNormal"
            )

    def _choose_plate(self, trace) -> str | None:
        """The plate whose members get the member flow, without subsampling: the
        one named by ``local_plate``, or (``"auto"``) above ``DENSE_DIM`` latents
        the plate holding the most latent coordinates, if any."""
        frames = latent_frames(trace)
        if self.local_plate is None:
            return None
        if self.local_plate != "auto":
            if self.local_plate not in frames:
                raise ValueError(
                    f"AutoGlow: local_plate={self.local_plate!r} is no plate around a "
                    f"latent site; the model's are {sorted(frames)}"
                )
            return self.local_plate
        if self.latent_dim <= DENSE_DIM or not frames:
            return None
        return max(sorted(frames), key=frames.get)

    def _setup_members(self, plate: str, *args, **kwargs) -> None:
        """The plate's layout, and every member's standardised data (amortisation)."""
        layout = PlateLayout(
            self.prototype_trace, self._init_locs, plate, self._prototype_frame_full_sizes[plate]
        )
        self._layout = layout
        self.latent_dim = layout.global_dim + layout.size * layout.member_dim
        self._features = None
        if self.amortize and layout.data:
            every = {plate: jnp.arange(layout.size)}
            with handlers.block(), warnings.catch_warnings():
                # the plate's subsample_size differs from its (full) substituted indices
                warnings.simplefilter("ignore", UserWarning)
                model = handlers.substitute(handlers.seed(self.model, 0), data=every)
                trace = handlers.trace(model).get_trace(*args, **kwargs)
            x = layout.pack_members(
                {s.name: trace[s.name]["value"] for s in layout.data}, layout.data
            )
            x = jnp.asarray(x, jnp.result_type(float))
            self._features = (x - x.mean(0)) / (x.std(0) + 1e-6)

    def _coupling(self, params, mask: Array):
        if self.coupling == "spline":
            return SplineCoupling(nets.mlp, params, 1, num_bins=self.num_bins, mask=mask)
        return AffineCoupling(nets.mlp, params, 1, scale="bounded", mask=mask)

    def _net_outputs(self, dim: int) -> int:
        per_channel = 3 * self.num_bins - 1 if self.coupling == "spline" else 2
        return per_channel * dim

    def _widths(self, d: int) -> tuple[int, ...]:
        return self._hidden_dims or (min(MAX_WIDTH, max(32, 2 * d)),) * 2

    def _flow(self, d: int, init_loc: Array) -> GlowTransform:
        """The generative map from white noise to a latent vector of ``d``
        coordinates starting at ``init_loc``: Glow steps (for ``d >= 2``), then the head."""
        if d == 1:
            return self._head(d, init_loc)
        k = self.num_flows
        hidden = self._widths(d)
        dense = d <= DENSE_DIM
        # Adam moves every parameter by about the learning rate per step, all the
        # weights into a unit in the same direction at first, so a layer's output
        # moves by about lr * fan_in: each layer's weights enter multiplied by
        # min(1, WIDTH_SCALE / fan_in) (stored divided by it, so the network at
        # initialisation is unchanged), which keeps one optimiser step's change to
        # each map of the order of the learning rate at any dimension and width.
        mult = _multipliers((d, *hidden))
        if not dense:
            # the K steps' shifts add up coherently as well: without the dense
            # maps the couplings alone move a coordinate, by K times one step's change
            mult[-1] /= k
        masks = jnp.asarray(coupling_masks(d, k))

        def init_net(key):
            layers = nets.mlp_init(key, d, self._net_outputs(d), hidden)
            return _rescaled(layers, mult, inverse=True)

        def init_steps(key):
            steps = {"net": jax.vmap(init_net)(jax.random.split(key, k))}
            if dense:  # dense linear maps only while d x d stays small
                steps.update(
                    lower=jnp.zeros((k, d, d)), upper=jnp.zeros((k, d, d)), log_s=jnp.zeros((k, d))
                )
            return steps

        p = numpyro.param(f"{self.prefix}_glow_steps", init_steps)
        coupling = self._coupling(_rescaled(p["net"], mult), masks)
        if dense:
            # off-diagonals divided by d, for the same reason as the multipliers
            identity = jnp.broadcast_to(jnp.arange(d), (k, d))
            linear = Inv1x1ConvLU(
                identity, p["lower"] / d, p["upper"] / d, p["log_s"], jnp.ones((k, d)), 1
            )
            coupling = Chain([linear, coupling])
        steps = Scan(coupling, unroll=1)
        return Chain([steps, self._head(d, init_loc)])

    def _head(self, d: int, init_loc: Array) -> ArrowAffine:
        """The affine head: full lower-Cholesky on the first ``min(d, DENSE_DIM)``
        coordinates, linear in ``d`` beyond them (:class:`ArrowAffine`)."""
        m = min(d, DENSE_DIM)
        loc = numpyro.param(f"{self.prefix}_loc", init_loc)
        scale_tril = numpyro.param(
            f"{self.prefix}_scale_tril",
            jnp.identity(m) * self._init_scale,
            constraint=constraints.scaled_unit_lower_cholesky,
        )
        n = d - m
        if n == 0:  # AutoMultivariateNormal's head, its parameters only
            empty = jnp.zeros(0)
            return ArrowAffine(loc, scale_tril, jnp.zeros((0, m)), empty, empty)
        # divided by its fan-in m, as the conditioners' weights (see _flow)
        cross = numpyro.param(f"{self.prefix}_cross", jnp.zeros((n, m))) / m
        scale = numpyro.param(
            f"{self.prefix}_scale",
            jnp.full(n, self._init_scale),
            constraint=constraints.softplus_positive,
        )
        # |rho| < 1: over thousands of coordinates a coefficient above 1
        # compounds to overflow (a random walk is the limit rho -> 1)
        rho = numpyro.param(
            f"{self.prefix}_rho", jnp.zeros(n - 1), constraint=constraints.interval(-1.0, 1.0)
        )
        return ArrowAffine(loc, scale_tril, cross, scale, rho)

    # --- the plate's members ---------------------------------------------------------
    def _global_flow(self) -> GlowTransform | None:
        """The globals' flow in plate mode (``None`` when every latent is local)."""
        layout = self._layout
        if layout.global_dim == 0:
            return None
        return self._flow(layout.global_dim, layout.pack_globals(self._init_locs))

    def _member_params(self) -> dict:
        """The member flow's shared networks and every member's location and scale
        (``(G, m)`` each: the only parameters that grow with the plate)."""
        layout = self._layout
        m = layout.member_dim
        c = layout.global_dim + (0 if self._features is None else layout.data_dim) + 2 * m
        hidden = self._widths(c)
        affine_mult = _multipliers((c, *hidden))
        coupling_mult = _multipliers((m + c, *hidden))
        k = 2 * math.ceil(math.log2(m)) if m >= 2 else 0

        def init(key):
            key_a, key_c = jax.random.split(key)
            layers = nets.mlp_init(key_a, c, 2 * m, hidden)
            net = {"affine": _rescaled(layers, affine_mult, inverse=True)}
            if k:
                init_c = lambda key: _rescaled(  # noqa: E731
                    nets.mlp_init(key, m + c, 2 * m, hidden), coupling_mult, inverse=True
                )
                net["couplings"] = jax.vmap(init_c)(jax.random.split(key_c, k))
            return net

        net = numpyro.param(f"{self.prefix}_member_net", init)
        params = {"affine": _rescaled(net["affine"], affine_mult)}
        if k:
            params["couplings"] = _rescaled(net["couplings"], coupling_mult)
        init_loc = layout.pack_members(self._init_locs)
        if layout.subsampled:
            # the prototype saw one minibatch, and most members are seldom in one:
            # each starts at the minibatch's mean, so that the shared network,
            # which moves them all, has no member-by-member noise to undo
            init_loc = jnp.broadcast_to(init_loc.mean(0), (layout.size, layout.member_dim))
        loc = numpyro.param(f"{self.prefix}_member_loc", init_loc)
        scale = numpyro.param(
            f"{self.prefix}_member_scale",
            jnp.full((layout.size, m), self._init_scale),
            constraint=constraints.softplus_positive,
        )
        masks = jnp.asarray(coupling_masks(m, k)) if k else None
        return {"net": params, "loc": loc, "scale": scale, "masks": masks}

    def _plate_flow(self) -> PlateFlow:
        """Without subsampling: the whole latent vector's flow (AutoContinuous's layout)."""
        p = self._member_params()
        g, members = self._layout.flat_indices()
        return PlateFlow(
            self._global_flow(),
            p["net"],
            p["loc"],
            p["scale"],
            self._features,
            p["masks"],
            jnp.asarray(g),
            jnp.asarray(members),
            self._layout.pack_globals(self._init_locs),
        )

    def _get_posterior(self):
        cls = StickTheLanding if self.stick_the_landing else dist.TransformedDistribution
        if self._layout is None:
            return cls(self.get_base_dist(), self._flow(self.latent_dim, self._init_latent))
        if self._layout.subsampled:
            raise ValueError(
                f"AutoGlow: the plate {self._layout.plate!r} is subsampled, so the guide "
                "has no one flow over every latent (get_transform, get_posterior, "
                "NeuTraReparam); draw every member with sample_posterior"
            )
        return cls(self.get_base_dist(), self._plate_flow())

    def __call__(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self._layout is None or not self._layout.subsampled:
            return super().__call__(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        return self._sample_members(plates[self._layout.plate]._indices)

    def _sample_members(self, index: Array) -> dict[str, Array]:
        """The guide on the members ``index`` of the subsampled plate: the globals
        once, the members' latents scaled by ``G / len(index)`` as NumPyro scales
        the model's sites in the plate."""
        layout = self._layout
        flow = self._global_flow()
        if flow is None:
            z_g = jnp.zeros(0)
        else:
            cls = StickTheLanding if self.stick_the_landing else dist.TransformedDistribution
            base = dist.Normal(jnp.zeros(layout.global_dim), 1.0).to_event(1)
            z_g = numpyro.sample(
                f"_{self.prefix}_global_latent", cls(base, flow), infer={"is_auxiliary": True}
            )
        # the members read the globals' values (relative to their initial values):
        # the draw's and the log density's alike, the gradient flowing through z_g
        shifted = z_g - layout.pack_globals(self._init_locs)
        p = self._member_params()
        stats = location_stats(p["loc"])
        features = None if self._features is None else self._features[index]
        live = (p["net"], p["loc"][index], p["scale"][index])
        # STL: the log density holds the parameters constant (the gradient flows
        # through z and z_g only)
        held = jax.tree.map(lax.stop_gradient, live) if self.stick_the_landing else live

        def run(params, x, inverse):
            net, loc, scale = params
            ctx = member_context(shifted, features, loc, scale, stats)
            return member_map(net, ctx, loc, scale, p["masks"], x, inverse)

        def forward(noise):
            return run(live, noise, inverse=False)[0]

        def density(z):
            u, log_det = run(held, z, inverse=True)
            return jnp.sum(dist.Normal(0.0, 1.0).log_prob(u), (-2, -1)) + jnp.sum(log_det, -1)

        scale_factor = layout.size / index.shape[0]
        shape = (index.shape[0], layout.member_dim)
        with handlers.scale(scale=scale_factor):
            z_l = numpyro.sample(
                f"_{self.prefix}_member_latent",
                MemberPosterior(forward, density, shape),
                infer={"is_auxiliary": True},
            )
        values = {**layout.unpack_globals(z_g), **layout.unpack_members(z_l)}
        result = {}
        for s in layout.sites:
            with handlers.scale(scale=1.0 if s.axis is None else scale_factor):
                result[s.name] = self._emit(s.name, values[s.name])
        return result

    def _emit(self, name: str, unconstrained: Array) -> Array:
        """The model's site ``name`` at a value, with the constraint's log-Jacobian
        (as AutoContinuous emits its sites)."""
        site = self.prototype_trace[name]
        transform = biject_to(site["fn"].support)
        value = transform(unconstrained)
        log_density = -transform.log_abs_det_jacobian(unconstrained, value)
        event_dim = site["fn"].event_dim
        log_density = sum_rightmost(
            log_density, jnp.ndim(log_density) - jnp.ndim(value) + event_dim
        )
        return numpyro.sample(name, dist.Delta(value, log_density=log_density, event_dim=event_dim))

    def sample_posterior(self, rng_key, params, *args, sample_shape=(), **kwargs):
        """Draws of every latent site (constrained space). With a subsampled plate,
        every member is drawn, and the plate's name maps to its indices
        ``0, ..., G - 1``, so that ``Predictive(model, posterior_samples=...)``
        runs the model over every member."""
        layout = self._layout
        if layout is None or not layout.subsampled:
            return super().sample_posterior(
                rng_key, params, *args, sample_shape=sample_shape, **kwargs
            )
        every = jnp.arange(layout.size)

        def draw(key):
            guide = handlers.substitute(handlers.seed(self._sample_members, key), data=params)
            return {
                name: v["value"]
                for name, v in handlers.trace(guide).get_trace(every).items()
                if name in self._init_locs
            }

        n = math.prod(sample_shape)
        out = jax.vmap(draw)(jax.random.split(rng_key, n))
        out = {k: v.reshape(tuple(sample_shape) + v.shape[1:]) for k, v in out.items()}
        out[layout.plate] = jnp.broadcast_to(every, (*sample_shape, layout.size))
        return out

    def get_base_dist(self):
        return dist.Normal(jnp.zeros(self.latent_dim), 1.0).to_event(1)

    def _draws(self, params, key=None):
        key = jax.random.PRNGKey(0) if key is None else key
        return self.sample_posterior(key, params, sample_shape=(self._num_quantile_samples,))

    def median(self, params):
        """Monte Carlo per-site medians of the guide (constrained space)."""
        return {name: jnp.median(v, axis=0) for name, v in self._draws(params).items()}

    def quantiles(self, params, quantiles):
        """Monte Carlo per-site quantiles of the guide (constrained space); the
        quantile axis comes first, as in NumPyro's guides."""
        q = jnp.asarray(quantiles)
        return {name: jnp.quantile(v, q, axis=0) for name, v in self._draws(params).items()}
