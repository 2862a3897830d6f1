"""A trained Glow as a prior: the one-line loader and the inpainting model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density

from numpyro_glow import FlowDistribution, inpainting_model, load_glow


@pytest.fixture(scope="module")
def prior(digits_checkpoint):
    return load_glow(digits_checkpoint)


def _image_and_mask():
    image = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8, 1)
    mask = np.zeros((8, 8, 1), bool)
    mask[:4] = True
    return np.where(mask, image, np.nan), mask


def test_load_glow_is_a_fixed_prior(prior, digits_checkpoint):
    assert isinstance(prior, FlowDistribution)
    assert prior.event_shape == (8, 8, 1) and prior.batch_shape == ()
    x = jax.jit(lambda k: prior.sample(k, (3,)))(jax.random.PRNGKey(0))
    assert x.shape == (3, 8, 8, 1)
    log_prob = jax.jit(lambda d, x: d.log_prob(x))
    assert np.isfinite(np.asarray(log_prob(prior, x))).all()

    def model():
        return __import__("numpyro").sample("image", prior)

    trace = handlers.trace(handlers.seed(model, 0)).get_trace()
    assert [s["type"] for s in trace.values()] == ["sample"]  # no param sites: fixed
    # the trained (best) parameters, not a fresh init: a second load is identical,
    # and so is the run's best.npz
    again = load_glow(digits_checkpoint)
    assert np.allclose(log_prob(prior, x), log_prob(again, x))
    best = load_glow(digits_checkpoint.with_name("best.npz"))
    assert np.array_equal(log_prob(prior, x), log_prob(best, x))
    # temperature scales the base
    cold = load_glow(digits_checkpoint, temperature=0.5)
    assert np.allclose(cold.base_dist.variance, 0.25)


def test_load_glow_errors(digits_checkpoint, tmp_path):
    # missing and corrupt files: tests/test_checkpoint.py
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_glow(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="not class-conditional"):
        load_glow(digits_checkpoint, label=3)


def test_inpainting_model_runs_in_white_noise(prior):
    image, mask = _image_and_mask()

    def model():
        return inpainting_model(prior, image, mask, 0.1)

    trace = handlers.trace(handlers.seed(model, 1)).get_trace()
    base = trace["image_base"]
    assert base["type"] == "sample" and not base["is_observed"]
    assert trace["image"]["type"] == "deterministic"
    assert trace["image_observed"]["is_observed"]
    eps = base["value"]
    assert eps.shape == (8, 8, 1)
    # the joint density in white-noise space: N(0, 1) prior + likelihood of the
    # observed pixels only (hidden pixels hold NaN and are ignored)
    x = prior.transforms[0](eps)
    expected = dist.Normal(0.0, 1.0).log_prob(eps).sum() + jnp.sum(
        jnp.where(mask, dist.Normal(x, 0.1).log_prob(jnp.nan_to_num(image)), 0.0)
    )
    got, _ = log_density(model, (), {}, {"image_base": eps})
    assert np.isfinite(float(got))
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-3)
    assert np.allclose(trace["image"]["value"], x, atol=1e-5)


def test_inpainting_model_errors(prior):
    image, mask = _image_and_mask()
    with pytest.raises(ValueError, match=r"event shape \(8, 8, 1\).*\(28, 28, 1\)"):
        inpainting_model(prior, np.zeros((28, 28, 1)), np.ones((28, 28, 1), bool))
    with pytest.raises(ValueError, match="boolean mask"):
        inpainting_model(prior, image, mask.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inpainting_model(prior, np.where(mask, 2.0, 0.0), mask)
    with pytest.raises(ValueError, match="NaN"):
        inpainting_model(prior, np.full((8, 8, 1), np.nan), mask)
    with pytest.raises(ValueError, match="flow prior"):
        inpainting_model(dist.Normal(0, 1).expand((8, 8, 1)).to_event(3), image, mask)
