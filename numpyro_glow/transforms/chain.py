"""Composition of transforms in one fused pass: a Python loop or a ``lax.scan``."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import Array, lax
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform

from .base import GlowTransform, forward_and_log_det, inverse_and_log_det

__all__ = ["Chain", "Scan"]


class Chain(GlowTransform):
    r"""The composition :math:`f = f_n \circ \dots \circ f_1` of ``parts``
    (applied first to last), with

    .. math::

        \log|\det J_f(x)| = \sum_i \log|\det J_{f_i}(x_{i-1})|, \qquad x_0 = x,

    in one pass: each part computes its output and its log-determinant together
    (NumPyro's ``ComposeTransform`` evaluates every part twice for
    ``log_abs_det_jacobian``). Parts may have a smaller ``event_dim`` (e.g.
    :class:`Logitify`, elementwise); their log-determinants are summed over the
    rest of the chain's event. Any NumPyro transform may be a part.
    """

    def __init__(self, parts: Sequence[Transform]):
        if not parts:
            raise ValueError("Chain: expected at least one transform, got none")
        self.parts = list(parts)

    @property
    def event_dim(self) -> int:  # type: ignore[override]
        return max(max(p.domain.event_dim, p.codomain.event_dim) for p in self.parts)

    def _lift(self, c: constraints.Constraint) -> constraints.Constraint:
        extra = self.event_dim - c.event_dim
        return constraints.independent(c, extra) if extra else c

    @property
    def domain(self) -> constraints.Constraint:
        return self._lift(self.parts[0].domain)

    @property
    def codomain(self) -> constraints.Constraint:
        return self._lift(self.parts[-1].codomain)

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        total = 0.0
        for part in self.parts:
            x, ld = forward_and_log_det(part, x, self.event_dim)
            total = total + ld
        return x, total

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        total = 0.0
        for part in reversed(self.parts):
            y, ld = inverse_and_log_det(part, y, self.event_dim)
            total = total + ld
        return y, total

    def forward_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for part in self.parts:
            shape = part.forward_shape(shape)
        return shape

    def inverse_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for part in reversed(self.parts):
            shape = part.inverse_shape(shape)
        return shape

    def tree_flatten(self):
        return (self.parts,), (("parts",), {})

    def __repr__(self) -> str:
        return "Chain([" + ", ".join(map(repr, self.parts)) + "])"


class Scan(GlowTransform):
    r"""``K`` layers of one structure, their parameters stacked on a leading axis,
    applied in sequence with :func:`jax.lax.scan`:

    .. math::

        f = f_K \circ \dots \circ f_1, \qquad
        \log|\det J_f| = \sum_k \log|\det J_{f_k}|, \qquad
        f^{-1} = f_1^{-1} \circ \dots \circ f_K^{-1}.

    The traced program holds one layer, so compile time does not grow with
    ``K``. ``unroll`` is passed to ``lax.scan`` (``True`` unrolls fully: the
    compiled program then grows with ``K`` but XLA can fuse across steps).
    Build one with :meth:`Scan.stack` from a list of layers. The layers must keep
    the event shape.
    """

    def __init__(self, layers: GlowTransform, unroll: int | bool = 1):
        self.layers = layers
        self.unroll = unroll

    @classmethod
    def stack(cls, layers: Sequence[GlowTransform], unroll: int | bool = 1) -> Scan:
        """Stack same-structured layers (same static data, same array shapes)."""
        if not layers:
            raise ValueError("Scan.stack: expected at least one layer, got none")
        treedefs = {jax.tree.structure(layer) for layer in layers}
        if len(treedefs) != 1:
            raise ValueError(
                "Scan.stack: expected layers with one structure (same types, static "
                f"data and nesting), got {len(treedefs)} different ones"
            )
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
        return cls(stacked, unroll=unroll)

    @property
    def event_dim(self) -> int:  # type: ignore[override]
        return self.layers.event_dim

    @property
    def num_steps(self) -> int:
        return jax.tree.leaves(self.layers)[0].shape[0]

    def _run(self, x: Array, inverse: bool) -> tuple[Array, Array]:
        x = jnp.asarray(x)
        zero = self._batch_zeros(x)

        def step(carry, layer):
            h, total = carry
            h, ld = layer.inverse_and_log_det(h) if inverse else layer.forward_and_log_det(h)
            return (h, total + ld), None

        (y, total), _ = lax.scan(step, (x, zero), self.layers, reverse=inverse, unroll=self.unroll)
        return y, total

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        return self._run(x, inverse=False)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        return self._run(y, inverse=True)

    def tree_flatten(self):
        return (self.layers,), (("layers",), {"unroll": self.unroll})

    def __repr__(self) -> str:
        return f"Scan({self.num_steps} x {jax.tree.structure(self.layers)}, unroll={self.unroll})"
