r"""A trained Glow as a prior inside another model.

:func:`load_glow` turns a checkpoint of ``numpyro-glow train`` into a
:class:`~numpyro_glow.FlowDistribution` with the trained parameters fixed in it;
:func:`inpainting_model` is the worked case, a NumPyro model that observes some
pixels of an image through Gaussian noise and puts the Glow on the whole image.
Inference runs in the flow's white-noise space through
:class:`~numpyro.infer.reparam.TransformReparam`:

.. math::

    \epsilon \sim \mathcal N(0, I), \qquad
    x = f^{-1}(\epsilon), \qquad
    y_{ij} \sim \mathcal N(x_{ij}, \sigma^2) \text{ for observed pixels } (i, j),

so the sampler sees the smooth posterior of :math:`\epsilon` (the prior term is
a standard normal) rather than the density of :math:`x`.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import Array
from numpyro.infer.reparam import TransformReparam

from .distribution import FlowDistribution
from .train.checkpoints import load_model

__all__ = ["load_glow", "inpainting_model"]


def load_glow(
    path: str | os.PathLike, *, temperature: float = 1.0, label: int | None = None
) -> FlowDistribution:
    """The Glow of a ``numpyro-glow train`` checkpoint, ready to use as a prior::

        prior = numpyro_glow.load_glow("runs/digits/best.npz")

    ``path`` is a run's ``best.npz`` or ``checkpoint.npz``; either way the
    parameters are the best ones (the parameter average at the best
    validation score), fixed: a model that samples from ``prior`` does not
    train them. Dropout is off. ``temperature`` scales the base normal;
    ``label`` picks the class of a class-conditional checkpoint (required
    there, refused otherwise). The file is read without pickle and checked
    against the model its configuration builds
    (:func:`numpyro_glow.train.load_model`): ``FileNotFoundError`` if it is
    missing, ``ValueError`` naming the file otherwise.
    """
    density, params, _ = load_model(path)
    classes = density.num_classes
    if classes is None and label is not None:
        raise ValueError(f"{path}: the checkpoint is not class-conditional; got label={label}")
    if classes is not None and (label is None or not 0 <= int(label) < classes):
        raise ValueError(
            f"{path}: the checkpoint is conditional on {classes} classes; expected "
            f"label in [0, {classes}), got {label}"
        )
    y = None if label is None else jnp.asarray(label, jnp.int32)
    return density.density(params, temperature, y)


def inpainting_model(
    prior: FlowDistribution,
    image: Array,
    mask: Array,
    noise_scale: float = 0.05,
    name: str = "image",
) -> Array:
    r"""Inpainting / denoising with a Glow prior, as a NumPyro model.

    ``image`` (``(H, W, C)``, values in :math:`[0, 1]`) is observed where ``mask``
    is true, through :math:`\mathcal N(x, \text{noise\_scale}^2)`; pixels outside the
    mask may hold anything (NaN too) and are ignored. The site ``name`` holds the
    whole reconstructed image :math:`x \sim` ``prior``, sampled through
    ``TransformReparam`` at ``name + "_base"`` (white noise), so NUTS and SVI
    work in the flow's latent space. Returns :math:`x`.

    Raises ``ValueError`` if ``image`` or ``mask`` do not have the prior's event
    shape, or if an observed pixel is not a finite value in :math:`[0, 1]`.
    """
    if not isinstance(prior, dist.TransformedDistribution):
        raise ValueError(
            f"inpainting_model: expected a flow prior (a TransformedDistribution such as "
            f"numpyro_glow.glow or load_glow), got {type(prior).__name__}"
        )
    shape = tuple(prior.event_shape)
    if tuple(np.shape(image)) != shape or tuple(np.shape(mask)) != shape:
        raise ValueError(
            f"inpainting_model: expected image and mask of the prior's event shape {shape}, "
            f"got {tuple(np.shape(image))} and {tuple(np.shape(mask))}"
        )
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"inpainting_model: expected a boolean mask, got dtype {mask.dtype}")
    _check_observed(image, mask)
    with numpyro.handlers.reparam(config={name: TransformReparam()}):
        x = numpyro.sample(name, prior)
    observed = jnp.where(mask, jnp.asarray(image, jnp.float32), 0.0)
    likelihood = dist.Normal(x, noise_scale).mask(mask).to_event(len(shape))
    numpyro.sample(name + "_observed", likelihood, obs=observed)
    return x


def _check_observed(image: Array, mask: Array) -> None:
    """Observed pixels must be finite and in [0, 1] (checked on concrete arrays)."""
    try:
        values = np.asarray(image)[np.asarray(mask)]
    except Exception:  # traced under jit: nothing to check eagerly
        return
    if not np.isfinite(values).all():
        raise ValueError(
            "inpainting_model: expected observed pixels (where mask is true) finite and in "
            f"[0, 1], got {int((~np.isfinite(values)).sum())} NaN/inf value(s)"
        )
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(
            "inpainting_model: expected observed pixels (where mask is true) in [0, 1], "
            f"got values in [{values.min()}, {values.max()}]"
        )
