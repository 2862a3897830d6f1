"""SplineCoupling beyond the shared contract (tests/test_contract.py runs that on
the ``spline_*`` cases): identity at a zero net output, Durkan's formulas against
a float64 reference, monotonicity, gradients at knots, edges and tails, errors,
and use inside Scan.

Most tests give the coupling a net that returns its parameters, ``h = params``
of shape ``(N, 3K - 1)``: row ``n`` of ``x`` (shape ``(N, 2)``, ``event_dim=1``)
then goes through its own spline, with ``x[n, 1]`` the transformed element.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import mlp_params

from numpyro_glow import nets
from numpyro_glow.transforms import Chain, Scan, SplineCoupling
from numpyro_glow.transforms.spline import (
    MIN_BIN_SIZE,
    MIN_DERIVATIVE,
    _derivative,
    _spline_bins,
)

K = 6
B = 2.0
N = 128  # rows in every call, so each jitted helper compiles once


def _table(params, x_a):
    """The net: returns its parameters, one row of raw spline parameters per row."""
    return params


def _coupling(h, bound=B):
    return SplineCoupling(_table, h, event_dim=1, num_bins=K, bound=bound)


def _rows(v):
    """Rows ``(0.5, v_n)``: the first channel conditions (unused by ``_table``)."""
    v = jnp.asarray(v, jnp.float32)
    return jnp.stack([jnp.full_like(v, 0.5), v], axis=-1)


@jax.jit
def _both(h, x):
    t = _coupling(h)
    return t.forward_and_log_det(x), t.inverse_and_log_det(x)


@jax.jit
def _grads(h, x):
    """For each direction: d(out)/dx and d(log_det)/dx elementwise (forward mode,
    through the custom JVP), and d(sum(out + log_det))/dh (reverse mode)."""
    tangent = jnp.zeros_like(x).at[:, 1].set(1.0)  # rows are independent
    result = []
    for inverse in (False, True):

        def f(h_, x_, inverse=inverse):
            t = _coupling(h_)
            y, ld = (t.inverse_and_log_det if inverse else t.forward_and_log_det)(x_)
            return y[:, 1], ld

        _, (dy, dld) = jax.jvp(lambda x_: f(h, x_), (x,), (tangent,))
        dh = jax.grad(lambda h_: sum(jnp.sum(a) for a in f(h_, x)))(h)
        result.append((dy, dld, dh))
    return result


# float64 reference: the parameterisation and Durkan et al.'s eqs. (4)-(5) -----------
def _reference_bins(h):
    h = np.asarray(h, np.float64)

    def sizes(raw):
        e = np.exp(raw - raw.max(-1, keepdims=True))
        return 2 * B * (MIN_BIN_SIZE + (1 - K * MIN_BIN_SIZE) * e / e.sum(-1, keepdims=True))

    def knots(size):
        return np.concatenate([np.full(size.shape[:-1] + (1,), -B), -B + np.cumsum(size, -1)], -1)

    raw_d = h[:, 2 * K :]
    elu1 = np.where(raw_d > 0, raw_d + 1, np.exp(np.minimum(raw_d, 0)))
    md = MIN_DERIVATIVE
    one = np.ones((len(h), 1))
    d = np.concatenate([one, md + (1 - md) * elu1, one], -1)
    return knots(sizes(h[:, :K])), knots(sizes(h[:, K : 2 * K])), d


def _reference_forward(bins, x):
    kx, ky, d = bins
    x = np.asarray(x, np.float64)
    r = np.arange(len(x))
    k = np.sum(x[:, None] >= kx[:, 1:-1], -1)
    w, hk = kx[r, k + 1] - kx[r, k], ky[r, k + 1] - ky[r, k]
    s, xi = hk / w, np.clip((x - kx[r, k]) / w, 0, 1)
    d0, d1 = d[r, k], d[r, k + 1]
    den = s + (d0 + d1 - 2 * s) * xi * (1 - xi)
    y = ky[r, k] + hk * (s * xi**2 + d0 * xi * (1 - xi)) / den
    slope = s**2 * (d1 * xi**2 + 2 * s * xi * (1 - xi) + d0 * (1 - xi) ** 2) / den**2
    inside = np.abs(x) <= B
    return np.where(inside, y, x), np.where(inside, np.log(slope), 0.0)


def _bisect(bins, y):
    """The reference inverse, by bisection on the reference forward."""
    lo, hi = np.full(len(y), -B), np.full(len(y), B)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = _reference_forward(bins, mid)[0] < y
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(np.abs(y) <= B, (lo + hi) / 2, y)


@pytest.fixture(scope="module")
def random_splines():
    """N splines with raw parameters ~ N(0, 1) and inputs on [-1.25B, 1.25B]."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    h = jax.random.normal(k1, (N, 3 * K - 1))
    v = jax.random.uniform(k2, (N,), minval=-1.25 * B, maxval=1.25 * B)
    return h, v


@jax.jit
def _both_ways(t, x):
    return t.forward_and_log_det(x), t.inverse_and_log_det(x)


def test_identity_at_zero_net_output():
    """The default nets start with a zero last layer: exactly the identity, both
    ways, inside and outside [-B, B] (the image layout runs the same elementwise
    code; the contract suite's spline_image case covers it)."""
    key = jax.random.PRNGKey(0)
    x = 3 * jax.random.normal(key, (4, 5))
    t = SplineCoupling(nets.mlp, nets.mlp_init(key, 2, 3 * (3 * 8 - 1), (8,)), 1)
    assert np.any(np.abs(x[:, 2:]) > t.bound) and np.any(np.abs(x[:, 2:]) < t.bound)
    for y, ld in _both_ways(t, x):
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(ld, 0.0)


@jax.jit
def _bins(h):
    """The layer's own x-knots, y-knots and knot derivatives, ``(N, K + 1)`` each,
    of the splines with raw parameters ``h`` ``(N, 3K - 1)`` (``C_b = 1``)."""
    knots, raw_d = _spline_bins(h.T, K, B)
    return knots[0].T, knots[1].T, _derivative(raw_d).T


def _layer_bins(h):
    """The layer's own float32 knots and knot derivatives, as float64."""
    return tuple(np.asarray(a, np.float64) for a in _bins(h))


def test_parameterisation_matches_float64(random_splines):
    h, _ = random_splines
    for got, expected in zip(_layer_bins(h), _reference_bins(h), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_matches_float64_reference_and_bisection(random_splines):
    """Durkan et al.'s formulas in float64 on the layer's own knots (rounding the
    knots would move y by up to the slope times their error, not counted here)."""
    h, v = random_splines
    bins = _layer_bins(h)
    x = _rows(v)
    (y, ld), _ = _both(h, x)
    y_ref, ld_ref = _reference_forward(bins, v)
    assert np.any(np.abs(v) > B) and np.any(np.abs(v) < B)
    assert np.exp(ld_ref).min() < 0.01 and np.exp(ld_ref).max() > 5  # far from affine
    np.testing.assert_allclose(y[:, 1], y_ref, atol=2e-6)
    np.testing.assert_allclose(ld, ld_ref, atol=5e-5)
    # the inverse at the float32 outputs, against bisection on the reference
    (_, _), (x_back, ild) = _both(h, y)
    x_ref = _bisect(bins, np.asarray(y[:, 1], np.float64))
    # an error of a few float32 ulps in y moves x by that over the slope
    slope_ref = np.exp(_reference_forward(bins, x_ref)[1])
    np.testing.assert_array_less(np.abs(x_back[:, 1] - x_ref) * slope_ref, 2e-6)
    np.testing.assert_allclose(ild, -_reference_forward(bins, x_back[:, 1])[1], atol=1e-4)


def test_monotone_and_continuous(random_splines):
    h, _ = random_splines
    grid = jnp.linspace(-1.5 * B, 1.5 * B, N // 2)
    hs = jnp.repeat(h[:2], N // 2, axis=0)  # two splines, each on the grid
    x = _rows(jnp.tile(grid, 2))
    (y, ld), (x_inv, _) = _both(hs, x)
    y, x_inv = y[:, 1].reshape(2, -1), x_inv[:, 1].reshape(2, -1)
    assert np.all(np.diff(y, axis=-1) > 0)
    assert np.all(np.diff(x_inv, axis=-1) > 0)
    assert np.all(np.isfinite(ld))
    # the tails are the identity, and the spline meets them at +-B
    tails = np.abs(grid) > B
    np.testing.assert_array_equal(y[:, tails], np.stack([grid[tails]] * 2))
    np.testing.assert_array_equal(ld.reshape(2, -1)[:, tails], 0.0)
    # (one spline for every row: h without batch axes broadcasts)
    ends = _rows(jnp.resize(jnp.array([-B, B]), N))
    (y_ends, _), _ = _both(h[0], ends)
    np.testing.assert_allclose(y_ends[:, 1], ends[:, 1], atol=1e-6)
    np.testing.assert_array_equal(_both(h[0], x)[0][0][: N // 2, 1], y[0])


def _special_points(h):
    """Every knot (float32, as the layer computes it) of the first spline on its
    input side (x for the forward, y for the inverse), the interval's ends, one
    float32 step inside and outside them, and far out, padded to N rows."""
    xk, yk, d = (np.asarray(a[0]) for a in _bins(h))
    below = np.nextafter(np.float32(B), np.float32(0))
    above = np.nextafter(np.float32(B), np.float32(10))
    extra = np.array([below, above, -below, -above, 1e6, -1e6, 3e38, -3e38], np.float32)
    pad = np.linspace(-0.9 * B, 0.9 * B, N - K - 1 - extra.size, dtype=np.float32)
    return [np.concatenate([knots, extra, pad]) for knots in (xk, yk)], d


def test_gradients_at_knots_edges_and_tails(random_splines):
    h0, _ = random_splines
    points, d = _special_points(h0)
    h = jnp.broadcast_to(h0[:1], (N, h0.shape[-1]))
    grads = _grads(h, _rows(points[0])), _grads(h, _rows(points[1]))
    for inverse in (False, True):
        v = points[int(inverse)]
        dy, dld, dh = grads[int(inverse)][int(inverse)]
        assert np.all(np.isfinite(dy)) and np.all(np.isfinite(dld)) and np.all(np.isfinite(dh))
        out, log_det = _both(h, _rows(v))[int(inverse)]
        # autodiff's derivative is the log-det's, at knots and edges too
        np.testing.assert_allclose(np.log(dy), log_det, atol=2e-5)
        # at a knot the slope is the knot derivative (d_0 = d_K = 1 at the ends)
        np.testing.assert_allclose(dy[: K + 1], 1 / d if inverse else d, rtol=2e-5)
        # tails: identity, zero log-det, no gradient reaches the spline parameters
        tail = np.abs(v) > B
        assert tail.sum() == 6
        np.testing.assert_array_equal(out[tail, 1], v[tail])
        np.testing.assert_array_equal(log_det[tail], 0.0)
        np.testing.assert_array_equal(dy[tail], 1.0)
        np.testing.assert_array_equal(dld[tail], 0.0)
        np.testing.assert_array_equal(dh[tail], 0.0)
        assert np.all(np.abs(dh[1:K]).sum(-1) > 0)  # interior knots


def test_bad_arguments_raise():
    t = SplineCoupling(_table, jnp.zeros((2, 3 * 22)), event_dim=1, num_bins=8)
    expected = r"expected the net to return 69 channels \(\(3 \* num_bins - 1\) \* C_b"
    with pytest.raises(ValueError, match=expected):
        t(jnp.zeros((2, 5)))  # C_b = 3
    for num_bins in [1, 0, 2.5, True, "8", 1000]:
        with pytest.raises(ValueError, match="num_bins"):
            SplineCoupling(_table, None, num_bins=num_bins)
    for bound in [0.0, -1.0, float("inf"), float("nan"), "wide", None]:
        with pytest.raises(ValueError, match="bound"):
            SplineCoupling(_table, None, bound=bound)


def test_inside_scan_jit_vmap_grad():
    """Stacked spline steps in a lax.scan, under vmap, equal the Python chain of
    the same layers, and their parameter gradients are finite and non-zero."""
    layers = [
        SplineCoupling(nets.mlp, mlp_params(seed, 2, 3 * (3 * K - 1)), 1, K, B) for seed in (1, 2)
    ]
    x = 1.5 * jax.random.normal(jax.random.PRNGKey(4), (4, 5))

    def loss(flow):
        y, ld = jax.vmap(flow.forward_and_log_det)(x)
        return jnp.sum(y**2) - jnp.sum(ld)

    @jax.jit
    def run(chain, scan):
        scanned = jax.vmap(scan.forward_and_log_det)(x)
        return chain.forward_and_log_det(x), scanned, jax.grad(loss)(scan)

    expected, got, grads = run(Chain(layers), Scan.stack(layers))
    assert np.any(np.abs(x) > B) and np.any(np.abs(expected[0] - x) > 0.01)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    leaves = jax.tree.leaves(grads.layers.params)
    assert all(np.isfinite(g).all() for g in leaves)
    assert all(np.abs(g[i]).sum() > 0 for g in leaves for i in range(2))
