"""What the device's matrix units deliver to JAX: the ceiling for ``peers.py``'s
TFLOP/s column.

Run: ``python benchmarks/ceiling.py`` (on the machine being measured). Times an
N x N x N matrix product (2 N^3 flops) in float32 at JAX's default precision
(TF32 on NVIDIA GPUs from Ampere on), float32 at ``precision="highest"``, and
bfloat16; median of ``--repeats`` calls after two warm-ups, on random data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp


def matmul_tflop_s(n: int, dtype, precision: str | None, repeats: int) -> float:
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    for _ in range(2):
        f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    result = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "n": args.n,
        "float32 default (TFLOP/s)": matmul_tflop_s(args.n, jnp.float32, None, args.repeats),
        "float32 highest (TFLOP/s)": matmul_tflop_s(args.n, jnp.float32, "highest", args.repeats),
        "bfloat16 (TFLOP/s)": matmul_tflop_s(args.n, jnp.bfloat16, None, args.repeats),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
