r"""An affine map with a dense leading block and a linear recurrence for the rest,
whose parameters, cost and log-determinant grow linearly in the dimension."""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array, lax
from jax.scipy.linalg import solve_triangular

from .base import GlowTransform, check_event

__all__ = ["ArrowAffine"]


def _recurrence(rho: Array, e: Array) -> Array:
    """``u_i = rho_i u_{i-1} + e_i`` with ``u_{-1} = 0``, along the last axis, by an
    associative scan (depth ``log d``; no Python or ``lax.scan`` loop over ``d``)."""

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, a_r * b_l + b_r

    if e.shape[-1] == 0:
        return e
    rho = jnp.broadcast_to(rho, e.shape)
    return lax.associative_scan(combine, (rho, e), axis=e.ndim - 1)[1]


class ArrowAffine(GlowTransform):
    r"""An invertible affine map of vectors, :math:`y = \mu + A x`, whose matrix
    has a dense lower-triangular leading block, an "arrow" from the leading
    coordinates to all others, and a lower-bidiagonal-inverse (first-order
    autoregressive) part for the rest. With :math:`x = (x_g, x_l)`, the first
    :math:`m` coordinates and the other :math:`n = d - m`:

    .. math::

        y_g &= \mu_g + L x_g, \\
        u_0 &= s_0 x_{l,0}, \quad u_i = \rho_i u_{i-1} + s_i x_{l,i} \;(i \ge 1), \qquad
        y_l = \mu_l + u + C x_g, \\
        \log|\det J| &= \textstyle\sum_j \log L_{jj} + \sum_i \log s_i ;

    and the inverse:

    .. math::

        x_g = L^{-1}(y_g - \mu_g), \quad u = y_l - \mu_l - C x_g, \quad
        x_{l,i} = (u_i - \rho_i u_{i-1}) / s_i .

    :math:`L` (``m x m``, positive diagonal) lets the leading coordinates (a
    model's global sites, which NumPyro lists first) be fully correlated;
    :math:`C` (``n x m``) correlates every other coordinate with them; the
    recurrence represents a Markov chain in the coordinates' order (a random walk
    is :math:`\rho = 1`). Parameters and cost are :math:`O(d\,m)`; the forward
    recurrence runs as an associative scan, the inverse is elementwise. With
    :math:`m = d` this is a full lower-Cholesky affine map
    (``LowerCholeskyAffine``). Only the ``event_dim=1`` (vector) form exists.
    """

    event_dim = 1

    def __init__(self, loc: Array, scale_tril: Array, cross: Array, scale: Array, rho: Array):
        self.loc = loc
        self.scale_tril = scale_tril
        self.cross = cross
        self.scale = scale
        self.rho = rho

    @property
    def lead(self) -> int:
        return self.scale_tril.shape[-1]

    def _coefficients(self) -> Array:
        """``(0, rho_1, ..., rho_{n-1})``: the first coordinate has no predecessor."""
        n = self.scale.shape[-1]
        return jnp.concatenate([jnp.zeros(1, self.rho.dtype), self.rho])[:n]

    def _check(self, x: Array) -> None:
        check_event("ArrowAffine", x, 1, self.loc.shape[-1])

    def _log_det(self, x: Array) -> Array:
        ld = jnp.sum(jnp.log(jnp.diagonal(self.scale_tril))) + jnp.sum(jnp.log(self.scale))
        return jnp.broadcast_to(ld, x.shape[:-1])

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        self._check(x)
        m = self.lead
        x_g, x_l = x[..., :m], x[..., m:]
        y_g = self.loc[:m] + x_g @ self.scale_tril.T
        u = _recurrence(self._coefficients(), self.scale * x_l)
        y_l = self.loc[m:] + u + x_g @ self.cross.T
        return jnp.concatenate([y_g, y_l], axis=-1), self._log_det(x)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        self._check(y)
        m = self.lead
        y_g, y_l = y[..., :m], y[..., m:]
        r = (y_g - self.loc[:m]).reshape(-1, m)
        x_g = solve_triangular(self.scale_tril, r.T, lower=True).T.reshape(y_g.shape)
        u = y_l - self.loc[m:] - x_g @ self.cross.T
        previous = jnp.concatenate([jnp.zeros_like(u[..., :1]), u[..., :-1]], axis=-1)
        x_l = (u - self._coefficients() * previous) / self.scale
        return jnp.concatenate([x_g, x_l], axis=-1), -self._log_det(y)

    def tree_flatten(self):
        names = ("loc", "scale_tril", "cross", "scale", "rho")
        return tuple(getattr(self, n) for n in names), (names, {})
