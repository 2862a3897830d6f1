"""What the user of a run sees: the progress bar, the training throughput, the
sample grid and its PNG, and the atomic writes of the run's text files."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .config import TrainConfig
from .density import Density, TrainState
from .trainer import Trainer

__all__: list[str] = []


def _replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary path)``, then rename it over ``path``; on failure remove it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _replace_atomically(path, lambda tmp: tmp.write_text(text))


class _Clock:
    """Training throughput over steps that are done: images counted since the
    last :meth:`restart`, divided by the time from that restart to the
    :meth:`pause` that reads them. Both are called right after waiting for the
    device, so the window holds exactly the work of the steps counted, the
    wait for the last of them included. The first step (which compiles) is
    left out, and so is whatever runs between a pause and the next restart
    (the evaluations)."""

    def __init__(self) -> None:
        self.images, self.t0, self.started = 0, time.perf_counter(), False

    def count(self, state: TrainState, images: int) -> None:
        if not self.started:  # wait for the first step, then start counting
            jax.block_until_ready(state.loss)
            self.started = True
            self.restart()
        else:
            self.images += images

    def elapsed(self) -> float:
        """Seconds since the last restart."""
        return time.perf_counter() - self.t0

    def pause(self) -> float | None:
        """Images per second since the last restart (call once the device is done);
        ``None`` if no step was counted."""
        rate = self.images / max(self.elapsed(), 1e-9) if self.images else None
        self.images = 0
        return rate

    def restart(self) -> None:
        """Open a new window (call once the device is done): nothing counted yet."""
        self.images, self.t0 = 0, time.perf_counter()


class _Progress:
    """tqdm's bar; the loss shown (and checked for NaN) at most every half second,
    the only times the loop waits for the device besides evaluations. Its
    images per second are those of the steps done in the last window of at
    least half a second, measured after waiting for them (as the throughput
    of ``metrics.jsonl``), not those dispatched."""

    def __init__(self, config: TrainConfig, start: int, file: Any = None):
        from tqdm.auto import tqdm  # a dependency of numpyro

        self.bar = tqdm(
            total=config.steps,
            initial=start,
            desc="train",
            dynamic_ncols=True,
            disable=not config.progress,
            mininterval=0.5,
            file=file,
        )
        self.enabled, self.batch = config.progress, config.batch_size
        self.clock = _Clock()  # the throughput shown, measured as metrics.jsonl's

    def update(
        self, state: TrainState, trainer: Trainer, last_checkpoint: Callable[[], str]
    ) -> None:
        self.bar.update(1)
        if not self.enabled:
            return
        self.clock.count(state, self.batch)
        if self.clock.elapsed() < 0.5:
            return
        trainer.check_finite(state, last_checkpoint())  # waits for the device
        loss = float(state.loss)
        rate = self.clock.pause()  # after the wait: the steps counted are done
        self.clock.restart()
        bpd = loss / (self.batch * trainer.density.num_dims * math.log(2.0))
        shown = dict(loss=f"{loss:.1f}", bpd=f"{bpd:.3f}")
        if rate is not None:
            shown["img_s"] = f"{rate:.0f}"
        self.bar.set_postfix(**shown)

    def restart(self) -> None:
        """A new throughput window, leaving out what ran since the device was last
        waited for (an evaluation); call it right after that wait."""
        self.clock.restart()

    def close(self) -> None:
        self.bar.close()


def _sample_grid(density: Density, params: dict, temperatures, n: int = 10) -> np.ndarray:
    """One row per temperature; with classes, column j is class j mod num_classes."""
    rows = []
    for i, t in enumerate(temperatures):
        key = jax.random.PRNGKey(100 + i)
        if density.num_classes is None:
            rows.append(density.sample(params, key, n, t))
        else:
            rows.append(
                np.concatenate(
                    [
                        density.sample(
                            params, jax.random.fold_in(key, j), 1, t, label=j % density.num_classes
                        )
                        for j in range(n)
                    ]
                )
            )
    return np.stack(rows)  # (rows, n, H, W, C)


def _save_png(grid: np.ndarray, path: Path, scale: int | None = None, pad: int = 1) -> None:
    """Write a (rows, cols, H, W, C) grid of [0, 1] images as one PNG, atomically."""
    from PIL import Image

    rows, cols, h, w, c = grid.shape
    scale = scale or max(1, 64 // max(h, w))
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i in range(rows):
        for j in range(cols):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y0 : y0 + h, x0 : x0 + w] = grid[i, j]
    img = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
    img = np.repeat(np.repeat(img, scale, 0), scale, 1)
    image = Image.fromarray(img[..., 0] if c == 1 else img)
    _replace_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
