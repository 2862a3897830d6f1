"""Glow on this machine: compile time against depth, and the fused log_prob.

Run: ``python benchmarks/glow_bench.py`` (about 3 minutes on 2 CPU cores).
Writes ``benchmarks/results/glow_bench.json`` and prints two tables:

1. Trace-and-compile time and steady-state time of a jitted gradient of the
   mean log-density, 8x8x1 images, 2 levels, 64 hidden channels, batch 64, for
   depth 4 and 32, with the K steps of a level run by ``lax.scan`` rolled
   (``unroll=1``) and fully unrolled (``unroll=True``).
2. ``log_prob`` of the same model: numpyro-glow's fused one-pass
   ``FlowDistribution.log_prob`` against NumPyro's default
   ``TransformedDistribution.log_prob`` on the same transforms (which inverts,
   then evaluates the log-determinant: every coupling network runs twice),
   jitted and eager. Under ``jit`` XLA's common-subexpression elimination
   merges the two identical passes, so the saving shows eagerly.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers

from numpyro_glow import glow

SHAPE = (8, 8, 1)
BATCH = 64
REPEATS = 10


def _model(depth, unroll):
    return lambda: glow("g", SHAPE, levels=2, depth=depth, hidden_channels=64, unroll=unroll)


def _params(model):
    trace = handlers.trace(handlers.seed(model, 0)).get_trace()
    return {k: s["value"] for k, s in trace.items() if s["type"] == "param"}


def _time(fn, *args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def compile_vs_depth(x):
    rows = []
    for unroll in (1, True):
        for depth in (4, 32):
            model = _model(depth, unroll)
            params = _params(model)

            def loss(p, model=model):
                return -handlers.substitute(model, p)().log_prob(x).mean()

            t0 = time.perf_counter()
            compiled = jax.jit(jax.grad(loss)).lower(params).compile()
            compile_s = time.perf_counter() - t0
            _, steady = _time(compiled, params)
            rows.append(
                {
                    "unroll": str(unroll),
                    "depth": depth,
                    "trace_and_compile_s": compile_s,
                    "grad_ms": 1e3 * steady,
                }
            )
            print(rows[-1], flush=True)
    return rows


def fused_vs_default(x):
    rows = []
    for depth in (4, 8):
        model = _model(depth, True)
        params = _params(model)

        def fused(p, model=model):
            return handlers.substitute(model, p)().log_prob(x)

        def default(p, model=model):
            d = handlers.substitute(model, p)()
            return dist.TransformedDistribution(d.base_dist, d.transforms).log_prob(x)

        a, b = jax.jit(fused)(params), jax.jit(default)(params)
        err = float(jnp.max(jnp.abs(a - b)))
        _, t_fused = _time(jax.jit(fused), params)
        _, t_default = _time(jax.jit(default), params)
        _, e_fused = _time(fused, params)  # eager: op by op, no XLA CSE
        _, e_default = _time(default, params)
        rows.append(
            {
                "depth": depth,
                "jit_fused_ms": 1e3 * t_fused,
                "jit_default_ms": 1e3 * t_default,
                "jit_speedup": t_default / t_fused,
                "eager_fused_ms": 1e3 * e_fused,
                "eager_default_ms": 1e3 * e_default,
                "eager_speedup": e_default / e_fused,
                "max_abs_diff": err,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    x = jax.random.uniform(jax.random.PRNGKey(0), (BATCH, *SHAPE))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.default_backend()} device(s), jax {jax.__version__}",
        "compile_vs_depth": compile_vs_depth(x),
        "fused_vs_default": fused_vs_default(x),
    }
    out = Path(__file__).parent / "results" / "glow_bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| scan unroll | depth | trace + compile (s) | grad (ms) |\n|---|---|---|---|")
    for r in result["compile_vs_depth"]:
        print(
            f"| {r['unroll']} | {r['depth']} | {r['trace_and_compile_s']:.2f} "
            f"| {r['grad_ms']:.1f} |"
        )
    print(
        "\n| depth | jit fused (ms) | jit default (ms) | ratio | eager fused (ms) "
        "| eager default (ms) | ratio |\n|---|---|---|---|---|---|---|"
    )
    for r in result["fused_vs_default"]:
        print(
            f"| {r['depth']} | {r['jit_fused_ms']:.2f} | {r['jit_default_ms']:.2f} "
            f"| {r['jit_speedup']:.2f}x | {r['eager_fused_ms']:.0f} | {r['eager_default_ms']:.0f} "
            f"| {r['eager_speedup']:.2f}x |"
        )


if __name__ == "__main__":
    main()
