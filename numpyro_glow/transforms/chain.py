"""Composition of transforms in one fused pass: a Python loop or a ``lax.scan``."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

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


class _ScanConfig(NamedTuple):
    """The static (hashable) description of a :class:`Scan`'s layers: how to rebuild
    one step from its parameter leaves, and which way the scan runs."""

    treedef: Any  # jax.tree structure of the stacked layers
    mask: tuple[bool, ...]  # per leaf: floating point (differentiated) or not
    event_dim: int
    inverse: bool  # True: the Scan's inverse_and_log_det (steps K..1, each inverted)
    unroll: int | bool


def _is_float(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _split_leaves(layers: GlowTransform, inverse: bool, unroll: int | bool):
    leaves, treedef = jax.tree.flatten(layers)
    mask = tuple(_is_float(leaf) for leaf in leaves)
    floats = [leaf for leaf, m in zip(leaves, mask, strict=True) if m]
    others = [leaf for leaf, m in zip(leaves, mask, strict=True) if not m]
    return _ScanConfig(treedef, mask, layers.event_dim, inverse, unroll), floats, others


def _merge(cfg: _ScanConfig, floats: Sequence[Any], others: Sequence[Any]) -> GlowTransform:
    fi, oi = iter(floats), iter(others)
    return cfg.treedef.unflatten([next(fi) if m else next(oi) for m in cfg.mask])


def _step(layer: GlowTransform, h: Array, inverse: bool) -> tuple[Array, Array]:
    return layer.inverse_and_log_det(h) if inverse else layer.forward_and_log_det(h)


def _scan_plain(cfg: _ScanConfig, floats, others, x: Array) -> tuple[Array, Array]:
    """``(y, sum_k log_det_k)``: the steps in order, with ``lax.scan``."""
    zero = jnp.zeros(jnp.shape(x)[: jnp.ndim(x) - cfg.event_dim], jnp.result_type(x))

    def body(carry, params):
        h, total = carry
        h, ld = _step(_merge(cfg, *params), h, cfg.inverse)
        return (h, total + ld), None

    (y, total), _ = lax.scan(
        body, (x, zero), (floats, others), reverse=cfg.inverse, unroll=cfg.unroll
    )
    return y, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan_reversible(cfg: _ScanConfig, floats, others, x: Array) -> tuple[Array, Array]:
    """:func:`_scan_plain` with the reversible backward pass of :class:`Scan`."""
    return _scan_plain(cfg, floats, others, x)


def _scan_reversible_fwd(cfg, floats, others, x):
    y, total = _scan_plain(cfg, floats, others, x)
    # Residuals: the parameters and the output only, no per-step activation.
    return (y, total), (floats, others, y)


def _scan_reversible_bwd(cfg, residuals, cotangents):
    floats, others, y = residuals
    g_y, g_total = cotangents

    def body(carry, params):
        h_out, g_out = carry
        f, o = params
        # Recompute this step's input from its output with the step's inverse ...
        h_in, _ = _step(_merge(cfg, f, o), h_out, not cfg.inverse)
        h_in = lax.stop_gradient(h_in)
        # ... then pull the cotangents (of the output and of the log-det, which
        # enters the total with weight one) back through the step.
        _, vjp = jax.vjp(lambda f_, h_: _step(_merge(cfg, f_, o), h_, cfg.inverse), f, h_in)
        g_f, g_in = vjp((g_out, g_total))
        return (h_in, g_in), g_f

    (_, g_x), g_floats = lax.scan(
        body, (y, g_y), (floats, others), reverse=not cfg.inverse, unroll=cfg.unroll
    )
    return g_floats, None, g_x


_scan_reversible.defvjp(_scan_reversible_fwd, _scan_reversible_bwd)


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

    **Reversible gradients** (``reversible=True``). Plain reverse-mode autodiff
    stores every step's activations (the input of each step and everything its
    coupling network computes) for the backward pass, so memory grows linearly
    with ``K``. Because every step is a bijection, its input can instead be
    recomputed from its output (i-RevNet, Glow's reference implementation,
    MemCNN). With ``reversible=True`` the Scan is a :func:`jax.custom_vjp` of its
    parameters :math:`\theta_{1..K}` (the floating-point leaves of ``layers``) and
    its input :math:`x_0`. The forward pass runs the steps,
    :math:`x_k = f_k(x_{k-1}; \theta_k)`, and keeps only the output :math:`x_K`
    (and the parameters). Given the cotangents :math:`\bar x_K` of the output and
    :math:`\bar\ell` of the total log-determinant
    :math:`\ell = \sum_k \ell_k(x_{k-1}; \theta_k)`, the backward pass walks
    :math:`k = K, \dots, 1`:

    .. math::

        x_{k-1} &= f_k^{-1}(x_k; \theta_k)
            \quad\text{(recomputed with the step's inverse)},\\
        (\bar\theta_k, \bar x_{k-1}) &= \mathrm{VJP}_{(\theta_k, x_{k-1})}
            \big[(f_k, \ell_k)\big](\bar x_k, \bar\ell),

    and returns :math:`\bar x_0` and the stacked :math:`\bar\theta_{1..K}`. Every
    step sees the same :math:`\bar\ell`, since :math:`\ell` sums the steps with
    weight one. The inverse direction (:meth:`inverse_and_log_det`) is the same
    algorithm with the roles of :math:`f_k` and :math:`f_k^{-1}` swapped. Memory
    held between the passes is then :math:`O(1)` in ``K`` (one step's
    activations at a time, plus the parameters), for about one extra inverse
    and one extra forward evaluation per step (``benchmarks/memory.py``
    measures both).

    Caveats: (1) The recomputed :math:`x_{k-1}` equals the true activation only
    up to rounding, and the error can grow through the ``K`` inverses, more with
    badly conditioned steps (large ActNorm scales, small coupling scales). Most
    gradients then agree with plain autodiff to a small fraction of their
    largest entry; the largest differences are in coupling-net weights next to
    ReLU units that sit within rounding of zero, whose derivative flips.
    (2) The memory saving needs the rolled scan (``unroll=1``): fully
    unrolled, XLA keeps most of the backward's per-step temporaries alive, so
    :func:`~numpyro_glow.glow` with ``reversible=True`` rolls the scan on every
    backend. :doc:`/performance` (*Options*, ``reversible=True``) has the
    measured drift, memory and time. (3) A ``custom_vjp`` defines reverse mode
    only: forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``)
    through a reversible Scan raises; use ``reversible=False`` there. (4)
    Non-float leaves (the dropout keys) get no cotangent, as in plain autodiff.
    Without differentiation a reversible Scan computes exactly what a plain one
    does.
    """

    def __init__(self, layers: GlowTransform, unroll: int | bool = 1, reversible: bool = False):
        self.layers = layers
        self.unroll = unroll
        self.reversible = bool(reversible)

    @classmethod
    def stack(
        cls,
        layers: Sequence[GlowTransform],
        unroll: int | bool = 1,
        reversible: bool = False,
    ) -> Scan:
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
        return cls(stacked, unroll=unroll, reversible=reversible)

    @property
    def event_dim(self) -> int:  # type: ignore[override]
        return self.layers.event_dim

    @property
    def num_steps(self) -> int:
        return jax.tree.leaves(self.layers)[0].shape[0]

    def _run(self, x: Array, inverse: bool) -> tuple[Array, Array]:
        x = jnp.asarray(x)
        cfg, floats, others = _split_leaves(self.layers, inverse, self.unroll)
        run = _scan_reversible if self.reversible else _scan_plain
        return run(cfg, floats, others, x)

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        return self._run(x, inverse=False)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        return self._run(y, inverse=True)

    def tree_flatten(self):
        return (self.layers,), (
            ("layers",),
            {"unroll": self.unroll, "reversible": self.reversible},
        )

    def __repr__(self) -> str:
        return (
            f"Scan({self.num_steps} x {jax.tree.structure(self.layers)}, "
            f"unroll={self.unroll}, reversible={self.reversible})"
        )
