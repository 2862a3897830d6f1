"""Rational-quadratic spline coupling (Durkan et al. 2019, "Neural Spline Flows")."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from .coupling import Net, _Coupling

__all__ = ["SplineCoupling"]

#: Smallest bin width and height, as a fraction of the interval's length ``2B``.
MIN_BIN_SIZE = 1e-3
#: Smallest interior knot derivative (a power of two, so that ``1 - m + m == 1``
#: exactly and a zero network output gives derivatives of exactly one).
MIN_DERIVATIVE = 2.0**-10


def _positive(raw: Array) -> Array:
    """``elu(raw) + 1``: positive, increasing, C1, and exactly 1 at ``raw = 0``
    (``1 + raw`` there, not ``exp(0)``, which a vectorised ``exp`` need not
    round to one)."""
    return jnp.where(raw >= 0, 1.0 + raw, jnp.exp(jnp.minimum(raw, 0.0)))


def _unit(t: Array) -> Array:
    """Clamp to ``[0, 1]`` (rounding may step just outside) with the derivative of
    the identity at the ends, where ``jnp.clip`` would halve it."""
    return jnp.where(t < 0, 0.0, jnp.where(t > 1, 1.0, t))


def _derivative(raw: Array) -> Array:
    """Knot derivative from its raw parameter: ``m_d + (1 - m_d) (elu(raw) + 1)``,
    exactly one at ``raw = 0``."""
    return MIN_DERIVATIVE + (1.0 - MIN_DERIVATIVE) * _positive(raw)


def _spline_bins(raw: Array, num_bins: int, bound: float) -> tuple[Array, Array]:
    """Knots and raw knot derivatives of ``M`` splines from their raw parameters
    ``raw`` ``(3K - 1, M)``.

    Returns ``knots`` ``(2, K + 1, M)``, the x-knots and the y-knots from
    ``-bound`` to ``bound`` (bin ``k`` is ``2 bound (m + (1 - K m) softmax(r)_k)``
    wide), and ``raw_d`` ``(K + 1, M)``, the raw knot derivatives with 0 at both
    ends (derivative one there, :func:`_derivative`). Widths and heights go
    through the same operations on one array, so equal raw widths and heights
    give bitwise equal x- and y-knots. Bins are on a major axis and the ``M``
    splines on the minor one, so every per-bin array is contiguous over the
    splines.
    """
    k = num_bins
    sizes = raw[: 2 * k].reshape(2, k, -1)
    e = jnp.exp(sizes - jax.lax.stop_gradient(sizes.max(axis=1, keepdims=True)))
    scale = (2.0 * bound * (1.0 - k * MIN_BIN_SIZE)) / e.sum(axis=1, keepdims=True)
    sizes = 2.0 * bound * MIN_BIN_SIZE + e * scale
    # The running sum as K - 1 additions: jnp.cumsum lowers to a reduce_window,
    # which XLA:CPU runs and differentiates slowly.
    knots = [jnp.full_like(sizes[:, 0], -bound)]
    for j in range(k - 1):
        knots.append(knots[-1] + sizes[:, j])
    knots = jnp.stack([*knots, jnp.full_like(knots[0], bound)], axis=1)
    zero = jnp.zeros_like(raw[:1])
    return knots, jnp.concatenate([zero, raw[2 * k :], zero], axis=0)


def _log_slope(xi: Array, one_m: Array, log_s: Array, a0: Array, a1: Array) -> Array:
    r"""``log dy/dx`` inside a bin, at ``xi`` (and ``one_m = 1 - xi``) in it
    (notation of :class:`SplineCoupling`).

    :math:`P = 1 + u` with :math:`u = (a_1 - 1)\xi^2 + (a_0 - 1)(1 - \xi)^2` is exact
    (zero) at the identity; where :math:`u \le -1/2` it would lose digits to
    cancellation, and the sum of positive terms
    :math:`a_1\xi^2 + 2\xi(1-\xi) + a_0(1-\xi)^2` is used instead. Each branch is
    finite everywhere, so neither leaks a NaN gradient through the ``where``.
    """
    u = (a1 - 1.0) * xi**2 + (a0 - 1.0) * one_m**2
    small = u > -0.5
    log_p = jnp.where(
        small,
        jnp.log1p(jnp.where(small, u, 0.0)),
        jnp.log(a1 * xi**2 + 2.0 * xi * one_m + a0 * one_m**2),
    )
    return log_s + log_p - 2.0 * jnp.log1p((a0 + a1 - 2.0) * xi * one_m)


def _solve(eta: Array, a0: Array, a1: Array) -> Array:
    """The root ``xi`` in ``[0, 1]`` of ``theta(xi) = eta`` (the inverse within a
    bin), in the form without cancellation for either sign of ``b``."""
    delta = a0 + a1 - 2.0
    a = (1.0 - a0) + eta * delta
    b = a0 - eta * delta
    root = jnp.sqrt(jnp.maximum(b * b + 4.0 * a * eta, 0.0))
    pos = b >= 0  # otherwise a > 1
    xi = jnp.where(
        pos,
        2.0 * eta / jnp.where(pos, b + root, 1.0),
        (root - b) / jnp.where(pos, 1.0, 2.0 * a),
    )
    return _unit(xi)


@jax.custom_jvp
def _bin_map(v, start_in, start_out, size_in, size_out, frac_in, frac_out):
    """``start_out + size_out * frac_out``, the point of the output bin at
    ``frac_out``, given that ``v = start_in + size_in * frac_in``.

    The value is computed as
    ``v + (start_out - start_in) + (size_out * frac_out - size_in * frac_in)``, which
    the identity parameters (equal bins, ``frac_out = frac_in``) turn into ``v``
    bitwise. Its derivatives are those of ``start_out + size_out * frac_out``:
    differentiating the first form would compute a small slope as ``1 + (s - 1)``
    and lose its relative precision.
    """
    return v + (start_out - start_in) + (size_out * frac_out - size_in * frac_in)


@_bin_map.defjvp
def _bin_map_jvp(primals, tangents):
    _, _, start_out, _, size_out, _, frac_out = primals
    _, _, start_dot, _, size_dot, _, frac_dot = tangents
    return _bin_map(*primals), start_dot + size_dot * frac_out + size_out * frac_dot


def _rq_spline(
    v: Array, knots: Array, raw_d: Array, bound: float, inverse: bool
) -> tuple[Array, Array]:
    """The splines (or their inverses) on ``v`` ``(M,)``, one each, with the
    elementwise log-derivative; identity with log-derivative zero outside
    ``[-bound, bound]``. ``knots`` and ``raw_d`` as :func:`_spline_bins` returns."""
    num_bins = raw_d.shape[0] - 1
    inside = (v >= -bound) & (v <= bound)
    # Double where: the spline runs on 0 (inside) wherever v is in a tail, so the
    # branch the output discards never produces an inf or NaN gradient.
    v_in = jnp.where(inside, v, 0.0)
    # Bin search on the knots of v's side: the number of interior knots <= v.
    idx = jnp.sum(v_in >= knots[int(inverse), 1:-1], axis=0)
    onehot = idx == jnp.arange(num_bins)[:, None]  # (K, M)
    table = jnp.stack([knots[0, :-1], knots[0, 1:], knots[1, :-1], knots[1, 1:]])
    table = jnp.concatenate([table, jnp.stack([raw_d[:-1], raw_d[1:]])])  # (6, K, M)
    picked = jnp.sum(jnp.where(onehot, table, 0.0), axis=1)
    x_k, x_k1, y_k, y_k1 = picked[0], picked[1], picked[2], picked[3]
    d0, d1 = _derivative(picked[4]), _derivative(picked[5])
    w, h = x_k1 - x_k, y_k1 - y_k
    log_s = jnp.log(h) - jnp.log(w)
    s = h / w
    a0, a1 = d0 / s, d1 / s
    if inverse:
        # eta and 1 - eta each from its own end of the bin, and xi and 1 - xi
        # each from its own root (the mirrored spline), so neither loses digits.
        eta, eta_m = _unit((v_in - y_k) / h), _unit((y_k1 - v_in) / h)
        xi, one_m = _solve(eta, a0, a1), _solve(eta_m, a1, a0)
        out = _bin_map(v_in, y_k, x_k, h, w, eta, xi)
        log_det = -_log_slope(xi, one_m, log_s, a0, a1)
    else:
        xi, one_m = _unit((v_in - x_k) / w), _unit((x_k1 - v_in) / w)
        theta = xi * (1.0 + (a0 - 1.0) * one_m) / (1.0 + (a0 + a1 - 2.0) * xi * one_m)
        out = _bin_map(v_in, x_k, y_k, w, h, xi, theta)
        log_det = _log_slope(xi, one_m, log_s, a0, a1)
    return jnp.where(inside, out, v), jnp.where(inside, log_det, 0.0)


@functools.partial(jax.jit, static_argnames=("num_bins", "bound", "inverse"))
def _spline(
    x_b: Array, h: Array, num_bins: int, bound: float, inverse: bool
) -> tuple[Array, Array]:
    """``(y_b, log_det)`` elementwise from ``x_b`` ``(..., C_b)`` and the raw
    parameters ``h`` ``(..., (3K - 1) C_b)``. Jitted as one unit, so that eager
    calls (and eager autodiff) dispatch one compiled program instead of each of
    its many small operations; under an outer ``jit`` it is inlined."""
    # Flat, parameter-major layout: every per-bin array is contiguous over all
    # the elements, which XLA vectorises (a short minor axis C_b would not be).
    k3, c_b = 3 * num_bins - 1, x_b.shape[-1]
    raw = jnp.moveaxis(h.reshape(h.shape[:-1] + (k3, c_b)), -2, 0).reshape(k3, -1)
    knots, raw_d = _spline_bins(raw, num_bins, bound)
    y, log_det = _rq_spline(x_b.reshape(-1), knots, raw_d, bound, inverse)
    return y.reshape(x_b.shape), log_det.reshape(x_b.shape)


class SplineCoupling(_Coupling):
    r"""Rational-quadratic spline coupling layer (Durkan et al. 2019, "Neural
    Spline Flows"; the spline of Gregory & Delbourgo 1982).

    The channels split as in :class:`AffineCoupling`: :math:`y_a = x_a`, the first
    :math:`\lfloor C/2 \rfloor` channels, condition the rest, :math:`x_b`, each
    element of which goes through its own monotone spline on :math:`[-B, B]`
    (``bound``) with :math:`K` bins (``num_bins``), and through the identity
    outside it.

    **Parameters of the splines.** :math:`h = \mathrm{net}(\mathrm{params}, x_a)`
    has :math:`(3K - 1) C_b` channels, parameter-major like
    :class:`AffineCoupling`'s: read as :math:`(3K - 1, C_b)`, block :math:`p`
    (channels :math:`p C_b` to :math:`(p + 1) C_b - 1`) holds raw parameter
    :math:`p` of every channel of :math:`x_b`: :math:`p = 0..K-1` the raw widths
    :math:`r^w`, :math:`p = K..2K-1` the raw heights :math:`r^h`,
    :math:`p = 2K..3K-2` the raw interior derivatives :math:`r^d` (leading
    axes of :math:`h` broadcast against :math:`x_b`'s). With
    :math:`m = 10^{-3}` and :math:`m_d = 2^{-10}`,

    .. math::

        w_k = 2B\big(m + (1 - Km)\,\mathrm{softmax}(r^w)_k\big), \quad
        h_k = 2B\big(m + (1 - Km)\,\mathrm{softmax}(r^h)_k\big), \quad
        d_k = m_d + (1 - m_d)\,\big(\mathrm{elu}(r^d_k) + 1\big),

    the knots :math:`x_0 = y_0 = -B`, :math:`x_{k+1} = x_k + w_k`,
    :math:`y_{k+1} = y_k + h_k` (:math:`x_K = y_K = B`), and the end derivatives
    :math:`d_0 = d_K = 1`, so the spline joins the identity tails with a
    continuous derivative. A zero :math:`h` (the default networks' zero last
    layer) gives equal bins and unit derivatives: the layer is then exactly the
    identity, with log-determinant exactly zero.

    **Forward.** For :math:`x` in bin :math:`k`, :math:`x_k \le x \le x_{k+1}`, with
    :math:`\xi = (x - x_k)/w_k`, :math:`s_k = h_k/w_k`,
    :math:`a_0 = d_k/s_k`, :math:`a_1 = d_{k+1}/s_k`,
    :math:`\delta = a_0 + a_1 - 2`:

    .. math::

        y = y_k + h_k\,\frac{\xi\,\big(1 + (a_0 - 1)(1 - \xi)\big)}{1 + \delta\,\xi(1-\xi)}
          = y_k + h_k\,\frac{s_k\xi^2 + d_k\,\xi(1-\xi)}{s_k + (d_k + d_{k+1} - 2s_k)\,\xi(1-\xi)},

    computed as :math:`x + (y_k - x_k) + (h_k\theta - w_k\xi)` (:math:`\theta` the
    fraction above) so that the identity parameters reproduce :math:`x` bitwise;
    :math:`y = x` outside :math:`[-B, B]`.

    **Log-determinant.** Elementwise, summed over the event:

    .. math::

        \log\frac{dy}{dx} = \log s_k
            + \log\big(a_1\xi^2 + 2\xi(1-\xi) + a_0(1-\xi)^2\big)
            - 2\log\big(1 + \delta\,\xi(1-\xi)\big)

    inside (the derivative is positive, so the spline is monotone), and zero in
    the tails.

    **Inverse.** The bin is found on the y-knots; with
    :math:`\eta = (y - y_k)/h_k`, :math:`\xi` is the root in :math:`[0, 1]` of
    :math:`a\xi^2 + b\xi - \eta = 0`, :math:`a = 1 - a_0 + \eta\delta`,
    :math:`b = a_0 - \eta\delta`, taken in the form without cancellation:

    .. math::

        \xi = \frac{2\eta}{b + \sqrt{b^2 + 4a\eta}} \ (b \ge 0), \qquad
        \xi = \frac{\sqrt{b^2 + 4a\eta} - b}{2a} \ (b < 0,\ \text{then } a > 1),

    :math:`x = x_k + w_k\xi`, and the log-determinant is minus the forward one at
    :math:`\xi`. Both directions share the bin parameters, the bin search and the
    log-derivative code.

    The tails are selected with a "double where": the spline is evaluated at a
    point inside the interval wherever the input is in a tail, so no infinite or
    NaN gradient leaks from the discarded branch, also far outside
    :math:`[-B, B]`. The output's value is computed as above (exact at the
    identity), its derivatives as those of the textbook form
    :math:`y_k + h_k\theta` (a custom JVP): differentiating
    :math:`x + \dots - w_k\xi` would compute a small slope as
    :math:`1 + (\text{slope} - 1)` and lose its relative precision; the
    inverse likewise. ``net`` is static data and ``params`` a pytree, as in
    :class:`AffineCoupling`; :math:`B` and :math:`K` are static.

    **Defaults.** ``bound=4``: inputs of a coupling are roughly standardised
    (ActNorm before it in a Glow step; a guide's latent at the scale of a
    standard normal), so :math:`[-4, 4]` holds all but :math:`6\cdot 10^{-5}`
    of a standard normal's mass, and pixels after :class:`Logitify` with
    ``alpha=0.05`` lie within :math:`\pm 3.7`; outside it the layer is the
    identity and cannot help, while a wider interval spends the bins where
    there is little mass. ``num_bins=8``: more bins are more flexible per step
    and widen the conditioner's output layer in proportion.
    """

    def __init__(
        self,
        net: Net,
        params: Any,
        event_dim: int = 3,
        num_bins: int = 8,
        bound: float = 4.0,
        mask: Array | None = None,
    ):
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"SplineCoupling: expected an integer num_bins >= 2, got {num_bins!r}")
        if num_bins * MIN_BIN_SIZE >= 1.0:
            raise ValueError(
                f"SplineCoupling: expected num_bins < {round(1 / MIN_BIN_SIZE)} (each bin is at "
                f"least {MIN_BIN_SIZE} of the interval), got {num_bins}"
            )
        try:
            bound_value = float(bound)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"SplineCoupling: expected a positive finite number for bound, got {bound!r}"
            ) from err
        if not (math.isfinite(bound_value) and bound_value > 0):
            raise ValueError(
                f"SplineCoupling: expected a positive finite number for bound, got {bound!r}"
            )
        super().__init__(net, params, event_dim, mask)
        self.num_bins = num_bins
        self.bound = bound_value

    @property
    def _h_layout(self) -> str:  # type: ignore[override]
        return f"(3 * num_bins - 1) * C_b, num_bins={self.num_bins}"

    def _h_channels(self, c_b: int) -> int:
        return c_b * (3 * self.num_bins - 1)

    def _transform_b(self, x_b: Array, h: Array, inverse: bool) -> tuple[Array, Array]:
        # a net may return fewer batch axes than x_b has (the same spline for all)
        h = jnp.broadcast_to(h, x_b.shape[:-1] + h.shape[-1:])
        return _spline(x_b, h, self.num_bins, self.bound, inverse)

    def _aux(self) -> dict:
        return {**super()._aux(), "num_bins": self.num_bins, "bound": self.bound}

    def __repr__(self) -> str:
        net = getattr(self.net, "__name__", self.net)
        return (
            f"SplineCoupling(net={net}, event_dim={self.event_dim}, "
            f"num_bins={self.num_bins}, bound={self.bound})"
        )
