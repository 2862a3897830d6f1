"""The transform contract (docs/transforms.rst, "The contract every transform
passes"), checked for every transform in ``cases.CASES``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from cases import CASES, build

IDS = [c.name for c in CASES]
KEY = jax.random.PRNGKey(0)


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


def _loss(t, v, inverse=False):
    out, ld = (t.inverse_and_log_det if inverse else t.forward_and_log_det)(v)
    return jnp.sum(out**2) + jnp.sum(ld)


# Compiled once per transform structure and shared by the tests below; the
# Python bodies run only while tracing, so _TRACES counts the traces.
_TRACES: list[None] = []


def _forward(t, v):
    _TRACES.append(None)
    return t.forward_and_log_det(v)


_FWD = jax.jit(_forward)
_INV = jax.jit(lambda t, v: t.inverse_and_log_det(v))
_FWD_VMAP_INPUTS = jax.jit(jax.vmap(_forward, in_axes=(None, 0)))
_FWD_VMAP_OBJECTS = jax.jit(jax.vmap(_forward))
_VALUE_AND_GRAD = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)), static_argnums=2)

STEP = 1e-3
_STEPPED: dict[str, tuple] = {}


def _stepped(case):
    """``(t, x, loss, grads, t_step, norm)``: the case's transform, an input, the
    loss there, ``jax.grad`` of the loss with respect to the transform *object*
    and the input, the transform one normalised gradient step of length ``STEP``
    away (its constants unmoved: their gradient is zero), and the gradient's
    norm. Cached per case."""
    if case.name not in _STEPPED:
        t = build(case)
        x = case.sample_x(KEY, (2,))
        loss, grads = _VALUE_AND_GRAD(t, x, False)
        norm = float(np.sqrt(sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(grads[0]))))
        t_step = jax.tree.map(lambda p, d: p - STEP * d / max(norm, 1e-12), t, grads[0])
        _STEPPED[case.name] = (t, x, float(loss), grads, t_step, norm)
    return _STEPPED[case.name]


# 1. round trips ---------------------------------------------------------------
def test_round_trip_both_ways(case):
    t = build(case)
    x = case.sample_x(KEY, (3,))
    y = _FWD(t, x)[0]
    np.testing.assert_allclose(_INV(t, y)[0], x, atol=2e-5, rtol=1e-5)
    y2 = y + 0.1 * jax.random.normal(jax.random.PRNGKey(1), y.shape)
    x2 = _INV(t, y2)[0]
    assert np.all(np.isfinite(x2))
    np.testing.assert_allclose(_FWD(t, x2)[0], y2, atol=2e-5, rtol=1e-5)


# 2. log-det against the autodiff Jacobian ----------------------------------------
def _jacobian(f, x, forward_mode):
    flat = lambda v: f(v.reshape(x.shape)).reshape(-1)  # noqa: E731
    return (jax.jacfwd if forward_mode else jax.jacrev)(flat)(x.reshape(-1))


@functools.partial(jax.jit, static_argnums=2)
def _log_dets(t, x, forward_mode):
    """Both directions' log-dets (fused, and NumPyro's ``log_abs_det_jacobian``)
    and autodiff Jacobians, the inverse's at the matching point ``y = t(x)``."""
    y, ld = t.forward_and_log_det(x)
    x_back, ild = t.inverse_and_log_det(y)
    forward = (ld, t.log_abs_det_jacobian(x, y), _jacobian(t, x, forward_mode))
    inverse = (ild, t.inv.log_abs_det_jacobian(y, x_back), _jacobian(t.inv, y, forward_mode))
    return forward, inverse


def test_log_det_matches_jacobian(case):
    t = build(case)
    forward, inverse = _log_dets(t, case.sample_x(KEY), case.forward_mode)
    expected = np.linalg.slogdet(np.asarray(forward[2], np.float64))[1]
    inverse_expected = np.linalg.slogdet(np.asarray(inverse[2], np.float64))[1]
    np.testing.assert_allclose(inverse_expected, -expected, rtol=1e-4, atol=1e-4)
    for ld in forward[:2]:
        np.testing.assert_allclose(np.sum(ld), expected, rtol=1e-4, atol=1e-4)
    for ld in inverse[:2]:  # the inverse direction, at the matching point: the negative
        np.testing.assert_allclose(np.sum(ld), inverse_expected, rtol=1e-4, atol=1e-4)


# 3. shapes --------------------------------------------------------------------------
@pytest.mark.parametrize("batch_shape", [(), (1,), (2, 3)], ids=["scalar", "one", "two_by_three"])
def test_shapes(case, batch_shape):
    """Shapes by abstract evaluation (``jax.eval_shape``: the shapes a run returns,
    without compiling or running)."""
    t = build(case)
    x = jax.ShapeDtypeStruct(tuple(batch_shape) + case.event_shape, jnp.float32)
    y, ld = jax.eval_shape(t.forward_and_log_det, x)
    assert y.shape == t.forward_shape(x.shape)
    assert t.inverse_shape(y.shape) == x.shape
    ld_batch = x.shape[: len(x.shape) - t.domain.event_dim]
    assert ld.shape == ld_batch
    assert jax.eval_shape(t.log_abs_det_jacobian, x, y).shape == ld_batch
    x2, ild = jax.eval_shape(t.inverse_and_log_det, y)
    assert x2.shape == x.shape and ild.shape == ld_batch
    assert jax.eval_shape(t.inv.log_abs_det_jacobian, y, x2).shape == ld_batch


@jax.jit
def _transformed_log_prob(t, x):
    """NumPyro's ``TransformedDistribution(base, t.inv).log_prob`` at ``x`` (batch
    ``(2, 3)``), and its parts: the base's log-density at ``t(x)`` and the log-det."""
    y, ld = t.forward_and_log_det(x)
    event_shape = y.shape[2:]
    base = dist.Normal(jnp.zeros(event_shape), 1.0).to_event(len(event_shape))
    return dist.TransformedDistribution(base, t.inv).log_prob(x), base.log_prob(y), ld


def test_transformed_distribution_keeps_batch(case):
    """A wrong event_dim makes TransformedDistribution sum log-dets over the batch."""
    t = build(case)
    x = case.sample_x(KEY, (2, 3))
    lp, base_lp, ld = _transformed_log_prob(t, x)
    assert lp.shape == (2, 3)
    if t.domain.event_dim < x.ndim - 2:  # elementwise layer: sum over the event
        ld = ld.reshape(2, 3, -1).sum(-1)
    np.testing.assert_allclose(lp, base_lp + ld, rtol=1e-5, atol=1e-4)


# 4. eager, jit, vmap, pytree ---------------------------------------------------------
def test_eager_jit_vmap_pytree_agree(case):
    """Eager, ``jit`` and ``vmap`` agree. The transform object is a ``jit`` argument
    whose static data compares by value (a rebuilt transform, and one with new
    parameter values, reuse the compiled function), ``vmap`` maps over inputs
    and over a batch of transform objects, and a pytree round trip keeps it whole."""
    t, _, _, _, t_step, _ = _stepped(case)
    x = case.sample_x(KEY, (3,))
    y, ld = t.forward_and_log_det(x)  # eager: the one run outside jit
    y_jit, ld_jit = _FWD(t, x)
    np.testing.assert_allclose(y_jit, y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ld_jit, ld, atol=1e-4, rtol=1e-5)
    x_back, ild = t.inverse_and_log_det(y)
    x_jit, ild_jit = _INV(t, y)
    np.testing.assert_allclose(x_jit, x_back, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ild_jit, ild, atol=1e-4, rtol=1e-5)
    traces = len(_TRACES)
    np.testing.assert_allclose(_FWD(case.make(), x)[0], y_jit, atol=1e-6)
    y_step, ld_step = _FWD(t_step, x)
    assert len(_TRACES) == traces, "an equal transform, or new values, retraced jit"
    y_vmap, ld_vmap = _FWD_VMAP_INPUTS(t, x)
    np.testing.assert_allclose(y_vmap, y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ld_vmap, ld, atol=1e-4, rtol=1e-5)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), t, t_step)
    y_both, ld_both = _FWD_VMAP_OBJECTS(both, jnp.stack([x, x]))
    np.testing.assert_allclose(y_both[0], y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(y_both[1], y_step, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ld_both[1], ld_step, atol=1e-4, rtol=1e-5)
    # pytree round trip keeps every attribute, static or not
    leaves, treedef = jax.tree.flatten(t)
    t2 = jax.tree.unflatten(treedef, leaves)
    assert type(t2) is type(t) and jax.tree.structure(t2) == treedef
    np.testing.assert_allclose(t2(x), y, atol=1e-6)
    # a transform returned from jit is whole
    t3 = jax.jit(lambda tr: tr)(t)
    np.testing.assert_allclose(t3.inverse_and_log_det(y)[0], x_back, atol=1e-6)


# 5. gradients ------------------------------------------------------------------------
def test_every_leaf_is_a_float_array(case):
    """Integer constants are not array leaves, so ``jax.grad`` takes the object."""
    t = build(case)
    dtypes = [jnp.result_type(a) for a in jax.tree.leaves(t)]
    assert all(jnp.issubdtype(d, jnp.inexact) for d in dtypes), dtypes


def test_gradients_finite(case):
    """``jax.grad`` with respect to the transform object and the input, both
    directions; a small step against the object's gradient lowers the loss."""
    t, x, loss, forward, t_step, norm = _stepped(case)
    y = t(x)
    for g_t, g_v in [forward, _VALUE_AND_GRAD(t, y, True)[1]]:
        assert type(g_t) is type(t) and jax.tree.structure(g_t) == jax.tree.structure(t)
        assert np.isfinite(g_v).all()
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(g_t))
        if jax.tree.leaves(t) and "squeeze" not in case.name:
            assert any(np.abs(g).sum() > 0 for g in jax.tree.leaves(g_t)), "no gradient"
    if norm > 0:  # first order: the loss drops by about STEP * |grad|
        assert float(_VALUE_AND_GRAD(t_step, x, False)[0]) < loss - 0.5 * STEP * norm
