"""A flow density with a one-pass ``log_prob``, and bits per dimension."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import Array, lax

from .transforms import GlowTransform, forward_and_log_det, inverse_and_log_det

__all__ = ["FlowDistribution", "StickTheLanding", "bits_per_dim"]


class FlowDistribution(dist.TransformedDistribution):
    r"""``TransformedDistribution(base, flow.inv)`` whose ``log_prob`` is one pass.

    ``flow`` is the normalizing transform (data to white noise). Sampling pushes
    base draws through ``flow.inv``; the density is

    .. math::

        \log p(x) = \log p_{\text{base}}(f(x)) + \log|\det J_f(x)| ,

    computed by one call of ``flow.forward_and_log_det``: NumPyro's default
    ``log_prob`` inverts ``flow.inv`` and then asks for its log-determinant,
    which evaluates every coupling network twice.
    """

    def __init__(self, base_distribution: dist.Distribution, flow: GlowTransform, **kwargs):
        super().__init__(base_distribution, flow.inv, **kwargs)

    @property
    def flow(self) -> GlowTransform:
        """The normalizing transform, data to latent."""
        return self.transforms[-1].inv

    def log_prob(self, value: Array, intermediates=None) -> Array:
        if intermediates is not None:  # from sample_with_intermediates: nothing to recompute
            return super().log_prob(value, intermediates)
        z, log_det = forward_and_log_det(self.flow, value, len(self.event_shape))
        return self.base_dist.log_prob(z) + log_det


class StickTheLanding(dist.TransformedDistribution):
    r"""A ``TransformedDistribution`` whose log density is differentiated only
    through its argument: the "sticking the landing" (STL) gradient of Roeder,
    Wu & Duvenaud (2017), for any guide built from pytree transforms.

    Draws are the usual reparametrised ones, :math:`z = T_\theta(\epsilon)`,
    differentiable in :math:`\theta`. :meth:`log_prob` evaluates the same log
    density as ``TransformedDistribution``, but with the transforms' (and the
    base distribution's) parameters held constant,

    .. math::

        \log q(z) = \log p_{\text{base}}\big(T_{\bar\theta}^{-1}(z)\big)
            + \log\big|\det J_{T_{\bar\theta}^{-1}}(z)\big|, \qquad
        \bar\theta = \operatorname{stop\_gradient}(\theta),

    so the ELBO gradient keeps only the path derivative: the score term
    :math:`\mathbb E_q[\nabla_\theta \log q_\theta(z)]`, zero in expectation,
    is dropped, and the gradient's variance vanishes when :math:`q` equals the
    posterior. Plain ``SVI(model, guide, optim, Trace_ELBO())`` uses it as soon
    as the guide samples from this distribution. Each ``log_prob`` costs one
    inverse pass through the transforms (one more pass than the plain gradient,
    which reuses the forward pass's log-determinant).
    """

    def sample_with_intermediates(self, key, sample_shape=()):
        # No intermediates: NumPyro then evaluates log_prob(value), below.
        return self.rsample(key, sample_shape), []

    def log_prob(self, value: Array, intermediates=None) -> Array:
        base, transforms = jax.tree.map(lax.stop_gradient, (self.base_dist, self.transforms))
        event_dim = len(self.event_shape)
        x, log_det = value, 0.0
        for t in reversed(transforms):
            x, ld = inverse_and_log_det(t, x, event_dim)
            log_det = log_det + ld
        return base.log_prob(x) + log_det


def bits_per_dim(log_prob: Array, num_dims: int, levels: int | None = None) -> Array:
    r"""Bits per dimension of a density on :math:`[0, 1]^D` evaluated at data.

    For discrete data with ``levels`` values per dimension, dequantized as
    :math:`x = (k + u) / \text{levels}` with :math:`u \in [0, 1)^D`, the density of
    :math:`k + u` on :math:`[0, \text{levels}]^D` is
    :math:`p(x) / \text{levels}^D`, so

    .. math::

        \text{bpd} = -\frac{\log p(x) - D \log(\text{levels})}{D \log 2} .

    A density uniform on :math:`[0, 1]^D` scores exactly :math:`\log_2(\text{levels})`.
    With ``levels=None`` the plain :math:`-\log p(x) / (D \log 2)` of a continuous
    density.
    """
    discretisation = 0.0 if levels is None else num_dims * math.log(levels)
    return -(jnp.asarray(log_prob) - discretisation) / (num_dims * math.log(2.0))
