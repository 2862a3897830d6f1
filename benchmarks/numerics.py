"""Numerics of Glow's layers in float32, measured side by side in one run.

Three checks, one per seed note (see ``docs/numerics.rst``):

a. A 1x1 convolution as an ``einsum`` over the channel axis versus
   ``jax.lax.conv_general_dilated`` with a 1x1 kernel (NHWC): agreement and
   jitted run time, interleaved in the same run, with the ratio.
b. ``log|det W|`` of a dense ``W = Q diag(s)`` near singular (and the underflow
   pitfall ``0.1 * orthogonal 48x48``) from ``det``, from ``slogdet`` and from the
   LU parametrisation (:class:`numpyro_glow.transforms.Inv1x1ConvLU`), against a
   float64 truth, and whether their gradients are finite.
c. :class:`numpyro_glow.transforms.Logitify` near 0 and 1: its log-determinant
   and the naive ``log(1-alpha) - log(z2) - log(1-z2)`` against a float64
   evaluation of the same float32 inputs, and the inverse round trip.

Run ``python benchmarks/numerics.py``; it prints Markdown tables and writes
``benchmarks/results/numerics.json``. JAX runs in float32 on the default backend.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from numpyro_glow.transforms import (  # noqa: E402
    Inv1x1Conv,
    Inv1x1ConvLU,
    Logitify,
    lu_factors,
    random_rotation,
)

RESULTS = Path(__file__).resolve().parent / "results" / "numerics.json"
REPEATS = 50


# --------------------------------------------------------------------------- utils
def _table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            if math.isnan(v) or math.isinf(v):
                return str(v)
            if v == 0.0:
                return "0"
            return f"{v:.3g}" if (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.4g}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join([line, sep, *body])


def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


def _finite_tree(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


# ------------------------------------------------------------ a. 1x1 conv as einsum
def conv1x1_einsum(x, w):
    """``y[..., c] = sum_d w[c, d] x[..., d]`` (the package's form)."""
    return jnp.einsum("...d,cd->...c", x, w)


def conv1x1_lax(x, w):
    """The same map through the convolution primitive, NHWC with an HWIO kernel."""
    kernel = w.T[None, None]  # (1, 1, C_in, C_out), kernel[0, 0, d, c] = w[c, d]
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def bench_conv(shapes=((64, 16, 16, 12), (64, 8, 8, 48), (64, 32, 32, 12))) -> list[dict]:
    fns = {"einsum": jax.jit(conv1x1_einsum), "conv": jax.jit(conv1x1_lax)}
    out = []
    for shape in shapes:
        kx, kw = jax.random.split(jax.random.key(sum(shape)))
        x = jax.random.normal(kx, shape, jnp.float32)
        w = random_rotation(kw, shape[-1])
        ys = {name: f(x, w).block_until_ready() for name, f in fns.items()}  # compile
        for f in fns.values():  # warm-up
            for _ in range(3):
                f(x, w).block_until_ready()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(REPEATS):  # interleaved, so both see the same machine load
            for name, f in fns.items():
                t0 = time.perf_counter()
                f(x, w).block_until_ready()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        out.append(
            {
                "shape": list(shape),
                "max_abs_diff": float(jnp.max(jnp.abs(ys["einsum"] - ys["conv"]))),
                "max_abs_y": float(jnp.max(jnp.abs(ys["einsum"]))),
                "einsum_ms": med["einsum"],
                "conv_ms": med["conv"],
                "conv_over_einsum": med["conv"] / med["einsum"],
            }
        )
    return out


# ------------------------------------------------------------- b. log|det W| near singular
def _truth_logdet(w: np.ndarray) -> float:
    """Sum of log singular values of ``w`` (e.g. a float32 matrix), in float64."""
    return float(np.sum(np.log(np.linalg.svd(w.astype(np.float64), compute_uv=False))))


def _make_lu(w32: np.ndarray) -> tuple[Inv1x1ConvLU, str]:
    """The LU transform through the public ``from_weight``; if that refuses the
    float32 weight as numerically singular, factor it in float64 and cast."""
    try:
        return Inv1x1Conv.from_weight(w32, lu=True, event_dim=1), "from_weight"
    except ValueError:
        parts = lu_factors(w32.astype(np.float64))
        perm, rest = parts[0], [p.astype(np.float32) for p in parts[1:]]
        return Inv1x1ConvLU(perm, *rest, event_dim=1), "f64 lu_factors*"


def _lu_matrix_f64(t: Inv1x1ConvLU) -> np.ndarray:
    """``P L (U + diag(sign_s exp(log_s)))`` of the float32 parameters, in float64."""
    c = t.channels
    lower = np.tril(np.asarray(t.lower, np.float64), -1) + np.eye(c)
    upper = np.triu(np.asarray(t.upper, np.float64), 1) + np.diag(
        np.asarray(t.sign_s, np.float64) * np.exp(np.asarray(t.log_s, np.float64))
    )
    return (lower @ upper)[np.asarray(t.perm)]


def _lu_params(t: Inv1x1ConvLU) -> dict:
    return {"log_s": t.log_s, "lower": t.lower, "upper": t.upper}


def _with_params(t: Inv1x1ConvLU, p: dict) -> Inv1x1ConvLU:
    return Inv1x1ConvLU(t.perm, p["lower"], p["upper"], p["log_s"], t.sign_s, event_dim=1)


def _logdet_cases() -> list[tuple[str, int, np.ndarray, bool]]:
    """``(name, C, singular values, two_sided)``: ``W = Q diag(s)`` (one rotation)
    or ``W = U diag(s) V^T`` (two independent rotations)."""

    def centred(c: int, cond: float) -> np.ndarray:
        # log-spaced in [cond^-1/2, cond^1/2]: |det W| = 1, only the conditioning varies
        return np.logspace(-0.5, 0.5, c) ** math.log10(cond)

    conds = (1.0, 1e3, 1e5, 1e7)
    cases = [(f"Q diag(s), C=48, cond {k:.0e}", 48, centred(48, k), False) for k in conds]
    for c in (12, 48):
        cases += [(f"U diag(s) V^T, C={c}, cond {k:.0e}", c, centred(c, k), True) for k in conds]
    cases += [
        # s in [1/cond, 1]: |det W| = cond^(-C/2), below float32's range from cond ~ 1e3 on
        (
            f"U diag(s) V^T, C=48, s in [1/cond, 1], cond {k:.0e}",
            48,
            np.logspace(0, -math.log10(k), 48),
            True,
        )
        for k in conds[1:]
    ]
    cases.append(("0.1 * Q, C=48 (the DESIGN pitfall)", 48, np.full(48, 0.1), False))
    return cases


def bench_logdet() -> list[dict]:
    dense_det = jax.jit(lambda w: jnp.log(jnp.abs(jnp.linalg.det(w))))
    dense_slog = jax.jit(lambda w: jnp.linalg.slogdet(w)[1])
    g_det = jax.jit(jax.grad(lambda w: jnp.log(jnp.abs(jnp.linalg.det(w)))))
    g_slog = jax.jit(jax.grad(lambda w: jnp.linalg.slogdet(w)[1]))

    def lu_logdet(p, t):
        return _with_params(t, p).log_abs_det()

    def lu_nll(p, t, x):
        # negative log-likelihood of x when W x is standard normal (up to a constant)
        y, ld = _with_params(t, p).forward_and_log_det(x)
        return jnp.sum(0.5 * y**2) - jnp.sum(ld)

    def lu_inv_loss(p, t, y):
        x, ld = _with_params(t, p).inverse_and_log_det(y)
        return jnp.sum(0.5 * x**2) - jnp.sum(ld)

    def max_abs(tree) -> float:
        return max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(tree))

    out = []
    for i, (name, c, s, two_sided) in enumerate(_logdet_cases()):
        ku, kv = jax.random.split(jax.random.key(100 + i))
        u = np.asarray(random_rotation(ku, c), np.float64)
        w64 = u * s[None, :]
        if two_sided:
            w64 = w64 @ np.asarray(random_rotation(kv, c), np.float64).T
        w32 = w64.astype(np.float32)
        truth = _truth_logdet(w32)  # of the float32 matrix the float32 code sees
        w = jnp.asarray(w32)
        lu, how = _make_lu(w32)
        p = _lu_params(lu)
        x = jax.random.normal(jax.random.key(7), (16, c), jnp.float32)
        ld_det = float(dense_det(w))
        ld_slog = float(dense_slog(w))
        ld_lu = float(lu.log_abs_det())
        grad_slog = g_slog(w)
        grad_nll = jax.grad(lu_nll)(p, lu, x)
        out.append(
            {
                "case": name,
                "channels": c,
                "two_sided": two_sided,
                "cond_f32": float(np.linalg.cond(w32.astype(np.float64))),
                "truth": truth,
                "det": _json_float(ld_det),
                "slogdet": ld_slog,
                "lu": ld_lu,
                "err_det": _json_float(abs(ld_det - truth)),
                "err_slogdet": abs(ld_slog - truth),
                "err_lu": abs(ld_lu - truth),
                # against the float64 log-det of the LU's own matrix: exact by construction
                "err_lu_own_matrix": abs(ld_lu - _truth_logdet(_lu_matrix_f64(lu))),
                "lu_built_by": how,
                "grad_finite_det": _finite_tree(g_det(w)),
                "grad_finite_slogdet": _finite_tree(grad_slog),
                "max_abs_grad_slogdet": max_abs(grad_slog),
                "grad_finite_lu_logdet": _finite_tree(jax.grad(lu_logdet)(p, lu)),
                "grad_finite_lu_forward_nll": _finite_tree(grad_nll),
                "max_abs_grad_lu_forward_nll": max_abs(grad_nll),
                "grad_finite_lu_inverse_loss": _finite_tree(jax.grad(lu_inv_loss)(p, lu, x)),
            }
        )
    return out


# ---------------------------------------------------------------- c. Logitify near 0 and 1
def _logitify_f64(x: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Value and log-det in float64 of the (float32) input."""
    x = x.astype(np.float64)
    a = alpha / 2 + (1 - alpha) * x
    b = alpha / 2 + (1 - alpha) * (1 - x)
    return np.log(a) - np.log(b), math.log1p(-alpha) - np.log(a) - np.log(b)


def _naive_f32(x: jnp.ndarray, alpha: float) -> jnp.ndarray:
    one = jnp.float32(1)
    al = jnp.float32(alpha)
    z2 = al / 2 + (one - al) * x
    return jnp.log(one - al) - jnp.log(z2) - jnp.log(one - z2)


def bench_logitify(alphas=(0.05, 1e-3, 1e-6)) -> dict:
    edge = [0.0, 1e-7, 1e-3, 0.5, 1 - 2.0**-24, 1 - 2.0**-23, 1.0]
    pixels = [k / 255 for k in (0, 1, 2, 127, 128, 253, 254, 255)]
    sets = {"edge": edge, "pixels k/255": pixels}
    rows = []
    points = []
    for alpha in alphas:
        t = Logitify(alpha)
        fwd = jax.jit(t.forward_and_log_det)
        inv = jax.jit(t.inverse_and_log_det)
        naive = jax.jit(lambda x, a=alpha: _naive_f32(x, a))
        for set_name, values in sets.items():
            x = jnp.asarray(np.asarray(values, np.float32))
            y, ld = fwd(x)
            ld_naive = naive(x)
            x_back, ld_inv = inv(y)
            y64, ld64 = _logitify_f64(np.asarray(x), alpha)
            rel_ld = np.abs(np.asarray(ld, np.float64) - ld64) / np.abs(ld64)
            rel_naive = np.abs(np.asarray(ld_naive, np.float64) - ld64) / np.abs(ld64)
            err_y = np.abs(np.asarray(y, np.float64) - y64) / np.maximum(np.abs(y64), 1.0)
            xs = np.asarray(x, np.float64)
            rt_abs = np.abs(np.asarray(x_back, np.float64) - xs)
            # what float32 can resolve: one spacing of y carried back through dx/dy,
            # plus one spacing of x
            dxdy = np.exp(-ld64)
            resolution = np.spacing(np.abs(np.asarray(y))).astype(np.float64) * dxdy + np.spacing(
                np.asarray(x)
            ).astype(np.float64)
            rt_units = rt_abs / resolution
            inv_ld_sum = np.abs(np.asarray(ld, np.float64) + np.asarray(ld_inv, np.float64))
            rows.append(
                {
                    "alpha": alpha,
                    "inputs": set_name,
                    "max_rel_err_logdet_logitify": float(rel_ld.max()),
                    "max_rel_err_logdet_naive": float(rel_naive.max()),
                    "naive_worst_x": float(xs[np.argmax(rel_naive)]),
                    "max_err_value_logitify": float(err_y.max()),
                    "max_abs_roundtrip_err": float(rt_abs.max()),
                    "max_roundtrip_err_in_resolution_units": float(rt_units.max()),
                    "max_abs_fwd_plus_inv_logdet": float(inv_ld_sum.max()),
                    "all_finite": bool(
                        np.all(np.isfinite(np.asarray(ld)))
                        and np.all(np.isfinite(np.asarray(x_back)))
                    ),
                }
            )
            for xi, a, b, c in zip(xs, rel_ld, rel_naive, rt_abs, strict=True):
                points.append(
                    {
                        "alpha": alpha,
                        "x": float(xi),
                        "rel_err_logdet_logitify": float(a),
                        "rel_err_logdet_naive": float(b),
                        "abs_roundtrip_err": float(c),
                    }
                )
    return {"summary": rows, "points": points}


# ---------------------------------------------------------------------------- main
def main() -> dict:
    t_start = time.perf_counter()
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "dtype": str(jnp.zeros(()).dtype),
    }
    print(
        f"# numerics: jax {machine['jax']} ({machine['backend']}), {machine['cpu_count']} CPUs, "
        f"default float {machine['dtype']}\n"
    )

    conv = bench_conv()
    print(f"## a. 1x1 convolution: einsum vs lax.conv_general_dilated (median of {REPEATS})\n")
    print(
        _table(
            ["shape (N,H,W,C)", "max abs diff", "max abs y", "einsum ms", "conv ms", "conv/einsum"],
            [
                [
                    "x".join(map(str, r["shape"])),
                    r["max_abs_diff"],
                    r["max_abs_y"],
                    r["einsum_ms"],
                    r["conv_ms"],
                    r["conv_over_einsum"],
                ]
                for r in conv
            ],
        )
    )

    logdet = bench_logdet()
    print("\n## b. log|det W| in float32 vs float64 truth (abs error, nats)\n")
    print(
        _table(
            [
                "W",
                "cond (f32 W)",
                "truth",
                "err det",
                "err slogdet",
                "err LU",
                "err LU (own W)",
                "LU from",
            ],
            [
                [
                    r["case"],
                    r["cond_f32"],
                    r["truth"],
                    r["err_det"],
                    r["err_slogdet"],
                    r["err_lu"],
                    r["err_lu_own_matrix"],
                    r["lu_built_by"],
                ]
                for r in logdet
            ],
        )
    )
    print(
        "\n* from_weight refused the float32 weight as singular; factored in float64, cast to "
        "float32.\n\nFinite gradients (w.r.t. W for det/slogdet, "
        "w.r.t. log_s/lower/upper for LU):\n"
    )
    print(
        _table(
            [
                "W",
                "det",
                "slogdet",
                "max abs grad slogdet",
                "LU log_abs_det",
                "LU forward NLL",
                "max abs grad LU NLL",
                "LU inverse loss",
            ],
            [
                [
                    r["case"],
                    r["grad_finite_det"],
                    r["grad_finite_slogdet"],
                    r["max_abs_grad_slogdet"],
                    r["grad_finite_lu_logdet"],
                    r["grad_finite_lu_forward_nll"],
                    r["max_abs_grad_lu_forward_nll"],
                    r["grad_finite_lu_inverse_loss"],
                ]
                for r in logdet
            ],
        )
    )

    logit = bench_logitify()
    print("\n## c. Logitify in float32 vs float64 evaluation of the same inputs\n")
    print(
        _table(
            [
                "alpha",
                "inputs",
                "rel err log-det (Logitify)",
                "rel err log-det (naive)",
                "naive worst at x",
                "err y",
                "round trip abs",
                "round trip / resolution",
                "abs(ld_fwd + ld_inv)",
            ],
            [
                [
                    r["alpha"],
                    r["inputs"],
                    r["max_rel_err_logdet_logitify"],
                    r["max_rel_err_logdet_naive"],
                    r["naive_worst_x"],
                    r["max_err_value_logitify"],
                    r["max_abs_roundtrip_err"],
                    r["max_roundtrip_err_in_resolution_units"],
                    r["max_abs_fwd_plus_inv_logdet"],
                ]
                for r in logit["summary"]
            ],
        )
    )
    print(
        "\nerr y: |y - y64| / max(|y64|, 1). round trip / resolution: |x' - x| divided by "
        "spacing(y) |dx/dy| + spacing(x), what float32 storage of y and x can resolve. "
        "edge inputs: 0, 1e-7, 1e-3, 0.5, 1-2^-24, 1-2^-23, 1."
    )

    elapsed = time.perf_counter() - t_start
    result = {
        "machine": machine,
        "repeats": REPEATS,
        "elapsed_s": elapsed,
        "conv1x1": conv,
        "logdet": logdet,
        "logitify": logit,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS} ({elapsed:.1f} s)")
    return result


if __name__ == "__main__":
    main()
