"""numpyro-glow: Glow normalizing flows for NumPyro."""

from . import data, nets, transforms
from ._version import __version__ as __version__
from .autoguide import AutoGlow
from .distribution import FlowDistribution, StickTheLanding, bits_per_dim
from .glow import glow
from .prior import inpainting_model, load_glow
from .transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Chain,
    Inv1x1Conv,
    Inv1x1ConvLU,
    Logitify,
    Scan,
    SplineCoupling,
    Split,
    Squeeze,
)

__all__ = [
    "AutoGlow",
    "FlowDistribution",
    "StickTheLanding",
    "bits_per_dim",
    "glow",
    "inpainting_model",
    "load_glow",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "Chain",
    "Inv1x1Conv",
    "Inv1x1ConvLU",
    "Logitify",
    "Scan",
    "SplineCoupling",
    "Split",
    "Squeeze",
    "data",
    "nets",
    "transforms",
]
