"""A run: :func:`train` composes the :class:`~.trainer.Trainer` with a
:class:`RunFolder` (which never loses work) and the training loop (steps,
evaluations, checkpoints, early stopping), then scores the best parameters on
the test split and writes the sample grid and the summary."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax

from .. import checkpoint
from ..data import Splits, reduce_bits, train_validation_split
from ..data import load as load_data
from ..glow import num_parameters
from .checkpoints import BEST, CHECKPOINT, _check_resumable
from .config import TrainConfig, default_out_dir
from .density import TrainState
from .report import _Clock, _Progress, _sample_grid, _save_png, _write_text
from .trainer import Trainer

Array = jax.Array

__all__ = ["RUN_FILES", "RunFolder", "train"]

RUN_FILES = (CHECKPOINT, BEST, "metrics.jsonl", "samples.png", "summary.json")


class RunFolder:
    """The output folder of a run, which never loses work: it refuses to start a
    run where one exists unless told to ``resume`` it or ``overwrite`` it; a
    new run that fails before it wrote a checkpoint or an evaluation leaves
    no file and no folder behind."""

    def __init__(self, path: Path, *, resume: bool, overwrite: bool, primary: bool = True):
        if resume and overwrite:
            raise ValueError("--resume continues a run and --overwrite replaces it: pass one")
        self.path, self.resume, self.overwrite, self.primary = path, resume, overwrite, primary
        self.checkpoint, self.best = path / CHECKPOINT, path / BEST
        self.metrics = path / "metrics.jsonl"
        old = [name for name in (*RUN_FILES, "checkpoint.pkl") if (path / name).exists()]
        if resume and not self.checkpoint.is_file():
            hint = (
                " (an old pickle checkpoint: convert it first)" if "checkpoint.pkl" in old else ""
            )
            raise FileNotFoundError(f"nothing to resume: {self.checkpoint} not found{hint}")
        if old and not (resume or overwrite):
            raise ValueError(
                f"{path} already holds a run ({', '.join(old)}); pass --resume to continue it, "
                "--overwrite to replace it, or --out to write elsewhere"
            )
        self._created = [p for p in (path, *path.parents) if not p.exists()]
        self.saved_step: int | None = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            return
        fresh = self.primary and not self.resume and self.saved_step is None
        if fresh and self.metrics.is_file() and not self.metrics.stat().st_size:
            self.metrics.unlink()  # a new run that recorded nothing leaves nothing
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break

    def last_checkpoint(self) -> str:
        """The last checkpoint this run wrote, in words."""
        if self.saved_step is None:
            return "none yet (nothing was written)"
        return f"{self.checkpoint} (step {self.saved_step})"

    def start(self, state: TrainState) -> None:
        """Create the folder; on ``overwrite`` remove the old run's files; write
        ``metrics.jsonl`` anew (with the history of a resumed run)."""
        history = state.history
        if self.resume:
            self.saved_step = int(state.step)
        if not self.primary:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
        _write_text(self.metrics, "".join(checkpoint.dumps(r) + "\n" for r in history))

    def log(self, record: dict) -> None:
        if self.primary:
            with open(self.metrics, "a") as f:
                f.write(checkpoint.dumps(record) + "\n")

    def save(self, trainer: Trainer, state: TrainState) -> None:
        """Checkpoint ``state`` unless this step is already saved; the best
        parameters too when they changed."""
        step = int(state.step)
        if step == self.saved_step:
            return
        trainer.check_finite(state, self.last_checkpoint())
        if self.primary:
            trainer.save(state, self.path)
        self.saved_step = step


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: Splits | None = None,
) -> dict:
    """Train, evaluate, checkpoint and sample; returns the summary.

    Writes into ``config.out_dir`` (default :func:`default_out_dir` of the
    data): ``checkpoint.npz`` (the training state, every ``checkpoint_every``
    steps, on an early stop and at the end), ``best.npz`` (the parameters of
    the best validation score, with it), ``metrics.jsonl`` (one JSON object per
    evaluation), ``samples.png`` (a grid, one row per temperature) and
    ``summary.json``. The validation set is carved from the training split;
    the best parameters on it (averaged, EMA) are evaluated on the test split
    at the end.

    A folder that holds a run is refused unless ``resume`` (continue from its
    checkpoint, with the same batches and noise as an uninterrupted run; the
    options that matter must be the checkpoint's, and are compared before any
    data are read) or ``overwrite``. A non-finite loss raises
    ``FloatingPointError`` at the next check (evaluation, checkpoint or
    progress update), keeping the last good checkpoint.
    """
    out = Path(config.out_dir or default_out_dir(config.data))
    primary = jax.process_index() == 0  # with several processes, the first one writes
    with RunFolder(out, resume=resume, overwrite=overwrite, primary=primary) as run:
        if resume:
            _check_resumable(run.checkpoint, config)
        splits = data if data is not None else load_data(config.data, seed=config.seed)
        splits = reduce_bits(splits, config.n_bits)
        parts = train_validation_split(splits.train, config.validation_size, config.seed)
        trainer = Trainer(config, parts.train, parts.test, _num_classes(splits))
        t_start = time.perf_counter()
        state = trainer.resume(run.checkpoint) if resume else trainer.init_state()
        run.start(state)
        state, stopped_early = _fit(trainer, state, run, t_start)
        run.save(trainer, state)
        return _finish(trainer, state, splits, run, stopped_early, t_start)


def _advance(
    trainer: Trainer,
    state: TrainState,
    batches: Iterator[tuple[Array, Array | None]],
    clock: _Clock,
    bar: _Progress,
    last_checkpoint: Callable[[], str],
) -> TrainState:
    """What the loop does at every step: take the next batch, dispatch the
    compiled step (without waiting for it), count, tick the bar."""
    k, y = next(batches)
    state = trainer.step(state, k, y)
    clock.count(state, trainer.config.batch_size)
    bar.update(state, trainer, last_checkpoint)
    return state


def _fit(
    trainer: Trainer, state: TrainState, run: RunFolder, t_start: float
) -> tuple[TrainState, bool]:
    """The training loop: steps, evaluations, checkpoints, early stopping. Nothing
    waits for the device except evaluations, checkpoints and progress updates."""
    config = trainer.config
    start = int(state.step)
    bar, clock, stopped = _Progress(config, start), _Clock(), False
    try:
        batches = trainer.batches(start)
        for done in range(start + 1, config.steps + 1):
            state = _advance(trainer, state, batches, clock, bar, run.last_checkpoint)
            if done % config.eval_every == 0 or done == config.steps:
                trainer.check_finite(state, run.last_checkpoint())  # waits for the device
                rate = clock.pause()
                elapsed = time.perf_counter() - t_start
                state = trainer.evaluate(state, images_per_sec=rate, elapsed_s=elapsed)
                run.log(state.history[-1])
                stopped = state.bad_evals >= config.patience
                clock.restart()
                bar.restart()
            if done % config.checkpoint_every == 0 or stopped:
                run.save(trainer, state)
            if stopped:
                break
    finally:
        bar.close()
    return state, stopped


def _finish(
    trainer: Trainer,
    state: TrainState,
    splits: Splits,
    run: RunFolder,
    stopped_early: bool,
    t_start: float,
) -> dict:
    """Test-set scores of the best parameters, the sample grid and the summary."""
    density, best = trainer.density, state.best
    test_bpd = density.bits_per_dim(best, splits.test, jax.random.PRNGKey(11))
    test_uniform = density.bits_per_dim(best, splits.test, jax.random.PRNGKey(11), uniform=True)
    grid = _sample_grid(density, best, trainer.config.temperatures)
    samples_path = run.path / "samples.png"
    if run.primary:
        _save_png(grid, samples_path)
    summary = {
        "data": trainer.config.data,
        "test_bpd": test_bpd,
        "test_bpd_uniform_dequantization": test_uniform,
        "dequantization": trainer.config.dequantization,
        "best_validation_bpd": state.best_score,
        "best_step": state.best_step,
        "steps_run": int(state.step),
        "stopped_early": stopped_early,
        "wall_time_s": time.perf_counter() - t_start,
        "num_parameters": num_parameters(best),
        "num_parameters_glow": num_parameters(best, "glow"),
        "train_images": len(trainer.train_data.x),
        "validation_images": len(trainer.validation.x),
        "test_images": len(splits.test.x),
        "checkpoint": str(run.checkpoint),
        "best": str(run.best),
        "metrics": str(run.metrics),
        "samples": str(samples_path),
    }
    if run.primary:
        run.log({"final": True, **summary})
        _write_text(run.path / "summary.json", checkpoint.dumps(summary, indent=2) + "\n")
    return json.loads(checkpoint.dumps(summary))


def _num_classes(splits: Splits) -> int | None:
    found = [d.num_classes for d in (splits.train, splits.test) if d.num_classes is not None]
    return max(found) if found else None
