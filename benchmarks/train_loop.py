"""The training loop against the bare compiled step: how much of the device the loop uses.

Run: ``python benchmarks/train_loop.py`` (about 5 minutes on 2 shared CPU cores;
``--quick`` for a smoke run). Writes ``benchmarks/results/train_loop.json``
and prints a Markdown table.

The method of issue 12: the same compiled update, called N times with and
without the per-step host work of ``numpyro-glow train``. Modes:

``bare_old``
    ``jax.jit(SVI.update)`` (the update ``Trainer`` compiled before issue 12:
    no donation, no parameter average), N calls on one pre-placed batch.
``loop_old``
    What ``train()`` did per step before issue 12 (commit e5d022d), re-created
    here on the same compiled update: index the batch on the host (a new
    permutation per step) and transfer it, fold the step into the key, call
    the update, convert the loss to a Python float (a host sync), check it,
    update the parameter average with an eager ``tree_map``, set the bar's
    postfix.
``bare_new``
    ``Density.train_step`` (SVI update, parameter average and NaN flag in one
    compiled function, the state donated), N calls on one pre-placed batch.
``loop_new``
    N calls of ``numpyro_glow.train.run._advance``, the per-step work of today's
    ``train()``: next batch from ``Trainer.batches``, the compiled step
    dispatched without waiting, the throughput clock, the progress bar (which
    reads the loss at most every half second).
``loop_stream``
    ``loop_new`` on the same images prepared as a streaming set
    (``numpyro-glow prepare``, then ``stream:DIR``): batches read from the
    shards by grain, ``--loader-threads`` (2) threads ahead (issue 20).
``loop_prefetch`` (experiment)
    ``loop_new`` with the batches prepared by a background thread, two ahead.
``loop_device_data`` (experiment)
    the training images kept on the device; each step sends only its indices
    and gathers the batch inside the compiled step.

The progress bar is on (the command's default) and writes to ``os.devnull``.
Every round runs every mode once, the order rotated by one mode per round, so
the machine's load hits all of them alike; many short rounds spread each mode
over the whole run.
The table reports, per mode, the steps/s over all its rounds (total steps
over total time) and the median over rounds; per loop, its ratio to its own
bare step over all rounds and the median of the paired per-round ratios.
Evaluations and checkpoints are not part of any mode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_glow.data import ImageData, load, train_validation_split
from numpyro_glow.prepare import prepare
from numpyro_glow.train import GlowConfig, TrainConfig, Trainer
from numpyro_glow.train.density import _arrays_only, _carried, _rejoin
from numpyro_glow.train.report import _Clock, _Progress
from numpyro_glow.train.run import _advance

RESULTS = Path(__file__).parent / "results"

CONFIGS = {
    # the digits default run (numpyro-glow train)
    "digits": dict(model=GlowConfig(), batch_size=64),
    # the second GPU row: 28x28x1 (random pixels stand in for MNIST), K=16, 256 ch
    "mnist28": dict(model=GlowConfig(levels=2, depth=16, hidden_channels=256), batch_size=64),
    # a 32x32x3 set (random pixels stand in for CIFAR-10), the default model
    "rgb32": dict(model=GlowConfig(), batch_size=64),
    # smoke run
    "tiny": dict(model=GlowConfig(levels=1, depth=1, hidden_channels=4), batch_size=16),
}


def _data(name: str, seed: int = 0) -> tuple[ImageData, ImageData]:
    if name in ("mnist28", "rgb32"):
        shape = (2000, 28, 28, 1) if name == "mnist28" else (2000, 32, 32, 3)
        x = np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)
        data = ImageData(x, None, 256, f"random{shape[1]}")
        parts = train_validation_split(data, 0.1, seed)
    else:
        splits = load("digits", seed=seed)
        parts = train_validation_split(splits.train, 0.1, seed)
    return parts.train, parts.test


def _prefetch(batches, depth: int = 2):
    """The items of ``batches``, produced by a background thread ``depth`` ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        for item in batches:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            yield q.get()
    finally:
        stop.set()


class Bench:
    def __init__(self, config_name: str):
        cfg = CONFIGS[config_name]
        self.config = TrainConfig(steps=10**9, dequantization="variational", progress=True, **cfg)
        train, validation = _data(config_name)
        self.trainer = Trainer(self.config, train, validation)
        self.density = self.trainer.density
        self.devnull = open(os.devnull, "w")  # noqa: SIM115 - closed in close()
        state = self.trainer.init_state()
        self.k, self.y = jax.device_put(self.trainer.batch(0))  # pre-placed
        # old: the update Trainer compiled before issue 12
        self.svi = self.density.svi
        self.update = jax.jit(self.svi.update)
        self.svi_state = jax.tree.map(jnp.copy, state.svi)
        self.ema_old = jax.tree.map(jnp.copy, state.ema)
        self.old_step = 0
        self.old_key = jax.random.PRNGKey(self.config.seed + 1)
        # new: one state per new mode (each is donated step after step)
        arrays = _arrays_only(state)
        self.states = {m: jax.tree.map(jnp.copy, arrays) for m in NEW_MODES}
        # the same training images, prepared as a streaming set and read through grain
        self.tmp = tempfile.TemporaryDirectory()
        npz = Path(self.tmp.name) / "train.npz"
        labels = {} if train.y is None else {"y": train.y}
        np.savez(npz, x=train.x, levels=np.int64(train.levels), **labels)
        prepare(f"npz:{npz}", Path(self.tmp.name) / "stream", test_size=1, progress=False)
        streamed = load(f"stream:{Path(self.tmp.name) / 'stream'}")
        self.stream_trainer = Trainer(self.config, streamed.train, validation)
        self.iters = {
            "loop_stream": self.stream_trainer.batches(0),
            "loop_new": self.trainer.batches(0),
            "loop_prefetch": _prefetch(self.trainer.batches(0)),
        }
        # device-resident data
        self.x_dev = jnp.asarray(train.x)
        self.device_step = jax.jit(
            lambda s, x, idx, key: self.density._train_step(s, x[idx], None, key),
            donate_argnums=0,
        )
        self.perm_cache: tuple[int, np.ndarray] | None = None
        self.bars = {
            m: _Progress(self.config, 0, file=self.devnull) for m in ("loop_old", *NEW_MODES)
        }
        self.clocks = {m: _Clock() for m in NEW_MODES}

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.devnull.close()
        self.tmp.cleanup()

    # modes ---------------------------------------------------------------------
    def bare_old(self, n: int) -> None:
        state = self.svi_state
        for _ in range(n):
            state, loss = self.update(state, self.k, self.y)
        jax.block_until_ready(loss)
        self.svi_state = state

    def loop_old(self, n: int) -> None:
        """The per-step body of train() at e5d022d (old Trainer.batch and step_key)."""
        state, ema, bar = self.svi_state, self.ema_old, self.bars["loop_old"].bar
        data, b = self.trainer.train_data, self.config.batch_size
        decay, dims = self.config.ema_decay, self.density.num_dims
        for _ in range(n):
            step = self.old_step
            epoch, i = divmod(step, max(len(data.x) // b, 1))
            perm = np.random.default_rng((self.config.seed, epoch)).permutation(len(data.x))
            k, y = self.density.place(data.x[perm[i * b : (i + 1) * b]], None)
            state = state._replace(rng_key=jax.random.fold_in(self.old_key, step))
            new_state, loss = self.update(state, k, y)
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(loss)
            state = new_state
            params = self.svi.get_params(state)
            ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
            bpd = loss / (len(k) * dims * math.log(2.0))
            bar.set_postfix(loss=f"{loss:.1f}", bpd=f"{bpd:.3f}", refresh=False)
            bar.update(1)
            self.old_step += 1
        jax.block_until_ready(ema)
        self.svi_state, self.ema_old = state, ema

    def bare_new(self, n: int) -> None:
        old = self.states["bare_new"]
        state, key = _carried(old), self.trainer.step_key
        for _ in range(n):
            state = self.density.train_step(state, self.k, self.y, key)
        jax.block_until_ready(state.loss)
        self.states["bare_new"] = _rejoin(state, old)

    def _loop(self, mode: str, n: int) -> None:
        state, bar, clock = self.states[mode], self.bars[mode], self.clocks[mode]
        trainer = self.stream_trainer if mode == "loop_stream" else self.trainer
        for _ in range(n):
            state = _advance(trainer, state, self.iters[mode], clock, bar, lambda: "-")
        jax.block_until_ready(state.loss)
        self.states[mode] = state

    def loop_new(self, n: int) -> None:
        self._loop("loop_new", n)

    def loop_stream(self, n: int) -> None:
        self._loop("loop_stream", n)

    def loop_prefetch(self, n: int) -> None:
        self._loop("loop_prefetch", n)

    def loop_device_data(self, n: int) -> None:
        mode = "loop_device_data"
        old = self.states[mode]
        state, bar = _carried(old), self.bars[mode]
        n_data, b = len(self.trainer.train_data.x), self.config.batch_size
        step = int(state.step)
        for _ in range(n):
            epoch, i = divmod(step, n_data // b)
            if self.perm_cache is None or self.perm_cache[0] != epoch:
                rng = np.random.default_rng((self.config.seed, epoch))
                self.perm_cache = (epoch, rng.permutation(n_data).astype(np.int32))
            idx = self.perm_cache[1][i * b : (i + 1) * b]
            state = self.device_step(state, self.x_dev, idx, self.trainer.step_key)
            bar.update(state, self.trainer, lambda: "-")
            step += 1
        jax.block_until_ready(state.loss)
        self.states[mode] = _rejoin(state, old)


NEW_MODES = ("bare_new", "loop_new", "loop_stream", "loop_prefetch", "loop_device_data")
MODES = ("bare_old", "loop_old", *NEW_MODES)
PAIRS = {
    "loop_old": "bare_old",
    "loop_new": "bare_new",
    "loop_stream": "bare_new",
    "loop_prefetch": "bare_new",
    "loop_device_data": "bare_new",
}


def main(args: argparse.Namespace) -> dict:
    bench = Bench(args.config)
    try:
        for mode in MODES:  # compile and warm up
            getattr(bench, mode)(3)
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        seconds = dict.fromkeys(MODES, 0.0)
        for r in range(args.rounds):
            for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                t0 = time.perf_counter()
                getattr(bench, mode)(args.steps)
                seconds[mode] += time.perf_counter() - t0
                rates[mode].append(args.steps / (time.perf_counter() - t0))
            print(f"round {r + 1}: " + ", ".join(f"{m} {rates[m][-1]:.1f}" for m in MODES))
    finally:
        bench.close()
    ratios = {
        loop: [a / b for a, b in zip(rates[loop], rates[bare], strict=True)]
        for loop, bare in PAIRS.items()
    }
    result = {
        "config": args.config,
        "steps_per_mode": args.steps,
        "rounds": args.rounds,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "steps_per_s": rates,
        "total_steps_per_s": {m: args.rounds * args.steps / t for m, t in seconds.items()},
        "median_steps_per_s": {m: statistics.median(v) for m, v in rates.items()},
        "loop_over_bare": ratios,
        "total_loop_over_bare": {m: seconds[bare] / seconds[m] for m, bare in PAIRS.items()},
        "median_loop_over_bare": {m: statistics.median(v) for m, v in ratios.items()},
    }
    print(table(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


def table(result: dict) -> str:
    total, med = result["total_steps_per_s"], result["median_steps_per_s"]
    ratio, med_ratio = result["total_loop_over_bare"], result["median_loop_over_bare"]
    lines = [
        f"{result['config']}, {result['backend']} ({result['device']}), "
        f"{result['rounds']} rounds x {result['steps_per_mode']} steps per mode",
        "",
        "| mode | steps/s (all rounds) | steps/s (median round) | loop / bare (all rounds) "
        "| loop / bare (median of paired rounds) |",
        "|---|---|---|---|---|",
    ]
    for m in MODES:
        r = f"{ratio[m]:.2f} | {med_ratio[m]:.2f}" if m in ratio else " | "
        lines.append(f"| {m} | {total[m]:.1f} | {med[m]:.1f} | {r} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="digits")
    p.add_argument("--steps", type=int, default=15, help="steps per mode per round")
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--out", default=None, help="default: results/train_loop[_CONFIG].json")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 rounds of 10 steps")
    return p


if __name__ == "__main__":
    a = parser().parse_args()
    if a.quick:
        a.config, a.steps, a.rounds, a.out = "tiny", 10, 2, ""
    if a.out is None:
        suffix = "" if a.config == "digits" else f"_{a.config}"
        a.out = str(RESULTS / f"train_loop{suffix}.json")
    main(a)
