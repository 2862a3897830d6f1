"""Memory and time of one training gradient, with and without reversible gradients.

Run: ``python benchmarks/memory.py`` (about 5-10 minutes on 2 shared CPU cores;
``--quick`` for a smoke run). Writes ``benchmarks/results/memory.json`` and
``benchmarks/results/memory.md``.

For a Glow on 16x16x3 images, L=2 levels, 64 hidden channels, batch 32, LU 1x1
convolutions, affine coupling, and depth K = 4, 16, 32 per level, it compiles
one training gradient, ``jax.value_and_grad`` of the mean ``-log_prob`` with
respect to all parameters, with ``glow(..., reversible=False)`` (plain
autodiff, which stores every step's activations) and ``reversible=True`` (the
backward pass recomputes them with each step's inverse, see
:class:`numpyro_glow.transforms.Scan`), each with the K steps in a rolled
``lax.scan`` (``unroll=1``, the CPU default) and fully unrolled
(``unroll=True``). It reports:

- XLA's own accounting of the compiled executable,
  ``jax.jit(f).lower(...).compile().memory_analysis()``: ``temp`` (the
  temporaries of the program, where the stored activations live) and
  ``peak = arguments + outputs + temp - aliased``;
- the step time, median of 5 calls; plain and reversible calls alternate, so
  the machine's load hits both alike, and the ratio is the cost in compute;
- the largest difference between the two gradients, relative to each
  parameter's largest gradient.

It also measures the float32 drift of the recomputation: for the first level's
K=32 steps (every parameter nudged so no coupling is the identity, then
ActNorm data-initialised on the batch, see ``_params``), the true
activations ``x_0..x_K`` against those recomputed from ``x_K`` by the inverses,
as the reversible backward pass does.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from numpyro_glow import glow
from numpyro_glow.transforms import ActNorm, Chain, split_channels

SHAPE = (16, 16, 3)
LEVELS = 2
HIDDEN = 64
BATCH = 32
REPEATS = 5
RESULTS = Path(__file__).parent / "results"


def _model(depth, unroll, reversible, init_data=None):
    def model():
        return glow(
            "g",
            SHAPE,
            levels=LEVELS,
            depth=depth,
            hidden_channels=HIDDEN,
            unroll=unroll,
            reversible=reversible,
            init_data=init_data,
        )

    return model


def _params(depth, x, nudge=0.1):
    """Parameters with non-identity couplings and sane activations: the default
    initialisation, every leaf nudged (``p (1 + nudge N) + nudge^2 N``, relative,
    so the 1x1 convolutions stay near rotations), then each ActNorm data-initialised
    on ``x`` step after step, as ``glow(init_data=...)`` does, so that the
    activations stay normalised however deep (a plain nudge compounds over K steps
    into overflow)."""

    @jax.jit
    def make(x):
        trace = handlers.trace(handlers.seed(_model(depth, 1, False), 0)).get_trace()
        params = {k: s["value"] for k, s in trace.items() if s["type"] == "param"}
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), 2 * len(leaves))
        params = treedef.unflatten(
            [
                p * (1 + nudge * jax.random.normal(k1, p.shape))
                + nudge**2 * jax.random.normal(k2, p.shape)
                for k1, k2, p in zip(keys[::2], keys[1::2], leaves, strict=True)
            ]
        )
        d = handlers.substitute(_model(depth, 1, False), params)()
        head, inner = d.flow.parts[0], d.flow.parts[-1]
        h = Chain([head, inner.parts[0]])(x)  # Logitify, Squeeze
        for level in range(LEVELS):
            layers = inner.parts[1].layers
            locs, log_scales = [], []
            for k in range(depth):
                step = jax.tree.map(lambda a, k=k: a[k], layers)
                loc, std = jnp.mean(h, axis=(0, 1, 2)), jnp.std(h, axis=(0, 1, 2))
                locs.append(loc)
                log_scales.append(jnp.log(std + 1e-6))
                act = ActNorm(locs[-1], log_scales[-1], event_dim=3)
                h = Chain([act, *step.parts[1:]])(h)
            name = f"g.level{level}"
            params[name] = {
                **params[name],
                "actnorm": {"loc": jnp.stack(locs), "log_scale": jnp.stack(log_scales)},
            }
            if level < LEVELS - 1:
                split = inner.parts[2]
                h = split.inner.parts[0](split_channels(h)[0])
                inner = split.inner
        return params

    return make(x)


def _step_fn(depth, unroll, reversible):
    def loss(params, x):
        d = handlers.substitute(_model(depth, unroll, reversible), params)()
        return -jnp.mean(d.log_prob(x))

    return jax.jit(jax.value_and_grad(loss))


def _memory(compiled):
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "peak_bytes": int(peak),
    }


def _max_rel_diff(g0, g1):
    worst = 0.0
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(float(np.max(np.abs(a))), 1e-30)
        worst = max(worst, float(np.max(np.abs(a - b))) / scale)
    return worst


def compare(depths, unrolls, x):
    rows = []
    for unroll in unrolls:
        for depth in depths:
            params = _params(depth, x)
            compiled, row = {}, {"unroll": unroll, "depth": depth}
            for rev in (False, True):
                t0 = time.perf_counter()
                compiled[rev] = _step_fn(depth, unroll, rev).lower(params, x).compile()
                row[f"compile_s_{rev}"] = time.perf_counter() - t0
                row[f"memory_{rev}"] = _memory(compiled[rev])
            out = {rev: jax.block_until_ready(compiled[rev](params, x)) for rev in (False, True)}
            times = {False: [], True: []}
            for _ in range(REPEATS):
                for rev in (False, True):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled[rev](params, x))
                    times[rev].append(time.perf_counter() - t0)
            for rev in (False, True):
                row[f"step_ms_{rev}"] = 1e3 * float(np.median(times[rev]))
            row["loss"] = float(out[False][0])
            row["loss_diff"] = abs(float(out[False][0]) - float(out[True][0]))
            row["grad_max_rel_diff"] = _max_rel_diff(out[False][1], out[True][1])
            rows.append(row)
            print(_row_md(row), flush=True)
    return rows


def drift(depth, x):
    """True against recomputed activations of the first level's Scan."""
    params = _params(depth, x)

    @jax.jit
    def f(params, x):
        d = handlers.substitute(_model(depth, 1, False), params)()
        head, level0 = d.flow.parts[0], d.flow.parts[-1]  # Logitify, Chain(level 0)
        squeeze, scan = level0.parts[0], level0.parts[1]
        h = Chain([head, squeeze])(x)
        true = [h]
        for k in range(depth):
            h = jax.tree.map(lambda a, k=k: a[k], scan.layers)(h)
            true.append(h)
        back = [true[-1]]
        for k in reversed(range(depth)):
            back.append(jax.tree.map(lambda a, k=k: a[k], scan.layers).inv(back[-1]))
        true, back = jnp.stack(true), jnp.stack(back[::-1])
        err = jnp.abs(true - back).reshape(depth + 1, -1).max(axis=1)
        return err, jnp.abs(true).max()

    err, scale = f(params, x)
    err = np.asarray(err)
    return {
        "depth": depth,
        "max_abs_err": float(err.max()),
        "max_abs_activation": float(scale),
        "max_rel_err": float(err.max() / scale),
        "err_at_input": float(err[0]),
        "err_per_step": err.tolist(),
    }


def _mib(b):
    return b / 2**20


def _row_md(r):
    m0, m1 = r["memory_False"], r["memory_True"]
    unroll = "True (unrolled)" if r["unroll"] is True else f"{r['unroll']} (rolled)"
    return (
        f"| {unroll} | {r['depth']} "
        f"| {_mib(m0['temp_bytes']):.1f} | {_mib(m1['temp_bytes']):.1f} "
        f"| {_mib(m0['peak_bytes']):.1f} | {_mib(m1['peak_bytes']):.1f} "
        f"| {m1['peak_bytes'] / m0['peak_bytes']:.2f}x "
        f"| {r['step_ms_False']:.0f} | {r['step_ms_True']:.0f} "
        f"| {r['step_ms_True'] / r['step_ms_False']:.2f}x "
        f"| {r['compile_s_False']:.1f} / {r['compile_s_True']:.1f} "
        f"| {r['grad_max_rel_diff']:.1e} | {r['loss']:.3f} |"
    )


HEADER = (
    "| scan unroll | K | temp plain (MiB) | temp reversible (MiB) | peak plain (MiB) "
    "| peak reversible (MiB) | peak rev/plain | step plain (ms) | step reversible (ms) "
    "| time rev/plain | compile plain / rev (s) | max rel grad diff | loss |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K=2 only, rolled only")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16, 32])
    args = parser.parse_args(argv)
    depths, unrolls = ([2], [1]) if args.quick else (args.depths, [1, True])
    x = jax.random.uniform(jax.random.PRNGKey(0), (BATCH, *SHAPE), minval=0.02, maxval=0.98)
    print(HEADER, flush=True)
    rows = compare(depths, unrolls, x)
    dr = drift(max(depths), x)
    print(
        f"drift, K={dr['depth']}: max |x_k - recomputed x_k| = {dr['max_abs_err']:.2e} "
        f"(max |x_k| = {dr['max_abs_activation']:.2f}, relative {dr['max_rel_err']:.1e}); "
        f"at the level's input: {dr['err_at_input']:.2e}",
        flush=True,
    )
    if args.quick:
        return
    env = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "config": {"shape": SHAPE, "levels": LEVELS, "hidden": HIDDEN, "batch": BATCH},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(
        json.dumps({"env": env, "rows": rows, "drift": dr}, indent=1)
    )
    md = [
        f"# `python benchmarks/memory.py` ({env['date']}, jax {env['jax']}, {env['backend']})",
        "",
        f"One training gradient (`value_and_grad` of the mean `-log_prob`, jitted) of a "
        f"Glow on {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} images, L={LEVELS}, {HIDDEN} hidden "
        f"channels, batch {BATCH}, LU 1x1 conv, affine coupling; K steps per level. "
        "Memory from XLA's `compiled.memory_analysis()` (peak = arguments + outputs + "
        "temp - aliased); step time the median of 5 alternating calls; max rel grad diff "
        "the largest |plain - reversible| over each parameter's largest |gradient|.",
        "",
        HEADER,
        *map(_row_md, rows),
        "",
        f"Drift of the recomputation, first level, K={dr['depth']} (parameters nudged, "
        "then ActNorm data-initialised): max |x_k - recomputed x_k| over all steps "
        f"= {dr['max_abs_err']:.2e}, with max |x_k| = {dr['max_abs_activation']:.2f} "
        f"(relative {dr['max_rel_err']:.1e}); at the level's input (after all "
        f"{dr['depth']} inverses) {dr['err_at_input']:.2e}.",
        "",
    ]
    (RESULTS / "memory.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
