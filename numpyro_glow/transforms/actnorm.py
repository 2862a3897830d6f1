"""ActNorm: a learned affine normalisation on the channel axis."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import Array
from numpyro.distributions.util import sum_rightmost

from .base import GlowTransform, check_event

__all__ = ["ActNorm"]


class ActNorm(GlowTransform):
    r"""Activation normalisation (Glow, section 3.1), in its normalizing form.

    For an event of shape :math:`(H, W, C)` (``event_dim=3``) or :math:`(C,)`
    (``event_dim=1``), with ``loc`` :math:`\mu` and ``log_scale``
    :math:`\log s` of shape :math:`(C,)`:

    .. math::

        y = (x - \mu)\, e^{-\log s}, \qquad x = y\, e^{\log s} + \mu, \qquad
        \log|\det J| = -H W \sum_c \log s_c .

    With :math:`\mu = 0, \log s = 0` it is the identity. The data-dependent
    initialisation of the paper sets :math:`\mu` and :math:`s` to the per-channel
    mean and standard deviation of a first batch, so that the output of that
    batch has zero mean and unit variance per channel.

    ``loc`` and ``log_scale`` may also have any shape that broadcasts against the
    input, e.g. the full event shape :math:`(H, W, C)` or a batch of them: that is
    the learned (class-conditional) top prior of Glow, written as the
    normalizing transform :math:`\epsilon = (h - \mu) / \sigma` into white noise.
    The log-determinant then sums :math:`-\log s` over the broadcast event.
    """

    def __init__(self, loc: Array, log_scale: Array, event_dim: int = 3):
        if event_dim < 1:
            raise ValueError(f"ActNorm: expected event_dim >= 1, got {event_dim}")
        loc, log_scale = jnp.asarray(loc), jnp.asarray(log_scale)
        if loc.ndim < 1 or loc.shape[-1:] != log_scale.shape[-1:]:
            raise ValueError(
                "ActNorm: expected loc and log_scale with the same channel axis, "
                f"got shapes {loc.shape} and {log_scale.shape}"
            )
        self.loc = loc
        self.log_scale = log_scale
        self.event_dim = event_dim

    @property
    def channels(self) -> int:
        return self.loc.shape[-1]

    def _log_det(self, x: Array) -> Array:
        if jnp.ndim(self.log_scale) == 1:
            # per-channel parameters: O(C), the spatial size is a static count
            n_pix = math.prod(jnp.shape(x)[jnp.ndim(x) - self.event_dim : -1])
            return jnp.broadcast_to(
                -n_pix * jnp.sum(self.log_scale), jnp.shape(x)[: jnp.ndim(x) - self.event_dim]
            )
        full = jnp.broadcast_to(
            -self.log_scale, jnp.broadcast_shapes(jnp.shape(x), self.log_scale.shape)
        )
        return sum_rightmost(full, self.event_dim)

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        check_event("ActNorm", x, self.event_dim, self.channels)
        y = (x - self.loc) * jnp.exp(-self.log_scale)
        return y, self._log_det(y)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        check_event("ActNorm", y, self.event_dim, self.channels)
        x = y * jnp.exp(self.log_scale) + self.loc
        return x, -self._log_det(x)

    def tree_flatten(self):
        return (self.loc, self.log_scale), (("loc", "log_scale"), {"event_dim": self.event_dim})

    def __repr__(self) -> str:
        return f"ActNorm(channels={self.channels}, event_dim={self.event_dim})"
