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


def _spline_bins(h: Array, num_bins: int, bound: float) -> tuple[Array, Array]:
    """Knots and knot derivatives from the raw parameters ``h`` ``(..., 3K - 1)``.

    Returns ``knots`` ``(..., 2, K + 1)`` (row 0 the x-knots, row 1 the y-knots,
    from ``-bound`` to ``bound``) and ``derivatives`` ``(..., K + 1)`` (one at both
    ends). Widths and heights go through one softmax on one array, so a zero
    ``h`` gives bitwise equal x- and y-knots.
    """
    k = num_bins
    raw = h[..., : 2 * k].reshape(h.shape[:-1] + (2, k))
    frac = MIN_BIN_SIZE + (1.0 - k * MIN_BIN_SIZE) * jax.nn.softmax(raw, axis=-1)
    inner = 2.0 * bound * jnp.cumsum(frac[..., :-1], axis=-1) - bound
    ends = jnp.ones(inner.shape[:-1] + (1,), inner.dtype) * bound
    knots = jnp.concatenate([-ends, inner, ends], axis=-1)
    interior = MIN_DERIVATIVE + (1.0 - MIN_DERIVATIVE) * _positive(h[..., 2 * k :])
    one = jnp.ones(interior.shape[:-1] + (1,), interior.dtype)
    return knots, jnp.concatenate([one, interior, one], axis=-1)


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
    v: Array, knots: Array, derivatives: Array, bound: float, inverse: bool
) -> tuple[Array, Array]:
    """The spline (or its inverse) elementwise on ``v``, with the elementwise
    log-derivative; identity with log-derivative zero outside ``[-bound, bound]``."""
    num_bins = derivatives.shape[-1] - 1
    inside = (v >= -bound) & (v <= bound)
    # Double where: the spline runs on 0 (inside) wherever v is in a tail, so the
    # branch the output discards never produces an inf or NaN gradient.
    v_in = jnp.where(inside, v, 0.0)
    # Bin search on the knots of v's side: the number of interior knots <= v.
    side = int(inverse)
    idx = jnp.sum(v_in[..., None] >= knots[..., side, 1:-1], axis=-1)
    onehot = idx[..., None] == jnp.arange(num_bins)
    table = jnp.concatenate(
        [
            knots[..., :-1],  # x_k, y_k
            knots[..., 1:],  # x_{k+1}, y_{k+1}
            derivatives[..., None, :-1],  # d_k
            derivatives[..., None, 1:],  # d_{k+1}
        ],
        axis=-2,
    )
    picked = jnp.sum(jnp.where(onehot[..., None, :], table, 0.0), axis=-1)
    x_k, y_k, x_k1, y_k1, d0, d1 = (picked[..., i] for i in range(6))
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
    parameters ``h`` ``(..., C_b (3K - 1))``. Jitted as one unit, so that eager
    calls (and eager autodiff) dispatch one compiled program instead of each of
    its many small operations; under an outer ``jit`` it is inlined."""
    h = h.reshape(h.shape[:-1] + (x_b.shape[-1], 3 * num_bins - 1))
    knots, derivatives = _spline_bins(h, num_bins, bound)
    return _rq_spline(x_b, knots, derivatives, bound, inverse)


class SplineCoupling(_Coupling):
    r"""Rational-quadratic spline coupling layer (Durkan et al. 2019, "Neural
    Spline Flows"; the spline of Gregory & Delbourgo 1982).

    The channels split as in :class:`AffineCoupling`: :math:`y_a = x_a`, the first
    :math:`\lfloor C/2 \rfloor` channels, condition the rest, :math:`x_b`, each
    element of which goes through its own monotone spline on :math:`[-B, B]`
    (``bound``) with :math:`K` bins (``num_bins``), and through the identity
    outside it.

    **Parameters of the splines.** :math:`h = \mathrm{net}(\mathrm{params}, x_a)`
    has :math:`C_b (3K - 1)` channels, read as :math:`(C_b, 3K - 1)`: for channel
    :math:`j` of :math:`x_b`, the block :math:`h_{[j(3K-1):(j+1)(3K-1)]}` holds
    :math:`K` raw widths :math:`r^w`, then :math:`K` raw heights :math:`r^h`, then
    :math:`K - 1` raw interior derivatives :math:`r^d`. With
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
    :math:`[-B, B]`. ``net`` is static data and ``params`` a pytree, as in
    :class:`AffineCoupling`; :math:`B` and :math:`K` are static.
    """

    def __init__(
        self,
        net: Net,
        params: Any,
        event_dim: int = 3,
        num_bins: int = 8,
        bound: float = 4.0,
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
        super().__init__(net, params, event_dim)
        self.num_bins = num_bins
        self.bound = bound_value

    @property
    def _h_layout(self) -> str:  # type: ignore[override]
        return f"C_b * (3 * num_bins - 1), num_bins={self.num_bins}"

    def _h_channels(self, c_b: int) -> int:
        return c_b * (3 * self.num_bins - 1)

    def _transform_b(self, x_b: Array, h: Array, inverse: bool) -> tuple[Array, Array]:
        return _spline(x_b, h, self.num_bins, self.bound, inverse)

    def _aux(self) -> dict:
        return {**super()._aux(), "num_bins": self.num_bins, "bound": self.bound}

    def __repr__(self) -> str:
        net = getattr(self.net, "__name__", self.net)
        return (
            f"SplineCoupling(net={net}, event_dim={self.event_dim}, "
            f"num_bins={self.num_bins}, bound={self.bound})"
        )
