"""Training a Glow density on images by SVI: dequantization as inference,
validation-based early stopping, parameter averaging, open checkpoints.

One job per module, each importing only those listed before it:

``config``
    :class:`GlowConfig` and :class:`TrainConfig`, every option of a run (the
    command line is generated from their fields).
``model``
    The density model as NumPyro code (:func:`density_model`) and its
    dequantization guides (:func:`dequantization_guide`).
``density``
    :class:`Density`, the model of a configuration on images of a
    :class:`DataInfo` shape, as compiled functions; :class:`TrainState`, the
    one state a run carries.
``checkpoints``
    Writing a run's checkpoints and reading them back: :func:`load_model`
    turns a checkpoint into a density and its parameters (what
    :func:`numpyro_glow.load_glow` builds on); :func:`convert_checkpoint`.
``trainer``
    :class:`Trainer` adds the data and moves the state through init, resume,
    step, evaluation and checkpointing.
``report``
    What the user sees: the progress bar, the throughput, the sample grid.
``run``
    :func:`train` composes them with a :class:`RunFolder` and the loop.

The names below are importable from ``numpyro_glow.train`` itself; each is
loaded with its module on first use, so reading a checkpoint (``load_glow``)
does not import the trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module of this package that defines it
_WHERE = {
    "GlowConfig": "config",
    "TrainConfig": "config",
    "canonical_data": "config",
    "default_out_dir": "config",
    "density_model": "model",
    "dequantization_guide": "model",
    "glow_from_config": "model",
    "DataInfo": "density",
    "Density": "density",
    "TrainState": "density",
    "BEST": "checkpoints",
    "CHECKPOINT": "checkpoints",
    "convert_checkpoint": "checkpoints",
    "load_model": "checkpoints",
    "Trainer": "trainer",
    "RunFolder": "run",
    "train": "run",
}

__all__ = [
    "CHECKPOINT",
    "BEST",
    "DataInfo",
    "Density",
    "GlowConfig",
    "RunFolder",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "canonical_data",
    "convert_checkpoint",
    "default_out_dir",
    "density_model",
    "dequantization_guide",
    "glow_from_config",
    "load_model",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
