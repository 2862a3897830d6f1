"""AutoGlow: every AutoContinuous feature, NeuTra, and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from numpyro.infer.reparam import NeuTraReparam

from numpyro_glow import AutoGlow

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


def test_initialisation_is_a_small_gaussian_at_init_loc():
    guide = AutoGlow(constrained_model, num_flows=2, init_scale=0.1)
    svi = SVI(constrained_model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
    transform = guide.get_transform(svi.get_params(svi.init(KEY, DATA)))
    z = transform(guide.get_base_dist().sample(KEY, (2000,)))
    np.testing.assert_allclose(z.mean(0), guide._init_latent, atol=0.02)
    np.testing.assert_allclose(z.std(0), 0.1, rtol=0.1)


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


def test_latent_dimension_one_is_refused():
    def model():
        numpyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="AutoNormal"):
        SVI(model, AutoGlow(model), numpyro.optim.Adam(1e-3), Trace_ELBO()).init(KEY)
