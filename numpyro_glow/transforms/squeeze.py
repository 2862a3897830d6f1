"""Squeeze: space to depth."""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from .base import GlowTransform, check_event

__all__ = ["Squeeze"]


class Squeeze(GlowTransform):
    r"""Space-to-depth reshaping (RealNVP, Glow), event shape
    :math:`(H, W, C) \to (H/f, W/f, f^2 C)`.

    Output pixel :math:`(i, j)` holds the :math:`f \times f` input block at rows
    :math:`fi \ldots fi+f-1` and columns :math:`fj \ldots fj+f-1`, in the order
    (row offset, column offset, channel):

    .. math::

        y_{i, j, (p f + q) C + c} = x_{f i + p,\, f j + q,\, c}, \qquad
        \log|\det J| = 0 .

    The inverse is depth to space. Height and width must be multiples of ``f``.
    """

    event_dim = 3

    def __init__(self, factor: int = 2):
        if int(factor) != factor or factor < 1:
            raise ValueError(f"Squeeze: expected a positive integer factor, got {factor!r}")
        self.factor = int(factor)

    def forward_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        f = self.factor
        self._check_shape(shape)
        *batch, h, w, c = shape
        return (*batch, h // f, w // f, c * f * f)

    def inverse_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        f = self.factor
        if len(shape) < 3 or shape[-1] % (f * f):
            raise ValueError(
                f"Squeeze: expected an (H, W, C) output with C divisible by {f * f}, "
                f"got shape {tuple(shape)}"
            )
        *batch, h, w, c = shape
        return (*batch, h * f, w * f, c // (f * f))

    def _check_shape(self, shape) -> None:
        f = self.factor
        if len(shape) < 3 or shape[-3] % f or shape[-2] % f:
            raise ValueError(
                f"Squeeze: expected an (H, W, C) input with H and W divisible by {f}, "
                f"got shape {tuple(shape)}"
            )

    def _regroup(self, a: Array, grouped: tuple[int, ...], out: tuple[int, ...]) -> Array:
        """Reshape the event to 5 axes, swap the middle two, reshape to ``out``.

        The swap is an involution, so the same code serves both directions.
        """
        nb = a.ndim - 3
        a = a.reshape(*a.shape[:nb], *grouped)
        a = a.transpose(*range(nb), nb, nb + 2, nb + 1, nb + 3, nb + 4)
        return a.reshape(out)

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        x = jnp.asarray(x)
        check_event("Squeeze", x, 3)
        f, out = self.factor, self.forward_shape(x.shape)
        h, w, c = out[-3:]
        return self._regroup(x, (h, f, w, f, c // (f * f)), out), self._batch_zeros(x)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        y = jnp.asarray(y)
        check_event("Squeeze", y, 3)
        f, out = self.factor, self.inverse_shape(y.shape)
        h, w, c = y.shape[-3:]
        return self._regroup(y, (h, w, f, f, c // (f * f)), out), self._batch_zeros(y)

    def tree_flatten(self):
        return (), ((), {"factor": self.factor})

    def __repr__(self) -> str:
        return f"Squeeze(factor={self.factor})"
