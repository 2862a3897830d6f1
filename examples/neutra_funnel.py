"""NeuTra HMC with AutoGlow on Neal's funnel, against plain NUTS, through ArviZ.

    v ~ N(0, 3),   x_i ~ N(0, exp(v / 2)),  i = 1 .. dim - 1

Plain NUTS on the funnel cannot enter its neck (v << 0) with one step size:
it reports divergences and a biased marginal of ``v``. NeuTra (Hoffman et al.
2019) fits AutoGlow by SVI, then runs NUTS on the white noise of the fitted
guide (``NeuTraReparam``), where the posterior is close to a standard normal.
The script reports for both, through ArviZ (``az.from_numpyro``,
``az.summary``): the mean and sd of ``v`` (exact: 0 and 3), r_hat, the bulk
effective sample size per second of sampling, and the divergences.

Run: ``python examples/neutra_funnel.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.reparam import NeuTraReparam

from numpyro_glow import AutoGlow


def funnel(dim: int = 10) -> None:
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(jnp.zeros(dim - 1), jnp.exp(v / 2)))


def run_nuts(model, args: argparse.Namespace, key, target_accept: float = 0.8):
    mcmc = MCMC(
        NUTS(model, target_accept_prob=target_accept),
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        chain_method="sequential",
        progress_bar=False,
    )
    t0 = time.perf_counter()
    # The funnel's neck underflows exp(v / 2) to 0 for v < -200 or so; plain NUTS
    # goes there, and NumPyro's argument validation would stop the run.
    with numpyro.validation_enabled(False):
        mcmc.run(key)
    return mcmc, time.perf_counter() - t0


def report(idata, seconds: float, divergences: int) -> dict:
    import arviz as az

    row = az.summary(idata, var_names=["v"], kind="all").iloc[0]
    v = idata.posterior["v"].values
    return {
        "v_mean": float(v.mean()),
        "v_sd": float(v.std()),
        "r_hat": float(row["r_hat"]),
        "ess_bulk": float(row["ess_bulk"]),
        "ess_per_second": float(row["ess_bulk"]) / seconds,
        "divergences": divergences,
        "seconds": seconds,
    }


def main(args: argparse.Namespace) -> dict:
    import arviz as az

    model = lambda: funnel(args.dim)  # noqa: E731
    key_svi, key_nuts, key_neutra = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    results: dict = {}

    mcmc, seconds = run_nuts(model, args, key_nuts)
    divergences = int(mcmc.get_extra_fields()["diverging"].sum())
    results["NUTS"] = report(az.from_numpyro(mcmc), seconds, divergences)

    guide = AutoGlow(model, num_flows=args.num_flows)
    # AutoGlow's recommended recipe (docs page "AutoGlow"): several vectorised
    # particles per step, the learning rate decaying tenfold over the run
    decay = lambda i: args.lr * 0.1 ** (i / args.svi_steps)  # noqa: E731
    loss = Trace_ELBO(num_particles=args.particles, vectorize_particles=True)
    svi = SVI(model, guide, numpyro.optim.Adam(decay), loss)
    t0 = time.perf_counter()
    fitted = svi.run(key_svi, args.svi_steps, progress_bar=False)
    svi_seconds = time.perf_counter() - t0
    neutra = NeuTraReparam(guide, fitted.params)
    mcmc, seconds = run_nuts(neutra.reparam(model), args, key_neutra, args.target_accept)
    divergences = int(mcmc.get_extra_fields()["diverging"].sum())
    latent = mcmc.get_samples(group_by_chain=True)["auto_shared_latent"]
    samples = {k: np.asarray(v) for k, v in neutra.transform_sample(latent).items()}
    row = report(az.from_dict(posterior=samples), seconds, divergences)
    row["svi_seconds"] = svi_seconds
    row["svi_elbo"] = -float(
        Trace_ELBO(num_particles=4000).loss(jax.random.PRNGKey(1), fitted.params, model, guide)
    )
    row["ess_per_second_with_svi"] = row["ess_bulk"] / (seconds + svi_seconds)
    results["NeuTra(AutoGlow) + NUTS"] = row

    print("| sampler | v mean | v sd | r_hat | ESS bulk | ESS/s | divergences |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['v_mean']:.2f} | {r['v_sd']:.2f} | {r['r_hat']:.3f} | "
            f"{r['ess_bulk']:.0f} | {r['ess_per_second']:.1f} | {r['divergences']} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--num-flows", type=int, default=16)
    p.add_argument("--particles", type=int, default=16, help="SVI particles per step")
    p.add_argument("--svi-steps", type=int, default=5000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-warmup", type=int, default=1000)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--num-chains", type=int, default=2)
    p.add_argument(
        "--target-accept", type=float, default=0.95, help="NUTS target acceptance under NeuTra"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
