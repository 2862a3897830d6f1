"""Mixed precision: bfloat16 coupling convolutions, float32 log-determinants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from numpyro_glow import glow, nets


def _model(precision):
    def model(x=None):
        return glow("g", (4, 4, 2), levels=1, depth=2, hidden_channels=8, precision=precision)

    return model


@pytest.fixture(scope="module")
def params():
    """Random (not zero-initialised) parameters, so the nets' outputs matter."""
    trace = handlers.trace(handlers.seed(_model("float32"), 0)).get_trace()
    found = {k: v["value"] for k, v in trace.items() if v["type"] == "param"}
    leaves, tree = jax.tree.flatten(found)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


def test_bfloat16_net_returns_float32_and_is_close():
    p = nets.conv_net_init(jax.random.PRNGKey(0), 2, 4, 8)
    p = {**p, "w3": 0.1 * jax.random.normal(jax.random.PRNGKey(2), p["w3"].shape)}
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 4, 4, 2))
    full, mixed = nets.conv_net(p, x), nets.conv_net_bfloat16(p, x)
    assert mixed.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(full)))
    err = float(jnp.max(jnp.abs(full - mixed)))
    assert 0 < err < 3e-2 * scale  # bfloat16 rounding: different, but close


def test_mixed_precision_glow_is_an_exact_bijection(params):
    density = handlers.substitute(handlers.seed(_model("bfloat16"), 0), params)()
    reference = handlers.substitute(handlers.seed(_model("float32"), 0), params)()
    x = jax.random.uniform(jax.random.PRNGKey(4), (5, 4, 4, 2), minval=0.05, maxval=0.95)

    @jax.jit
    def run(d, x):
        z, log_det = d.flow.forward_and_log_det(x)
        back, inv_log_det = d.flow.inverse_and_log_det(z)
        return z, log_det, back, inv_log_det, d.log_prob(x)

    z, log_det, back, inv_log_det, log_p = run(density, x)
    assert z.dtype == log_det.dtype == log_p.dtype == jnp.float32
    # the same bfloat16 nets run both ways, so the round trip is float32-exact
    np.testing.assert_allclose(back, x, atol=2e-5)
    np.testing.assert_allclose(inv_log_det, -log_det, rtol=1e-5, atol=1e-3)
    # and the density is close to the float32 one
    ref = run(reference, x)[-1]
    assert not np.allclose(log_p, ref, rtol=0, atol=0)
    np.testing.assert_allclose(log_p, ref, rtol=2e-2)


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision.*'float16'"):
        handlers.seed(_model("float16"), 0)()
