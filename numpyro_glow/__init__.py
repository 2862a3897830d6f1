"""numpyro-glow: Glow normalizing flows for NumPyro."""

from . import nets, transforms
from .transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Chain,
    Inv1x1Conv,
    Inv1x1ConvLU,
    Logitify,
    Scan,
    Split,
    Squeeze,
)

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "Chain",
    "Inv1x1Conv",
    "Inv1x1ConvLU",
    "Logitify",
    "Scan",
    "Split",
    "Squeeze",
    "nets",
    "transforms",
]
