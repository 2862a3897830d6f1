"""Per-call cost of SplineCoupling against AffineCoupling at the same shapes.

Run: ``python benchmarks/spline.py`` (about 1-2 minutes on 2 shared CPU cores;
``--quick`` for a smoke run). Writes ``benchmarks/results/spline.json`` and
prints a Markdown table.

For each shape, both couplings get the same conditioner architecture (only its
output width differs: ``2 C_b`` for affine, ``C_b (3K - 1)`` for the spline),
with random non-zero weights, and three jitted functions are timed:
``forward_and_log_det``, ``inverse_and_log_det`` and the gradient of
``sum(y**2) + sum(log_det)`` with respect to the net's parameters and the
input. Calls of the two couplings alternate (blocks of ``--calls`` calls,
``--repeats`` times), so the machine's load hits both alike; the table gives
the median time per call and the ratio spline / affine. Compile time
(``jax.jit(f).lower(...).compile()``) is reported too.

Shapes: vectors ``d = 10`` (``C_a = C_b = 5``), ``nets.mlp`` with two hidden
layers of 32 (AutoGlow's default width at this ``d``), batch 16 and 256;
images 8x8x4 (``C_a = C_b = 2``), ``nets.conv_net`` with 64 hidden channels
(the CLI's default), batch 64. ``K = 8`` bins, ``bound = 4``.
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

from numpyro_glow import nets
from numpyro_glow.transforms import AffineCoupling, SplineCoupling

RESULTS = Path(__file__).parent / "results"
NUM_BINS = 8


def _perturb(key, tree, scale=0.1):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _layers(kind: str, channels: int):
    """The affine and the spline coupling on ``channels`` channels."""
    key = jax.random.PRNGKey(0)
    c_a, c_b = channels // 2, channels - channels // 2
    outs = {"affine": 2 * c_b, "spline": c_b * (3 * NUM_BINS - 1)}
    if kind == "vector":
        init, net, event_dim = (lambda o: nets.mlp_init(key, c_a, o, (32, 32))), nets.mlp, 1
    else:
        init, net, event_dim = (lambda o: nets.conv_net_init(key, c_a, o, 64)), nets.conv_net, 3
    params = {name: _perturb(jax.random.PRNGKey(1), init(o)) for name, o in outs.items()}
    return {
        "affine": AffineCoupling(net, params["affine"], event_dim, scale="exp"),
        "spline": SplineCoupling(net, params["spline"], event_dim, NUM_BINS, bound=4.0),
    }


def _functions():
    def loss(t, x):
        y, ld = t.forward_and_log_det(x)
        return jnp.sum(y**2) + jnp.sum(ld)

    return {
        "forward": jax.jit(lambda t, x: t.forward_and_log_det(x)),
        "inverse": jax.jit(lambda t, x: t.inverse_and_log_det(x)),
        "gradient": jax.jit(jax.grad(loss, argnums=(0, 1))),
    }


def _time(fn, args, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def run(calls: int, repeats: int) -> list[dict]:
    shapes = [
        ("vector d=10", "vector", (16, 10)),
        ("vector d=10", "vector", (256, 10)),
        ("image 8x8x4", "image", (64, 8, 8, 4)),
    ]
    rows = []
    for label, kind, shape in shapes:
        layers = _layers(kind, shape[-1])
        x = 1.5 * jax.random.normal(jax.random.PRNGKey(2), shape)
        for what, fn in _functions().items():
            compile_s = {}
            for name, t in layers.items():
                start = time.perf_counter()
                jax.jit(fn).lower(t, x).compile()
                compile_s[name] = time.perf_counter() - start
                jax.block_until_ready(fn(t, x))  # warm
            samples = {name: [] for name in layers}
            for _ in range(repeats):
                for name, t in layers.items():
                    samples[name].append(_time(fn, (t, x), calls))
            med = {name: float(np.median(s)) for name, s in samples.items()}
            rows.append(
                {
                    "shape": label,
                    "batch": shape[0],
                    "function": what,
                    "affine_us": 1e6 * med["affine"],
                    "spline_us": 1e6 * med["spline"],
                    "ratio": med["spline"] / med["affine"],
                    "compile_affine_s": compile_s["affine"],
                    "compile_spline_s": compile_s["spline"],
                }
            )
            r = rows[-1]
            print(
                f"| {label} | {shape[0]} | {what} | {r['affine_us']:.1f} | "
                f"{r['spline_us']:.1f} | {r['ratio']:.2f} | "
                f"{r['compile_affine_s']:.2f} / {r['compile_spline_s']:.2f} |",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per coupling")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 x 2 calls")
    args = parser.parse_args(argv)
    calls, repeats = (2, 2) if args.quick else (args.calls, args.repeats)
    print(
        "| shape | batch | function | affine (us) | spline (us) | spline / affine "
        "| compile affine / spline (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = run(calls, repeats)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        meta = {
            "jax": jax.__version__,
            "platform": platform.platform(),
            "device": str(jax.devices()[0]),
            "num_bins": NUM_BINS,
            "calls": calls,
            "repeats": repeats,
        }
        (RESULTS / "spline.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
