"""The coupling layers' shared split/merge code, and the affine and additive couplings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jax import Array
from jax.nn import log_sigmoid
from numpyro.distributions.util import sum_rightmost

from .base import GlowTransform, check_event, split_channels

__all__ = ["AffineCoupling", "AdditiveCoupling"]

#: ``net(params, x_a) -> h``: a pure function of its parameters and the
#: conditioning half, with the batch and event axes of ``x_a`` in front of ``h``'s
#: channel axis.
Net = Callable[[Any, Array], Array]

_SCALES = {
    # Glow's sigmoid(raw + 2): a contraction in (0, 1), 0.881 at raw = 0.
    "sigmoid": lambda raw: log_sigmoid(raw + 2.0),
    # Unconstrained: expands or contracts, identity at raw = 0.
    "exp": lambda raw: raw,
    # Soft-clamped: log s = 3 tanh(raw / 3) in (-3, 3), identity at raw = 0.
    "tanh": lambda raw: 3.0 * jnp.tanh(raw / 3.0),
}


class _Coupling(GlowTransform):
    r"""Shared split/merge code of the couplings.

    The channels split into :math:`x_a` (the first :math:`\lfloor C/2 \rfloor`)
    and :math:`x_b`; :math:`y_a = x_a` and :math:`h = \mathrm{net}(\mathrm{params},
    x_a)`, checked to have :meth:`_h_channels` channels. A subclass says only how
    :math:`x_b` is transformed given :math:`h`, in :meth:`_transform_b`; both
    directions run through :meth:`_couple`, so they share every other line.
    """

    #: How the channel count of ``h`` depends on ``C_b`` (for error messages).
    _h_layout: str = ""

    def __init__(self, net: Net, params: Any, event_dim: int = 3):
        if not callable(net):
            raise ValueError(
                f"{type(self).__name__}: expected a callable net(params, x), got {net!r}"
            )
        self.net = net
        self.params = params
        self.event_dim = event_dim

    def _h_channels(self, c_b: int) -> int:
        """The number of channels ``net`` must return for ``c_b`` transformed channels."""
        raise NotImplementedError

    def _transform_b(self, x_b: Array, h: Array, inverse: bool) -> tuple[Array, Array | None]:
        """``(y_b, log_det)``: ``x_b`` transformed given ``h`` (backwards if
        ``inverse``), and the elementwise log-derivative, of ``x_b``'s shape, that
        :meth:`_couple` sums over the event (``None``: volume preserving)."""
        raise NotImplementedError

    def _couple(self, x: Array, inverse: bool) -> tuple[Array, Array]:
        x = jnp.asarray(x)
        name = type(self).__name__
        check_event(name, x, max(self.event_dim, 1))
        if x.shape[-1] < 2:
            raise ValueError(f"{name}: expected at least 2 channels to split, got shape {x.shape}")
        x_a, x_b = split_channels(x)
        c_b = x_b.shape[-1]
        h = self.net(self.params, x_a)
        expected = self._h_channels(c_b)
        if h.shape[-1] != expected:
            raise ValueError(
                f"{name}: expected the net to return {expected} channels "
                f"({self._h_layout} with C_b={c_b}), got shape {h.shape}"
            )
        y_b, log_det = self._transform_b(x_b, h, inverse)
        if log_det is None:
            log_det = self._batch_zeros(x)
        else:
            log_det = sum_rightmost(log_det, self.event_dim)
        return jnp.concatenate([x_a, y_b], axis=-1), log_det

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        return self._couple(x, inverse=False)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        return self._couple(y, inverse=True)

    def _aux(self) -> dict:
        return {"net": self.net, "event_dim": self.event_dim}

    def tree_flatten(self):
        return (self.params,), (("params",), self._aux())

    def __repr__(self) -> str:
        net = getattr(self.net, "__name__", self.net)
        return f"{type(self).__name__}(net={net}, event_dim={self.event_dim})"


class AffineCoupling(_Coupling):
    r"""Affine coupling layer (Glow, section 3.3).

    The channels split into :math:`x_a` (the first :math:`\lfloor C/2 \rfloor`) and
    :math:`x_b`; :math:`h = \mathrm{net}(\mathrm{params}, x_a)` has
    :math:`2 C_b` channels: a shift :math:`t = h_{[:C_b]}` and a raw scale
    :math:`r = h_{[C_b:]}`. With :math:`\log s = \log\sigma(r + 2)` (``scale="sigmoid"``,
    Glow's choice), :math:`\log s = r` (``scale="exp"``, able to expand) or
    :math:`\log s = 3\tanh(r/3)` (``scale="tanh"``, expands and contracts by at
    most :math:`e^3` per layer, which keeps guides from diverging):

    .. math::

        y_a = x_a, \quad y_b = (x_b + t) \odot s; \qquad
        x_b = y_b \odot s^{-1} - t; \qquad
        \log|\det J| = \sum \log s .

    ``net`` is a pure function held as static data and ``params`` a pytree of
    arrays, so a jitted function taking the transform does not retrace when the
    parameter values change. With a zero-initialised last layer (the default
    networks), ``scale="exp"`` is the identity at initialisation and
    ``scale="sigmoid"`` multiplies :math:`x_b` by :math:`\sigma(2) = 0.881`, as in
    the Glow code.
    """

    def __init__(self, net: Net, params: Any, event_dim: int = 3, scale: str = "sigmoid"):
        if scale not in _SCALES:
            raise ValueError(f"AffineCoupling: expected scale in {sorted(_SCALES)}, got {scale!r}")
        super().__init__(net, params, event_dim)
        self.scale = scale

    _h_layout = "2 * C_b"

    def _h_channels(self, c_b: int) -> int:
        return 2 * c_b

    def _transform_b(self, x_b: Array, h: Array, inverse: bool) -> tuple[Array, Array]:
        c_b = x_b.shape[-1]
        shift, log_scale = h[..., :c_b], _SCALES[self.scale](h[..., c_b:])
        if inverse:
            return x_b * jnp.exp(-log_scale) - shift, -log_scale
        return (x_b + shift) * jnp.exp(log_scale), log_scale

    def _aux(self) -> dict:
        return {**super()._aux(), "scale": self.scale}


class AdditiveCoupling(_Coupling):
    r"""Additive (volume-preserving) coupling layer (NICE; Glow's additive option).

    With :math:`x_a, x_b` as in :class:`AffineCoupling` and
    :math:`t = \mathrm{net}(\mathrm{params}, x_a)` of :math:`C_b` channels:

    .. math::

        y_a = x_a, \quad y_b = x_b + t; \qquad x_b = y_b - t; \qquad \log|\det J| = 0 .
    """

    _h_layout = "C_b"

    def _h_channels(self, c_b: int) -> int:
        return c_b

    def _transform_b(self, x_b: Array, h: Array, inverse: bool) -> tuple[Array, None]:
        return (x_b - h if inverse else x_b + h), None
