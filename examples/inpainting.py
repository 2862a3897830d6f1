"""Inpainting digits with a trained Glow as the prior, by NUTS in white-noise space.

Train the prior first (``numpyro-glow train`` writes ``runs/digits/best.npz``),
then run ``python examples/inpainting.py``. The script takes a test-set digit
(never seen in training), hides part of it (``--mask``: the bottom half, the
right half, or a random 75% of the pixels; blue in the figure), and observes the rest through
Gaussian noise of sd ``--noise``:

.. code-block:: python

    prior = numpyro_glow.load_glow(checkpoint)            # the one-line loader
    model = partial(inpainting_model, prior, image, mask)  # TransformReparam inside

``inpainting_model`` samples the image from the Glow under ``TransformReparam``,
so NUTS runs on the flow's white noise ``image_base`` (64 standard normals for a
digit). The script reports, through ArviZ (``az.from_numpyro``,
``az.summary``), r_hat and the bulk/tail effective sample sizes of the 64
latents, the divergences, the error of the posterior mean on the hidden pixels,
and the posterior sd on hidden and observed pixels; and draws a figure:
truth, observation, posterior mean, per-pixel posterior sd, posterior draws.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np
from numpyro.infer import MCMC, NUTS

from numpyro_glow import data, inpainting_model, load_glow


def make_mask(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """True where the pixel is observed."""
    mask = np.ones(shape, bool)
    height, width = shape[:2]
    if kind == "bottom":
        mask[height // 2 :] = False
    elif kind == "right":
        mask[:, width // 2 :] = False
    elif kind == "random":
        mask = np.random.default_rng(seed).random(shape) >= 0.75
    else:
        raise ValueError(f"--mask: expected bottom, right or random, got {kind!r}")
    return mask


def main(args: argparse.Namespace) -> dict:
    import arviz as az

    prior = load_glow(args.checkpoint)
    test = data.load("digits").test
    if not 0 <= args.index < len(test.x):
        raise ValueError(f"--index: expected 0 <= index < {len(test.x)}, got {args.index}")
    truth = (test.x[args.index].astype(np.float32) + 0.5) / test.levels
    mask = make_mask(args.mask, truth.shape, args.seed)
    rng = np.random.default_rng(args.seed)
    observed = np.where(
        mask, np.clip(truth + args.noise * rng.standard_normal(truth.shape), 0, 1), np.nan
    )

    model = partial(inpainting_model, prior, observed.astype(np.float32), mask, args.noise)
    mcmc = MCMC(
        NUTS(model, target_accept_prob=args.target_accept),
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        chain_method="sequential",
        progress_bar=False,
    )
    t0 = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(args.seed))
    seconds = time.perf_counter() - t0

    idata = az.from_numpyro(mcmc)
    summary = az.summary(idata, var_names=["image_base"], kind="diagnostics")
    images = np.asarray(mcmc.get_samples()["image"])  # (draws, H, W, C), from the flow
    mean, sd = images.mean(0), images.std(0)
    hidden = ~mask
    results = {
        "index": args.index,
        "mask": args.mask,
        "hidden_pixels": int(hidden.sum()),
        "rmse_hidden_posterior_mean": float(np.sqrt(np.mean((mean - truth)[hidden] ** 2))),
        "rmse_hidden_mean_fill": float(
            np.sqrt(np.mean((truth - observed_mean(observed, mask))[hidden] ** 2))
        ),
        "sd_hidden_mean": float(sd[hidden].mean()),
        "sd_observed_mean": float(sd[mask].mean()),
        "r_hat_max": float(summary["r_hat"].max()),
        "ess_bulk_min": float(summary["ess_bulk"].min()),
        "ess_bulk_median": float(summary["ess_bulk"].median()),
        "ess_tail_min": float(summary["ess_tail"].min()),
        "divergences": int(mcmc.get_extra_fields()["diverging"].sum()),
        "seconds": seconds,
        "draws": int(images.shape[0]),
    }
    print(json.dumps(results, indent=2))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inpainting.json").write_text(json.dumps(results, indent=2))
    figure(truth, observed, mask, mean, sd, images[:: max(len(images) // 4, 1)][:4], out)
    return results


def observed_mean(observed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A baseline: every hidden pixel set to the mean of the observed ones."""
    return np.where(mask, observed, np.nanmean(observed))


def figure(truth, observed, mask, mean, sd, draws, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = np.where(mask, observed, np.nan)
    panels = [("truth", truth), ("observed", shown), ("posterior mean", mean)]
    panels += [("posterior sd", sd)] + [(f"draw {i + 1}", d) for i, d in enumerate(draws)]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(panels), 2.0))
    for ax, (title, img) in zip(axes, panels, strict=True):
        cmap = plt.get_cmap("magma" if title == "posterior sd" else "gray")
        cmap = cmap.with_extremes(bad="tab:blue")  # the hidden pixels of the observation
        vmax = None if title == "posterior sd" else 1.0
        ax.imshow(np.squeeze(np.clip(img, 0, 1), -1), cmap=cmap, vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "inpainting.png", dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/digits/best.npz")
    p.add_argument("--index", type=int, default=0, help="which test-set digit")
    p.add_argument("--mask", default="bottom", choices=["bottom", "right", "random"])
    p.add_argument("--noise", type=float, default=0.05, help="sd of the observation noise")
    p.add_argument("--num-warmup", type=int, default=300)
    p.add_argument("--num-samples", type=int, default=300)
    p.add_argument("--num-chains", type=int, default=2)
    p.add_argument("--target-accept", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="runs/inpainting")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
