"""AutoGlow: an ``AutoContinuous`` guide built from Glow steps for vectors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import Array
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer.autoguide import AutoContinuous
from numpyro.infer.initialization import init_to_uniform

from . import nets
from .distribution import StickTheLanding
from .transforms import AffineCoupling, ArrowAffine, Chain, Inv1x1ConvLU, Scan, SplineCoupling

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

    Everything :class:`~numpyro.infer.autoguide.AutoContinuous` offers works:
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
        super()._setup_prototype(*args, **kwargs)
        if self.latent_dim == 1:
            raise ValueError(
                "AutoGlow: the latent dimension is 1, too small to couple; "
                "use AutoNormal or AutoDiagonalNormal"
            )

    def _coupling(self, params, mask: Array):
        if self.coupling == "spline":
            return SplineCoupling(nets.mlp, params, 1, num_bins=self.num_bins, mask=mask)
        return AffineCoupling(nets.mlp, params, 1, scale="bounded", mask=mask)

    def _net_outputs(self, dim: int) -> int:
        per_channel = 3 * self.num_bins - 1 if self.coupling == "spline" else 2
        return per_channel * dim

    def _widths(self) -> tuple[int, ...]:
        d = self.latent_dim
        return self._hidden_dims or (min(MAX_WIDTH, max(32, 2 * d)),) * 2

    def _flow(self) -> Chain:
        """The generative map from white noise to the latent vector."""
        d, k = self.latent_dim, self.num_flows
        hidden = self._widths()
        dense = d <= DENSE_DIM
        fan_in = (d, *hidden)
        # Adam moves every parameter by about the learning rate per step, all the
        # weights into a unit in the same direction at first, so a layer's output
        # moves by about lr * fan_in: each layer's weights enter multiplied by
        # min(1, WIDTH_SCALE / fan_in) (stored divided by it, so the network at
        # initialisation is unchanged), which keeps one optimiser step's change to
        # each map of the order of the learning rate at any dimension and width.
        mult = [min(1.0, WIDTH_SCALE / n) for n in fan_in]
        if not dense:
            # the K steps' shifts add up coherently as well: without the dense
            # maps the couplings alone move a coordinate, by K times one step's change
            mult[-1] /= k
        masks = jnp.asarray(coupling_masks(d, k))

        def init_net(key):
            layers = nets.mlp_init(key, d, self._net_outputs(d), hidden)
            return [{**lay, "w": lay["w"] / c} for lay, c in zip(layers, mult, strict=True)]

        def init_steps(key):
            steps = {"net": jax.vmap(init_net)(jax.random.split(key, k))}
            if dense:  # dense linear maps only while d x d stays small
                steps.update(
                    lower=jnp.zeros((k, d, d)), upper=jnp.zeros((k, d, d)), log_s=jnp.zeros((k, d))
                )
            return steps

        p = numpyro.param(f"{self.prefix}_glow_steps", init_steps)
        net = [{**lay, "w": lay["w"] * c} for lay, c in zip(p["net"], mult, strict=True)]
        coupling = self._coupling(net, masks)
        if dense:
            # off-diagonals divided by d, for the same reason as the multipliers
            identity = jnp.broadcast_to(jnp.arange(d), (k, d))
            linear = Inv1x1ConvLU(
                identity, p["lower"] / d, p["upper"] / d, p["log_s"], jnp.ones((k, d)), 1
            )
            coupling = Chain([linear, coupling])
        steps = Scan(coupling, unroll=1)
        return Chain([steps, self._head()])

    def _head(self) -> ArrowAffine:
        """The affine head: full lower-Cholesky on the first ``min(d, DENSE_DIM)``
        coordinates, linear in ``d`` beyond them (:class:`ArrowAffine`)."""
        d = self.latent_dim
        m = min(d, DENSE_DIM)
        loc = numpyro.param(f"{self.prefix}_loc", self._init_latent)
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

    def _get_posterior(self):
        cls = StickTheLanding if self.stick_the_landing else dist.TransformedDistribution
        return cls(self.get_base_dist(), self._flow())

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
