"""AutoGlow: every AutoContinuous feature, NeuTra, and clear errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal
from numpyro.infer.reparam import NeuTraReparam

from numpyro_glow import AutoGlow
from numpyro_glow.autoguide import coupling_masks

KEY = jax.random.PRNGKey(0)


def constrained_model(y=None):
    """A positive scale, a simplex and a plate over data."""
    sigma = numpyro.sample("sigma", dist.LogNormal(0.0, 0.5))
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(3)))
    mu = numpyro.sample("mu", dist.Normal(0.0, 3.0))
    with numpyro.plate("data", 20):
        numpyro.sample("y", dist.Normal(mu + weights[0], sigma), obs=y)


DATA = 1.5 + 0.7 * jax.random.normal(KEY, (20,))


@pytest.fixture(scope="module")
def fitted():
    guide = AutoGlow(constrained_model, num_flows=2, hidden_dims=(16,))
    svi = SVI(constrained_model, guide, numpyro.optim.Adam(5e-3), Trace_ELBO())
    result = svi.run(KEY, 1500, DATA, progress_bar=False)
    return guide, result


def test_svi_fits_and_loss_decreases(fitted):
    _, result = fitted
    assert np.isfinite(result.losses).all()
    assert result.losses[-100:].mean() < result.losses[:100].mean() - 5


def test_sample_posterior_respects_constraints_and_data(fitted):
    guide, result = fitted
    draws = guide.sample_posterior(KEY, result.params, sample_shape=(500,))
    assert draws["sigma"].shape == (500,) and (draws["sigma"] > 0).all()
    assert draws["weights"].shape == (500, 3)
    np.testing.assert_allclose(draws["weights"].sum(-1), 1.0, rtol=1e-5)
    # the posterior of mu + w0 sits near the data mean
    shift = draws["mu"] + draws["weights"][:, 0]
    assert abs(float(shift.mean()) - float(DATA.mean())) < 0.3


def test_median_and_quantiles(fitted):
    guide, result = fitted
    median = guide.median(result.params)
    q = guide.quantiles(result.params, [0.1, 0.5, 0.9])
    assert set(median) == {"sigma", "weights", "mu"}
    assert q["mu"].shape == (3,) and q["weights"].shape == (3, 3)
    assert q["mu"][0] < q["mu"][1] < q["mu"][2]
    np.testing.assert_allclose(q["mu"][1], median["mu"], atol=1e-6)


def test_predictive_with_guide(fitted):
    guide, result = fitted
    pred = Predictive(constrained_model, guide=guide, params=result.params, num_samples=50)
    samples = pred(KEY)
    assert samples["y"].shape == (50, 20)


def test_get_transform_and_posterior(fitted):
    guide, result = fitted
    transform = guide.get_transform(result.params)
    posterior = guide.get_posterior(result.params)
    eps = guide.get_base_dist().sample(KEY, (4,))
    z = transform(eps)
    assert z.shape == (4, guide.latent_dim)
    np.testing.assert_allclose(transform.inv(z), eps, atol=1e-4)
    lp = posterior.log_prob(z)
    expected = guide.get_base_dist().log_prob(eps) - transform.log_abs_det_jacobian(eps, z)
    np.testing.assert_allclose(lp, expected, rtol=1e-4, atol=1e-4)


def test_initialisation_is_auto_multivariate_normal():
    """At init every step is the identity: the guide is AutoMultivariateNormal's
    N(init_loc, init_scale^2 I), log density included."""
    glow = AutoGlow(constrained_model, num_flows=3, init_scale=0.3)
    mvn = AutoMultivariateNormal(constrained_model, init_scale=0.3)
    params = {}
    for guide in (glow, mvn):
        svi = SVI(constrained_model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
        params[guide] = svi.get_params(svi.init(KEY, DATA))
    np.testing.assert_allclose(glow._init_latent, mvn._init_latent)
    eps = glow.get_base_dist().sample(KEY, (64,))
    z_glow = glow.get_transform(params[glow])(eps)
    np.testing.assert_allclose(z_glow, mvn.get_transform(params[mvn])(eps), atol=1e-5)
    np.testing.assert_allclose(
        glow.get_posterior(params[glow]).log_prob(z_glow),
        mvn.get_posterior(params[mvn]).log_prob(z_glow),
        rtol=1e-5,
        atol=1e-5,
    )


LOC = jnp.array([1.0, -2.0, 0.5])
COV = jnp.array([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])


def gaussian_model():
    numpyro.sample("z", dist.MultivariateNormal(LOC, COV))


def per_sample_gradient(stick_the_landing: bool, key):
    """Gradient of the one-sample negative ELBO at the exact optimum (the
    guide's head set to the target's mean and Cholesky factor)."""
    guide = AutoGlow(gaussian_model, num_flows=2, stick_the_landing=stick_the_landing)
    svi = SVI(gaussian_model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
    params = svi.get_params(svi.init(KEY))
    params = {**params, "auto_loc": LOC, "auto_scale_tril": jnp.linalg.cholesky(COV)}
    return jax.grad(lambda p: Trace_ELBO().loss(key, p, gaussian_model, guide))(params)


def test_stick_the_landing_gradient_vanishes_at_the_optimum():
    key = jax.random.PRNGKey(1)
    stl = jax.tree.leaves(per_sample_gradient(True, key))
    assert max(float(jnp.abs(g).max()) for g in stl) < 1e-4
    plain = per_sample_gradient(False, key)
    # without STL the score term remains: nonzero per sample, zero on average
    assert float(jnp.abs(plain["auto_loc"]).max()) > 1e-2


def test_coupling_masks_condition_later_sites_on_earlier_ones():
    masks = coupling_masks(5, 6)  # B = 3 bits: one cycle is 6 masks
    assert masks.shape == (6, 5) and set(np.unique(masks)) <= {0.0, 1.0}
    # coordinate 0 conditions the last B steps; each coordinate j > 0 is
    # transformed in some step that coordinate 0 conditions
    assert (masks[-3:, 0] == 1).all()
    for j in range(1, 5):
        assert any(m[0] == 1 and m[j] == 0 for m in masks)
    # every step transforms something and keeps something
    assert ((masks.sum(1) > 0) & (masks.sum(1) < 5)).all()
    np.testing.assert_array_equal(coupling_masks(5, 8)[-6:], masks)
    with pytest.raises(ValueError, match="dim >= 2"):
        coupling_masks(1, 4)


def test_spline_coupling_guide_fits():
    guide = AutoGlow(funnel, num_flows=2, hidden_dims=(16,), coupling="spline", num_bins=4)
    svi = SVI(funnel, guide, numpyro.optim.Adam(5e-3), Trace_ELBO())
    result = svi.run(KEY, 300, progress_bar=False)
    assert np.isfinite(result.losses).all()
    assert result.losses[-50:].mean() < result.losses[:50].mean()
    assert result.params["auto_glow_steps"]["net"][-1]["w"].shape[-1] == (3 * 4 - 1) * 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_flows": 0}, "num_flows"),
        ({"init_scale": 0.0}, "init_scale"),
        ({"coupling": "additive"}, "coupling"),
        ({"hidden_dims": ()}, "hidden_dims"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoGlow(funnel, **kwargs)


def funnel():
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(jnp.zeros(2), jnp.exp(v / 2)))


def test_neutra_then_nuts_runs_in_white_noise_space():
    guide = AutoGlow(funnel, num_flows=2, hidden_dims=(16,))
    svi = SVI(funnel, guide, numpyro.optim.Adam(5e-3), Trace_ELBO())
    result = svi.run(KEY, 800, progress_bar=False)
    neutra = NeuTraReparam(guide, result.params)
    model = neutra.reparam(funnel)
    mcmc = MCMC(NUTS(model), num_warmup=150, num_samples=150, progress_bar=False)
    mcmc.run(KEY)
    latent = mcmc.get_samples()["auto_shared_latent"]
    assert latent.shape == (150, 3)
    v = neutra.transform_sample(latent)["v"]
    assert np.isfinite(v).all() and v.shape == (150,)


def test_discrete_latent_site_is_refused():
    def model():
        numpyro.sample("k", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="discrete site"):
        SVI(model, AutoGlow(model), numpyro.optim.Adam(1e-3), Trace_ELBO()).init(KEY)


def test_improper_uniform_site_uses_the_init_strategy():
    def model():
        x = numpyro.sample("x", dist.ImproperUniform(dist.constraints.real_vector, (), (2,)))
        numpyro.factor("normal", -0.5 * jnp.sum(x**2))

    guide = AutoGlow(model, num_flows=2, hidden_dims=(8,))
    state = SVI(model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO()).init(KEY)
    assert guide.latent_dim == 2 and state is not None


def test_latent_dimension_one_is_refused():
    def model():
        numpyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="AutoNormal"):
        SVI(model, AutoGlow(model), numpyro.optim.Adam(1e-3), Trace_ELBO()).init(KEY)


def wide_model(dim: int):
    """A global log-scale and ``dim - 1`` coordinates given it."""

    def model():
        s = numpyro.sample("s", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(jnp.zeros(dim - 1), jnp.exp(s)).to_event(1))

    return model


def test_parameters_grow_linearly_in_the_dimension():
    """Above DENSE_DIM no parameter is d x d and the count grows linearly in d
    (shapes by abstract evaluation: nothing is computed)."""
    counts = {}
    for dim in (400, 800):
        model = wide_model(dim)
        svi = SVI(model, AutoGlow(model), numpyro.optim.Adam(1e-3), Trace_ELBO())
        p = jax.eval_shape(lambda k, svi=svi: svi.get_params(svi.init(k)), KEY)
        shapes = [leaf.shape for leaf in jax.tree.leaves(p)]
        assert all(sum(n >= dim for n in shape) <= 1 for shape in shapes), shapes
        counts[dim] = sum(math.prod(shape) for shape in shapes)
        assert p["auto_scale_tril"].shape == (64, 64) and p["auto_cross"].shape == (dim - 64, 64)
    assert counts[800] < 2.05 * counts[400]


def test_structured_head_starts_isotropic_and_stays_consistent():
    """Above DENSE_DIM the guide starts as N(init_loc, init_scale^2 I); with its
    parameters moved, ``log_prob`` agrees with the transform's log-determinant."""
    model = wide_model(80)
    guide = AutoGlow(model, num_flows=2, hidden_dims=(8,), init_scale=0.5)
    svi = SVI(model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
    p = svi.get_params(svi.init(KEY))
    eps = guide.get_base_dist().sample(KEY, (3,))
    np.testing.assert_allclose(
        guide.get_transform(p)(eps), guide._init_latent + 0.5 * eps, atol=1e-5
    )
    # moved away from the identity: round trip and log density stay consistent
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(KEY, len(leaves))
    p = tree.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )
    p["auto_scale"] = jnp.abs(p["auto_scale"])  # the constraints' values
    p["auto_scale_tril"] = jnp.tril(p["auto_scale_tril"], -1) + 0.5 * jnp.identity(64)
    transform = guide.get_transform(p)
    z = transform(eps)
    np.testing.assert_allclose(transform.inv(z), eps, atol=1e-4)
    expected = guide.get_base_dist().log_prob(eps) - transform.log_abs_det_jacobian(eps, z)
    np.testing.assert_allclose(guide.get_posterior(p).log_prob(z), expected, rtol=1e-4)


def stochastic_volatility(returns):
    sigma = numpyro.sample("sigma", dist.Exponential(50.0))
    s = numpyro.sample("s", dist.GaussianRandomWalk(scale=sigma, num_steps=returns.shape[0]))
    nu = numpyro.sample("nu", dist.Exponential(0.1))
    numpyro.sample("r", dist.StudentT(df=nu, loc=0.0, scale=jnp.exp(s)), obs=returns)


def test_stochastic_volatility_trains_finite_at_default_settings():
    """102 latents from NumPyro's default initialisation, Adam at 3e-3: the
    previous AutoGlow (dense 16-step stack) reached an infinite loss at step 11
    from this seed."""
    rng = np.random.default_rng(0)
    returns = jnp.asarray(
        np.exp(np.cumsum(rng.normal(0, 0.1, 100)) - 4.0) * rng.standard_t(5.0, 100), jnp.float32
    )
    guide = AutoGlow(stochastic_volatility)
    svi = SVI(stochastic_volatility, guide, numpyro.optim.Adam(3e-3), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(1), 60, returns, progress_bar=False)
    assert np.isfinite(result.losses).all()
