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

__all__ = [
    "CUT",
    "check_corruption",
    "corrupt",
    "density_model",
    "dequantization_guide",
    "glow_from_config",
]


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


CUT = 6.0  # Gaussian dequantization: the noise is a standard normal cut at +-CUT


def corrupt(k: Array, eps: Array, levels: int, corruption_level: float) -> Array:
    r"""Raiko's corruption of the integer pixels ``k`` (``0 .. levels - 1``) by the
    noise ``eps``: :math:`x = (k + c\,\epsilon) / (c + L - 1)`, with ``c`` the
    ``corruption_level`` and ``L`` the ``levels``; for 8-bit images
    (:math:`k = 255 x_8`) TFGENZOO's ``(255 x + c eps) / (c + 255)``."""
    return (k + corruption_level * eps) / (corruption_level + levels - 1)


def check_corruption(levels: int, corruption_level: float, alpha: float | None) -> None:
    """``ValueError`` unless Gaussian dequantization keeps every pixel inside the
    interval Logitify maps (``alpha``; any value without Logitify): the noise,
    cut at ``CUT`` standard deviations, and the half-pixel bins of its uniform
    bound."""
    if alpha is None:
        return
    width = corruption_level + levels - 1
    pad = alpha / (2.0 * (1.0 - alpha))  # Logitify's domain is [-pad, 1 + pad]
    reach = max(CUT * corruption_level, 0.5) / width
    if reach >= pad:
        largest = pad * (levels - 1) / (CUT - pad)  # CUT c / (c + L - 1) < pad
        smallest = 0.5 / pad - (levels - 1)  # 0.5 / (c + L - 1) < pad
        fixes = ["a larger --alpha", "--alpha none"]
        if smallest <= 0:
            fixes.insert(0, f"a --corruption-level below {largest:.3g}")
        elif smallest < largest:
            fixes.insert(0, f"a --corruption-level between {smallest:.3g} and {largest:.3g}")
        raise ValueError(
            f"corruption_level (--corruption-level): on {levels} pixel values the noise "
            f"({CUT:g} x {corruption_level}) or the half-pixel bins of its uniform bound reach "
            f"{reach:.3g} outside [0, 1], beyond the {pad:.3g} that Logitify (--alpha {alpha}) "
            f"maps; use {', '.join(fixes[:-1])} or {fixes[-1]}"
        )


def _cut_normal() -> dist.Distribution:
    return dist.TruncatedNormal(0.0, 1.0, low=-CUT, high=CUT)


def density_model(
    k: Array,
    y: Array | None = None,
    *,
    levels: int,
    config: GlowConfig,
    num_classes: int | None = None,
    temperature: float = 1.0,
    corruption_level: float | None = None,
    uniform: bool = False,
) -> None:
    """Integer pixels ``k`` (``(B, H, W, C)``) observed through dequantization.

    By default the noise ``u`` is uniform on :math:`[0, 1)^D` and
    :math:`x = (k + u) / L`. With a ``corruption_level`` ``c`` (Gaussian
    dequantization) it is standard normal, cut at ``CUT``, and
    ``x = corrupt(k, u, L, c)``: the model is then the density of the corrupted
    pixels :math:`k + c u`, which bounds nothing. ``uniform=True`` keeps that
    density but draws ``u`` uniform on :math:`[-1/2, 1/2)`: its dequantization
    bound, with bins centred on the pixel values.
    """
    batch, event_shape = k.shape[0], tuple(k.shape[1:])
    gaussian = corruption_level is not None and not uniform
    noise = _cut_normal() if gaussian else dist.Uniform(0.0, 1.0)
    with numpyro.plate("batch", batch):
        u = numpyro.sample("dequant", noise.expand(event_shape).to_event(3))
    if corruption_level is None:
        width = levels
        x = (k + u) / width
    else:
        width = corruption_level + levels - 1
        x = corrupt(k, u, levels, corruption_level) if gaussian else (k + u - 0.5) / width
    density = glow_from_config(config, event_shape, num_classes, y, temperature, init_data=x)
    with numpyro.plate("batch", batch):
        numpyro.sample("x", density, obs=x)
    numpyro.factor("discretization", -batch * math.prod(event_shape) * math.log(width))


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
    corruption_level: float | None = None,
    uniform: bool = False,
) -> None:
    """``q(u | k)``: uniform, or (``variational``) a conditional flow then a sigmoid;
    with a ``corruption_level`` (and not ``uniform``), the model's own cut normal,
    so that the model's and the guide's densities of ``u`` cancel."""
    batch, event_shape = k.shape[0], tuple(k.shape[1:])
    if corruption_level is not None and not uniform:
        q = _cut_normal().expand(event_shape).to_event(3)
    elif not variational:
        q = dist.Uniform(0.0, 1.0).expand(event_shape).to_event(3)
    else:
        flow = _dequant_flow("dequant", k, levels)
        base = dist.Normal(0.0, 1.0).expand((batch, *event_shape)).to_event(3)
        q = dist.TransformedDistribution(base, [flow, dist.transforms.SigmoidTransform()])
    with numpyro.plate("batch", batch):
        numpyro.sample("dequant", q)
