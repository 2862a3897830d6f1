"""Per-layer behaviour beyond the shared contract: numerics at the edges,
initialisation, clear errors, static networks, use inside NumPyro models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from cases import conv_params
from jax.example_libraries import stax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta

from numpyro_glow import nets
from numpyro_glow.transforms import (
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
    random_rotation,
)

KEY = jax.random.PRNGKey(0)


# Logitify: float32 accuracy up to the ends of [0, 1] ------------------------------
EDGE_X = np.array(
    [0.0, 1e-30, 1e-7, 1e-3, 0.25, 0.5 - 2**-25, 0.5, 0.5 + 2**-24, 0.75]
    + [1 - 2**-23, 1 - 2**-24, 254 / 255, 16 / 17, 1.0],
    np.float32,
)


def _logitify_f64(x32, alpha):
    x = x32.astype(np.float64)
    a = alpha / 2 + (1 - alpha) * x
    b = alpha / 2 + (1 - alpha) * (1 - x)
    return np.log(a) - np.log(b), np.log1p(-alpha) - np.log(a) - np.log(b)


@pytest.mark.parametrize("alpha", [0.05, 1e-3, 1e-6])
def test_logitify_float32_matches_float64(alpha):
    x = np.concatenate([EDGE_X, np.random.default_rng(0).random(200, dtype=np.float32)])
    t = Logitify(alpha)
    y, ld = t.forward_and_log_det(jnp.asarray(x))
    y_ref, ld_ref = _logitify_f64(x, alpha)

    def rel(got, ref):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.abs(np.asarray(got, np.float64) - ref) / np.abs(ref)

    nonzero = y_ref != 0
    assert np.max(rel(y, y_ref)[nonzero]) < 1e-5
    assert np.all(np.asarray(y)[~nonzero] == 0)
    assert np.max(rel(ld, ld_ref)) < 1e-5
    # inverse from the float32 value, against float64 of the same float32 input
    y32 = np.asarray(y)
    x_back, ild = t.inverse_and_log_det(jnp.asarray(y32))
    y64 = y32.astype(np.float64)
    x_ref = (1 / (1 + np.exp(-y64)) - alpha / 2) / (1 - alpha)
    ild_ref = -np.log1p(-alpha) - np.logaddexp(0, y64) - np.logaddexp(0, -y64)
    big = np.abs(x_ref) > 1e-6  # below that the float64 reference itself cancels
    assert np.max(rel(x_back, x_ref)[big]) < 1e-5
    assert np.max(np.abs(np.asarray(x_back, np.float64) - x)) < 1e-6
    assert np.max(rel(ild, ild_ref)) < 1e-5
    # finite gradients at the edges, both directions
    g_fwd = jax.grad(lambda v: jnp.sum(t.forward_and_log_det(v)[1] + t(v)))(jnp.asarray(x))
    g_inv = jax.grad(lambda v: jnp.sum(t.inverse_and_log_det(v)[1] + t.inv(v)))(jnp.asarray(y32))
    assert np.isfinite(g_fwd).all() and np.isfinite(g_inv).all()


def test_naive_logitify_log_det_loses_digits():
    """The seed's naive form, in float32, is off by far more than ours near x = 1."""
    alpha = 1e-6
    x = jnp.asarray(EDGE_X)
    z2 = alpha / 2 + (1 - alpha) * x
    naive = np.log1p(-alpha) - jnp.log(z2) - jnp.log(1 - z2)
    _, ld_ref = _logitify_f64(EDGE_X, alpha)
    naive_err = np.max(np.abs(np.asarray(naive, np.float64) - ld_ref) / np.abs(ld_ref))
    ours = Logitify(alpha).forward_and_log_det(x)[1]
    ours_err = np.max(np.abs(np.asarray(ours, np.float64) - ld_ref) / np.abs(ld_ref))
    assert naive_err > 1e-3 > 1e-5 > ours_err


def test_logitify_pixels_exactly_0_and_1_finite():
    x = jnp.array([0.0, 1.0])
    for alpha in (0.05, 1e-6):
        y, ld = Logitify(alpha).forward_and_log_det(x)
        assert np.isfinite(y).all() and np.isfinite(ld).all()
        np.testing.assert_allclose(y[0], -y[1])


# Inv1x1Conv: LU against dense near a singular weight ---------------------------------
def _ill_conditioned(c, cond, seed=0):
    q = np.asarray(random_rotation(jax.random.PRNGKey(seed), c), np.float64)
    return (q @ np.diag(np.geomspace(1.0, 1.0 / cond, c))).astype(np.float32)


def test_lu_matches_dense():
    w = _ill_conditioned(6, 10.0)
    dense = Inv1x1Conv.from_weight(w, lu=False)
    lu = Inv1x1Conv.from_weight(w, lu=True)
    assert isinstance(lu, Inv1x1ConvLU)
    np.testing.assert_allclose(lu.matrix(), w, atol=1e-6)
    np.testing.assert_allclose(lu.inverse_matrix() @ w, np.eye(6), atol=1e-5)
    x = jax.random.normal(KEY, (2, 3, 3, 6))
    for a, b in zip(dense.forward_and_log_det(x), lu.forward_and_log_det(x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [(), (3,), (2, 5)])
def test_lu_vector_inverse_solves_or_inverts(batch):
    """Vectors fewer than channels take two triangular solves, more take
    W^{-1}; both invert the forward map, with minus its log-determinant."""
    w = _ill_conditioned(6, 10.0, seed=1)
    lu = Inv1x1Conv.from_weight(w, lu=True, event_dim=1)
    assert not np.array_equal(lu.perm, np.arange(6))  # the permutation is exercised
    y = jax.random.normal(KEY, (*batch, 6))
    x, log_det = lu.inverse_and_log_det(y)
    np.testing.assert_allclose(x, y @ np.asarray(lu.inverse_matrix()).T, rtol=1e-5, atol=1e-5)
    back, forward_log_det = lu.forward_and_log_det(x)
    np.testing.assert_allclose(back, y, atol=1e-5)
    assert log_det.shape == batch
    np.testing.assert_allclose(log_det, -forward_log_det, rtol=1e-6)


def test_lu_gradients_finite_at_condition_1e7():
    w = _ill_conditioned(8, 1e7)
    lu = Inv1x1Conv.from_weight(w, lu=True)
    x = jax.random.normal(KEY, (2, 2, 2, 8))

    def loss(t):
        y, ld = t.forward_and_log_det(x)
        x_back, ild = t.inverse_and_log_det(y)
        return jnp.sum(y**2) + jnp.sum(ld) + jnp.sum(ild)

    rebuild = lambda lo, up, s: Inv1x1ConvLU(lu.perm, lo, up, s, lu.sign_s)  # noqa: E731
    grads = jax.grad(lambda *p: loss(rebuild(*p)), argnums=(0, 1, 2))(lu.lower, lu.upper, lu.log_s)
    for g in grads:
        assert np.isfinite(g).all()
    # the LU log-det is exact for its own parameters: the sum of log_s
    truth = np.sum(np.log(np.linalg.svd(np.asarray(lu.matrix(), np.float64), compute_uv=False)))
    np.testing.assert_allclose(lu.log_abs_det(), truth, rtol=1e-4)


def test_dense_det_underflows_where_lu_does_not():
    """DESIGN pitfall: 0.1 x orthogonal 48x48 has |det| = 1e-48 < float32's range."""
    w = 0.1 * np.asarray(random_rotation(KEY, 48))
    naive = jnp.log(jnp.abs(jnp.linalg.det(jnp.asarray(w))))
    assert not np.isfinite(naive)
    lu = Inv1x1Conv.from_weight(w, lu=True)
    np.testing.assert_allclose(lu.log_abs_det(), 48 * np.log(0.1), rtol=1e-5)
    g = jax.grad(lambda s: Inv1x1ConvLU(lu.perm, lu.lower, lu.upper, s, lu.sign_s).log_abs_det())
    assert np.isfinite(g(lu.log_s)).all()


# Initialisation: identity and rotation ------------------------------------------------
def test_actnorm_identity_at_init():
    t = ActNorm(jnp.zeros(3), jnp.zeros(3))
    x = jax.random.normal(KEY, (2, 4, 4, 3))
    y, ld = t.forward_and_log_det(x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(ld, 0.0)


@pytest.mark.parametrize("event_dim", [3, 1])
def test_coupling_at_init(event_dim):
    if event_dim == 3:
        x = jax.random.normal(KEY, (2, 4, 4, 4))
        init = lambda c_out: nets.conv_net_init(KEY, 2, c_out, 8)  # noqa: E731
        net = nets.conv_net
    else:
        x = jax.random.normal(KEY, (2, 4))
        init = lambda c_out: nets.mlp_init(KEY, 2, c_out, (8,))  # noqa: E731
        net = nets.mlp
    for t in (
        AffineCoupling(net, init(4), event_dim, scale="exp"),
        AffineCoupling(net, init(4), event_dim, scale="tanh"),
        AdditiveCoupling(net, init(2), event_dim),
    ):
        y, ld = t.forward_and_log_det(x)
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(ld, 0.0)
    # Glow's sigmoid(raw + 2) scale starts as a fixed contraction by sigmoid(2)
    y, ld = AffineCoupling(net, init(4), event_dim, scale="sigmoid").forward_and_log_det(x)
    s2 = jax.nn.sigmoid(2.0)
    np.testing.assert_array_equal(y[..., :2], x[..., :2])
    np.testing.assert_allclose(y[..., 2:], s2 * x[..., 2:], rtol=1e-6)
    np.testing.assert_allclose(ld, np.log(s2) * x[0, ..., 2:].size, rtol=1e-5)


@pytest.mark.parametrize("lu", [False, True])
def test_conv1x1_rotation_at_init(lu):
    w = random_rotation(KEY, 6)
    np.testing.assert_allclose(w @ w.T, np.eye(6), atol=1e-5)
    assert np.linalg.det(np.asarray(w)) > 0
    t = Inv1x1Conv.from_weight(w, lu=lu)
    x = jax.random.normal(KEY, (2, 3, 3, 6))
    y, ld = t.forward_and_log_det(x)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(ld, 0.0, atol=1e-4)


def test_split_prior_is_standard_normal_at_init():
    params = nets.conv_net_init(KEY, 2, 4, 8)
    x = jax.random.normal(KEY, (2, 4, 4, 4))
    y, ld = Split(nets.conv_net, params).forward_and_log_det(x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(ld, 0.0)


def test_squeeze_layout():
    x = jnp.arange(4 * 4 * 2.0).reshape(4, 4, 2)
    y = Squeeze()(x)
    assert y.shape == (2, 2, 8)
    # output pixel (i, j) holds the 2x2 block at rows 2i..2i+1, cols 2j..2j+1
    np.testing.assert_array_equal(y[1, 0].reshape(2, 2, 2), x[2:4, 0:2])


# Clear errors -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, x, match",
    [
        (lambda: ActNorm(jnp.zeros(3), jnp.zeros(3)), jnp.zeros((4, 4, 2)), "expected 3 channels"),
        (lambda: ActNorm(jnp.zeros(3), jnp.zeros(3)), jnp.zeros((4, 3)), "at least 3 axes"),
        (lambda: Inv1x1Conv(jnp.eye(3)), jnp.zeros((4, 4, 2)), "expected 3 channels"),
        (lambda: Squeeze(), jnp.zeros((3, 4, 2)), "divisible by 2"),
        (lambda: Squeeze(), jnp.zeros((4, 2)), "at least 3 axes"),
        (
            lambda: AffineCoupling(nets.conv_net, nets.conv_net_init(KEY, 1, 3, 4)),
            jnp.zeros((4, 4, 2)),
            "expected the net to return 2 channels",
        ),
        (
            lambda: AffineCoupling(nets.mlp, nets.mlp_init(KEY, 1, 2), event_dim=1),
            jnp.zeros((1,)),
            "at least 2 channels",
        ),
    ],
)
def test_bad_input_raises(make, x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="square"):
        Inv1x1Conv(jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="square"):
        Inv1x1Conv.from_weight(np.ones((3, 2)), lu=True)
    with pytest.raises(ValueError, match="singular"):
        Inv1x1Conv(jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="singular"):
        Inv1x1Conv.from_weight(np.ones((3, 3)), lu=True)
    with pytest.raises(ValueError, match="finite"):
        Inv1x1Conv(jnp.full((2, 2), jnp.nan))
    with pytest.raises(ValueError, match="alpha"):
        Logitify(1.0)
    with pytest.raises(ValueError, match="scale"):
        AffineCoupling(nets.mlp, [], scale="softplus")
    with pytest.raises(ValueError, match="factor"):
        Squeeze(0)
    with pytest.raises(ValueError, match="same channel axis"):
        ActNorm(jnp.zeros(3), jnp.zeros(2))
    with pytest.raises(ValueError, match="one structure"):
        Scan.stack([ActNorm(jnp.zeros(2), jnp.zeros(2)), Squeeze()])


# Static network, array parameters: no retracing ----------------------------------------
def test_jit_does_not_retrace_on_new_parameter_values():
    traces = []

    @jax.jit
    def f(t, x):
        traces.append(1)
        return t.forward_and_log_det(x)

    x = jax.random.normal(KEY, (2, 4, 4, 2))
    for seed in range(3):
        f(AffineCoupling(nets.conv_net, conv_params(seed, 1, 2)), x)
    assert len(traces) == 1


# Inside NumPyro models -----------------------------------------------------------------
def test_user_network_via_numpyro_module_trains_with_svi():
    """A stax network registered with numpyro.module conditions a coupling; SVI fits
    a flow density to data, and the loss goes down."""
    stax_net = stax.serial(stax.Dense(16), stax.Relu, stax.Dense(4))
    data = jax.random.normal(KEY, (256, 4)) * jnp.array([1.0, 2.0, 0.5, 1.0]) + 1.0

    def model(x):
        apply_fn, params = nets.module("net", stax_net, (1, 2))
        loc = numpyro.param("loc", jnp.zeros(4))
        log_scale = numpyro.param("log_scale", jnp.zeros(4))
        flow = Chain(
            [ActNorm(loc, log_scale, event_dim=1), AffineCoupling(apply_fn, params, 1, "exp")]
        )
        base = dist.Normal(jnp.zeros(4), 1.0).to_event(1)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.TransformedDistribution(base, flow.inv), obs=x)

    svi = SVI(model, AutoDelta(lambda x: None), numpyro.optim.Adam(0.05), Trace_ELBO())
    result = svi.run(KEY, 200, data, progress_bar=False)
    assert result.losses[-1] < result.losses[0] - 100
    # the first half passes the coupling untouched: ActNorm alone models it
    np.testing.assert_allclose(result.params["loc"][:2], data.mean(0)[:2], atol=0.3)


@pytest.mark.parametrize(
    "kernel,c_in,c_out", [((3, 3), 3, 4), ((1, 1), 3, 4), ((3, 5), 3, 4), ((3, 3), 5, 2)]
)
def test_conv2d_same_matches_xla_gradients(kernel, c_in, c_out):
    """The matrix-product convolution of the conditioner equals XLA's
    ``conv_general_dilated``: values, both gradients and forward-mode
    derivatives, on both paths (C_in <= C_out and C_in > C_out)."""
    from jax import lax

    from numpyro_glow.nets import conv2d_same

    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (2, 6, 5, c_in))
    w = jax.random.normal(kw, (*kernel, c_in, c_out))

    def xla(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)

    g = jax.random.normal(kg, (2, 6, 5, c_out))
    y_ref, vjp_ref = jax.vjp(xla, x, w)
    y, vjp = jax.vjp(conv2d_same, x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.jit(vjp)(g), vjp_ref(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # forward mode too (no custom rule in the way)
    tangents = (jnp.cos(x), jnp.sin(w))
    _, jvp = jax.jvp(conv2d_same, (x, w), tangents)
    _, jvp_ref = jax.jvp(xla, (x, w), tangents)
    np.testing.assert_allclose(jvp, jvp_ref, rtol=1e-4, atol=1e-4)


def test_conv2d_same_rejects_even_kernels():
    from numpyro_glow.nets import conv2d_same

    x, w = jnp.ones((1, 4, 4, 1)), jnp.ones((2, 2, 1, 1))
    with pytest.raises(ValueError, match="odd kernel"):
        conv2d_same(x, w)


def test_relu_matches_jax_relu_derivatives_included():
    """``nets.relu`` reads its derivative mask from the output; values, forward
    and reverse derivatives (0 at exactly 0, as ``jax.nn.relu``) and the second
    derivative are ``jax.nn.relu``'s."""
    x = jnp.array([-2.0, -0.5, 0.0, 0.0, 0.3, 4.0])
    t = jnp.arange(1.0, 7.0)
    np.testing.assert_array_equal(nets.relu(x), jax.nn.relu(x))
    np.testing.assert_array_equal(
        jax.jvp(nets.relu, (x,), (t,))[1], jax.jvp(jax.nn.relu, (x,), (t,))[1]
    )
    np.testing.assert_array_equal(jax.vjp(nets.relu, x)[1](t)[0], jax.vjp(jax.nn.relu, x)[1](t)[0])
    d2 = jax.vmap(jax.grad(jax.grad(nets.relu)))(x)
    np.testing.assert_array_equal(d2, jnp.zeros_like(x))


@pytest.mark.parametrize("matmul_convs", [False, True])
def test_conv_net_matches_reference_formulation(matmul_convs):
    """The conditioner (ReLU with output masks, 1x1 layer as a 2-D product,
    either convolution) equals the textbook formulation with ``jax.nn.relu``,
    an einsum and XLA's convolutions: values and parameter gradients."""
    from jax import lax

    def conv(x, w, b):
        dims = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims) + b

    def reference(p, x):
        h = jax.nn.relu(conv(x, p["w1"], p["b1"]))
        h = jax.nn.relu(jnp.einsum("...d,dc->...c", h, p["w2"]) + p["b2"])
        return conv(h, p["w3"], p["b3"])

    params = conv_params(3, 2, 4, 8)
    x = jax.random.normal(KEY, (3, 4, 4, 2))
    net = nets.conv_net_for("float32", matmul_convs)
    np.testing.assert_allclose(net(params, x), reference(params, x), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p, x)))  # noqa: E731
    got, want = jax.grad(loss(net))(params), jax.grad(loss(reference))(params)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
