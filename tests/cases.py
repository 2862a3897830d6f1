"""Small instances of every transform for the contract suite.

Each case is built once (module-level cache) with random, non-trivial
parameters, so the suite exercises real couplings rather than the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np

from numpyro_glow import nets
from numpyro_glow.transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ArrowAffine,
    Chain,
    GlowTransform,
    Inv1x1Conv,
    Logitify,
    Scan,
    SplineCoupling,
    Split,
    Squeeze,
    random_rotation,
)

IMAGE = (4, 4, 2)
VECTOR = (5,)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], GlowTransform]
    event_shape: tuple[int, ...]  # shape of one input to the transform
    unit_interval: bool = False  # inputs in [0, 1] (Logitify first)
    forward_mode: bool = True  # False: reverse-mode only (a custom VJP), use jacrev

    def sample_x(self, key, batch_shape=()):
        shape = tuple(batch_shape) + self.event_shape
        if self.unit_interval:
            return jax.random.uniform(key, shape, minval=0.02, maxval=0.98)
        return jax.random.normal(key, shape)


def _perturb(key, tree, scale):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _key(i):
    return jax.random.PRNGKey(i)


def conv_params(seed, c_in, c_out, hidden=4):
    return _perturb(_key(seed + 100), nets.conv_net_init(_key(seed), c_in, c_out, hidden), 0.1)


def mlp_params(seed, d_in, d_out, hidden=(8,)):
    return _perturb(_key(seed + 100), nets.mlp_init(_key(seed), d_in, d_out, hidden), 0.1)


def actnorm(seed, shape, event_dim):
    k1, k2 = jax.random.split(_key(seed))
    return ActNorm(
        jax.random.normal(k1, shape), 0.3 * jax.random.normal(k2, shape), event_dim=event_dim
    )


def conv1x1(seed, c, lu, event_dim):
    w = np.asarray(random_rotation(_key(seed), c)) @ np.diag(np.linspace(0.7, 1.4, c))
    return Inv1x1Conv.from_weight(w.astype(np.float32), lu=lu, event_dim=event_dim)


def image_step(seed, c=2):
    """One Glow step on images: ActNorm, LU 1x1 conv, affine coupling."""
    return Chain(
        [
            actnorm(seed, (c,), 3),
            conv1x1(seed + 1, c, True, 3),
            AffineCoupling(nets.conv_net, conv_params(seed + 2, c // 2, 2 * (c - c // 2)), 3),
        ]
    )


def vector_step(seed, d=5):
    return Chain(
        [
            actnorm(seed, (d,), 1),
            conv1x1(seed + 1, d, True, 1),
            AffineCoupling(nets.mlp, mlp_params(seed + 2, d // 2, 2 * (d - d // 2)), 1, "exp"),
        ]
    )


def split_level():
    """Split on (4, 4, 4): prior on the second half, a squeezing inner level on the first."""
    steps = Scan.stack([image_step(40, 8), image_step(50, 8)])
    inner = Chain([Squeeze(), steps, Squeeze().inv])
    return Split(nets.conv_net, conv_params(60, 2, 4), inner=inner)


def _affine(seed, scale, event_dim):
    if event_dim == 3:
        return AffineCoupling(nets.conv_net, conv_params(seed, 1, 2), 3, scale=scale)
    return AffineCoupling(nets.mlp, mlp_params(seed, 2, 6), 1, scale=scale)


def _additive(seed, event_dim):
    if event_dim == 3:
        return AdditiveCoupling(nets.conv_net, conv_params(seed, 1, 1), 3)
    return AdditiveCoupling(nets.mlp, mlp_params(seed, 2, 3), 1)


#: The spline cases' interval: standard normal inputs fall on both sides of it.
SPLINE_BOUND = 1.5


def _spline(seed, event_dim, num_bins=8):
    """Spline coupling with random net weights: raw spline parameters of standard
    deviation 0.3-0.5, slopes between about 0.1 and 4."""
    k = 3 * num_bins - 1
    if event_dim == 3:  # (4, 4, 2): C_a = C_b = 1
        params = conv_params(seed, 1, k)
        return SplineCoupling(nets.conv_net, params, 3, num_bins, SPLINE_BOUND)
    params = mlp_params(seed, 2, 3 * k)  # (5,): C_a = 2, C_b = 3
    return SplineCoupling(nets.mlp, params, 1, num_bins, SPLINE_BOUND)


def guide_steps():
    """Two AutoGlow steps on vectors (5,), stacked in a Scan: an LU map and a
    masked coupling with the bounded scale, the two masks unbalanced (2 and 3
    kept channels)."""
    masks = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 1, 1]], np.float32)
    steps = []
    for seed, mask in zip((70, 80), masks, strict=True):
        coupling = AffineCoupling(nets.mlp, mlp_params(seed, 5, 10), 1, "bounded", mask=mask)
        steps.append(Chain([conv1x1(seed + 1, 5, True, 1), coupling]))
    return Scan.stack(steps)


def arrow(seed, d=5, lead=2):
    """AutoGlow's head: a 2x2 lower-triangular block, an arrow to the other three
    coordinates and their recurrence (one coefficient above 1)."""
    assert d - lead == 3
    k = jax.random.split(_key(seed), 5)
    tril = np.tril(0.3 * np.asarray(jax.random.normal(k[0], (lead, lead)))) + np.eye(lead)
    return ArrowAffine(
        jax.random.normal(k[1], (d,)),
        tril,
        0.5 * jax.random.normal(k[2], (d - lead, lead)),
        np.exp(0.3 * np.asarray(jax.random.normal(k[3], (d - lead,)))),
        np.array([1.2, -0.7], np.float32),
    )


CASES = [
    Case("logitify", lambda: Logitify(0.05), (3, 2), unit_interval=True),
    Case("logitify_tiny_alpha", lambda: Logitify(1e-6), (3, 2), unit_interval=True),
    Case("actnorm_image", lambda: actnorm(1, (2,), 3), IMAGE),
    Case("actnorm_vector", lambda: actnorm(2, (5,), 1), VECTOR),
    Case("actnorm_full_shape_prior", lambda: actnorm(3, IMAGE, 3), IMAGE),
    Case("conv1x1_dense_image", lambda: conv1x1(4, 2, False, 3), IMAGE),
    Case("conv1x1_lu_image", lambda: conv1x1(5, 2, True, 3), IMAGE),
    Case("conv1x1_dense_vector", lambda: conv1x1(6, 5, False, 1), VECTOR),
    Case("conv1x1_lu_vector", lambda: conv1x1(7, 5, True, 1), VECTOR),
    Case("affine_sigmoid_image", lambda: _affine(8, "sigmoid", 3), IMAGE),
    Case("affine_exp_image", lambda: _affine(9, "exp", 3), IMAGE),
    Case("affine_sigmoid_vector", lambda: _affine(10, "sigmoid", 1), VECTOR),
    Case("affine_exp_vector", lambda: _affine(11, "exp", 1), VECTOR),
    Case("affine_tanh_vector", lambda: _affine(16, "tanh", 1), VECTOR),
    Case("additive_image", lambda: _additive(12, 3), IMAGE),
    Case("additive_vector", lambda: _additive(13, 1), VECTOR),
    Case("spline_image", lambda: _spline(17, 3), IMAGE),
    Case("spline_vector", lambda: _spline(18, 1, num_bins=5), VECTOR),
    Case("guide_steps", guide_steps, VECTOR),
    Case("arrow_affine", lambda: arrow(90), VECTOR),
    Case("squeeze", lambda: Squeeze(), IMAGE),
    Case("unsqueeze", lambda: Squeeze().inv, (2, 2, 8)),
    Case("split_multiscale", split_level, (4, 4, 4)),
    Case("split_prior_only", lambda: Split(nets.conv_net, conv_params(14, 1, 2)), IMAGE),
    Case("scan_image_steps", lambda: Scan.stack([image_step(20), image_step(30)]), IMAGE),
    Case(
        "scan_image_steps_reversible",
        lambda: Scan.stack([image_step(20), image_step(30)], reversible=True),
        IMAGE,
        forward_mode=False,
    ),
    Case(
        "scan_vector_steps_unrolled",
        lambda: Scan.stack([vector_step(21), vector_step(31)], unroll=True),
        VECTOR,
    ),
    Case(
        "chain_logitify_squeeze_step",
        lambda: Chain([Logitify(0.05), Squeeze(), image_step(70, 8), Squeeze().inv]),
        IMAGE,
        unit_interval=True,
    ),
    Case("inverse_of_coupling", lambda: _affine(15, "sigmoid", 3).inv, IMAGE),
]

_cache: dict[str, GlowTransform] = {}


def build(case: Case) -> GlowTransform:
    if case.name not in _cache:
        _cache[case.name] = case.make()
    return _cache[case.name]
