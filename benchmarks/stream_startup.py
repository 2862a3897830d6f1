"""Startup time and host memory of ``train --data stream:DIR`` against the size of
the data set (issue 20).

Run: ``python benchmarks/stream_startup.py`` (about 3 minutes on 2 shared CPU
cores, 0.5 GB of disk under a temporary folder; ``--sizes 1000 10000`` for a
smoke run). Writes ``benchmarks/results/stream_startup.json`` and prints a
Markdown table.

For each size N, a synthetic set of N random 8x8x3 images is written as a
prepared folder (in shards, never whole in memory); then a fresh process
times the command's work up to the end of the first training step: importing
the package, opening the folder (``stream:DIR``), the validation split, the
model, the data-dependent initialisation, the first batch through grain and
the first (compiling) step. It reports those seconds and the process's peak
resident memory (``VmHWM`` from ``/proc``). The same for the in-memory
``npz:`` source, up to the size where it still fits comfortably, shows what
the stream replaces.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SHAPE = (8, 8, 3)

CHILD = r"""
import sys, time, json
t0 = time.perf_counter()
import jax
from numpyro_glow.data import load, train_validation_split
from numpyro_glow.train import GlowConfig, TrainConfig, Trainer
spec = sys.argv[1]
config = TrainConfig(data=spec, model=GlowConfig(levels=1, depth=2, hidden_channels=8),
                     batch_size=64, dequantization="uniform", progress=False)
splits = load(spec)
parts = train_validation_split(splits.train, config.validation_size, config.seed)
t_open = time.perf_counter() - t0
trainer = Trainer(config, parts.train, parts.test)
state = trainer.init_state()
batches = trainer.batches(0)
state = trainer.step(state, *next(batches))
jax.block_until_ready(state.loss)
t_step = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"open_s": t_open, "first_step_s": t_step, "peak_rss_mb": int(hwm) / 1024}))
"""


def write_set(folder: Path, n: int, seed: int = 0) -> None:
    """A prepared folder of ``n`` random images (90% train, 10% test), written
    shard by shard with the writer ``numpyro-glow prepare`` uses."""
    from numpyro_glow.prepare import _write_json, _write_npy
    from numpyro_glow.stream import FORMAT, MANIFEST, VERSION

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per = 1 << 16
    splits = {"train": [], "test": []}
    counts = {"train": n - n // 10, "test": n // 10}
    for part, count in counts.items():
        for i, lo in enumerate(range(0, count, per)):
            x = rng.integers(0, 256, (min(per, count - lo), *SHAPE), dtype=np.uint8)
            rec = _write_npy(folder / f"{part}-{i:05d}.npy", x)
            splits[part].append({**rec, "count": len(x), "skipped": 0})
    manifest = dict(format=FORMAT, version=VERSION, source="synthetic", shape=list(SHAPE),
                    dtype="|u1", levels=256, num_classes=None, images=counts,
                    splits=splits)  # fmt: skip
    _write_json(folder / MANIFEST, manifest)


def measure(spec: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, spec], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return {**json.loads(done.stdout.strip().splitlines()[-1]),
            "wall_s": time.perf_counter() - t0}  # fmt: skip


def main(args: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"s{n}"
            write_set(folder, n)
            row = {"images": n, "pixels_mb": n * int(np.prod(SHAPE)) / 2**20}
            row["stream"] = measure(f"stream:{folder}")
            if n <= args.npz_up_to:
                npz = Path(tmp) / f"s{n}.npz"
                x = np.random.default_rng(0).integers(0, 256, (n, *SHAPE), dtype=np.uint8)
                np.savez(npz, x=x)
                del x
                row["npz"] = measure(f"npz:{npz}")
                npz.unlink()
            rows.append(row)
            print(json.dumps(row))
            for p in folder.iterdir():
                p.unlink()
    result = {
        "shape": list(SHAPE),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
    }
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


def table(result: dict) -> str:
    lines = [
        "| images | pixels (MB) | stream: open (s) | stream: to first step (s) | "
        "stream: peak RSS (MB) | npz: to first step (s) | npz: peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s, z = r["stream"], r.get("npz")
        npz = f"{z['first_step_s']:.1f} | {z['peak_rss_mb']:.0f}" if z else "- | -"
        lines.append(
            f"| {r['images']:,} | {r['pixels_mb']:.0f} | {s['open_s']:.2f} | "
            f"{s['first_step_s']:.1f} | {s['peak_rss_mb']:.0f} | {npz} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--npz-up-to", type=int, default=1_000_000)
    p.add_argument("--out", default=str(RESULTS / "stream_startup.json"))
    return p


if __name__ == "__main__":
    main(parser().parse_args())
