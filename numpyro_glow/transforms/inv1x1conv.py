"""Invertible 1x1 convolution, with a dense or an LU-factored weight."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.scipy.linalg import solve_triangular
from numpyro.util import not_jax_tracer

from .base import GlowTransform, check_event

__all__ = ["Inv1x1Conv", "Inv1x1ConvLU", "lu_factors", "random_rotation", "rotation_constants"]


def _mix(x: Array, w: Array) -> Array:
    """``y[..., c] = sum_d w[c, d] x[..., d]``: a 1x1 convolution as a tensordot."""
    return jnp.einsum("...d,cd->...c", x, w)


class Inv1x1Conv(GlowTransform):
    r"""Invertible 1x1 convolution (Glow, section 3.2) with a dense weight.

    At every pixel the channel vector is multiplied by a :math:`C \times C`
    matrix :math:`W`; a 1x1 convolution is a tensordot over the channel axis:

    .. math::

        y_{hw} = W x_{hw}, \qquad x_{hw} = W^{-1} y_{hw}, \qquad
        \log|\det J| = H W \log|\det W| .

    ``event_dim=1`` gives the vector version (an invertible linear map).
    ``log|det W|`` comes from ``slogdet``; near a singular :math:`W` it loses
    accuracy and its gradient :math:`W^{-T}` blows up. :class:`Inv1x1ConvLU`
    (``from_weight(w, lu=True)``) avoids both.
    """

    def __init__(self, weight: Array, event_dim: int = 3):
        weight = jnp.asarray(weight)
        _check_square(weight)
        if not_jax_tracer(weight):
            _check_nonsingular(np.asarray(weight))
        self.weight = weight
        self.event_dim = event_dim

    @classmethod
    def from_weight(
        cls, weight: Array, lu: bool = False, event_dim: int = 3
    ) -> Inv1x1Conv | Inv1x1ConvLU:
        """The dense (``lu=False``) or LU (``lu=True``) parametrisation of ``weight``.

        The LU factors are computed with SciPy on the concrete weight, once, so
        call this outside traced code (e.g. to make initial values).
        """
        if lu:
            return Inv1x1ConvLU(*lu_factors(weight), event_dim=event_dim)
        return cls(weight, event_dim=event_dim)

    @property
    def channels(self) -> int:
        return self.weight.shape[-1]

    # The three pieces each parametrisation supplies.
    def matrix(self) -> Array:
        return self.weight

    def inverse_matrix(self) -> Array:
        return jnp.linalg.inv(self.weight)

    def log_abs_det(self) -> Array:
        return jnp.linalg.slogdet(self.weight)[1]

    def _apply(self, x: Array, w: Array, sign: float) -> tuple[Array, Array]:
        check_event(type(self).__name__, x, self.event_dim, self.channels)
        n_pix = math.prod(x.shape[x.ndim - self.event_dim : -1])
        log_det = jnp.broadcast_to(
            sign * n_pix * self.log_abs_det(), x.shape[: x.ndim - self.event_dim]
        )
        return _mix(x, w), log_det

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        return self._apply(jnp.asarray(x), self.matrix(), 1.0)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        return self._apply(jnp.asarray(y), self.inverse_matrix(), -1.0)

    def tree_flatten(self):
        return (self.weight,), (("weight",), {"event_dim": self.event_dim})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels}, event_dim={self.event_dim})"


class Inv1x1ConvLU(Inv1x1Conv):
    r"""Invertible 1x1 convolution with an LU-factored weight (Glow, section 3.2).

    .. math::

        W = P\,L\,\big(U + \operatorname{diag}(\mathrm{sign\_s} \odot e^{\log s})\big),
        \qquad \log|\det J| = H W \sum_c \log s_c ,

    with :math:`P` a fixed permutation (``perm``: :math:`P_{i,\mathrm{perm}_i} = 1`),
    :math:`L` unit lower-triangular (the strictly lower part of ``lower``),
    :math:`U` strictly upper-triangular (the strictly upper part of ``upper``),
    and fixed signs ``sign_s``. The log-determinant costs O(C) and is exact
    for these parameters, whatever their values, and its gradient never blows up.
    The inverse uses two triangular solves.

    ``perm`` and ``sign_s`` are constants (built once with :func:`lu_factors`),
    not parameters to learn. So that every leaf of the transform is a float
    array, and ``jax.grad`` with the transform object as its argument works,
    the permutation's indices are held as ``float32`` (exact for any channel
    count a matrix fits in memory) and read back as integers, ``perm``; their
    gradient is zero.
    """

    def __init__(
        self,
        perm: Array,
        lower: Array,
        upper: Array,
        log_s: Array,
        sign_s: Array,
        event_dim: int = 3,
    ):
        lower, upper = jnp.asarray(lower), jnp.asarray(upper)
        _check_square(lower)
        _check_square(upper)
        c = lower.shape[-1]
        if upper.shape[-1] != c or jnp.shape(log_s)[-1:] != (c,) or jnp.shape(sign_s)[-1:] != (c,):
            raise ValueError(
                f"Inv1x1ConvLU: expected lower/upper of shape ({c}, {c}) and log_s, sign_s "
                f"and perm of shape ({c},), got {lower.shape}, {upper.shape}, "
                f"{jnp.shape(log_s)}, {jnp.shape(sign_s)}, {jnp.shape(perm)}"
            )
        self.perm_indices = jnp.asarray(perm, jnp.float32)
        self.lower = lower
        self.upper = upper
        self.log_s = jnp.asarray(log_s)
        self.sign_s = jnp.asarray(sign_s, self.log_s.dtype)
        self.event_dim = event_dim

    @property
    def channels(self) -> int:
        return self.lower.shape[-1]

    @property
    def perm(self) -> Array:
        r"""The permutation :math:`P` as integer indices, :math:`P_{i,\mathrm{perm}_i} = 1`."""
        return self.perm_indices.astype(jnp.int32)

    def _factors(self) -> tuple[Array, Array]:
        c = self.channels
        lower = jnp.tril(self.lower, -1) + jnp.eye(c, dtype=self.lower.dtype)
        upper = jnp.triu(self.upper, 1) + jnp.diag(self.sign_s * jnp.exp(self.log_s))
        return lower, upper

    def matrix(self) -> Array:
        lower, upper = self._factors()
        return (lower @ upper)[self.perm]

    def inverse_matrix(self) -> Array:
        # W^{-1} = U^{-1} L^{-1} P^T, and (A P^T)[:, j] = A[:, perm[j]].
        lower, upper = self._factors()
        eye = jnp.eye(self.channels, dtype=lower.dtype)
        l_inv = solve_triangular(lower, eye, lower=True, unit_diagonal=True)
        a = solve_triangular(upper, l_inv, lower=False)
        return a[:, self.perm]

    def log_abs_det(self) -> Array:
        return jnp.sum(self.log_s)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        # Fewer vectors than channels (a guide's few particles): two triangular
        # solves against the vectors cost less than forming W^{-1} (which
        # solves against the C x C identity); images keep W^{-1} for all pixels.
        y = jnp.asarray(y)
        if math.prod(y.shape[:-1]) >= self.channels:
            return super().inverse_and_log_det(y)
        check_event(type(self).__name__, y, self.event_dim, self.channels)
        lower, upper = self._factors()
        flat = y.reshape(-1, self.channels)
        z = jnp.zeros_like(flat).at[:, self.perm].set(flat)  # P^T y
        x = solve_triangular(lower, z.T, lower=True, unit_diagonal=True)
        x = solve_triangular(upper, x, lower=False).T
        n_pix = math.prod(y.shape[y.ndim - self.event_dim : -1])
        log_det = jnp.broadcast_to(-n_pix * self.log_abs_det(), y.shape[: y.ndim - self.event_dim])
        return x.reshape(y.shape), log_det

    @property
    def weight(self) -> Array:  # type: ignore[override]
        return self.matrix()

    def tree_flatten(self):
        return (self.perm_indices, self.lower, self.upper, self.log_s, self.sign_s), (
            ("perm_indices", "lower", "upper", "log_s", "sign_s"),
            {"event_dim": self.event_dim},
        )


def lu_factors(weight: Array) -> tuple[np.ndarray, ...]:
    """``(perm, lower, upper, log_s, sign_s)`` with ``W = P L (U + diag(sign_s e^{log_s}))``.

    Runs SciPy on a concrete weight; call it once, outside traced code.
    """
    import scipy.linalg

    w = np.asarray(weight)
    _check_square(w)
    _check_nonsingular(w)
    p, lower, upper = scipy.linalg.lu(w)
    perm = np.argmax(p, axis=1).astype(np.int32)  # scipy: w = p @ l @ u, P[i, perm[i]] = 1
    d = np.diag(upper)
    return (
        perm,
        np.tril(lower, -1).astype(w.dtype),
        np.triu(upper, 1).astype(w.dtype),
        np.log(np.abs(d)).astype(w.dtype),
        np.sign(d).astype(w.dtype),
    )


def _check_square(w) -> None:
    shape = np.shape(w)
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"Inv1x1Conv: expected a square (C, C) weight, got shape {shape}")


def _check_nonsingular(w: np.ndarray) -> None:
    if w.ndim != 2:
        return  # stacked weights (for Scan) are checked per step by their builder
    if not np.all(np.isfinite(w)):
        raise ValueError("Inv1x1Conv: expected a finite weight, got NaN or inf entries")
    # Singular in float64: the LU form represents any weight that float64 can
    # invert, conditions of 1e7 and beyond included.
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    if s[-1] <= s[0] * np.finfo(np.float64).eps * w.shape[0] * 10:
        raise ValueError(
            f"Inv1x1Conv: expected an invertible weight, got a singular one "
            f"(smallest singular value {s[-1]:.3g}, largest {s[0]:.3g})"
        )


def _haar(q, r, xp):
    """The ``Q`` of a QR decomposition of a Gaussian matrix, made Haar-distributed
    (columns' signs fixed by ``R``'s diagonal) and a rotation (determinant +1, by
    flipping the first column if needed); ``xp`` is ``numpy`` or ``jax.numpy``."""
    q = q * xp.sign(xp.diag(r))
    first = xp.arange(q.shape[-1]) == 0
    return q * xp.where(first, xp.sign(xp.linalg.det(q)), 1.0)


def random_rotation(key: Array, channels: int, dtype=jnp.float32) -> Array:
    """A random ``(C, C)`` rotation (orthogonal, determinant +1) from a JAX key:
    Glow's initialisation of a 1x1 convolution's weight. Traceable, so it can be
    a parameter's init function inside a model. For the NumPy constants the
    builders use (LU factors included) see :func:`rotation_constants`."""
    import jax

    return _haar(*jnp.linalg.qr(jax.random.normal(key, (channels, channels), dtype)), jnp)


@functools.lru_cache(maxsize=64)
def rotation_constants(
    seed: int, stream: int, depth: int, channels: int, lu: bool = True
) -> dict[str, np.ndarray]:
    """``depth`` random ``(C, C)`` rotations, the initial weights of a stack of 1x1
    convolutions, as read-only NumPy arrays stacked on a leading axis: for
    ``lu=False`` ``{"weight"}``, for ``lu=True`` their :func:`lu_factors`
    ``{"perm", "lower", "upper", "log_s", "sign_s"}``.

    They depend only on ``(seed, stream, depth, channels)`` (NumPy's
    ``default_rng((seed, stream))``) and are built once per process (cached), never
    traced, so a model that rebuilds them at every step gets the same fixed
    permutations and signs. :func:`~numpyro_glow.glow` uses ``stream`` = the level;
    :class:`~numpyro_glow.AutoGlow` stream 0.
    """
    rng = np.random.default_rng((seed, stream))
    ws = [
        _haar(*np.linalg.qr(rng.standard_normal((channels, channels))), np).astype(np.float32)
        for _ in range(depth)
    ]
    if lu:
        names = ("perm", "lower", "upper", "log_s", "sign_s")
        out = dict(zip(names, map(np.stack, zip(*map(lu_factors, ws), strict=True)), strict=True))
    else:
        out = {"weight": np.stack(ws)}
    for a in out.values():
        a.flags.writeable = False
    return out
