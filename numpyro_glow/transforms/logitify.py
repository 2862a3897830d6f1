"""Logitify: pixels in [0, 1] to the reals, accurate in float32 up to the ends."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.nn import sigmoid, softplus
from numpyro.distributions import constraints

from .base import GlowTransform

__all__ = ["Logitify"]


class Logitify(GlowTransform):
    r"""Elementwise map from the unit interval to the reals (event_dim 0).

    Forward (normalizing), with :math:`a = \alpha/2 + (1-\alpha)x` and
    :math:`b = 1 - a = \alpha/2 + (1-\alpha)(1-x)`:

    .. math::

        y = \operatorname{logit}(a) = \log a - \log b, \qquad
        \log\left|\frac{dy}{dx}\right| = \log(1-\alpha) - \log a - \log b
        = \log(1-\alpha) + \operatorname{softplus}(y) + \operatorname{softplus}(-y).

    Inverse (generative):

    .. math::

        x = \frac{\sigma(y) - \alpha/2}{1-\alpha}, \qquad
        \log\left|\frac{dx}{dy}\right| = -\log(1-\alpha)
        - \operatorname{softplus}(y) - \operatorname{softplus}(-y).

    **Numerics.** The naive form :math:`-\log z_2 - \log(1 - z_2)` rounds
    :math:`z_2 = a` first, so :math:`1 - z_2` loses its digits near
    :math:`x = 1` (for :math:`\alpha = 0` it is exactly 0 at the top pixel).
    Here ``b`` is computed from ``1 - x``, which is exact in floating point for
    :math:`x \ge 1/2`, and ``a`` from ``x``, which is exact for :math:`x < 1/2`;
    so both factors keep full relative precision.
    The value is computed as :math:`y = \pm\operatorname{log1p}(|a-b|/\min(a,b))`
    with :math:`a - b = (1-\alpha)(2x-1)`, so it keeps its relative precision
    also near :math:`x = 1/2`, where :math:`y` crosses 0. The inverse below
    :math:`y = 0` uses
    :math:`x = \frac{\alpha}{2(1-\alpha)}\,\operatorname{expm1}(y - y_0)\,\sigma(-y)`
    with :math:`y_0 = \operatorname{logit}(\alpha/2)` held as a float64 constant
    split into two float32 parts, so :math:`\sigma(y) - \alpha/2` never
    cancels. See the Numerics page of the docs for measurements.

    The inverse maps the reals onto the open interval
    :math:`(-\tfrac{\alpha}{2(1-\alpha)}, 1 + \tfrac{\alpha}{2(1-\alpha)})`, the
    transform's ``domain``, which contains [0, 1].

    :param alpha: squeezes [0, 1] into :math:`[\alpha/2, 1 - \alpha/2]` before the
        logit, ``0 <= alpha < 1``. A static Python float.
    """

    event_dim = 0
    codomain = constraints.real

    def __init__(self, alpha: float = 0.05):
        alpha = float(alpha)
        if not 0.0 <= alpha < 1.0 or math.isnan(alpha):
            raise ValueError(f"Logitify: expected 0 <= alpha < 1, got alpha={alpha}")
        self.alpha = alpha

    @property
    def domain(self) -> constraints.Constraint:
        """The interval the logit maps onto the reals: [0, 1] widened by
        :math:`\alpha / (2(1-\alpha))` on each side. Data lie in [0, 1]; samples of a
        flow ending in Logitify fall anywhere in this interval (clip them for
        display)."""
        pad = self.alpha / (2.0 * (1.0 - self.alpha))
        return constraints.interval(-pad, 1.0 + pad)

    # float64 constants, computed once in Python.
    @property
    def _log1m_alpha(self) -> float:
        return math.log1p(-self.alpha)

    def _y0_parts(self, dtype) -> tuple[Array, Array]:
        """logit(alpha/2) as a float32 (hi, lo) pair: hi + lo is exact to ~1e-14."""
        half = self.alpha / 2.0
        y0 = math.log(half) - math.log1p(-half) if half > 0 else -math.inf
        hi = np.asarray(y0, dtype)
        lo = np.asarray(y0 - float(hi) if half > 0 else 0.0, dtype)
        return hi, lo

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        x = _as_float(x)
        half = self.alpha / 2.0
        c = 1.0 - self.alpha
        upper = x >= 0.5
        # The smaller of x and 1 - x, exact in floating point on each side.
        m = jnp.where(upper, 1.0 - x, x)
        small = half + c * m  # min(a, b), full relative precision
        large = half + c * (1.0 - m)  # max(a, b), >= 1/2: absolute precision suffices
        d = 2.0 * x - 1.0  # exact for x >= 1/4
        t = c * jnp.where(upper, d, -d)  # |a - b|, differentiable at x = 1/2
        y = jnp.where(upper, 1.0, -1.0) * jnp.log1p(t / small)
        log_det = self._log1m_alpha - jnp.log(small) - jnp.log(large)
        return y, log_det

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        y = _as_float(y)
        half = self.alpha / 2.0
        c = 1.0 - self.alpha
        # Where sigma(y) >= alpha (y > logit(alpha)), (sigma(y) - alpha/2) loses at most
        # one bit. Below, sigma(y) - sigma(y0) = (alpha/2) expm1(y - y0) sigma(-y),
        # with y0 = logit(alpha/2) as an exact (hi, lo) pair: no cancellation.
        x_direct = (sigmoid(y) - half) / c
        if half > 0:
            hi, lo = self._y0_parts(y.dtype)
            switch = math.log(self.alpha) - math.log1p(-self.alpha)
            y_low = jnp.minimum(y, switch)  # keeps the unused branch finite for grads
            x_low = (half / c) * jnp.expm1((y_low - hi) - lo) * sigmoid(-y_low)
            x = jnp.where(y > switch, x_direct, x_low)
        else:
            x = x_direct
        log_det = -self._log1m_alpha - softplus(y) - softplus(-y)
        return x, log_det

    def tree_flatten(self):
        return (), ((), {"alpha": self.alpha})

    def __repr__(self) -> str:
        return f"Logitify(alpha={self.alpha})"


def _as_float(a: Array) -> Array:
    a = jnp.asarray(a)
    return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(jnp.result_type(float))
