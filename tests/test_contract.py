"""The transform contract of DESIGN.md, checked for every transform in ``cases.CASES``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from cases import CASES, build, float_leaf_mask

IDS = [c.name for c in CASES]
KEY = jax.random.PRNGKey(0)


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


def _sample_y(case, t, key, batch_shape=()):
    """A point in the codomain: push an input through (then perturb in place)."""
    x = case.sample_x(key, batch_shape)
    return t(x)


# 1. round trips ---------------------------------------------------------------
def test_round_trip_both_ways(case):
    t = build(case)
    x = case.sample_x(KEY, (3,))
    y = t(x)
    np.testing.assert_allclose(t.inv(y), x, atol=2e-5, rtol=1e-5)
    y2 = y + 0.1 * jax.random.normal(jax.random.PRNGKey(1), y.shape)
    x2 = t.inv(y2)
    assert np.all(np.isfinite(x2))
    np.testing.assert_allclose(t(x2), y2, atol=2e-5, rtol=1e-5)


# 2. log-det against the autodiff Jacobian ----------------------------------------
def _jacobian_log_det(f, x, forward_mode=True):
    flat = lambda v: f(v.reshape(x.shape)).reshape(-1)  # noqa: E731
    jac = (jax.jacfwd if forward_mode else jax.jacrev)(flat)(x.reshape(-1))
    return np.linalg.slogdet(np.asarray(jac, np.float64))[1]


def test_log_det_matches_jacobian(case):
    t = build(case)
    x = case.sample_x(KEY)
    y, ld = t.forward_and_log_det(x)
    expected = _jacobian_log_det(t, x, case.forward_mode)
    np.testing.assert_allclose(np.sum(ld), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.sum(t.log_abs_det_jacobian(x, y)), expected, rtol=1e-4, atol=1e-4)
    # inverse direction, at the matching point: the negative
    x_back, ild = t.inverse_and_log_det(y)
    inverse_expected = _jacobian_log_det(t.inv, y, case.forward_mode)
    np.testing.assert_allclose(np.sum(ild), inverse_expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.sum(ild), -expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.sum(t.inv.log_abs_det_jacobian(y, x_back)), -expected, rtol=1e-4, atol=1e-4
    )


# 3. shapes --------------------------------------------------------------------------
@pytest.mark.parametrize("batch_shape", [(), (1,), (2, 3)], ids=["scalar", "one", "two_by_three"])
def test_shapes(case, batch_shape):
    t = build(case)
    x = case.sample_x(KEY, batch_shape)
    y, ld = t.forward_and_log_det(x)
    assert y.shape == t.forward_shape(x.shape)
    assert t.inverse_shape(y.shape) == x.shape
    ld_batch = x.shape[: x.ndim - t.domain.event_dim]
    assert ld.shape == ld_batch
    assert t.log_abs_det_jacobian(x, y).shape == ld_batch
    x2, ild = t.inverse_and_log_det(y)
    assert x2.shape == x.shape and ild.shape == ld_batch
    assert t.inv.log_abs_det_jacobian(y, x2).shape == ld_batch


def test_transformed_distribution_keeps_batch(case):
    """A wrong event_dim makes TransformedDistribution sum log-dets over the batch."""
    t = build(case)
    x = case.sample_x(KEY, (2, 3))
    y = t(x)
    event_shape = y.shape[2:]
    base = dist.Normal(jnp.zeros(event_shape), 1.0).to_event(len(event_shape))
    d = dist.TransformedDistribution(base, t.inv)
    lp = d.log_prob(x)
    assert lp.shape == (2, 3)
    ld = t.forward_and_log_det(x)[1]
    if t.domain.event_dim < len(event_shape):  # elementwise layer: sum over the event
        ld = ld.reshape(2, 3, -1).sum(-1)
    np.testing.assert_allclose(lp, base.log_prob(y) + ld, rtol=1e-5, atol=1e-4)


# 4. eager, jit, vmap, pytree ---------------------------------------------------------
def test_eager_jit_vmap_pytree_agree(case):
    t = build(case)
    x = case.sample_x(KEY, (3,))
    y, ld = t.forward_and_log_det(x)
    fwd = jax.jit(lambda tr, v: tr.forward_and_log_det(v))
    inv = jax.jit(lambda tr, v: tr.inverse_and_log_det(v))
    y_jit, ld_jit = fwd(t, x)
    np.testing.assert_allclose(y_jit, y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ld_jit, ld, atol=1e-4, rtol=1e-5)
    y_vmap, ld_vmap = jax.vmap(t.forward_and_log_det)(x)
    np.testing.assert_allclose(y_vmap, y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ld_vmap, ld, atol=1e-4, rtol=1e-5)
    # pytree round trip keeps every attribute, static or not
    leaves, treedef = jax.tree.flatten(t)
    t2 = jax.tree.unflatten(treedef, leaves)
    assert type(t2) is type(t) and jax.tree.structure(t2) == treedef
    np.testing.assert_allclose(t2(x), y, atol=1e-6)
    np.testing.assert_allclose(inv(t2, y)[0], x, atol=2e-5, rtol=1e-5)
    # a transform returned from jit is whole
    t3 = jax.jit(lambda tr: tr)(t)
    np.testing.assert_allclose(t3(x), y, atol=1e-6)


# 5. finite gradients --------------------------------------------------------------------
def test_gradients_finite(case):
    t = build(case)
    x = case.sample_x(KEY, (2,))
    leaves, treedef = jax.tree.flatten(t)
    mask = float_leaf_mask(t)

    def loss(float_leaves, v, inverse):
        it = iter(float_leaves)
        tr = treedef.unflatten(
            [next(it) if m else leaf for leaf, m in zip(leaves, mask, strict=True)]
        )
        out, ld = (tr.inverse_and_log_det if inverse else tr.forward_and_log_det)(v)
        return jnp.sum(out**2) + jnp.sum(ld)

    params = [leaf for leaf, m in zip(leaves, mask, strict=True) if m]
    y = t(x)
    for v, inverse in [(x, False), (y, True)]:
        g_params, g_v = jax.grad(loss, argnums=(0, 1))(params, v, inverse)
        assert np.isfinite(g_v).all()
        assert all(np.isfinite(g).all() for g in g_params)
        if any(np.size(p) for p in params) and "squeeze" not in case.name:
            assert any(np.abs(g).sum() > 0 for g in g_params), "parameters get no gradient"
