"""The multi-scale split with its learned prior."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import Array

from .base import GlowTransform, check_event, split_channels
from .coupling import AffineCoupling, Net

__all__ = ["Split"]


class Split(GlowTransform):
    r"""Glow's multi-scale split, with its learned prior, as one bijection.

    Glow factors out half of the channels after each level and models them with
    a Gaussian whose mean and log standard deviation a network computes from the
    other half, :math:`x_b \sim \mathcal N(\mu(x_a), \sigma(x_a)^2)`; the kept half
    :math:`x_a` goes on through the deeper levels (``inner``). With a fixed
    standard normal base distribution, that prior is the normalizing map of
    :math:`x_b` to white noise, so the whole split is a transform of the same
    shape::

        x = [x_a | x_b]  --(mu, log sigma) = prior_net(x_a)-->  eps_b = (x_b - mu) / sigma
          |                                                        |
          +--> inner(x_a) = z_a  (the deeper levels)               |
        y = [z_a | eps_b]  <---------------------------------------+

    .. math::

        y_a = \mathrm{inner}(x_a), \quad
        y_b = (x_b - \mu(x_a))\, e^{-\log\sigma(x_a)}; \qquad
        x_a = \mathrm{inner}^{-1}(y_a), \quad
        x_b = y_b\, e^{\log\sigma(x_a)} + \mu(x_a);

        \log|\det J| = \log|\det J_{\mathrm{inner}}(x_a)| - \sum \log\sigma(x_a).

    ``prior_net(prior_params, x_a)`` returns :math:`2 C_b` channels,
    :math:`(-\mu, -\log\sigma)`, the layout of an :class:`AffineCoupling` with
    ``scale="exp"``, whose code this reuses; a zero-initialised network gives the
    standard normal prior. ``inner`` must keep the shape of :math:`x_a` (a deeper
    level that squeezes ends with ``Squeeze().inv``); ``None`` is the identity.
    """

    def __init__(
        self,
        prior_net: Net,
        prior_params: Any,
        inner: GlowTransform | None = None,
        event_dim: int = 3,
    ):
        self.prior_net = prior_net
        self.prior_params = prior_params
        self.inner = inner
        self.event_dim = event_dim

    @property
    def prior(self) -> AffineCoupling:
        """The learned prior as an affine coupling ``x_b -> eps_b``."""
        return AffineCoupling(self.prior_net, self.prior_params, self.event_dim, scale="exp")

    def _inner(self, a: Array, inverse: bool) -> tuple[Array, Array]:
        if self.inner is None:
            return a, jnp.zeros(())
        out, ld = (self.inner.inverse_and_log_det if inverse else self.inner.forward_and_log_det)(a)
        if out.shape != a.shape:
            raise ValueError(
                f"Split: expected the inner transform to keep the shape {a.shape} of the "
                f"kept half, got {out.shape}; end a squeezing inner level with Squeeze().inv"
            )
        return out, ld

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        check_event("Split", x, self.event_dim)
        y, ld = self.prior.forward_and_log_det(x)  # conditions on x_a before inner
        y_a, y_b = split_channels(y)
        z_a, ld_a = self._inner(y_a, inverse=False)
        return jnp.concatenate([z_a, y_b], axis=-1), ld + ld_a

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        check_event("Split", y, self.event_dim)
        z_a, y_b = split_channels(y)
        x_a, ld_a = self._inner(z_a, inverse=True)
        x, ld = self.prior.inverse_and_log_det(jnp.concatenate([x_a, y_b], axis=-1))
        return x, ld + ld_a

    def tree_flatten(self):
        return (self.prior_params, self.inner), (
            ("prior_params", "inner"),
            {"prior_net": self.prior_net, "event_dim": self.event_dim},
        )

    def __repr__(self) -> str:
        return f"Split(inner={self.inner!r})"
