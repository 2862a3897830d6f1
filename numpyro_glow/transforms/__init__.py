"""Glow's layers as NumPyro transforms, in the normalizing direction (data to latent)."""

from .actnorm import ActNorm
from .arrow import ArrowAffine
from .base import (
    GlowTransform,
    Inverse,
    forward_and_log_det,
    inverse_and_log_det,
    split_channels,
)
from .chain import Chain, Scan
from .coupling import AdditiveCoupling, AffineCoupling
from .inv1x1conv import (
    Inv1x1Conv,
    Inv1x1ConvLU,
    lu_factors,
    random_rotation,
    rotation_constants,
)
from .logitify import Logitify
from .spline import SplineCoupling
from .split import Split
from .squeeze import Squeeze

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "ArrowAffine",
    "Chain",
    "GlowTransform",
    "Inv1x1Conv",
    "Inv1x1ConvLU",
    "Inverse",
    "Logitify",
    "Scan",
    "SplineCoupling",
    "Split",
    "Squeeze",
    "forward_and_log_det",
    "inverse_and_log_det",
    "lu_factors",
    "random_rotation",
    "rotation_constants",
    "split_channels",
]
