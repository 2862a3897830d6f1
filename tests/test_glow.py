"""The multi-scale Glow density: exact log_prob, sampling, ActNorm data init."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

from numpyro_glow import FlowDistribution, bits_per_dim, glow
from numpyro_glow.glow import COUPLINGS, CouplingKind, default_unroll
from numpyro_glow.transforms import AdditiveCoupling, Logitify, Squeeze

KEY = jax.random.PRNGKey(0)
SHAPE = (4, 4, 1)

OPTIONS = {
    "affine_lu_L2_top": dict(levels=2, coupling="affine", lu=True, learn_top=True),
    "additive_dense_L1_notop": dict(levels=1, coupling="additive", lu=False, learn_top=False),
    "affine_lu_L2_classes": dict(levels=2, coupling="affine", lu=True, num_classes=3),
    "affine_dense_L1_top_reals": dict(levels=1, coupling="affine", lu=False, alpha=None),
    "additive_lu_L2_classes_notop": dict(
        levels=2, coupling="additive", learn_top=False, num_classes=2
    ),
    "spline_lu_L1_top": dict(levels=1, coupling="spline", lu=True),
}
# A spline flow nudged by 0.2 is so ill-conditioned that the float32 autodiff
# Jacobian of the brute-force check is off by 0.1 nats (float64 agrees with the
# fused log_prob to 3e-4), so its nudge is milder.
NUDGE = {"spline_lu_L1_top": 0.05}


def _make(options, y=None, **extra):
    def model():
        return glow("g", SHAPE, depth=2, hidden_channels=4, y=y, **options, **extra)

    return model


def _perturbed_params(model, scale=0.2):
    """Parameters after a random nudge, so nothing is the identity."""
    trace = handlers.trace(handlers.seed(model, 0)).get_trace()
    params = {k: s["value"] for k, s in trace.items() if s["type"] == "param"}
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(KEY, len(leaves))
    return treedef.unflatten(
        [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


@jax.jit
def _jacobian_and_latent(flow, v):
    """The flow's autodiff Jacobian at one flattened image, and its latent."""

    def f(u):
        return flow(u.reshape(SHAPE)).reshape(-1)

    return jax.jacfwd(f)(v), f(v)


@pytest.fixture(scope="module", params=list(OPTIONS), ids=list(OPTIONS))
def built(request):
    options = OPTIONS[request.param]
    y = jnp.array([0, 1]) if options.get("num_classes") else None
    model = _make(options, y)
    params = _perturbed_params(model, NUDGE.get(request.param, 0.2))
    d = handlers.substitute(model, params)()
    # one image's flow each: with classes, the flow of that image's label
    labels = [None, None] if y is None else [y[0], y[1]]
    d.flows_per_image = [
        handlers.substitute(_make(options, label), params)().flow for label in labels
    ]
    x = jax.random.uniform(KEY, (2, *SHAPE), minval=0.05, maxval=0.95)
    if options.get("alpha", 0.05) is None:
        x = jax.random.normal(KEY, (2, *SHAPE))
    # a milder nudge for sampling: a strongly perturbed untrained flow's inverse
    # divides by tiny sigmoid scales step after step and overflows
    mild = handlers.substitute(model, _perturbed_params(model, 0.05))()
    return d, x, mild


def test_log_prob_equals_brute_force(built):
    d, x, _ = built
    assert isinstance(d, FlowDistribution)
    assert d.event_shape == SHAPE
    lp = d.log_prob(x)
    assert lp.shape == (2,)
    for i in range(2):
        jac, z = _jacobian_and_latent(d.flows_per_image[i], x[i].reshape(-1))
        logdet = np.linalg.slogdet(np.asarray(jac, np.float64))[1]
        base = dist.Normal(0.0, 1.0).expand((z.size,)).to_event(1).log_prob(z)
        np.testing.assert_allclose(lp[i], base + logdet, rtol=1e-4, atol=1e-3)
    # NumPyro's default (two-pass) log_prob agrees with the fused one
    default = dist.TransformedDistribution(d.base_dist, d.transforms).log_prob(x)
    np.testing.assert_allclose(lp, default, rtol=1e-5, atol=1e-4)


def test_sample_and_log_prob_consistent(built):
    _, _, d = built
    x, intermediates = d.sample_with_intermediates(KEY)
    assert x.shape == d.batch_shape + SHAPE
    assert np.isfinite(x).all()
    np.testing.assert_allclose(d.log_prob(x), d.log_prob(x, intermediates), rtol=1e-4, atol=1e-3)
    # and the flow maps the sample back to its base draw
    z = d.flow(x)
    np.testing.assert_allclose(d.flow.inv(z), x, atol=1e-4)


def test_temperature_scales_base():
    model = _make(OPTIONS["affine_lu_L2_top"], temperature=0.5)
    d = handlers.seed(model, 0)()
    eps = d.base_dist.sample(KEY, (200,))
    assert abs(float(eps.std()) - 0.5) < 0.01
    np.testing.assert_allclose(d.base_dist.variance, 0.25)


def test_class_conditional_sampling_depends_on_class():
    options = OPTIONS["affine_lu_L2_classes"]
    model = _make(options, jnp.array([0, 2]))
    params = _perturbed_params(model)
    d = handlers.substitute(model, params)()
    assert d.batch_shape == (2,)
    # same base draw, two classes: different images
    eps = jax.random.normal(KEY, SHAPE)
    x = d.flow.inv(jnp.stack([eps, eps]))
    assert float(jnp.abs(x[0] - x[1]).max()) > 1e-3


def test_actnorm_data_init_normalises_the_batch():
    data = jax.random.uniform(KEY, (64, 8, 8, 1))

    def model():
        return glow("g", (8, 8, 1), levels=2, depth=3, hidden_channels=4, init_data=data)

    d = handlers.seed(model, 0)()
    level0 = d.flow.parts[1]
    h = Squeeze()(Logitify(0.05)(data))
    steps = level0.parts[1]
    for k in range(steps.num_steps):
        step = jax.tree.map(lambda a: a[k], steps.layers)  # noqa: B023
        out = step.parts[0](h)
        np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
        np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, atol=1e-3)
        h = step(h)
    # the second level sees the kept half of the first
    kept = Squeeze()(h[..., : h.shape[-1] // 2])
    level1 = level0.parts[2].inner
    first = jax.tree.map(lambda a: a[0], level1.parts[1].layers)
    out = first.parts[0](kept)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, atol=1e-3)


def test_params_exist_then_init_data_is_ignored():
    data = jax.random.uniform(KEY, (8, 8, 8, 1))

    def model(x):
        return glow("g", (8, 8, 1), levels=1, depth=1, hidden_channels=4, init_data=x)

    params = {
        k: s["value"]
        for k, s in handlers.trace(handlers.seed(model, 0)).get_trace(data).items()
        if s["type"] == "param"
    }
    other = handlers.substitute(handlers.seed(model, 1), params)(data * 0.5)
    again = handlers.substitute(handlers.seed(model, 1), params)(data)
    np.testing.assert_array_equal(other.log_prob(data), again.log_prob(data))


def test_uniform_model_scores_log2_levels():
    for levels in (256, 17, 32):
        num_dims = 8 * 8 * 3
        bpd = bits_per_dim(jnp.zeros(5), num_dims, levels)  # log p = 0: uniform on [0,1]^D
        np.testing.assert_allclose(bpd, np.log2(levels), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(event_shape=(6, 6, 1), levels=2), "divisible by 4"),
        (dict(event_shape=(4, 4)), "event_shape"),
        (dict(event_shape=SHAPE, levels=1, coupling="no_such_kind"), "coupling"),
        (dict(event_shape=SHAPE, levels=1, num_classes=3), "y"),
        (dict(event_shape=SHAPE, levels=1, init_data=jnp.zeros((2, 4, 4, 3))), "init_data"),
        (dict(event_shape=SHAPE, levels=2, dropout=1.5), "dropout"),
        (dict(event_shape=SHAPE, levels=2, temperature=0.0), "temperature"),
        (dict(event_shape=SHAPE, levels=2, precision="float16"), "precision"),
        (dict(event_shape=SHAPE, levels=2, alpha=1.0), "alpha"),
    ],
)
def test_glow_bad_arguments(kwargs, match):
    """Every argument is checked before the first parameter is registered."""
    tracer = handlers.trace(
        handlers.seed(lambda: glow("g", depth=1, hidden_channels=2, **kwargs), 0)
    )
    with pytest.raises(ValueError, match=match):
        tracer.get_trace()
    assert not [name for name, site in tracer.trace.items() if site["type"] == "param"]


def _unrolls(**kwargs):
    d = handlers.seed(lambda: glow("g", SHAPE, levels=2, depth=2, hidden_channels=2, **kwargs), 0)()
    level0 = d.flow.parts[1]
    return [level0.parts[1].unroll, level0.parts[2].inner.parts[1].unroll]


def test_reversible_runs_the_rolled_scan_on_every_backend(monkeypatch):
    assert _unrolls() == [default_unroll()] * 2
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert default_unroll() == 4
    assert _unrolls() == [4, 4]
    assert _unrolls(reversible=True) == [1, 1]
    assert _unrolls(reversible=True, unroll=2) == [2, 2]  # an explicit unroll wins


def test_default_unroll_depth_is_deprecated():
    with pytest.warns(DeprecationWarning, match="depth"):
        assert default_unroll(8) == default_unroll()


def test_a_coupling_kind_is_one_table_entry(monkeypatch):
    """A new kind in ``COUPLINGS`` is all glow needs: here an additive coupling
    whose net returns the shift only (width c_b), registered as "shift"."""
    kind = CouplingKind(
        width=lambda c_b: c_b,
        make=lambda net, params, event_dim, scale: AdditiveCoupling(net, params, event_dim),
    )
    monkeypatch.setitem(COUPLINGS, "shift", kind)
    model = _make(dict(levels=1, coupling="shift"))
    tracer = handlers.trace(handlers.seed(model, 0))
    d = tracer()
    assert tracer.trace["g.level0"]["value"]["coupling"]["w3"].shape[-1] == 2  # c_b of 4
    steps = d.flow.parts[1].parts[1].layers
    assert isinstance(steps.parts[2], AdditiveCoupling)
    x = jax.ShapeDtypeStruct((2, *SHAPE), jnp.float32)
    assert jax.eval_shape(d.log_prob, x).shape == (2,)  # it runs (abstractly: no compile)


def test_svi_step_decreases_loss():
    data = jax.random.uniform(KEY, (32, 4, 4, 1)) * 0.5

    def model(x):
        d = glow("g", SHAPE, levels=1, depth=2, hidden_channels=8, init_data=x)
        with numpyro.plate("batch", x.shape[0]):
            numpyro.sample("x", d, obs=x)

    svi = numpyro.infer.SVI(
        model, lambda x: None, numpyro.optim.Adam(1e-2), numpyro.infer.Trace_ELBO()
    )
    result = svi.run(KEY, 60, data, progress_bar=False)
    assert np.isfinite(result.losses).all()
    assert result.losses[-1] < result.losses[0]


def test_dropout_masks_are_exact_bijections():
    options = dict(levels=1, coupling="affine", lu=True, dropout=0.5)
    model = _make(options)
    params = _perturbed_params(model)
    x = jax.random.uniform(KEY, (1, *SHAPE), minval=0.05, maxval=0.95)
    lps = []
    for seed in (0, 1):
        d = handlers.substitute(handlers.seed(model, seed), params)()
        jac = jax.jacfwd(lambda v, d=d: d.flow(v.reshape(SHAPE)).reshape(-1))(x.reshape(-1))
        z = d.flow(x[0]).reshape(-1)
        brute = dist.Normal(0.0, 1.0).expand((z.size,)).to_event(1).log_prob(z)
        brute = brute + np.linalg.slogdet(np.asarray(jac, np.float64))[1]
        lps.append(d.log_prob(x)[0])
        np.testing.assert_allclose(lps[-1], brute, rtol=1e-4, atol=1e-3)
    assert abs(float(lps[0] - lps[1])) > 1e-3  # a fresh mask per seed
    # without a key (no seed handler), no dropout: deterministic
    a = handlers.substitute(model, params)().log_prob(x)
    b = handlers.substitute(model, params)().log_prob(x)
    np.testing.assert_array_equal(a, b)
