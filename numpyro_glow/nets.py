"""Default conditioner networks: Glow's convolutional net and an MLP for vectors.

Each network is a pair: ``*_init(key, ...) -> params`` and a pure
``apply(params, x) -> h``, the signature the couplings and the split expect. The
last layer starts at zero, so a coupling built on it starts as the identity (up
to Glow's fixed ``sigmoid(2)`` scale) and a split prior as the standard normal.

Any other pure ``apply(params, x)`` works too. Networks written with other
libraries become such a pair, with their parameters registered with NumPyro,
through :func:`module` (``jax.example_libraries.stax``), :func:`flax_linen`,
:func:`flax_nnx` and :func:`equinox`; :doc:`/networks` shows each inside a flow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpyro
from jax import Array, lax

__all__ = [
    "conv_net",
    "conv_net_bfloat16",
    "conv_net_for",
    "conv2d_same",
    "relu",
    "conv_net_init",
    "mlp",
    "mlp_init",
    "module",
    "flax_linen",
    "flax_nnx",
    "equinox",
    "zero_conv",
    "zero_conv_init",
]


def _conv(x: Array, w: Array, b: Array, conv: Callable | None = None) -> Array:
    """'SAME' NHWC convolution with any batch shape in front of (H, W, C);
    ``conv`` is XLA's (default) or :func:`conv2d_same`."""
    batch = x.shape[:-3]
    y = (conv or _conv_xla)(x.reshape((-1,) + x.shape[-3:]), w)
    return y.reshape(batch + y.shape[-3:]) + b


def _conv_xla(x: Array, w: Array) -> Array:
    return lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _tap_start(i: int, j: int, ph: int, pw: int, flip: bool) -> tuple[int, int]:
    """Where tap ``(i, j)``'s window starts in the input padded by ``(ph, pw)``."""
    return (2 * ph - i, 2 * pw - j) if flip else (i, j)


def _shifted(z: Array, kh: int, kw: int, flip: bool) -> Array:
    """``(N, H, W, C) -> (N, H, W, kh kw C)``: block ``t = (i, j)`` holds
    ``z[h + s o_i, w + s o_j]`` (zero outside), ``o = (i - kh//2, j - kw//2)``,
    ``s = -1`` if ``flip`` else ``1``."""
    height, width = z.shape[1], z.shape[2]
    ph, pw = kh // 2, kw // 2
    zp = jnp.pad(z, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    blocks = []
    for i in range(kh):
        for j in range(kw):
            a, b = _tap_start(i, j, ph, pw, flip)
            blocks.append(zp[:, a : a + height, b : b + width])
    return jnp.concatenate(blocks, axis=-1)


def _fold(y: Array, kh: int, kw: int, flip: bool) -> Array:
    """``(N, H, W, kh kw C) -> (N, H, W, C)``: the sum over taps ``t = (i, j)``
    of block ``t`` read at ``(h + s o_i, w + s o_j)`` (notation of :func:`_shifted`).

    The blocks are taken with ``jnp.split`` (whose transpose is a concatenation),
    so that autodiff's transpose of ``_fold`` is :func:`_shifted` (with the
    opposite ``flip``) rather than a sum of ``kh kw`` zero-padded copies."""
    height, width = y.shape[1], y.shape[2]
    ph, pw = kh // 2, kw // 2
    out = None
    for t, block in enumerate(jnp.split(y, kh * kw, axis=-1)):
        i, j = divmod(t, kw)
        a, b = _tap_start(i, j, ph, pw, flip)
        padded = jnp.pad(block, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
        shifted = padded[:, a : a + height, b : b + width]
        out = shifted if out is None else out + shifted
    return out


def _matmul(a: Array, b: Array) -> Array:
    """``(..., K) @ (K, M)`` as one 2-D matrix product."""
    return (a.reshape(-1, a.shape[-1]) @ b).reshape(*a.shape[:-1], b.shape[-1])


def _taps_by_channel(w: Array) -> Array:
    """``(kh, kw, C_in, C_out) -> (C_in, kh kw C_out)``, tap-major columns."""
    kh, kw, c_in, c_out = w.shape
    return w.reshape(kh * kw, c_in, c_out).transpose(1, 0, 2).reshape(c_in, kh * kw * c_out)


def _check_odd(w: Array) -> None:
    kh, kw = w.shape[:2]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"conv2d_same: expected an odd kernel, got {kh}x{kw}")


def conv2d_same(x: Array, w: Array) -> Array:
    r"""Stride-1 'SAME' convolution of ``x`` ``(N, H, W, C_in)`` with an odd
    ``(k_h, k_w, C_in, C_out)`` kernel ``w``, as one matrix product.

    With :math:`T = k_h k_w` taps of offsets :math:`o_t`,
    :math:`y_p = \sum_t x_{p + o_t} W_t`, computed from shifted copies of the
    tensor with fewer channels:

    - :math:`C_{in} \le C_{out}` (Glow's first layer): the input's shifted
      copies :math:`P_{p,t} = x_{p+o_t}`, ``(N H W, T C_in)``, give
      :math:`y = P\,W_{(T C_{in}) \times C_{out}}`;
    - :math:`C_{in} > C_{out}` (the last layer): :math:`Y = x\,[W_1 \dots W_T]`,
      ``(N H W, T C_out)``, summed over shifts, :math:`y_p = \sum_t Y_{p+o_t, t}`.

    Ordinary autodiff then gives the backward pass as the same kind of
    products: for the first case :math:`\bar W = P^\top \bar y` and
    :math:`\bar x_q = \sum_t (\bar y\,W^\top)_{q - o_t, t}`; for the second, with
    the gradient's shifted copies :math:`G_{q,t} = \bar y_{q - o_t}`,
    :math:`\bar x = G\,[W_1 \dots W_T]^\top` and
    :math:`[\bar W_1 \dots \bar W_T] = x^\top G` (:func:`_fold` is written so
    that its transpose is a concatenation of shifted copies). Forward mode,
    ``vmap`` and higher derivatives work as for any JAX function.

    The values are XLA's convolution and its gradients up to float32 rounding
    (summation order). The reason is speed on CPU: XLA:CPU runs its
    convolutions, and more so their weight gradients (most of all inside a
    rolled ``lax.scan``), well below its matrix-product rate, and these
    products run at that rate. GPUs keep XLA's (cuDNN's) convolutions
    (:func:`conv_net_for`). :doc:`/performance` (*Options*) has the
    measurements and the commands that reproduce them.
    """
    _check_odd(w)
    kh, kw, c_in, c_out = w.shape
    if c_in <= c_out:
        return _matmul(_shifted(x, kh, kw, flip=False), w.reshape(kh * kw * c_in, c_out))
    return _fold(_matmul(x, _taps_by_channel(w)), kh, kw, flip=False)


@jax.custom_jvp
def relu(x: Array) -> Array:
    r""":math:`\mathrm{relu}(x) = \max(x, 0)`, with its derivative mask taken
    from the output, :math:`\dot y = \dot x\,[y > 0]`.

    Values and derivatives are those of :func:`jax.nn.relu` (derivative 0 at
    :math:`x = 0` too); only what reverse mode keeps differs. ``jax.nn.relu``'s
    rule reads its input, so autodiff keeps the pre-activation (or a mask of
    it) next to the output that the following layer's weight gradient needs
    anyway. Reading the output instead lets XLA keep one array per layer and
    fuse the mask into the backward product. Together with the 1x1 layer as
    a 2-D matrix product (which drops a transposed copy before its weight
    gradient) this made the CPU train step faster, where neither change alone
    did (:doc:`/performance`).
    """
    return jnp.maximum(x, 0)


@relu.defjvp
def _relu_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    y = relu(x)
    return y, jnp.where(y > 0, t, jnp.zeros_like(t))


def _he(key: Array, shape: tuple[int, ...], fan_in: int) -> Array:
    return jax.random.normal(key, shape) * jnp.sqrt(2.0 / fan_in)


def conv_net_init(
    key: Array, in_channels: int, out_channels: int, hidden_channels: int = 512
) -> dict[str, Array]:
    """Parameters of Glow's conditioner: 3x3 conv, ReLU, 1x1 conv, ReLU, 3x3 conv.

    The first two layers use He-normal weights, the last one is all zeros.
    """
    k1, k2 = jax.random.split(key)
    h = hidden_channels
    return {
        "w1": _he(k1, (3, 3, in_channels, h), 9 * in_channels),
        "b1": jnp.zeros(h),
        "w2": _he(k2, (h, h), h),
        "b2": jnp.zeros(h),
        "w3": jnp.zeros((3, 3, h, out_channels)),
        "b3": jnp.zeros(out_channels),
    }


def conv_net(params: dict[str, Array], x: Array) -> Array:
    r"""Glow's conditioner on images ``(..., H, W, C_in) -> (..., H, W, C_out)``:

    .. math::

        h = \mathrm{conv}_{3\times3}\big(\mathrm{relu}(W_2\,
        \mathrm{relu}(\mathrm{conv}_{3\times3}(x) + b_1) + b_2)\big) + b_3 ,

    the middle 1x1 convolution done as one 2-D matrix product over channels
    (:func:`relu` explains why the product and the ReLU are written this way).

    If ``params`` holds ``"dropout": {"key": key, "rate": rate}``, each hidden
    activation is dropped with probability ``rate`` (and the rest scaled by
    ``1 / (1 - rate)``); :func:`~numpyro_glow.glow` adds this while training
    with ``dropout > 0``. The mask depends on the key only, never on ``x``, so
    the coupling stays a bijection with an exact log-determinant.
    """
    return _conv_net(params, x, None)


def conv_net_bfloat16(params: dict[str, Array], x: Array) -> Array:
    """:func:`conv_net` in mixed precision: the input, weights and activations
    in ``bfloat16``, the output cast back to the input's dtype, so the coupling
    computes its scale, shift and log-determinant in ``float32``. Gradients
    reach the ``float32`` parameters through the casts."""
    return _conv_net(params, x, jnp.bfloat16)


@functools.cache
def conv_net_for(precision: str = "float32", matmul_convs: bool = False) -> Callable:
    """The conditioner :func:`~numpyro_glow.glow` uses: :func:`conv_net` or
    :func:`conv_net_bfloat16` (``precision``), with XLA's convolutions, or with
    :func:`conv2d_same`'s matrix products (``matmul_convs``; ``glow`` picks
    them on CPU, where they train faster, and keeps XLA's, that is cuDNN's, on
    GPUs; :doc:`/performance`). One function object per choice, so it is a
    stable static argument (``functools.cache``)."""
    plain = {"float32": conv_net, "bfloat16": conv_net_bfloat16}
    if precision not in plain:
        raise ValueError(f"expected precision 'float32' or 'bfloat16', got {precision!r}")
    if not matmul_convs:
        return plain[precision]
    dtype = None if precision == "float32" else jnp.bfloat16

    def net(params: dict[str, Array], x: Array) -> Array:
        return _conv_net(params, x, dtype, conv2d_same)

    net.__name__ = f"conv_net_{precision}_matmul"
    return net


def _conv_net(params: dict[str, Array], x: Array, dtype, conv: Callable | None = None) -> Array:
    out_dtype = x.dtype
    if dtype is not None:
        weights = {k: params[k].astype(dtype) for k in ("w1", "b1", "w2", "b2", "w3", "b3")}
        params, x = {**params, **weights}, x.astype(dtype)
    h = relu(_conv(x, params["w1"], params["b1"], conv))
    h = _dropout(params, h, 0)
    h = relu(_matmul(h, params["w2"]) + params["b2"])
    h = _dropout(params, h, 1)
    return _conv(h, params["w3"], params["b3"], conv).astype(out_dtype)


def _dropout(params: dict, h: Array, layer: int) -> Array:
    spec = params.get("dropout")
    if spec is None:
        return h
    keep = jax.random.bernoulli(jax.random.fold_in(spec["key"], layer), 1.0 - spec["rate"], h.shape)
    return jnp.where(keep, h / (1.0 - spec["rate"]), 0.0).astype(h.dtype)


def zero_conv_init(in_channels: int, out_channels: int) -> dict[str, Array]:
    """A zero-initialised 3x3 convolution (Glow's ``Conv2DZeros``), used by the
    split priors: at initialisation they are the standard normal."""
    return {"w": jnp.zeros((3, 3, in_channels, out_channels)), "b": jnp.zeros(out_channels)}


def zero_conv(params: dict[str, Array], x: Array) -> Array:
    r"""One 3x3 'SAME' convolution, :math:`h = \mathrm{conv}_{3\times3}(x) + b`."""
    return _conv(x, params["w"], params["b"])


def mlp_init(
    key: Array, in_dim: int, out_dim: int, hidden_dims: Sequence[int] = (64, 64)
) -> list[dict[str, Array]]:
    """Parameters of an MLP ``in_dim -> hidden_dims -> out_dim``, last layer zero."""
    dims = [in_dim, *hidden_dims]
    keys = jax.random.split(key, len(hidden_dims))
    layers = [
        {"w": _he(k, (a, b), a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, dims[:-1], dims[1:], strict=True)
    ]
    layers.append({"w": jnp.zeros((dims[-1], out_dim)), "b": jnp.zeros(out_dim)})
    return layers


def mlp(params: Sequence[dict[str, Array]], x: Array) -> Array:
    r"""MLP on vectors ``(..., D_in) -> (..., D_out)`` with ReLU between layers:
    :math:`h_{l+1} = \mathrm{relu}(h_l W_l + b_l)`, no activation on the last."""
    for layer in params[:-1]:
        x = relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def module(name: str, nn: tuple, input_shape: tuple[int, ...]) -> tuple[Callable, Any]:
    """Register a ``stax``-style ``(init_fn, apply_fn)`` network inside a model.

    Like :func:`numpyro.module` (same parameter name, ``name + "$params"``), but
    returns ``(apply_fn, params)`` separately, the form a coupling takes:
    ``AffineCoupling(*nets.module("net", stax.serial(...), (1, c)))``.
    """
    bound = numpyro.module(name, nn, input_shape)
    return bound.func, bound.args[0]


class _ModuleNet:
    """``net(params, x)`` for a network from another library: a pure function of
    its parameters, held by a coupling as static data. Two are equal when they
    run the same module (a Flax linen module compares by value, an nnx or
    Equinox module by identity), so a jitted function taking a flow rebuilt
    from the same module finds its compiled code."""

    def __init__(
        self, kind: str, module: Any, apply: Callable[[Any, Array], Array], options: tuple = ()
    ):
        self.kind = kind
        self.module = module
        self.options = options
        self._apply = apply
        self.__name__ = f"{kind}({', '.join([type(module).__name__, *map(str, options)])})"

    def __call__(self, params: Any, x: Array) -> Array:
        return self._apply(params, x)

    def _same_module(self, other: _ModuleNet) -> bool:
        if self.kind == "flax_linen":
            return self.module is other.module or self.module == other.module
        return self.module is other.module

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _ModuleNet)
            and (self.kind, self.options) == (other.kind, other.options)
            and self._same_module(other)
        )

    def __hash__(self) -> int:
        try:
            key = hash(self.module) if self.kind == "flax_linen" else id(self.module)
        except TypeError:  # a linen module with an unhashable field
            key = 0
        return hash((self.kind, self.options, key))

    def __repr__(self) -> str:
        return self.__name__


def _require(package: str, extra: str, where: str) -> None:
    try:
        __import__(package)
    except ImportError as e:
        raise ImportError(f"{where} needs {package}: pip install 'numpyro-glow[{extra}]'") from e


def flax_linen(name: str, module: Any, input_shape: tuple[int, ...]) -> tuple[Callable, Any]:
    """Register a Flax linen module as a coupling's network inside a model.

    The first time (under ``numpyro.handlers.seed``, as in ``SVI``),
    ``module.init`` runs on zeros of ``input_shape`` (the conditioning half
    ``x_a`` with batch axes in front, e.g. ``(1, D_a)`` or ``(1, H, W, C_a)``);
    its ``"params"`` are registered as ``name + "$params"``, the site
    :func:`numpyro.contrib.module.flax_module` uses. Returns ``(net, params)``
    with ``net(params, x) = module.apply({"params": params}, x)``, the form a
    coupling takes: ``AffineCoupling(*nets.flax_linen("c0", MLP(), (1, 2)),
    event_dim=1)``. The module must keep no other collection (no batch
    statistics): a coupling's network is a pure function of its parameters.
    """
    _require("flax", "flax", "nets.flax_linen")
    import flax

    def init(key: Array) -> Any:
        variables = flax.core.unfreeze(module.init(key, jnp.zeros(input_shape)))
        others = sorted(set(variables) - {"params"})
        if others or "params" not in variables:
            raise ValueError(
                f"nets.flax_linen: expected a module whose only collection is 'params', "
                f"got {sorted(variables)}"
            )
        return variables["params"]

    params = numpyro.param(name + "$params", init)
    net = _ModuleNet("flax_linen", module, lambda p, x: module.apply({"params": p}, x))
    return net, params


def flax_nnx(name: str, module: Any) -> tuple[Callable, Any]:
    """Register an initialised Flax nnx module as a coupling's network inside a model.

    Its ``nnx.Param`` values, as a pure dict (``nnx.to_pure_dict``), are
    registered as ``name + "$params"`` with their current values as the initial
    ones, the site :func:`numpyro.contrib.module.nnx_module` uses. Returns
    ``(net, params)`` with ``net(params, x) = nnx.merge(graphdef, params)(x)``;
    the module object itself is never changed. Every piece of its state must be
    an ``nnx.Param`` (no batch statistics, no stored ``Rngs``): a coupling's
    network is a pure function of its parameters.
    """
    _require("flax", "flax", "nets.flax_nnx")
    from flax import nnx

    graphdef, state, rest = nnx.split(module, nnx.Param, ...)
    others = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(rest))
    if others:
        paths = [jax.tree_util.keystr(path) for path, _ in others]
        raise ValueError(
            f"nets.flax_nnx: expected a module whose state is all nnx.Param, got other "
            f"state at {paths}"
        )
    params = numpyro.param(name + "$params", nnx.to_pure_dict(state))
    net = _ModuleNet("flax_nnx", module, lambda p, x: nnx.merge(graphdef, p, rest)(x))
    return net, params


def equinox(name: str, module: Any, event_ndim: int = 1) -> tuple[Callable, Any]:
    """Register an initialised Equinox module as a coupling's network inside a model.

    Its floating-point arrays (``eqx.partition(module, eqx.is_inexact_array)``)
    are registered as ``name + "$params"`` with their current values as the
    initial ones, the site :func:`numpyro.contrib.module.eqx_module` uses; the
    rest of the module is static. Equinox modules act on one example, so
    ``net(params, x)`` vmaps the module over the axes of ``x`` in front of its
    last ``event_ndim`` (one event: ``1`` for vectors ``(D_a,)``, ``3`` for
    channels-last images ``(H, W, C_a)``). Returns ``(net, params)``.
    """
    _require("equinox", "equinox", "nets.equinox")
    import equinox as eqx

    if not (isinstance(event_ndim, int) and event_ndim >= 1):
        raise ValueError(f"nets.equinox: expected an integer event_ndim >= 1, got {event_ndim!r}")
    init, static = eqx.partition(module, eqx.is_inexact_array)
    # an Equinox module is callable: wrap it so numpyro.param takes it as a value
    params = numpyro.param(name + "$params", lambda _: init)

    def apply(p: Any, x: Array) -> Array:
        if x.ndim < event_ndim:
            raise ValueError(
                f"nets.equinox: expected an input with at least event_ndim={event_ndim} "
                f"axes, got shape {x.shape}"
            )
        batch, event = x.shape[: x.ndim - event_ndim], x.shape[x.ndim - event_ndim :]
        out = jax.vmap(eqx.combine(p, static))(x.reshape((-1, *event)))
        return out.reshape(batch + out.shape[1:])

    return _ModuleNet("equinox", module, apply, (f"event_ndim={event_ndim}",)), params
