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

#: Bounds of ``scale="bounded"``: a step expands by at most ``e**BOUNDED_EXPANSION``
#: and contracts by at most ``e**-BOUNDED_CONTRACTION``.
BOUNDED_EXPANSION = 1.0
BOUNDED_CONTRACTION = 3.0

_SCALES = {
    # Glow's sigmoid(raw + 2): a contraction in (0, 1), 0.881 at raw = 0.
    "sigmoid": lambda raw: log_sigmoid(raw + 2.0),
    # Unconstrained: expands or contracts, identity at raw = 0.
    "exp": lambda raw: raw,
    # Soft-clamped: log s = 3 tanh(raw / 3) in (-3, 3), identity at raw = 0.
    "tanh": lambda raw: 3.0 * jnp.tanh(raw / 3.0),
    # Asymmetric soft clamp: log s in (-BOUNDED_CONTRACTION, BOUNDED_EXPANSION),
    # slope 1 at raw = 0 from both sides.
    "bounded": lambda raw: jnp.where(
        raw > 0,
        BOUNDED_EXPANSION * jnp.tanh(raw / BOUNDED_EXPANSION),
        BOUNDED_CONTRACTION * jnp.tanh(raw / BOUNDED_CONTRACTION),
    ),
}


class _Coupling(GlowTransform):
    r"""Shared split/merge code of the couplings.

    The channels split into :math:`x_a` (the first :math:`\lfloor C/2 \rfloor`)
    and :math:`x_b`; :math:`y_a = x_a` and :math:`h = \mathrm{net}(\mathrm{params},
    x_a)`, checked to have :meth:`_h_channels` channels. A subclass says only how
    :math:`x_b` is transformed given :math:`h`, in :meth:`_transform_b`; both
    directions run through :meth:`_couple`, so they share every other line.

    **Masked coupling.** With ``mask``, a 0/1 array over the channels (the last
    axis), the channels where it is 1 condition and those where it is 0 are
    transformed (RealNVP's masks): :math:`h = \mathrm{net}(\mathrm{params},
    m \odot x)` has the parameters of *every* channel (:meth:`_h_channels` of
    :math:`C`, same layout), the kept channels' parameters are zeroed and their
    outputs and log-derivatives are those of the identity. Any partition works,
    unbalanced ones included, and steps with different masks have the same
    shapes, so a :class:`~numpyro_glow.Scan` can stack them. The mask is an array
    child read as ``mask > 0.5``, so its gradient is zero.
    """

    #: How the channel count of ``h`` depends on ``C_b`` (for error messages).
    _h_layout: str = ""

    def __init__(self, net: Net, params: Any, event_dim: int = 3, mask: Array | None = None):
        if not callable(net):
            raise ValueError(
                f"{type(self).__name__}: expected a callable net(params, x), got {net!r}"
            )
        self.net = net
        self.params = params
        self.event_dim = event_dim
        self.mask = None if mask is None else jnp.asarray(mask, jnp.result_type(float))

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
        if self.mask is not None:
            return self._couple_masked(x, inverse)
        x_a, x_b = split_channels(x)
        y_b, log_det = self._transform_b(x_b, self._h(x_a, x_b.shape[-1]), inverse)
        return jnp.concatenate([x_a, y_b], axis=-1), self._sum_log_det(log_det, x)

    def _couple_masked(self, x: Array, inverse: bool) -> tuple[Array, Array]:
        c = x.shape[-1]
        if self.mask.shape[-1:] != (c,):
            raise ValueError(
                f"{type(self).__name__}: expected a mask over the {c} channels, "
                f"got shape {self.mask.shape}"
            )
        keep = self.mask > 0.5
        h = self._h(jnp.where(keep, x, 0.0), c)
        # the kept channels' parameters are zeroed (parameter-major layout)
        blocks = h.reshape(h.shape[:-1] + (-1, c))
        h = jnp.where(keep, 0.0, blocks).reshape(h.shape)
        y, log_det = self._transform_b(x, h, inverse)
        if log_det is not None:
            log_det = jnp.where(keep, 0.0, log_det)
        return jnp.where(keep, x, y), self._sum_log_det(log_det, x)

    def _h(self, x_a: Array, c_b: int) -> Array:
        """``net(params, x_a)``, checked to have the channels of ``c_b`` transformed ones."""
        h = self.net(self.params, x_a)
        expected = self._h_channels(c_b)
        if h.shape[-1] != expected:
            raise ValueError(
                f"{type(self).__name__}: expected the net to return {expected} channels "
                f"({self._h_layout} with C_b={c_b}), got shape {h.shape}"
            )
        return h

    def _sum_log_det(self, log_det: Array | None, x: Array) -> Array:
        if log_det is None:
            return self._batch_zeros(x)
        return sum_rightmost(log_det, self.event_dim)

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        return self._couple(x, inverse=False)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        return self._couple(y, inverse=True)

    def _aux(self) -> dict:
        return {"net": self.net, "event_dim": self.event_dim}

    def tree_flatten(self):
        return (self.params, self.mask), (("params", "mask"), self._aux())

    def __repr__(self) -> str:
        net = getattr(self.net, "__name__", self.net)
        return f"{type(self).__name__}(net={net}, event_dim={self.event_dim})"


class AffineCoupling(_Coupling):
    r"""Affine coupling layer (Glow, section 3.3).

    The channels split into :math:`x_a` (the first :math:`\lfloor C/2 \rfloor`) and
    :math:`x_b`; :math:`h = \mathrm{net}(\mathrm{params}, x_a)` has
    :math:`2 C_b` channels: a shift :math:`t = h_{[:C_b]}` and a raw scale
    :math:`r = h_{[C_b:]}`. With :math:`\log s = \log\sigma(r + 2)` (``scale="sigmoid"``,
    Glow's choice), :math:`\log s = r` (``scale="exp"``, able to expand),
    :math:`\log s = 3\tanh(r/3)` (``scale="tanh"``, expands and contracts by at
    most :math:`e^3` per layer) or the asymmetric soft clamp
    :math:`\log s = a\tanh(r/a)` for :math:`r > 0`, :math:`b\tanh(r/b)` otherwise,
    :math:`a = 1`, :math:`b = 3` (``scale="bounded"``: a layer contracts by up to
    :math:`e^{-3}` but expands by at most :math:`e`, so a deep stack's samples
    cannot blow up; the vector guide's choice):

    .. math::

        y_a = x_a, \quad y_b = (x_b + t) \odot s; \qquad
        x_b = y_b \odot s^{-1} - t; \qquad
        \log|\det J| = \sum \log s .

    ``net`` is a pure function held as static data and ``params`` a pytree of
    arrays, so a jitted function taking the transform does not retrace when the
    parameter values change. With a zero-initialised last layer (the default
    networks), ``scale="exp"`` is the identity at initialisation and
    ``scale="sigmoid"`` multiplies :math:`x_b` by :math:`\sigma(2) = 0.881`, as in
    the Glow code. ``mask`` makes it a masked coupling (see ``_Coupling``: any
    0/1 partition of the channels, the net sees :math:`m \odot x` and returns
    :math:`2C` channels).
    """

    def __init__(
        self,
        net: Net,
        params: Any,
        event_dim: int = 3,
        scale: str = "sigmoid",
        mask: Array | None = None,
    ):
        if scale not in _SCALES:
            raise ValueError(f"AffineCoupling: expected scale in {sorted(_SCALES)}, got {scale!r}")
        super().__init__(net, params, event_dim, mask)
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
