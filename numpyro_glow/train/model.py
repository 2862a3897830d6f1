"""The density model as NumPyro code: the Glow of a configuration, the model that
observes integer pixels through dequantization noise, and the guides of that
noise (uniform, or a small conditional flow).

The model observes integer pixels ``k`` through a latent dequantization noise
``u`` in :math:`[0, 1)^D`, with :math:`x = (k + u) / L` for ``L`` pixel levels::

    u ~ Uniform(0, 1)^D                    (site "dequant")
    x = (k + u) / L ~ glow(...)            (site "x", observed)
    factor -D log L                        (site "discretization": p(k + u) = p(x) / L^D)

With the guide ``q(u | k)`` the ELBO is the dequantization bound
:math:`\\log P(k) \\ge E_q[\\log p(k + u) - \\log q(u|k)]`: uniform dequantization
(``q`` uniform, the bound of RealNVP and Glow) or variational dequantization
(``q`` a small flow conditioned on ``k``, as in Flow++). The SVI loss per image
divided by :math:`D \\log 2` is then bits per dimension.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from .. import nets
from ..glow import glow
from ..transforms import AffineCoupling, Chain, Inv1x1Conv, Squeeze, random_rotation
from .config import GlowConfig

Array = jax.Array

__all__ = ["density_model", "dequantization_guide", "glow_from_config"]


def glow_from_config(
    config: GlowConfig,
    event_shape: tuple[int, ...],
    num_classes: int | None = None,
    y: Array | None = None,
    temperature: float = 1.0,
    init_data: Array | None = None,
):
    """:func:`~numpyro_glow.glow` named ``"glow"`` with the architecture of ``config``."""
    return glow(
        "glow",
        event_shape,
        levels=config.levels,
        depth=config.depth,
        hidden_channels=config.hidden_channels,
        coupling=config.coupling,
        lu=config.lu,
        learn_top=config.learn_top,
        num_classes=num_classes if config.conditional else None,
        y=y if config.conditional else None,
        alpha=config.alpha,
        temperature=temperature,
        init_data=init_data,
        seed=config.seed,
        dropout=config.dropout,
        reversible=config.reversible,
        precision=config.precision,
    )


def density_model(
    k: Array,
    y: Array | None = None,
    *,
    levels: int,
    config: GlowConfig,
    num_classes: int | None = None,
    temperature: float = 1.0,
) -> None:
    """Integer pixels ``k`` (``(B, H, W, C)``) observed through dequantization."""
    batch, event_shape = k.shape[0], tuple(k.shape[1:])
    with numpyro.plate("batch", batch):
        u = numpyro.sample("dequant", dist.Uniform(0.0, 1.0).expand(event_shape).to_event(3))
    x = (k + u) / levels
    density = glow_from_config(config, event_shape, num_classes, y, temperature, init_data=x)
    with numpyro.plate("batch", batch):
        numpyro.sample("x", density, obs=x)
    numpyro.factor("discretization", -batch * math.prod(event_shape) * math.log(levels))


def _dequant_flow(name: str, k: Array, levels: int, hidden: int = 32, steps: int = 2) -> Chain:
    """A small flow from white noise to logit(u), conditioned on the pixels:
    squeeze, then ``steps`` x (1x1 convolution, affine coupling whose net also
    sees the squeezed image), unsqueeze."""
    context = Squeeze()(k / (levels - 1) - 0.5)
    c = context.shape[-1]
    parts: list = [Squeeze()]
    for i in range(steps):
        w = numpyro.param(f"{name}.conv{i}", lambda key: random_rotation(key, c))
        net = numpyro.param(
            f"{name}.net{i}",
            lambda key, i=i: nets.conv_net_init(key, c // 2 + c, 2 * (c - c // 2), hidden),
        )
        parts += [
            Inv1x1Conv(w),
            AffineCoupling(_context_net, {"net": net, "context": context}, scale="exp"),
        ]
    parts.append(Squeeze().inv)
    return Chain(parts)


def _context_net(params: dict, x_a: Array) -> Array:
    """Glow's conv net on the coupling's half and the conditioning image."""
    return nets.conv_net(params["net"], jnp.concatenate([x_a, params["context"]], axis=-1))


def dequantization_guide(
    k: Array,
    y: Array | None = None,
    *,
    levels: int,
    config: GlowConfig,
    num_classes: int | None = None,
    temperature: float = 1.0,
    variational: bool = False,
) -> None:
    """``q(u | k)``: uniform, or (``variational``) a conditional flow then a sigmoid."""
    batch, event_shape = k.shape[0], tuple(k.shape[1:])
    if not variational:
        q = dist.Uniform(0.0, 1.0).expand(event_shape).to_event(3)
    else:
        flow = _dequant_flow("dequant", k, levels)
        base = dist.Normal(0.0, 1.0).expand((batch, *event_shape)).to_event(3)
        q = dist.TransformedDistribution(base, [flow, dist.transforms.SigmoidTransform()])
    with numpyro.plate("batch", batch):
        numpyro.sample("dequant", q)
