"""AutoGlow against NumPyro's guides and flowjax's flows on six posteriors.

Posteriors (``--problems``; latent dimension and log evidence ``log Z``):

- ``funnel``: Neal's funnel, ``v ~ N(0, 3)``, ``x_i ~ N(0, exp(v / 2))``,
  10 dimensions, log Z = 0.
- ``banana``: ``a ~ N(0, 10)``, ``b ~ N(-0.05 (a^2 - 100), 1)``; 2, log Z = 0.
- ``two_modes``: an equal mixture of ``N((-1.5, -1.5), I)`` and
  ``N((1.5, 1.5), I)``; 2, log Z = 0 (a single Gaussian reaches ``-log 2``).
- ``eight_schools``: the centered eight schools model, ``mu ~ N(0, 5)``,
  ``tau ~ HalfCauchy(5)``, ``theta_j ~ N(mu, tau)``, ``y_j ~ N(theta_j, sigma_j)``;
  10, log Z by quadrature.
- ``logistic``: logistic regression on the first 10 (standardised) features of
  scikit-learn's breast-cancer data (569 patients), intercept ``~ N(0, 5)``,
  weights ``~ N(0, 1)``; 11, log Z by importance sampling from a Laplace
  approximation (Student-t proposal, 200000 draws).
- ``hierarchical50``: the centered hierarchy of ``eight_schools`` with 50 groups
  (data drawn once from ``mu = 5``, ``tau = 3``, ``sigma_j ~ U(5, 15)``, NumPy seed 1);
  52, log Z by quadrature.

Two protocols, each over ``--seeds`` (the tables give medians):

- ``default`` (``--protocols default``): every guide with its defaults and
  NumPyro's default one-sample ``Trace_ELBO()``, Adam with the learning rate
  decaying exponentially from 3e-3 to 3e-4 over ``--steps`` steps.
- ``recipe``: flowjax's flows (``masked_autoregressive_flow`` and
  ``coupling_flow`` with their defaults, 16 samples per step, plain and
  sticking-the-landing ELBO, ``--flowjax-steps`` steps, the same schedule)
  against AutoGlow's recommended recipe (``RECIPE``: 16 vectorised particles,
  its default sticking-the-landing gradient, the same schedule) given the same
  wall time: AutoGlow's number of steps is the flowjax flow's training time
  divided by AutoGlow's measured time per step. Compilation is timed apart
  and not counted on either side. Needs ``pip install ".[compare]"`` (flowjax).
- ``ablation`` (not run by default): AutoGlow's defaults with one choice
  changed at a time (``ABLATION``: sticking the landing off, 8 steps instead
  of 16, spline couplings; one and 16 particles per step), ``--steps`` steps.
- ``cost`` (not run by default): milliseconds per one-sample step of each
  guide, compiled once and timed in interleaved rounds (``step_times``).

Every ELBO is estimated afterwards from ``--eval-particles`` draws of the
fitted guide (higher is better; at most log Z).

Run: ``python examples/compare_guides.py --out benchmarks/results/guides.json``
(a few hours on 2 CPU cores; ``--problems``, ``--seeds`` and ``--protocols``
select a part).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoBNAFNormal, AutoIAFNormal, AutoMultivariateNormal

from numpyro_glow import AutoGlow

# --- posteriors ---------------------------------------------------------------


def funnel(dim: int = 10) -> None:
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(jnp.zeros(dim - 1), jnp.exp(v / 2)))


def banana(curvature: float = 0.05) -> None:
    a = numpyro.sample("a", dist.Normal(0.0, 10.0))
    numpyro.sample("b", dist.Normal(-curvature * (a**2 - 100.0), 1.0))


MODES = np.array([[-1.5, -1.5], [1.5, 1.5]], np.float32)


def two_modes() -> None:
    # an improper flat "prior" and the mixture as a factor: the posterior is the
    # normalised mixture, log Z = 0
    x = numpyro.sample("x", dist.ImproperUniform(dist.constraints.real_vector, (), (2,)))
    components = dist.Normal(jnp.asarray(MODES), 1.0).to_event(1)
    numpyro.factor("mixture", jax.nn.logsumexp(components.log_prob(x)) - math.log(2.0))


EIGHT_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], np.float32)
EIGHT_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], np.float32)


def centered_hierarchy(y: np.ndarray, sigma: np.ndarray) -> None:
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("groups", len(y)):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def hierarchy50_data(groups: int = 50, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(5.0, 15.0, groups)
    theta = 5.0 + 3.0 * rng.standard_normal(groups)
    y = theta + sigma * rng.standard_normal(groups)
    return y.astype(np.float32), sigma.astype(np.float32)


def breast_cancer(features: int = 10) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = x[:, :features]
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32), y.astype(np.float32)


def logistic(x: np.ndarray, y: np.ndarray) -> None:
    c = numpyro.sample("c", dist.Normal(0.0, 5.0))
    w = numpyro.sample("w", dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1))
    numpyro.sample("y", dist.Bernoulli(logits=c + x @ w).to_event(1), obs=y)


class Problem(NamedTuple):
    model: object
    log_z: object  # a number, or a function computing it


def _hierarchy_log_z(y: np.ndarray, sigma: np.ndarray) -> float:
    """log Z of the centered hierarchy: theta integrated out analytically
    (``y_j ~ N(mu, sqrt(tau^2 + sigma_j^2))``), then (mu, tau) by quadrature."""
    from scipy import integrate, stats

    y, sigma = y.astype(np.float64), sigma.astype(np.float64)

    def log_joint(tau, mu):
        return (
            stats.norm.logpdf(mu, 0.0, 5.0)
            + stats.halfcauchy.logpdf(tau, scale=5.0)
            + stats.norm.logpdf(y, mu, np.sqrt(tau**2 + sigma**2)).sum()
        )

    shift = -log_joint(3.0, float(np.mean(y)))  # keep the integrand near 1
    value, _ = integrate.dblquad(
        lambda tau, mu: np.exp(log_joint(tau, mu) + shift), -40.0, 40.0, 0.0, np.inf
    )
    return float(np.log(value) - shift)


def _importance_log_z(model, draws: int = 200_000, seed: int = 0) -> float:
    """log Z from importance sampling with a Student-t (5 degrees of freedom)
    around the Laplace approximation of the unconstrained posterior."""
    import scipy.optimize
    from scipy import stats

    log_density, dim = potential(model)
    log_density = jax.jit(log_density)
    neg_grad = jax.jit(jax.grad(lambda z: -log_density(z)))
    mode = scipy.optimize.minimize(
        lambda z: -float(log_density(jnp.asarray(z, jnp.float32))),
        np.zeros(dim),
        jac=lambda z: np.asarray(neg_grad(jnp.asarray(z, jnp.float32)), np.float64),
        method="BFGS",
    ).x
    hessian = np.asarray(jax.hessian(lambda z: -log_density(z))(jnp.asarray(mode, jnp.float32)))
    chol = np.linalg.cholesky(np.linalg.inv(hessian.astype(np.float64)))
    eps = stats.t.rvs(5.0, size=(draws, dim), random_state=seed)
    z = mode + eps @ chol.T
    log_q = stats.t.logpdf(eps, 5.0).sum(1) - np.log(np.diag(chol)).sum()
    log_p = np.asarray(jax.lax.map(log_density, jnp.asarray(z, jnp.float32), batch_size=4096))
    log_w = log_p - log_q
    return float(np.log(np.mean(np.exp(log_w - log_w.max()))) + log_w.max())


def make_problems() -> dict[str, Problem]:
    x, y = breast_cancer()
    y50, s50 = hierarchy50_data()
    problems = {
        "funnel": Problem(lambda: funnel(10), 0.0),
        "banana": Problem(banana, 0.0),
        "two_modes": Problem(two_modes, 0.0),
        "eight_schools": Problem(lambda: centered_hierarchy(EIGHT_Y, EIGHT_SIGMA), None),
        "logistic": Problem(lambda: logistic(x, y), None),
        "hierarchical50": Problem(lambda: centered_hierarchy(y50, s50), None),
    }
    log_z = {
        "eight_schools": lambda: _hierarchy_log_z(EIGHT_Y, EIGHT_SIGMA),
        "logistic": lambda: _importance_log_z(problems["logistic"].model),
        "hierarchical50": lambda: _hierarchy_log_z(y50, s50),
    }
    return {
        name: Problem(p.model, log_z[name] if p.log_z is None else p.log_z)
        for name, p in problems.items()
    }


PROTOCOLS = ("default", "recipe", "ablation", "cost")
PROBLEMS = ("funnel", "banana", "two_modes", "eight_schools", "logistic", "hierarchical50")


def potential(model):
    """``(log density of the unconstrained latent vector, its dimension)``:
    NumPyro's potential energy, negated, as a function of a flat vector."""
    from jax.flatten_util import ravel_pytree
    from numpyro.infer.util import initialize_model

    info = initialize_model(jax.random.PRNGKey(0), model)
    flat, unravel = ravel_pytree(info.param_info.z)
    return (lambda z: -info.potential_fn(unravel(z))), flat.shape[0]


# --- guides and fitting -------------------------------------------------------

GUIDES = {
    "AutoGlow": AutoGlow,
    "AutoIAFNormal": AutoIAFNormal,
    "AutoBNAFNormal": AutoBNAFNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
}

#: AutoGlow's recommended recipe: the guide's defaults (sticking the landing on),
#: 16 vectorised particles per step and the schedule below.
RECIPE = {"particles": 16}


def schedule(steps: int, start: float = 3e-3, end: float = 3e-4):
    """The learning rate decaying exponentially from ``start`` to ``end`` over ``steps``."""
    return optax.exponential_decay(start, max(steps, 1), end / start)


def fit_svi(model, guide, steps: int, particles: int, seed: int):
    """SVI with Adam on :func:`schedule`. Returns the parameters, the compile
    time (first step) and the time of the other ``steps - 1`` steps."""
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True)
    svi = SVI(model, guide, numpyro.optim.optax_to_numpyro(optax.adam(schedule(steps))), loss)
    t0 = time.perf_counter()
    update = jax.jit(svi.update)
    state, _ = update(svi.init(jax.random.PRNGKey(seed)))
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    for _ in range(steps - 1):
        state, _ = update(state)
    params = jax.block_until_ready(svi.get_params(state))
    return params, {"compile_s": t1 - t0, "train_s": time.perf_counter() - t1, "steps": steps}


def step_time(model, make_guide, particles: int, probe: int = 200) -> float:
    """Seconds per SVI step of a guide, from ``probe`` steps after compiling."""
    _, timing = fit_svi(model, make_guide(model), probe + 1, particles, seed=0)
    return timing["train_s"] / probe


def elbo(model, guide, params, particles: int) -> float:
    key = jax.random.PRNGKey(12345)
    return -float(Trace_ELBO(num_particles=particles).loss(key, params, model, guide))


FLOWJAX = {  # name: (flow, sticking the landing)
    "flowjax MAF": ("masked_autoregressive_flow", False),
    "flowjax MAF, STL": ("masked_autoregressive_flow", True),
    "flowjax coupling": ("coupling_flow", False),
}


def fit_flowjax(model, name: str, steps: int, seed: int, eval_particles: int) -> dict:
    """A flowjax flow with its defaults, fitted by flowjax's own training step
    (16 samples per step, as ``fit_to_key_based_loss`` does it) to the model's
    unconstrained log density."""
    import equinox as eqx
    import flowjax.flows
    import paramax
    from flowjax.distributions import Normal
    from flowjax.train.losses import ElboLoss
    from flowjax.train.train_utils import step

    kind, stl = FLOWJAX[name]
    log_density, dim = potential(model)
    key, flow_key = jax.random.split(jax.random.key(seed))
    flow = getattr(flowjax.flows, kind)(flow_key, base_dist=Normal(jnp.zeros(dim)))
    loss = ElboLoss(log_density, 16, stick_the_landing=stl)
    optimizer = optax.adam(schedule(steps))
    params, static = eqx.partition(
        flow, eqx.is_inexact_array, is_leaf=lambda x: isinstance(x, paramax.NonTrainable)
    )
    opt_state = optimizer.init(params)
    t0 = time.perf_counter()
    t1 = t0
    for i, k in enumerate(jax.random.split(key, steps)):
        params, opt_state, value = step(
            params, static, key=k, optimizer=optimizer, opt_state=opt_state, loss_fn=loss
        )
        value.item()  # flowjax's loop reads every loss
        if i == 0:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    flow = eqx.combine(params, static)
    z, log_q = flow.sample_and_log_prob(jax.random.key(12345), (eval_particles,))
    value = float(jnp.mean(jax.vmap(log_density)(z) - log_q))
    return {"elbo": value, "compile_s": t1 - t0, "train_s": t2 - t1, "steps": steps}


# --- the two protocols ----------------------------------------------------------


def run_default(problem: Problem, args, seed: int, log) -> dict:
    rows = {}
    for name in args.guides:
        for steps in args.steps:
            guide = GUIDES[name](problem.model)
            params, timing = fit_svi(problem.model, guide, steps, 1, seed)
            row = {"elbo": elbo(problem.model, guide, params, args.eval_particles), **timing}
            rows[f"{name} @ {steps}"] = row
            log(name, steps, row)
    return rows


def fit_for_seconds(model, seconds: float, seconds_per_step: float, seed: int):
    """AutoGlow's recipe given ``seconds`` of training: the steps are the time
    over the estimated time per step; a run that took less than 0.8x or more
    than 1.25x the time (the machine's speed varies) is redone with the steps
    scaled by the ratio, at most twice."""
    steps = max(2, int(seconds / seconds_per_step))
    for _ in range(3):
        guide = AutoGlow(model)
        params, timing = fit_svi(model, guide, steps, RECIPE["particles"], seed)
        ratio = seconds / timing["train_s"]
        if 0.8 <= ratio <= 1.25:
            break
        steps = max(2, int(steps * ratio))
    return guide, params, timing


def run_recipe(problem: Problem, args, seed: int, log) -> dict:
    rows = {}
    seconds_per_step = step_time(problem.model, AutoGlow, RECIPE["particles"])
    for name in args.flowjax:
        row = fit_flowjax(problem.model, name, args.flowjax_steps, seed, args.eval_particles)
        rows[name] = row
        log(name, args.flowjax_steps, row)
        guide, params, timing = fit_for_seconds(
            problem.model, row["train_s"], seconds_per_step, seed
        )
        seconds_per_step = timing["train_s"] / timing["steps"]
        glow_row = {"elbo": elbo(problem.model, guide, params, args.eval_particles), **timing}
        rows[f"AutoGlow recipe, time of {name}"] = glow_row
        log("AutoGlow recipe", timing["steps"], glow_row)
    return rows


#: The ablation protocol: AutoGlow's defaults with one choice changed at a time
#: (guide keyword arguments, particles per step), one-sample and recipe.
ABLATION = {
    "AutoGlow": ({}, 1),
    "AutoGlow, no STL": ({"stick_the_landing": False}, 1),
    "AutoGlow, 8 steps": ({"num_flows": 8}, 1),
    "AutoGlow, spline": ({"coupling": "spline"}, 1),
    "AutoGlow, 16 particles": ({}, 16),
    "AutoGlow, 16 particles, no STL": ({"stick_the_landing": False}, 16),
    "AutoGlow, 16 particles, spline": ({"coupling": "spline"}, 16),
}


def run_ablation(problem: Problem, args, seed: int, log) -> dict:
    rows = {}
    for name, (kwargs, particles) in ABLATION.items():
        for steps in args.steps:
            guide = AutoGlow(problem.model, **kwargs)
            params, timing = fit_svi(problem.model, guide, steps, particles, seed)
            row = {"elbo": elbo(problem.model, guide, params, args.eval_particles), **timing}
            rows[f"ablation: {name} @ {steps}"] = row
            log(name, steps, row)
    return rows


def step_times(model, guides, rounds: int = 5, probe: int = 200) -> dict[str, float]:
    """Milliseconds per one-sample SVI step of each of ``guides`` with its
    defaults (and AutoGlow with 8 steps): each guide compiled once, then
    ``rounds`` rounds of ``probe`` steps per guide, the order rotated every
    round; the median round."""
    makers = {name: GUIDES[name] for name in guides}
    makers["AutoGlow, 8 steps"] = lambda m: AutoGlow(m, num_flows=8)
    runs = {}
    for name, make in makers.items():
        svi = SVI(model, make(model), numpyro.optim.Adam(1e-3), Trace_ELBO())
        update = jax.jit(svi.update)
        state, _ = update(svi.init(jax.random.PRNGKey(0)))
        runs[name] = [update, jax.block_until_ready(state)]
    times: dict[str, list[float]] = {name: [] for name in makers}
    names = list(makers)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            update, state = runs[name]
            t0 = time.perf_counter()
            for _ in range(probe):
                state, _ = update(state)
            runs[name][1] = jax.block_until_ready(state)
            times[name].append(1e3 * (time.perf_counter() - t0) / probe)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(args: argparse.Namespace) -> dict:
    problems = make_problems()
    results: dict = {"args": vars(args), "log_z": {}, "runs": {}}
    for problem_name in args.problems:
        problem = problems[problem_name]
        log_z = problem.log_z() if callable(problem.log_z) else problem.log_z
        results["log_z"][problem_name] = log_z
        if "cost" in args.protocols:
            ms = step_times(problem.model, args.guides)
            results.setdefault("step_ms", {})[problem_name] = ms
            print(problem_name, "ms per step:", json.dumps(ms), flush=True)
        for seed in args.seeds:

            def log(name, steps, row, problem_name=problem_name, seed=seed):
                print(
                    f"{problem_name:14s} seed {seed} {name:24s} {steps:6d} steps  "
                    f"ELBO {row['elbo']:9.3f}  train {row['train_s']:6.1f} s  "
                    f"compile {row['compile_s']:5.1f} s",
                    flush=True,
                )

            runs = {}
            if "default" in args.protocols:
                runs.update(run_default(problem, args, seed, log))
            if "recipe" in args.protocols:
                runs.update(run_recipe(problem, args, seed, log))
            if "ablation" in args.protocols:
                runs.update(run_ablation(problem, args, seed, log))
            results["runs"].setdefault(problem_name, {})[str(seed)] = runs
            if args.out:  # after every seed, so a long run keeps what it has
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=2)
    print(table(results))
    return results


def medians(results: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Per problem and row: the median ELBO, training seconds and steps over the
    seeds whose ELBO is finite, and ``failed``, the number of seeds whose ELBO
    is not (NaN or infinite: the run diverged)."""
    out: dict = {}
    for problem, by_seed in results["runs"].items():
        names = {name for runs in by_seed.values() for name in runs}
        out[problem] = {}
        for name in sorted(names):
            rows = [runs[name] for runs in by_seed.values() if name in runs]
            good = [r for r in rows if math.isfinite(r["elbo"])] or rows
            out[problem][name] = {
                key: float(np.median([r[key] for r in good]))
                for key in ("elbo", "train_s", "steps")
            }
            out[problem][name]["failed"] = sum(not math.isfinite(r["elbo"]) for r in rows)
            out[problem][name]["seeds"] = len(rows)
    return out


def table(results: dict) -> str:
    """A Markdown table of the medians, with each row's gap to log Z."""
    lines = [
        "| posterior | log Z | run | median ELBO | gap to log Z | train (s) | steps "
        "| seeds (failed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for problem, rows in medians(results).items():
        log_z = results["log_z"][problem]
        for name, r in rows.items():
            lines.append(
                f"| {problem} | {log_z:.3f} | {name} | {r['elbo']:.3f} | "
                f"{log_z - r['elbo']:.3f} | {r['train_s']:.1f} | {r['steps']:.0f} | "
                f"{r['seeds']} ({r['failed']}) |"
            )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    p.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    p.add_argument("--protocols", nargs="+", default=["default", "recipe"], choices=PROTOCOLS)
    p.add_argument("--steps", nargs="+", type=int, default=[3000, 10000])
    p.add_argument("--flowjax", nargs="+", default=list(FLOWJAX), choices=list(FLOWJAX))
    p.add_argument("--flowjax-steps", type=int, default=3000)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--eval-particles", type=int, default=4000)
    p.add_argument("--out", default=None, help="write the results as JSON")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
