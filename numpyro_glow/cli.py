"""``numpyro-glow train | sample | evaluate | prepare | convert-checkpoint``: the
density model from the shell.

Every option is a field of a configuration dataclass (:class:`~numpyro_glow.train.TrainConfig`
and :class:`~numpyro_glow.train.GlowConfig` for ``train``, the small classes below
for the rest); the parser is generated from the fields by
:mod:`numpyro_glow.options`, and the values are checked before anything is read,
compiled or written. Errors end the command with exit status 2 and one line
naming the option or file; Ctrl-C (exit 130) and SIGTERM (exit 143) stop a
run, keeping its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ._version import __version__
from .options import (
    POSITIVE,
    Validated,
    add_arguments,
    at_least,
    between,
    from_arguments,
    option,
)

__all__ = [
    "ConvertOptions",
    "DistributedOptions",
    "EvaluateOptions",
    "PrepareOptions",
    "RunOptions",
    "SampleOptions",
    "main",
]


@dataclass(frozen=True)
class RunOptions(Validated):
    """What ``train`` does with an output folder that already holds a run."""

    resume: bool = option(False, "continue the run in --out from its checkpoint.npz")
    overwrite: bool = option(False, "replace the run in --out (its files are deleted)")


@dataclass(frozen=True)
class DistributedOptions(Validated):
    """Several processes (hosts): see the docs page 'Several devices'."""

    distributed: bool = option(
        False, "call jax.distributed.initialize() first: one process per host, same command"
    )
    coordinator_address: str | None = option(
        None, "HOST:PORT of process 0 (--distributed)", metavar="HOST:PORT"
    )
    num_processes: int | None = option(
        None, "number of processes (--distributed)", check=at_least(1)
    )
    process_id: int | None = option(None, "0 .. N-1 (--distributed)", check=at_least(0))


@dataclass(frozen=True)
class SampleOptions(Validated):
    """``numpyro-glow sample``."""

    checkpoint: str = option("", "checkpoint.npz or best.npz of a run", flag="checkpoint")
    out: str = option("samples.png", "the PNG to write")
    temperature: tuple[float, ...] = option(
        (0.7,), "temperatures, one row of samples each", check=POSITIVE
    )
    num: int = option(10, "images per temperature", check=at_least(1))
    label: int | None = option(
        None, "class to sample (class-conditional checkpoints; default 0)", check=at_least(0)
    )
    seed: int = option(0, "seed of the draws", check=at_least(0))


@dataclass(frozen=True)
class EvaluateOptions(Validated):
    """``numpyro-glow evaluate``."""

    checkpoint: str = option("", "checkpoint.npz or best.npz of a run", flag="checkpoint")
    data: str | None = option(
        None, "data to evaluate on (default: the data the checkpoint trained on)", metavar="SPEC"
    )


@dataclass(frozen=True)
class PrepareOptions(Validated):
    """``numpyro-glow prepare``."""

    source: str = option(
        "",
        "folder:DIR (or a directory), npz:PATH, mnist:DIR, cifar10:DIR or digits",
        flag="source",
    )
    out: str = option("", "the new folder to write the prepared data set into", flag="out")
    size: int | None = option(
        None, "resize and center-crop every image to SIZE x SIZE (image folders)", check=POSITIVE
    )
    test_size: float = option(
        0.2,
        "held-out test fraction (sets without an official split)",
        check=between(0, 1, low_open=True),
    )
    seed: int = option(0, "seed of the test split", check=at_least(0))
    shard_size: int | None = option(
        None, "images per shard (default: about 64 MiB of pixels)", check=at_least(1)
    )
    skip_bad: bool = option(
        False, "skip (and count) unreadable images instead of stopping at the first"
    )
    workers: int | None = option(
        None, "decoding threads (default: the number of CPUs)", check=at_least(1)
    )
    progress: bool = option(True, "no progress line")


@dataclass(frozen=True)
class ConvertOptions(Validated):
    """``numpyro-glow convert-checkpoint``."""

    source: str = option("", "the checkpoint.pkl of numpyro-glow 0.1", flag="source")
    out: str | None = option(
        None, "folder for checkpoint.npz and best.npz (default: the pickle's folder)"
    )
    trust_pickle: bool = option(
        False, "required: say that you trust the file (only arrays and optax states are read)"
    )


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _versions() -> str:
    import jax
    import numpyro

    return f"numpyro-glow {__version__} (jax {jax.__version__}, numpyro {numpyro.__version__})"


def _parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    p = _Parser(prog="numpyro-glow", description="Glow densities on images.")
    p.add_argument("--version", action="version", version=_versions())
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tr = sub.add_parser("train", help="train a Glow; writes checkpoints, metrics and samples")
    add_arguments(tr, TrainConfig)
    add_arguments(tr, RunOptions)
    add_arguments(tr.add_argument_group("several processes"), DistributedOptions)

    sa = sub.add_parser("sample", help="draw a PNG grid of samples from a checkpoint")
    add_arguments(sa, SampleOptions)
    ev = sub.add_parser("evaluate", help="test-set bits per dimension of a checkpoint")
    add_arguments(ev, EvaluateOptions)
    pr = sub.add_parser(
        "prepare", help="write a data set as shards that train streams (stream:OUT)"
    )
    add_arguments(pr, PrepareOptions)
    cv = sub.add_parser(
        "convert-checkpoint", help="convert a trusted checkpoint.pkl (numpyro-glow 0.1) to .npz"
    )
    add_arguments(cv, ConvertOptions)
    return p


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, default_out_dir, train

    run = from_arguments(RunOptions, args)
    multi = from_arguments(DistributedOptions, args)
    devices = args.devices if args.devices is not None or not multi.distributed else "all"
    config = from_arguments(TrainConfig, args, devices=devices)
    if multi.distributed:  # before anything touches a device
        import jax

        jax.distributed.initialize(
            coordinator_address=multi.coordinator_address,
            num_processes=multi.num_processes,
            process_id=multi.process_id,
        )
    out = config.out_dir or default_out_dir(config.data)
    try:
        summary = train(config, resume=run.resume, overwrite=run.overwrite)
    except KeyboardInterrupt:
        print(f"numpyro-glow train: stopped; {_last_checkpoint(Path(out))}", file=sys.stderr)
        raise
    print(
        f"test bits/dim {summary['test_bpd']:.4f} ({summary['dequantization']} "
        f"dequantization; {summary['test_bpd_uniform_dequantization']:.4f} with uniform), "
        f"best validation {summary['best_validation_bpd']:.4f} at step "
        f"{summary['best_step']}, {summary['wall_time_s']:.0f} s"
    )
    print(f"samples:    {summary['samples']}")
    print(f"metrics:    {summary['metrics']}")
    print(f"checkpoint: {summary['checkpoint']}")
    return 0


def _last_checkpoint(out: Path) -> str:
    from .checkpoint import read_metadata
    from .train import CHECKPOINT

    path = out / CHECKPOINT
    try:
        step = read_metadata(path)["step"]
    except (OSError, ValueError, KeyError):
        return f"no checkpoint in {out}"
    return f"the last checkpoint is {path} (step {step}); continue with --resume"


def _checked_label(label: int | None, num_classes: int | None) -> int | None:
    if label is None:
        return None
    if num_classes is None:
        raise ValueError("--label needs a class-conditional checkpoint (trained --conditional)")
    if not 0 <= label < num_classes:
        raise ValueError(f"--label: expected a class in [0, {num_classes}), got {label}")
    return label


def _sample(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from .train import load_model
    from .train.report import _save_png

    opts = from_arguments(SampleOptions, args)
    density, params, _ = load_model(opts.checkpoint)
    label = _checked_label(opts.label, density.num_classes)
    rows = [
        density.sample(params, jax.random.PRNGKey(opts.seed + i), opts.num, t, label=label)
        for i, t in enumerate(opts.temperature)
    ]
    _save_png(np.stack(rows), Path(opts.out))
    print(f"samples: {opts.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import jax

    from .checkpoint import dumps
    from .data import load, reduce_bits
    from .train import TrainConfig, load_model

    opts = from_arguments(EvaluateOptions, args)
    density, params, meta = load_model(opts.checkpoint)
    config = TrainConfig.from_dict(meta["config"])
    spec = opts.data or config.data
    splits = reduce_bits(load(spec, seed=config.seed), config.n_bits)
    shape, levels = density.event_shape, density.info.levels
    found = (tuple(splits.test.x.shape[1:]), splits.test.levels)
    if found != (shape, levels):
        raise ValueError(
            f"{spec}: the checkpoint {opts.checkpoint} models images of shape {shape} with "
            f"{levels} levels; the data have shape {found[0]} with {found[1]} levels"
        )
    classes = density.num_classes
    found_classes = splits.test.num_classes
    if classes is not None and (found_classes is None or found_classes > classes):
        raise ValueError(
            f"{spec}: the checkpoint {opts.checkpoint} is conditional on {classes} classes; "
            "the test data have no labels or labels outside that range"
        )
    bpd = density.bits_per_dim(params, splits.test, jax.random.PRNGKey(11))
    print(dumps({"test_bpd": bpd, "test_images": len(splits.test.x)}))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import shlex

    from .prepare import prepare

    opts = from_arguments(PrepareOptions, args)
    keywords = dataclasses.asdict(opts)  # the options are prepare's keyword arguments
    manifest = prepare(keywords.pop("source"), keywords.pop("out"), **keywords)
    images, shape = manifest["images"], "x".join(map(str, manifest["shape"]))
    skipped = f", {manifest['skipped']} unreadable image(s) skipped" if manifest["skipped"] else ""
    print(
        f"prepared {images['train']} training and {images['test']} test images of {shape} "
        f"({manifest['levels']} levels) in {opts.out}{skipped}"
    )
    out = shlex.quote(str(Path(opts.out).expanduser().resolve()))
    print(f"train with: numpyro-glow train --data stream:{out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .train import convert_checkpoint

    opts = from_arguments(ConvertOptions, args)
    target = convert_checkpoint(opts.source, opts.out, trust_pickle=opts.trust_pickle)
    print(f"checkpoint: {target}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program runs so that it stops as on Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


HANDLERS = {
    "train": _train,
    "sample": _sample,
    "evaluate": _evaluate,
    "prepare": _prepare,
    "convert-checkpoint": _convert,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``numpyro-glow`` command."""
    args = _parser().parse_args(argv)
    try:
        with _sigterm_stops():
            return HANDLERS[args.command](args)
    except Terminated:
        print(f"numpyro-glow {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"numpyro-glow {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, FloatingPointError, ImportError) as e:
        print(f"numpyro-glow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
