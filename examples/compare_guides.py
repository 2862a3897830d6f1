"""AutoGlow against NumPyro's flow guides on three posteriors.

Posteriors (``--problems``):

- ``funnel``: Neal's funnel in ``--dim`` dimensions,
  ``v ~ N(0, 3)``, ``x_i ~ N(0, exp(v / 2))``; the log evidence is 0.
- ``banana``: a twisted Gaussian (Haario et al. 2001),
  ``a ~ N(0, 10)``, ``b ~ N(-0.05 (a^2 - 100), 1)``; the log evidence is 0.
- ``regression``: Bayesian linear regression with a shrinkage prior on
  scikit-learn's diabetes data (442 patients, 10 standardised features),
  ``sigma, tau ~ HalfNormal(1)``, ``beta_j ~ N(0, tau)``, ``y ~ N(c + X beta, sigma)``;
  13 latent dimensions, two of them positive.

Every guide is fitted by SVI (``Trace_ELBO``, one particle) with the same
optimiser for the same number of steps; the table gives the ELBO estimated with
``--eval-particles`` particles (higher is better) and the wall time of the fit.
With ``--seconds S`` every guide also gets S seconds of SVI after its first
(compiling) step, the equal-wall-time comparison.

Run: ``python examples/compare_guides.py`` (a few minutes on 2 CPU cores).
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
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoBNAFNormal, AutoIAFNormal, AutoMultivariateNormal

from numpyro_glow import AutoGlow


def funnel(dim: int = 10) -> None:
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(jnp.zeros(dim - 1), jnp.exp(v / 2)))


def banana(curvature: float = 0.05) -> None:
    a = numpyro.sample("a", dist.Normal(0.0, 10.0))
    numpyro.sample("b", dist.Normal(-curvature * (a**2 - 100.0), 1.0))


def diabetes() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return x.astype(np.float32), y.astype(np.float32)


def regression(x: np.ndarray, y: np.ndarray) -> None:
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    c = numpyro.sample("c", dist.Normal(0.0, 1.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(x.shape[1]), tau).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(c + x @ beta, sigma), obs=y)


def make_problem(name: str, dim: int):
    """The model (no arguments) of a posterior."""
    if name == "funnel":
        return lambda: funnel(dim)
    if name == "banana":
        return banana
    if name == "regression":
        x, y = diabetes()
        return lambda: regression(x, y)
    raise ValueError(f"expected a problem in {PROBLEMS}, got {name!r}")


PROBLEMS = ("funnel", "banana", "regression")


GUIDES = {
    "AutoGlow": lambda model: AutoGlow(model),
    "AutoIAFNormal": lambda model: AutoIAFNormal(model, num_flows=4),
    "AutoBNAFNormal": lambda model: AutoBNAFNormal(model, num_flows=2),
    "AutoMultivariateNormal": lambda model: AutoMultivariateNormal(model),
}


def elbo(model, guide, params, particles: int) -> float:
    return -float(
        Trace_ELBO(num_particles=particles).loss(jax.random.PRNGKey(123), params, model, guide)
    )


def fit(model, guide, lr: float, key, steps: int | None = None, seconds: float | None = None):
    """SVI for ``steps`` steps, or for ``seconds`` of wall time after the first
    (compiling) step. Returns the parameters, the seconds taken (compilation
    included) and the number of steps."""
    svi = SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO())
    t0 = time.perf_counter()
    update = jax.jit(svi.update)
    state, _ = update(svi.init(key))
    jax.block_until_ready(state)
    t1, done = time.perf_counter(), 1
    while (steps is not None and done < steps) or (
        seconds is not None and time.perf_counter() - t1 < seconds
    ):
        state, _ = update(state)
        done += 1
    params = jax.block_until_ready(svi.get_params(state))
    return params, time.perf_counter() - t0, done


def main(args: argparse.Namespace) -> dict:
    key = jax.random.PRNGKey(args.seed)
    results: dict = {}
    for problem in args.problems:
        model = make_problem(problem, args.dim)
        results[problem] = {}
        for name in args.guides:
            row: dict = {}
            guide = GUIDES[name](model)
            params, seconds, _ = fit(model, guide, args.lr, key, steps=args.steps)
            row.update(elbo=elbo(model, guide, params, args.eval_particles), seconds=seconds)
            if args.seconds:
                guide = GUIDES[name](model)
                params, _, done = fit(model, guide, args.lr, key, seconds=args.seconds)
                row.update(
                    elbo_at_seconds=elbo(model, guide, params, args.eval_particles),
                    steps_in_seconds=done,
                )
            results[problem][name] = row
            print(f"{problem:11s} {name:23s} " + json.dumps(row), flush=True)
    print(table(results, args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return results


def table(results: dict, args: argparse.Namespace) -> str:
    head = f"| posterior | guide | ELBO at {args.steps} steps | time (s) |"
    rule = "|---|---|---|---|"
    if args.seconds:
        head += f" ELBO at {args.seconds:g} s | steps in {args.seconds:g} s |"
        rule += "---|---|"
    lines = [head, rule]
    for problem, rows in results.items():
        for name, r in rows.items():
            line = f"| {problem} | {name} | {r['elbo']:.3f} | {r['seconds']:.1f} |"
            if args.seconds:
                line += f" {r['elbo_at_seconds']:.3f} | {r['steps_in_seconds']} |"
            lines.append(line)
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    p.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    p.add_argument("--dim", type=int, default=10, help="funnel dimension")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--seconds", type=float, default=None, help="also fit for this wall time")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-particles", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
