"""A flow density with a one-pass ``log_prob``, and bits per dimension."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpyro.distributions as dist
from jax import Array

from .transforms import GlowTransform, forward_and_log_det

__all__ = ["FlowDistribution", "bits_per_dim"]


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
