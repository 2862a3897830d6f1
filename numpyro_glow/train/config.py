"""The options of a run: :class:`GlowConfig` (the architecture) and
:class:`TrainConfig` (everything :func:`~numpyro_glow.train.train` does), from
which ``numpyro-glow train``'s command line is generated, and the rules that
go with them (the default output folder, what may change on resume)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..glow import COUPLINGS
from ..options import POSITIVE, Check, Validated, at_least, between, flag_of, option

__all__ = ["DATA_HELP", "GlowConfig", "TrainConfig", "canonical_data", "default_out_dir"]

DATA_HELP = (
    "digits (scikit-learn's 8x8 digits, embedded), mnist:DIR, cifar10:DIR, npz:PATH, folder:DIR, "
    "or stream:DIR (a data set numpyro-glow prepare wrote, read from disk as it trains)"
)


def _alpha(text: str) -> float | None:
    """``--alpha``: a number, or ``none`` for no Logitify."""
    return None if text.strip().lower() == "none" else float(text)


def _devices(text: str) -> int | str:
    """``--devices``: a positive integer or ``all``."""
    import argparse

    if text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return int(text)


NON_NEGATIVE = at_least(0)
DEVICES = Check(
    lambda v: v == "all" or (isinstance(v, int) and v >= 1), "a positive integer or 'all'"
)


@dataclass(frozen=True)
class GlowConfig(Validated):
    """Architecture of the density (the arguments of :func:`~numpyro_glow.glow`)."""

    levels: int = option(
        2, "Glow's number of scales L (not the number of pixel values)", check=at_least(1)
    )
    depth: int = option(8, "flow steps K per level", check=at_least(1))
    hidden_channels: int = option(
        64, "hidden channels of each coupling's convolutional net", check=at_least(1)
    )
    coupling: str = option("affine", "coupling layer", choices=tuple(COUPLINGS))
    lu: bool = option(
        True, "a dense 1x1 convolution weight instead of the LU-factored one", flag="--dense"
    )
    learn_top: bool = option(True, "a fixed standard normal top prior instead of a learned one")
    conditional: bool = option(
        False, "class-conditional top prior (the data must have labels; sample with --label)"
    )
    alpha: float | None = option(
        0.05,
        "Logitify's alpha: pixels squeezed into [alpha/2, 1 - alpha/2] before the logit "
        "('none': no Logitify)",
        check=between(0, 1),
        parse=_alpha,
    )
    dropout: float = option(
        0.1, "dropout rate on the coupling nets' hidden units, in training", check=between(0, 1)
    )
    seed: int = option(0, "seed of the 1x1 convolutions' random rotations", check=NON_NEGATIVE)
    reversible: bool = option(
        False, "recompute activations through the inverse in the backward pass (less memory)"
    )
    precision: str = option(
        "float32",
        "bfloat16: mixed-precision coupling convolutions, float32 log-determinants",
        choices=("float32", "bfloat16"),
    )


@dataclass(frozen=True)
class TrainConfig(Validated):
    """What :func:`train` does; ``numpyro-glow train``'s options are these fields.

    Every field is checked on construction (``ValueError`` naming the field,
    its flag, what was expected and what came).
    """

    data: str = option("digits", DATA_HELP, metavar="SPEC")
    out_dir: str | None = option(
        None,
        "output folder (default: runs/digits for the digits, runs/<kind>-<name>-<hash of the "
        "path> for a data set read from a path, so two data sets never share one)",
        flag="--out",
        resume=True,
    )
    n_bits: int | None = option(
        None,
        "reduce the pixels to 2**B levels (the Glow paper's 5 bits on CelebA-HQ): data, "
        "dequantization and bits/dim all use them; the data must have 2**b >= 2**B levels",
        check=between(1, 16, high_open=False),
        metavar="B",
    )
    loader_threads: int = option(
        2,
        "with stream:DIR, threads that read the next batches while the device steps",
        check=at_least(1),
        resume=True,
    )
    model: GlowConfig = option(GlowConfig(), "the architecture")
    steps: int = option(
        10000,
        "training steps (raise it with --resume to train longer)",
        check=at_least(1),
        resume=True,
    )
    batch_size: int = option(64, "images per training step", check=at_least(1))
    learning_rate: float = option(
        2e-3, "AdamW learning rate, after a linear warm-up", check=POSITIVE
    )
    warmup_steps: int = option(200, "steps of the learning-rate warm-up", check=NON_NEGATIVE)
    weight_decay: float = option(
        0.5, "AdamW's decoupled weight decay", check=at_least(0, "a number")
    )
    grad_clip: float = option(50.0, "clip gradients to this global norm", check=POSITIVE)
    ema_decay: float = option(
        0.995, "decay of the parameter average that is evaluated", check=between(0, 1)
    )
    dequantization: str = option(
        "variational",
        "q(u | k): a learned conditional flow, or uniform noise (both bound the likelihood "
        "of the pixels); gaussian: Raiko's corruption, normal noise of --corruption-level "
        "pixel values (TFGENZOO's LogitifyImage), the density of noisy pixels, no bound",
        choices=("uniform", "variational", "gaussian"),
    )
    corruption_level: float = option(
        1.0,
        "with --dequantization gaussian: the standard deviation of the noise in pixel values; "
        "x = (k + c eps) / (c + L - 1) for pixels k = 0 .. L - 1",
        check=POSITIVE,
    )
    validation_size: float = option(
        0.1,
        "fraction of the training split held out for validation",
        check=between(0, 1, low_open=True),
    )
    eval_every: int = option(250, "steps between validation evaluations", check=at_least(1))
    checkpoint_every: int = option(500, "steps between checkpoints", check=at_least(1), resume=True)
    patience: int = option(
        8,
        "evaluations without a better validation score before stopping early",
        check=at_least(1),
        resume=True,
    )
    temperatures: tuple[float, ...] = option(
        (0.5, 0.7, 0.85, 1.0),
        "sampling temperatures of samples.png, one row each",
        check=POSITIVE,
        resume=True,
    )
    seed: int = option(
        0,
        "seed of the splits, batches, noise, initialisation and 1x1 rotations",
        check=NON_NEGATIVE,
    )
    progress: bool = option(True, "no progress bar", resume=True)
    devices: int | str | None = option(
        None,
        "split each batch over the first N of jax.devices(), or 'all' (default: one; with "
        "--distributed: all); the batch size must be a multiple of the device count",
        check=DEVICES,
        parse=_devices,
        metavar="N|all",
        resume=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dequantization != "gaussian" and self.corruption_level != 1.0:
            raise ValueError(
                "corruption_level (--corruption-level): applies to --dequantization gaussian, "
                f"got {self.corruption_level} with --dequantization {self.dequantization}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The configuration of ``d`` (as :meth:`to_dict` writes it); fields that
        ``d`` lacks keep their defaults, unknown fields are a ``ValueError``."""
        d = dict(d)
        model = dict(d.pop("model", {}))
        for c, values in ((GlowConfig, model), (cls, d)):
            unknown = set(values) - {f.name for f in dataclasses.fields(c)}
            if unknown:
                raise ValueError(f"unknown {c.__name__} option(s): {sorted(unknown)}")
        if "temperatures" in d and isinstance(d["temperatures"], list):
            d["temperatures"] = tuple(d["temperatures"])
        return cls(model=GlowConfig(**model), **d)


def canonical_data(spec: str) -> str:
    """``spec`` with its path made absolute (``~`` expanded, links resolved), so
    two spellings of one data set compare equal."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        return spec.strip()
    return f"{kind.strip().lower()}:{Path(rest).expanduser().resolve()}"


def default_out_dir(spec: str) -> str:
    """``runs/digits`` for the digits; ``runs/<kind>-<name>-<hash>`` for a data set
    read from a path (the hash of the absolute path, so two data sets never
    share a folder)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        return str(Path("runs") / (kind.strip().lower() or "run"))
    full = canonical_data(spec)
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(full.split(":", 1)[1]).stem)
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return str(Path("runs") / f"{kind.strip().lower()}-{name or 'data'}-{digest}")


def _resume_difference(saved: TrainConfig, config: TrainConfig) -> str | None:
    """The first option that matters for resuming and differs, in words; ``None``."""
    pairs = [(TrainConfig, saved, config), (GlowConfig, saved.model, config.model)]
    for cls, old, new in pairs:
        for f in dataclasses.fields(cls):
            if f.metadata.get("resume") or f.name == "model":  # the model: its own fields
                continue
            a, b = getattr(old, f.name), getattr(new, f.name)
            if f.name == "data":
                a, b = canonical_data(a), canonical_data(b)
            if a != b:
                return f"{flag_of(f)} is {b!r} here but {a!r} in the checkpoint"
    return None


def _may_change_on_resume() -> str:
    return ", ".join(
        flag_of(f) for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume")
    )
