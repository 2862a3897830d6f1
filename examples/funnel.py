"""Neal's funnel: AutoGlow against NumPyro's guides, and NeuTra HMC against NUTS.

    v ~ Normal(0, 3),   x_i ~ Normal(0, exp(v / 2)),  i = 1 .. dim - 1

Part 1 fits each guide by SVI for the same number of steps and reports its
ELBO estimated with many particles (higher is better; the log evidence is 0)
and the wall time. Part 2 runs NUTS on the funnel directly and on the
NeuTra-reparametrised funnel (``NeuTraReparam`` with the fitted AutoGlow), and
reports, through ArviZ, the posterior of ``v`` (exact: mean 0, sd 3), r_hat, the
effective sample size per second and the number of divergences.

Run: ``python examples/funnel.py`` (a few minutes on 2 CPU cores), or with
``--steps``, ``--num-samples`` etc. smaller for a quick look.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoBNAFNormal, AutoIAFNormal, AutoMultivariateNormal
from numpyro.infer.reparam import NeuTraReparam

from numpyro_glow import AutoGlow


def funnel(dim: int = 10) -> None:
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(jnp.zeros(dim - 1), jnp.exp(v / 2)))


GUIDES = {
    "AutoGlow": lambda model: AutoGlow(model),
    "AutoIAFNormal": lambda model: AutoIAFNormal(model, num_flows=4),
    "AutoBNAFNormal": lambda model: AutoBNAFNormal(model, num_flows=2),
    "AutoMultivariateNormal": lambda model: AutoMultivariateNormal(model),
}


def fit(name: str, model, steps: int, lr: float, key) -> tuple:
    guide = GUIDES[name](model)
    svi = SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO())
    t0 = time.perf_counter()
    result = svi.run(key, steps, progress_bar=False)
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - t0
    elbo = -Trace_ELBO(num_particles=4000).loss(
        jax.random.PRNGKey(123), result.params, model, guide
    )
    return guide, result.params, float(elbo), seconds


def nuts(model, num_warmup: int, num_samples: int, key) -> tuple:
    import arviz as az

    mcmc = MCMC(
        NUTS(model),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=2,
        chain_method="sequential",
        progress_bar=False,
    )
    t0 = time.perf_counter()
    mcmc.run(key)
    seconds = time.perf_counter() - t0
    divergences = int(mcmc.get_extra_fields()["diverging"].sum())
    return mcmc, az.from_numpyro(mcmc), seconds, divergences


def summarise_v(v: np.ndarray, idata_var, seconds: float, divergences: int) -> dict:
    import arviz as az

    summary = az.summary(idata_var, kind="all")
    row = summary.iloc[0]
    return {
        "v_mean": float(np.mean(v)),
        "v_sd": float(np.std(v)),
        "r_hat": float(row["r_hat"]),
        "ess_bulk": float(row["ess_bulk"]),
        "ess_per_s": float(row["ess_bulk"]) / seconds,
        "divergences": divergences,
        "seconds": seconds,
    }


def main(args: argparse.Namespace) -> dict:
    import arviz as az

    model = lambda: funnel(args.dim)  # noqa: E731
    key = jax.random.PRNGKey(args.seed)
    results: dict = {"guides": {}, "mcmc": {}}
    glow_guide = glow_params = None
    for name in args.guides:
        guide, params, elbo, seconds = fit(name, model, args.steps, args.lr, key)
        results["guides"][name] = {"elbo": elbo, "svi_seconds": seconds, "steps": args.steps}
        print(f"{name:24s} ELBO {elbo:8.3f}  ({seconds:.1f} s for {args.steps} steps)", flush=True)
        if name == "AutoGlow":
            glow_guide, glow_params = guide, params

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcmc, idata, seconds, div = nuts(model, args.num_warmup, args.num_samples, key)
        results["mcmc"]["NUTS"] = summarise_v(
            np.asarray(mcmc.get_samples()["v"]), idata.posterior[["v"]], seconds, div
        )
        if glow_guide is not None:
            neutra = NeuTraReparam(glow_guide, glow_params)
            mcmc, _, seconds, div = nuts(
                neutra.reparam(model), args.num_warmup, args.num_samples, key
            )
            latent = mcmc.get_samples(group_by_chain=True)["auto_shared_latent"]
            v = neutra.transform_sample(latent)["v"]  # (chains, draws)
            results["mcmc"]["NeuTra(AutoGlow) + NUTS"] = summarise_v(
                np.asarray(v),
                az.convert_to_inference_data({"v": np.asarray(v)}).posterior,
                seconds,
                div,
            )
    for name, r in results["mcmc"].items():
        print(
            f"{name:26s} v: mean {r['v_mean']:6.2f} sd {r['v_sd']:5.2f}  r_hat {r['r_hat']:.3f}  "
            f"ESS {r['ess_bulk']:7.1f} ({r['ess_per_s']:.1f}/s)  divergences {r['divergences']}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    p.add_argument("--num-warmup", type=int, default=1000)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
