"""``numpyro-glow train | sample | evaluate``: the density model from the shell."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

__all__ = ["main"]

DATA_HELP = (
    "digits (scikit-learn's 8x8 digits, embedded), mnist:DIR, cifar10:DIR, npz:PATH or folder:DIR"
)


def _devices(text: str) -> int | str:
    """``--devices``: a positive integer or ``all``."""
    if text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    from .train import GlowConfig, TrainConfig

    t, g = TrainConfig(), GlowConfig()
    p = argparse.ArgumentParser(prog="numpyro-glow", description="Glow densities on images.")
    sub = p.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a Glow; writes checkpoint, metrics and samples")
    tr.add_argument("--data", default=t.data, help=DATA_HELP)
    tr.add_argument("--out", default=None, help="output folder (default runs/<data name>)")
    tr.add_argument("--steps", type=int, default=t.steps)
    tr.add_argument("--batch-size", type=int, default=t.batch_size)
    tr.add_argument("--learning-rate", type=float, default=t.learning_rate)
    tr.add_argument("--warmup-steps", type=int, default=t.warmup_steps)
    tr.add_argument("--weight-decay", type=float, default=t.weight_decay)
    tr.add_argument("--grad-clip", type=float, default=t.grad_clip)
    tr.add_argument("--ema-decay", type=float, default=t.ema_decay)
    tr.add_argument(
        "--dequantization", choices=["uniform", "variational"], default=t.dequantization
    )
    tr.add_argument("--validation-size", type=float, default=t.validation_size)
    tr.add_argument("--eval-every", type=int, default=t.eval_every)
    tr.add_argument("--checkpoint-every", type=int, default=t.checkpoint_every)
    tr.add_argument("--patience", type=int, default=t.patience)
    tr.add_argument("--seed", type=int, default=t.seed)
    tr.add_argument("--levels", type=int, default=g.levels)
    tr.add_argument("--depth", type=int, default=g.depth)
    tr.add_argument("--hidden-channels", type=int, default=g.hidden_channels)
    tr.add_argument("--coupling", choices=["affine", "additive"], default=g.coupling)
    tr.add_argument("--dropout", type=float, default=g.dropout, help="in the coupling nets")
    tr.add_argument("--dense", action="store_true", help="dense 1x1 convolution weight, not LU")
    tr.add_argument("--no-learn-top", action="store_true")
    tr.add_argument("--conditional", action="store_true", help="class-conditional top prior")
    tr.add_argument(
        "--reversible",
        action="store_true",
        help="recompute activations through the inverse in the backward pass (less memory)",
    )
    tr.add_argument(
        "--precision",
        choices=["float32", "bfloat16"],
        default=g.precision,
        help="bfloat16: mixed-precision coupling convolutions, float32 log-determinants",
    )
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pkl")
    tr.add_argument("--no-progress", action="store_true")
    par = tr.add_argument_group("several devices (see the docs page 'Several devices')")
    par.add_argument(
        "--devices",
        type=_devices,
        default=t.devices,
        help="split each batch over the first N of jax.devices(), or 'all' (default: one; "
        "with --distributed: all); the batch size must be a multiple of the device count",
    )
    par.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first: one process per host, same command",
    )
    par.add_argument(
        "--coordinator-address", default=None, help="HOST:PORT of process 0 (--distributed)"
    )
    par.add_argument("--num-processes", type=int, default=None, help="(--distributed)")
    par.add_argument("--process-id", type=int, default=None, help="0 .. N-1 (--distributed)")

    sa = sub.add_parser("sample", help="draw a PNG grid of samples from a checkpoint")
    sa.add_argument("checkpoint")
    sa.add_argument("--out", default="samples.png")
    sa.add_argument("--temperature", type=float, nargs="+", default=[0.7])
    sa.add_argument("--num", type=int, default=10, help="images per temperature")
    sa.add_argument("--label", type=int, default=None, help="class (conditional models)")
    sa.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("evaluate", help="test-set bits per dimension of a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", default=None, help="default: the data the checkpoint trained on")
    return p


def _train(args) -> int:
    if args.distributed:  # before anything touches a device
        import jax

        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
        if args.devices is None:
            args.devices = "all"
    from .train import GlowConfig, TrainConfig, train

    name = args.data.split(":", 1)[0]
    config = TrainConfig(
        data=args.data,
        out_dir=args.out or str(Path("runs") / name),
        model=GlowConfig(
            levels=args.levels,
            depth=args.depth,
            hidden_channels=args.hidden_channels,
            coupling=args.coupling,
            lu=not args.dense,
            learn_top=not args.no_learn_top,
            conditional=args.conditional,
            dropout=args.dropout,
            seed=args.seed,
            reversible=args.reversible,
            precision=args.precision,
        ),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        dequantization=args.dequantization,
        validation_size=args.validation_size,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        patience=args.patience,
        seed=args.seed,
        progress=not args.no_progress,
        devices=args.devices,
    )
    summary = train(config, resume=args.resume)
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


def _restore(path: str, data_spec: str | None = None, need_data: bool = True):
    """A trainer, the best parameters and the data splits of a checkpoint.

    With ``need_data=False`` (sampling) no data are read: the trainer is built on a
    placeholder with the checkpoint's image shape, levels and classes.
    """
    import numpy as np

    from .data import ImageData, Splits, load, train_validation_split
    from .train import TrainConfig, Trainer, load_checkpoint

    state = load_checkpoint(path)
    # evaluating and sampling run on one device, whatever the training used
    config = dataclasses.replace(TrainConfig.from_dict(state["config"]), devices=None)
    meta = state["data"]
    shape, levels, classes = tuple(meta["event_shape"]), meta["levels"], meta["num_classes"]
    if not need_data:
        y = None if classes is None else np.arange(classes, dtype=np.int32)
        n = 1 if classes is None else classes
        stub = ImageData(
            np.zeros((n, *shape), np.uint8 if levels <= 256 else np.int32), y, levels, "checkpoint"
        )
        return Trainer(config, stub, stub, classes), state["best"]["params"], Splits(stub, stub)
    if data_spec is not None:
        config = dataclasses.replace(config, data=data_spec)
    splits = load(config.data, seed=config.seed)
    found = (tuple(splits.test.x.shape[1:]), splits.test.levels)
    if found != (shape, levels):
        raise ValueError(
            f"{config.data}: the checkpoint {path} models images of shape {shape} with "
            f"{levels} levels; the data have shape {found[0]} with {found[1]} levels"
        )
    if classes is not None and (splits.test.y is None or int(splits.test.y.max()) >= classes):
        raise ValueError(
            f"{config.data}: the checkpoint {path} is conditional on {classes} classes; "
            "the test data have no labels or labels outside that range"
        )
    parts = train_validation_split(splits.train, config.validation_size, config.seed)
    trainer = Trainer(config, parts.train, parts.test, classes)
    return trainer, state["best"]["params"], splits


def _sample(args) -> int:
    import jax
    import numpy as np

    from .train import _save_png

    trainer, params, _ = _restore(args.checkpoint, need_data=False)
    if args.label is not None and trainer.num_classes is None:
        raise ValueError("--label needs a class-conditional checkpoint (trained --conditional)")
    rows = [
        trainer.sample(params, jax.random.PRNGKey(args.seed + i), args.num, t, label=args.label)
        for i, t in enumerate(args.temperature)
    ]
    _save_png(np.stack(rows), Path(args.out))
    print(f"samples: {args.out}")
    return 0


def _evaluate(args) -> int:
    import jax

    trainer, params, splits = _restore(args.checkpoint, args.data)
    bpd = trainer.bits_per_dim(params, splits.test, jax.random.PRNGKey(11))
    print(json.dumps({"test_bpd": bpd, "test_images": len(splits.test.x)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``numpyro-glow`` command."""
    args = _parser().parse_args(argv)
    handler = {"train": _train, "sample": _sample, "evaluate": _evaluate}[args.command]
    try:
        return handler(args)
    except (OSError, ValueError, FloatingPointError, ImportError) as e:
        print(f"numpyro-glow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
