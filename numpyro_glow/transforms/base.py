"""The base class every numpyro-glow transform derives from, and its inverse.

Each layer implements two primitives, one per direction, that return the output
together with the log-determinant of that direction's Jacobian, summed over the
event:

.. math::

    (y, \\log|\\det J_f(x)|) = \\text{forward\\_and\\_log\\_det}(x), \\qquad
    (x, \\log|\\det J_{f^{-1}}(y)|) = \\text{inverse\\_and\\_log\\_det}(y),

with :math:`\\log|\\det J_{f^{-1}}(y)| = -\\log|\\det J_f(x)|`. NumPyro's
``__call__``, ``_inverse``, ``log_abs_det_jacobian`` and
``call_with_intermediates`` all derive from these two, so one pass gives both the
value and the log-determinant, and ``TransformedDistribution.sample_with_intermediates``
never runs a layer twice.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax.numpy as jnp
from jax import Array
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform
from numpyro.distributions.util import sum_rightmost

__all__ = [
    "GlowTransform",
    "Inverse",
    "forward_and_log_det",
    "inverse_and_log_det",
    "check_event",
    "split_channels",
]


def _real(event_dim: int) -> constraints.Constraint:
    if event_dim == 0:
        return constraints.real
    return constraints.independent(constraints.real, event_dim)


def check_event(name: str, x: Array, event_dim: int, channels: int | None = None) -> None:
    """Raise ``ValueError`` if ``x`` has fewer than ``event_dim`` axes or a wrong
    channel (last) axis. Shapes are static, so this runs at trace time."""
    shape = jnp.shape(x)
    if len(shape) < event_dim:
        raise ValueError(
            f"{name}: expected an input with at least {event_dim} axes "
            f"(event_dim={event_dim}), got shape {shape}"
        )
    if channels is not None and shape[-1] != channels:
        raise ValueError(
            f"{name}: expected {channels} channels on the last axis, "
            f"got shape {shape} with {shape[-1]}"
        )


def split_channels(x: Array) -> tuple[Array, Array]:
    """Split the last axis into its first ``C // 2`` and its remaining channels."""
    c = x.shape[-1] // 2
    return x[..., :c], x[..., c:]


class GlowTransform(Transform):
    """Base class: a bijection over events of rank ``event_dim``.

    Subclasses implement :meth:`forward_and_log_det` and
    :meth:`inverse_and_log_det`, :meth:`tree_flatten`, and (if the event shape
    changes) :meth:`forward_shape` / :meth:`inverse_shape`. The log-determinants
    they return are already summed over the event, so they have the batch shape
    of the input.
    """

    event_dim: int = 0

    @property
    def domain(self) -> constraints.Constraint:
        return _real(self.event_dim)

    @property
    def codomain(self) -> constraints.Constraint:
        return _real(self.event_dim)

    # --- the two primitives -------------------------------------------------
    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        """``(y, log|det dy/dx|)``: the normalizing direction, data to latent, with
        the log-determinant summed over the event (it has the batch shape of ``x``)."""
        raise NotImplementedError

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        """``(x, log|det dx/dy|)``: the generative direction, latent to data; the
        log-determinant is the negative of the forward one at the matching point."""
        raise NotImplementedError

    # --- NumPyro's interface, derived ----------------------------------------
    def __call__(self, x: Array) -> Array:
        return self.forward_and_log_det(x)[0]

    def _inverse(self, y: Array) -> Array:
        return self.inverse_and_log_det(y)[0]

    def call_with_intermediates(self, x: Array) -> tuple[Array, Array]:
        return self.forward_and_log_det(x)

    def log_abs_det_jacobian(self, x: Array, y: Array, intermediates: Any = None) -> Array:
        if intermediates is not None:
            return intermediates
        return self.forward_and_log_det(x)[1]

    @property
    def inv(self) -> Transform:
        inv = self._inv() if isinstance(self._inv, weakref.ref) else None
        if inv is None:
            inv = Inverse(self)
            self._inv = weakref.ref(inv)
        return inv

    def _batch_zeros(self, x: Array) -> Array:
        """A zero log-determinant with the batch shape of ``x``."""
        return jnp.zeros(jnp.shape(x)[: jnp.ndim(x) - self.event_dim], jnp.result_type(x))


class Inverse(GlowTransform):
    """The inverse of a :class:`GlowTransform`, itself a :class:`GlowTransform`.

    Its primitives are the wrapped transform's, swapped, so an inverse flow (the
    generative direction of a density) keeps the fused one-pass log-determinant.
    """

    def __init__(self, base: GlowTransform):
        self.base = base

    @property
    def event_dim(self) -> int:  # type: ignore[override]
        return self.base.event_dim

    @property
    def domain(self) -> constraints.Constraint:
        return self.base.codomain

    @property
    def codomain(self) -> constraints.Constraint:
        return self.base.domain

    @property
    def inv(self) -> Transform:
        return self.base

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        return self.base.inverse_and_log_det(x)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        return self.base.forward_and_log_det(y)

    def log_abs_det_jacobian(self, x: Array, y: Array, intermediates: Any = None) -> Array:
        if intermediates is not None:
            return intermediates
        # Evaluating the base forward at the output is cheaper than inverting.
        return -self.base.forward_and_log_det(y)[1]

    def forward_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.base.inverse_shape(shape)

    def inverse_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.base.forward_shape(shape)

    def tree_flatten(self):
        return (self.base,), (("base",), {})

    def __repr__(self) -> str:
        return f"Inverse({self.base!r})"


def forward_and_log_det(t: Transform, x: Array, event_dim: int | None = None):
    """``(t(x), log|det J|)`` for any NumPyro transform, summed to ``event_dim``.

    A :class:`GlowTransform` does this in one pass; any other NumPyro transform
    goes through ``call_with_intermediates`` and ``log_abs_det_jacobian``.
    ``event_dim`` (default: the transform's own) is the event rank the result is
    reduced over.
    """
    if isinstance(t, GlowTransform):
        y, ld = t.forward_and_log_det(x)
    else:
        y, inter = t.call_with_intermediates(x)
        ld = t.log_abs_det_jacobian(x, y, inter)
    if event_dim is not None:
        ld = sum_rightmost(ld, event_dim - t.domain.event_dim)
    return y, ld


def inverse_and_log_det(t: Transform, y: Array, event_dim: int | None = None):
    """``(t^{-1}(y), log|det J_{t^{-1}}(y)|)`` for any NumPyro transform."""
    return forward_and_log_det(t.inv, y, event_dim)
