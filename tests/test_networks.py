"""Networks from Flax (linen, nnx) and Equinox as coupling conditioners: the docs
page "Your own networks" runs as written and trains each flow, a jitted SVI step
does not retrace when the parameters change, and impure modules are refused."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import Adam

from numpyro_glow import nets

pytest.importorskip("flax")
pytest.importorskip("equinox")

PAGE = Path(__file__).resolve().parents[1] / "docs" / "networks.rst"
KINDS = {"linen": "linen", "nnx": "nnx", "equinox": "eqx"}


def _python_blocks(rst: str) -> list[str]:
    """The ``.. code-block:: python`` bodies of a reStructuredText page, in order."""
    blocks = []
    for match in re.finditer(r"^\.\. code-block:: python\n\n((?:   .*\n|\n)+)", rst, re.M):
        blocks.append(textwrap.dedent(match.group(1)))
    return blocks


@pytest.fixture(scope="module")
def page():
    """The page's namespace after running every python block, in order."""
    blocks = _python_blocks(PAGE.read_text())
    assert len(blocks) == 4, "expected the setup and one block per library"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("kind", list(KINDS))
def test_page_example_trains(page, kind):
    losses = np.asarray(page[f"{KINDS[kind]}_result"].losses)
    assert np.isfinite(losses).all()
    # the flow starts as the identity (a standard normal); the fit gains a lot
    assert losses[-20:].mean() < 0.8 * losses[:20].mean(), (losses[:3], losses[-3:])


@pytest.mark.parametrize("kind", list(KINDS))
def test_jitted_svi_step_does_not_retrace(page, kind):
    """The model (and so each network's Python code) is traced once; later steps
    with new parameter values reuse the compiled step."""
    model = page[f"{KINDS[kind]}_model"]
    traces = []

    def counted(x):
        traces.append(None)
        return model(x)

    svi = SVI(counted, lambda x: None, Adam(1e-2), Trace_ELBO())
    data = page["data"][:64]
    state = svi.init(jax.random.key(0), data)
    update = jax.jit(svi.update)
    state, first = update(state, data)
    params = svi.get_params(state)
    after_first = len(traces)
    assert after_first > 0
    losses = [float(first)]
    for _ in range(3):
        state, loss = update(state, data)
        losses.append(float(loss))
    assert len(traces) == after_first, "a jitted SVI step retraced"
    assert np.isfinite(losses).all()
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params, svi.get_params(state))
    assert max(jax.tree.leaves(moved)) > 0
    assert {"coupling0$params", "coupling1$params"} <= set(params)


@pytest.mark.parametrize("kind", list(KINDS))
def test_rebuilt_flow_reuses_compiled_code(page, kind):
    """Two model runs give couplings whose networks compare equal, so a jitted
    function taking the transform object finds its compiled code."""
    model = page[f"{KINDS[kind]}_model"]
    data = page["data"][:8]
    trace = handlers.trace(handlers.seed(model, 0)).get_trace(data)
    params = {k: s["value"] for k, s in trace.items() if s["type"] == "param"}

    def flow():
        run = handlers.trace(handlers.substitute(handlers.seed(model, 1), params))
        return run.get_trace(data)["x"]["fn"].base_dist.flow  # under the plate: expanded

    traces = []

    @jax.jit
    def log_det(t, x):
        traces.append(None)
        return t.forward_and_log_det(x)[1]

    first, second = flow(), flow()
    assert first.parts[0].net == second.parts[0].net
    # a linen module is a description, equal by value (both couplings run the same
    # function on their own params); nnx and Equinox modules are equal by identity
    assert (first.parts[0].net == first.parts[2].net) == (kind == "linen")
    np.testing.assert_array_equal(log_det(first, data), log_det(second, data))
    assert len(traces) == 1


def test_impure_modules_are_refused():
    import equinox as eqx
    import flax.linen as nn
    from flax import nnx

    class WithBatchStats(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(x)

    with pytest.raises(ValueError, match="batch_stats"):
        handlers.seed(lambda: nets.flax_linen("n", WithBatchStats(), (2, 3)), 0)()
    with pytest.raises(ValueError, match="rngs"):
        nets.flax_nnx("n", nnx.Dropout(0.5, rngs=nnx.Rngs(0)))
    mlp = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="event_ndim"):
        nets.equinox("n", mlp, event_ndim=0)


def test_equinox_net_maps_over_batch_axes():
    import equinox as eqx

    mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    net, params = handlers.seed(lambda: nets.equinox("n", mlp), 0)()
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    out = net(params, x)
    assert out.shape == (2, 5, 2)
    np.testing.assert_allclose(out[1, 4], mlp(x[1, 4]), rtol=1e-6)
