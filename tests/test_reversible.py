"""Reversible gradients of ``Scan`` (issue 5): the custom VJP that recomputes each
step's input with its inverse must give the gradients of plain autodiff, in both
directions, rolled and unrolled, for any batch shape, under jit and vmap, and
inside a whole ``glow``; and it must hold less memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from numpyro_glow import glow
from numpyro_glow.glow import glow_step
from numpyro_glow.transforms import Scan, lu_factors

KEY = jax.random.PRNGKey(0)
EVENT = (4, 4, 4)  # (H, W, C) of one image inside a level
DEPTH = 2
BATCH = (2, 3)


def _stacked_step_params(depth=DEPTH, c=EVENT[-1], hidden=8, seed=0):
    """Non-trivial parameters of ``depth`` Glow steps (ActNorm, LU 1x1 conv,
    affine coupling), stacked on a leading axis, and their LU constants. Built
    with NumPy: eager JAX would dispatch (and compile) hundreds of tiny ops."""
    rng = np.random.default_rng(seed)
    c_a, c_out = c // 2, 2 * (c - c // 2)

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    params, constants = [], []
    for _ in range(depth):
        q, r = np.linalg.qr(rng.standard_normal((c, c)))
        w = (q * np.sign(np.diag(r))) @ np.diag(np.linspace(0.7, 1.4, c))
        perm, lower, upper, log_s, sign_s = lu_factors(w.astype(np.float32))
        params.append(
            {
                "actnorm": {"loc": normal(c, scale=0.5), "log_scale": normal(c, scale=0.3)},
                "conv": {"lower": lower, "upper": upper, "log_s": log_s},
                "coupling": {
                    "w1": normal(3, 3, c_a, hidden, scale=(2 / (9 * c_a)) ** 0.5),
                    "b1": normal(hidden, scale=0.1),
                    "w2": normal(hidden, hidden, scale=(2 / hidden) ** 0.5),
                    "b2": normal(hidden, scale=0.1),
                    "w3": normal(3, 3, hidden, c_out, scale=0.1),
                    "b3": normal(c_out, scale=0.1),
                },
            }
        )
        constants.append({"perm": perm, "sign_s": sign_s})

    def stack(trees):
        return jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *trees)

    return stack(params), stack(constants)


PARAMS, CONSTANTS = _stacked_step_params()


def _scan(params, unroll, reversible):
    return Scan(glow_step(params, CONSTANTS), unroll=unroll, reversible=reversible)


def _loss(params, x, cotangent, inverse, unroll, reversible):
    t = _scan(params, unroll, reversible)
    y, ld = (t.inverse_and_log_det if inverse else t.forward_and_log_det)(x)
    return jnp.sum(y * cotangent) + jnp.sum(jnp.sin(y)) + jnp.sum(ld)


def _both(inverse, unroll):
    """One jitted function: values and gradients, plain and reversible."""

    def f(params, x, cotangent):
        out = {}
        for rev in (False, True):
            t = _scan(params, unroll, rev)
            out[rev, "value"] = (t.inverse_and_log_det if inverse else t.forward_and_log_det)(x)
            out[rev, "grad"] = jax.grad(_loss, argnums=(0, 1))(
                params, x, cotangent, inverse, unroll, rev
            )
        return out

    return jax.jit(f)


def _assert_grads_close(expected, actual):
    for e, a in zip(jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True):
        e, a = np.asarray(e), np.asarray(a)
        scale = max(float(np.max(np.abs(e))), 1e-6)
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * scale)


def _inputs(batch_shape, inverse, unroll):
    kx, kc = jax.random.split(KEY)
    x = jax.random.normal(kx, (*batch_shape, *EVENT))
    if inverse:  # a point in the codomain
        x = _scan(PARAMS, unroll, False)(x)
    return x, jax.random.normal(kc, x.shape)


# pytest caches a module fixture by ``param == cached param``, and (False, True)
# == (False, 1): name the cases with strings.
DIRECTIONS = {
    "forward-rolled": (False, 1),
    "forward-unrolled": (False, True),
    "inverse-rolled": (True, 1),
    "inverse-unrolled": (True, True),
}


@pytest.fixture(scope="module", params=list(DIRECTIONS))
def compared(request):
    inverse, unroll = DIRECTIONS[request.param]
    x, ct = _inputs(BATCH, inverse, unroll)
    return _both(inverse, unroll)(PARAMS, x, ct)


def test_values_unchanged(compared):
    for a, b in zip(compared[False, "value"], compared[True, "value"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert compared[True, "value"][1].shape == BATCH


def test_gradients_match_autodiff(compared):
    g_params, g_x = compared[True, "grad"]
    assert g_x.shape == (*BATCH, *EVENT)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(compared[True, "grad"]))
    _assert_grads_close(compared[False, "grad"], compared[True, "grad"])
    # every stacked parameter gets its own, non-zero gradient
    assert all(
        np.abs(g).sum(axis=tuple(range(1, g.ndim))).min() > 0 for g in jax.tree.leaves(g_params)
    )


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_scalar_batch_and_vmap(inverse):
    """Batch shape (): one image, plain against reversible; and jit of vmap of the
    reversible per-image gradient."""
    x, ct = _inputs((2,), inverse, 1)
    grad = jax.grad(_loss, argnums=(0, 1))

    @jax.jit
    def f(params, x, ct):
        single = [grad(params, x[0], ct[0], inverse, 1, rev) for rev in (False, True)]
        per_image = jax.vmap(lambda v, c: grad(params, v, c, inverse, 1, True))(x, ct)
        return single, per_image

    (plain, rev), per_image = f(PARAMS, x, ct)
    assert rev[1].shape == EVENT
    _assert_grads_close(plain, rev)
    _assert_grads_close(rev, jax.tree.map(lambda g: g[0], per_image))


def test_pytree_and_jit_round_trip():
    def index(tree, k):
        return jax.tree.map(lambda a: a[k], tree)

    t = Scan.stack(
        [glow_step(index(PARAMS, k), index(CONSTANTS, k)) for k in range(DEPTH)],
        reversible=True,
    )
    leaves, treedef = jax.tree.flatten(t)
    t2 = jax.tree.unflatten(treedef, leaves)
    assert t2.reversible and t2.unroll == 1
    t3 = jax.jit(lambda tr: tr)(t)
    assert t3.reversible
    assert "reversible=True" in repr(t3)


def test_forward_mode_raises():
    """A custom VJP defines reverse mode only (documented limitation)."""
    x, _ = _inputs((), False, 1)
    t = _scan(PARAMS, 1, True)
    with pytest.raises(TypeError, match="forward-mode|jvp"):
        jax.jvp(lambda v: t(v), (x,), (x,))


# a whole glow ------------------------------------------------------------------------
SHAPE = (4, 4, 1)


def _glow_model(reversible):
    def model():
        return glow(
            "g", SHAPE, levels=2, depth=2, hidden_channels=4, unroll=1, reversible=reversible
        )

    return model


def test_glow_log_prob_gradient_matches():
    # Random parameters of the right shapes (eval_shape traces the initialisation,
    # it does not run it: eager initialisation alone takes seconds). Small values:
    # with large random weights an untrained coupling's scale gets tiny, its
    # inverse ill-conditioned, and the recomputed activations (so the reversible
    # gradients) drift in float32 (see Scan's docstring).
    def init():
        trace = handlers.trace(handlers.seed(_glow_model(False), 0)).get_trace()
        return {k: s["value"] for k, s in trace.items() if s["type"] == "param"}

    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), jax.eval_shape(init)
    )
    x = jax.random.uniform(KEY, (2, *SHAPE), minval=0.05, maxval=0.95)

    @jax.jit
    def f(params, x):
        def loss(params, x, rev):
            d = handlers.substitute(_glow_model(rev), params)()
            return -jnp.mean(d.log_prob(x))

        return [jax.value_and_grad(loss, argnums=(0, 1))(params, x, rev) for rev in (False, True)]

    (v0, g0), (v1, g1) = f(params, x)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    _assert_grads_close(g0, g1)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(g1[0]))


def test_reversible_holds_less_memory():
    """The compiled gradient's temporary buffers: with K=16 rolled steps the
    reversible backward needs less than plain autodiff, which stores them all."""
    params, constants = _stacked_step_params(depth=16, hidden=16, seed=1)
    x = jax.random.normal(KEY, (8, 8, 8, EVENT[-1]))

    def temp_bytes(rev):
        def loss(p, v):
            t = Scan(glow_step(p, constants), unroll=1, reversible=rev)
            y, ld = t.forward_and_log_det(v)
            return jnp.sum(y**2) + jnp.sum(ld)

        compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain, rev = temp_bytes(False), temp_bytes(True)
    assert rev < 0.5 * plain, (rev, plain)
