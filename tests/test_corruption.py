"""Gaussian dequantization (``--dequantization gaussian --corruption-level c``):
Raiko's corruption as in TFGENZOO's ``LogitifyImage(corruption_level, alpha)``,
checked against the formulas of its documentation, in the model, and through
``numpyro-glow train``."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_ARGS
from numpyro import handlers

from numpyro_glow import cli
from numpyro_glow.train import GlowConfig, TrainConfig
from numpyro_glow.train.model import (
    CUT,
    check_corruption,
    corrupt,
    density_model,
    dequantization_guide,
    glow_from_config,
)
from numpyro_glow.transforms import Logitify


def _softplus(a):
    return np.logaddexp(0.0, a)


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _seed_forward(x, eps, c, alpha):
    """TFGENZOO's LogitifyImage, forward, as its documentation writes it (float64):
    ``z = 255 x; z += c eps; z /= c + 255; z = z (1 - alpha) + alpha / 2; logit``;
    the log-determinant is ``softplus(z) + softplus(-z) - softplus(logit(alpha))``
    per pixel."""
    z = 255.0 * x
    z = z + c * eps
    z = z / (c + 255.0)
    z = z * (1.0 - alpha) + 0.5 * alpha
    z = np.log(z) - np.log(1.0 - z)
    log_det = _softplus(z) + _softplus(-z) - _softplus(np.log(alpha) - np.log(1.0 - alpha))
    return z, log_det


def _seed_inverse(z, alpha):
    """Its inverse: ``x = logistic(z); x = (x - alpha / 2) / (1 - alpha)``. The page
    prints the log-determinant as ``-2 log(logistic(z)) - z + softplus(logit(alpha))``;
    the sign of its first term is a slip (at z = 0 it would be positive, while the
    forward one is positive too): the inverse's is ``2 log(logistic(z)) - z + ...``,
    the negative of the forward's."""
    x = 1.0 / (1.0 + np.exp(-z))
    x = (x - 0.5 * alpha) / (1.0 - alpha)
    log_det = 2.0 * np.log(_sigmoid(z)) - z + _softplus(np.log(alpha) - np.log(1.0 - alpha))
    return x, log_det


@pytest.mark.parametrize("c", [1.0, 0.5, 3.0])
def test_corruption_and_logitify_match_the_seed(c):
    alpha = 0.05
    rng = np.random.default_rng(0)
    k = np.concatenate([[0, 255, 1, 254], rng.integers(0, 256, 200)]).astype(np.float64)
    eps = np.clip(rng.standard_normal(k.shape), -CUT, CUT)
    z_seed, log_det_seed = _seed_forward(k / 255.0, eps, c, alpha)

    # forward: the corrupted pixels of the model, then Logitify(alpha)
    x = corrupt(jnp.asarray(k, jnp.float32), jnp.asarray(eps, jnp.float32), 256, c)
    np.testing.assert_allclose(x, (255.0 * (k / 255.0) + c * eps) / (c + 255.0), atol=1e-6)
    z, log_det = Logitify(alpha).forward_and_log_det(x)
    np.testing.assert_allclose(z, z_seed, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_det, log_det_seed, rtol=1e-5, atol=1e-5)

    # inverse: back to the corrupted value, and to the pixels given the noise
    x_seed, inv_log_det_seed = _seed_inverse(z_seed, alpha)
    back, inv_log_det = Logitify(alpha).inverse_and_log_det(jnp.asarray(z_seed, jnp.float32))
    np.testing.assert_allclose(back, x_seed, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose((c + 255.0) * np.asarray(back) - c * eps, k, atol=2e-3)
    np.testing.assert_allclose(inv_log_det, inv_log_det_seed, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(inv_log_det_seed, -log_det_seed, rtol=1e-10, atol=1e-10)


def _params(model, k, **kwargs):
    trace = handlers.trace(handlers.seed(model, 0)).get_trace(k, **kwargs)
    return {name: s["value"] for name, s in trace.items() if s["type"] == "param"}


def _log_joint(fn, params, k, u, **kwargs):
    fixed = handlers.substitute(handlers.substitute(fn, params), {"dequant": u})
    trace = handlers.trace(fixed).get_trace(k, **kwargs)
    # every sample site: the noise, the observed image and the factor
    return sum(
        jnp.sum(s["fn"].log_prob(s["value"])) for s in trace.values() if s["type"] == "sample"
    )


def test_the_model_is_the_density_of_the_corrupted_pixels():
    """With the noise fixed at ``eps``, the loss (model minus guide) is
    ``-log p(x) + D log(c + L - 1)`` at ``x = (k + c eps) / (c + L - 1)``: the
    density of ``k + c eps`` in pixel units. The model's and the guide's
    densities of the noise cancel. The uniform bound of the same density puts
    bins of width 1 centred on the pixel values."""
    config = GlowConfig(levels=1, depth=1, hidden_channels=4, alpha=0.5)
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.integers(0, 5, (3, 4, 4, 1)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal(k.shape), jnp.float32)
    c, levels, dims = 0.3, 5, 16
    kwargs = dict(levels=levels, config=config, corruption_level=c)
    params = _params(density_model, k, **kwargs)
    glow_density = handlers.substitute(handlers.seed(glow_from_config, 0), params)(
        config, (4, 4, 1)
    )
    width = c + levels - 1

    loss = _log_joint(dequantization_guide, params, k, eps, **kwargs) - _log_joint(
        density_model, params, k, eps, **kwargs
    )
    log_p = glow_density.log_prob(corrupt(k, eps, levels, c))
    np.testing.assert_allclose(loss, -jnp.sum(log_p) + 3 * dims * math.log(width), rtol=1e-5)

    half = jnp.full(k.shape, 0.5)  # uniform bins: u - 1/2 = 0, the pixel values themselves
    bins = dict(kwargs, uniform=True)
    loss = _log_joint(dequantization_guide, params, k, half, **bins) - _log_joint(
        density_model, params, k, half, **bins
    )
    log_p = glow_density.log_prob(k / width)
    np.testing.assert_allclose(loss, -jnp.sum(log_p) + 3 * dims * math.log(width), rtol=1e-5)


def test_corruption_options_are_checked():
    with pytest.raises(ValueError, match=r"--corruption-level.*applies to --dequantization"):
        TrainConfig(corruption_level=0.5)
    with pytest.raises(ValueError, match=r"--corruption-level.*> 0"):
        TrainConfig(dequantization="gaussian", corruption_level=0.0)
    assert TrainConfig.from_dict({}).corruption_level == 1.0  # checkpoints from before
    check_corruption(256, 1.0, 0.05)  # TFGENZOO's defaults on 8-bit images fit
    check_corruption(17, 5.0, None)  # no Logitify: any noise
    with pytest.raises(ValueError, match=r"below 0\.364, a larger --alpha or --alpha none"):
        check_corruption(5, 1.0, 0.5)


def test_train_with_gaussian_dequantization(tmp_path, small_npz, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", f"npz:{small_npz}", "--out", str(out), "--steps", "4"]
    gaussian = ["--dequantization", "gaussian", "--corruption-level", "0.3"]
    # the digits' default alpha leaves no room for the noise: refused, nothing written
    assert cli.main([*args, *TINY_ARGS, *gaussian]) == 2
    assert "use a larger --alpha or --alpha none" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main([*args, *TINY_ARGS, *gaussian, "--alpha", "0.5"]) == 0
    assert "gaussian dequantization" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dequantization"] == "gaussian"
    assert math.isfinite(summary["test_bpd"])
    assert math.isfinite(summary["test_bpd_uniform_dequantization"])
    assert cli.main(["evaluate", str(out / "best.npz")]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out.splitlines()[-1])["test_bpd"])
