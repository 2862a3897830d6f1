"""Guides at the size of real models: posteriors from 10 to 2,500 latents.

Posteriors (``--problems``; latent dimension ``d``):

- ``funnel``, ``eight_schools``, ``hierarchical50``: from ``compare_guides.py``
  (10, 10, 52).
- ``sv100`` / ``sv2500``: stochastic volatility, NumPyro's example model
  (``sigma ~ Exp(50)``, a Gaussian random walk ``s`` of ``T`` days,
  ``nu ~ Exp(0.1)``, returns ``~ StudentT(nu, 0, exp(s))``) on ``T = 100`` and
  ``T = 2500`` simulated days (102, 2502).
- ``field100``: a log-Gaussian Cox process on a 10 x 10 grid, a Gaussian field
  with a squared-exponential covariance (length scale 2 cells) plus a mean,
  Poisson counts per cell (101).
- ``regression300``: a centered hierarchical regression, 300 groups of 5
  observations, group intercepts ``~ N(mu, tau)``, a shared slope and noise
  scale (304).
- ``irt500``: a two-parameter item-response model, 500 persons, 20 items
  (ability per person, difficulty and log-discrimination per item, two
  hyperparameters; 542).

Reference moments of the unconstrained latent vector come from long NUTS runs
(``--make-reference``, every normal site non-centered, ``--ref-chains`` chains
of 2,000 draws after 1,000 warm-up; the funnel's are exact), stored in
``benchmarks/results/scale_reference.npz``. For each guide and posterior the
script reports the parameter count, compile time, milliseconds per step, peak
memory (each guide runs in its own process; peak resident memory of that
process, read after training), the ELBO (``--eval-particles`` draws) and the error of the guide's
means and standard deviations against the reference, in reference standard
deviations (mean and max over coordinates). Two protocols: ``steps`` (every
guide ``--steps`` one-sample ``Trace_ELBO`` steps, Adam 3e-3 decaying to 3e-4)
and ``time`` (every guide the same wall time ``--seconds``, compilation
included, its number of steps set from its measured step time).

Run: ``python examples/scale_guides.py --out benchmarks/results/scale_guides.json``
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO, autoguide
from numpyro.infer.reparam import LocScaleReparam
from numpyro.infer.util import initialize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_guides  # noqa: E402

from numpyro_glow import AutoGlow  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "scale_reference.npz"

# --- posteriors ---------------------------------------------------------------


def sv_returns(days: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = np.cumsum(rng.normal(0.0, 0.1, days)) - 4.0
    return (np.exp(s) * rng.standard_t(5.0, days)).astype(np.float32)


def stochastic_volatility(returns: np.ndarray) -> None:
    sigma = numpyro.sample("sigma", dist.Exponential(50.0))
    s = numpyro.sample("s", dist.GaussianRandomWalk(scale=sigma, num_steps=returns.shape[0]))
    nu = numpyro.sample("nu", dist.Exponential(0.1))
    numpyro.sample("r", dist.StudentT(df=nu, loc=0.0, scale=jnp.exp(s)), obs=returns)


def field_data(side: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Counts on a ``side x side`` grid and the field's covariance."""
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)
    dist2 = ((grid[:, None] - grid[None]) ** 2).sum(-1)
    cov = np.exp(-dist2 / (2 * 2.0**2)) + 1e-4 * np.eye(side * side)
    rng = np.random.default_rng(seed)
    f = np.linalg.cholesky(cov) @ rng.standard_normal(side * side)
    return rng.poisson(np.exp(1.0 + f)).astype(np.float32), cov.astype(np.float32)


def latent_field(counts: np.ndarray, cov: np.ndarray) -> None:
    m = numpyro.sample("m", dist.Normal(0.0, 2.0))
    f = numpyro.sample("f", dist.MultivariateNormal(jnp.zeros(len(counts)), cov))
    numpyro.sample("y", dist.Poisson(jnp.exp(m + f)), obs=counts)


def regression_data(groups: int = 300, per: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    x = rng.standard_normal(groups * per)
    alpha = 1.0 + 0.5 * rng.standard_normal(groups)
    y = alpha[g] + 0.7 * x + 1.0 * rng.standard_normal(groups * per)
    return g, x.astype(np.float32), y.astype(np.float32)


def hierarchical_regression(g: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("groups", int(g.max()) + 1):
        alpha = numpyro.sample("alpha", dist.Normal(mu, tau))
    numpyro.sample("y", dist.Normal(alpha[g] + beta * x, sigma), obs=y)


def irt_data(persons: int = 500, items: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(persons)
    b = rng.standard_normal(items)
    a = np.exp(0.3 * rng.standard_normal(items))
    p = 1 / (1 + np.exp(-a * (theta[:, None] - b)))
    return (rng.uniform(size=p.shape) < p).astype(np.float32)


def item_response(responses: np.ndarray) -> None:
    persons, items = responses.shape
    mu_b = numpyro.sample("mu_b", dist.Normal(0.0, 2.0))
    sigma_b = numpyro.sample("sigma_b", dist.HalfNormal(2.0))
    with numpyro.plate("items", items):
        b = numpyro.sample("b", dist.Normal(mu_b, sigma_b))
        log_a = numpyro.sample("log_a", dist.Normal(0.0, 0.5))
    with numpyro.plate("persons", persons):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
    logits = jnp.exp(log_a) * (theta[:, None] - b)
    numpyro.sample("y", dist.Bernoulli(logits=logits).to_event(2), obs=responses)


def make_problems() -> dict:
    small = compare_guides.make_problems()
    counts, cov = field_data()
    reg = regression_data()
    sv100, sv2500 = sv_returns(100), sv_returns(2500, seed=1)
    responses = irt_data()
    return {
        "funnel": small["funnel"].model,
        "eight_schools": small["eight_schools"].model,
        "hierarchical50": small["hierarchical50"].model,
        "sv100": lambda: stochastic_volatility(sv100),
        "field100": lambda: latent_field(counts, cov),
        "regression300": lambda: hierarchical_regression(*reg),
        "irt500": lambda: item_response(responses),
        "sv2500": lambda: stochastic_volatility(sv2500),
    }


PROBLEMS = (
    "funnel",
    "eight_schools",
    "hierarchical50",
    "sv100",
    "field100",
    "regression300",
    "irt500",
    "sv2500",
)

GUIDES = {
    "AutoGlow": AutoGlow,
    "AutoNormal": autoguide.AutoNormal,
    "AutoMultivariateNormal": autoguide.AutoMultivariateNormal,
    "AutoLowRankMultivariateNormal": autoguide.AutoLowRankMultivariateNormal,
    "AutoIAFNormal": autoguide.AutoIAFNormal,
    "AutoBNAFNormal": autoguide.AutoBNAFNormal,
}

# --- reference ----------------------------------------------------------------


def unconstrained(model):
    """``(flatten, dim)``: a function from a dict of unconstrained site values to
    one flat vector (sites in name order: the same for the reference and for
    every guide's draws), and its size."""
    info = initialize_model(jax.random.PRNGKey(0), model)
    flat, _ = ravel_pytree(info.param_info.z)
    return (lambda z: ravel_pytree(z)[0]), flat.shape[0]


def reference(model, warmup: int, draws: int, chains: int, seed: int = 0) -> dict:
    """Mean and standard deviation of the unconstrained latent vector from NUTS."""
    flatten, _ = unconstrained(model)
    mcmc = MCMC(
        NUTS(handlers.reparam(model, config=_noncentered), target_accept_prob=0.9),
        num_warmup=warmup,
        num_samples=draws,
        num_chains=chains,
        chain_method="sequential",
        progress_bar=False,
    )
    t0 = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), extra_fields=("diverging",))
    seconds = time.perf_counter() - t0
    info = initialize_model(jax.random.PRNGKey(0), model)
    samples = mcmc.get_samples()
    z = {name: jax.vmap(_unconstrain(info, name))(samples[name]) for name in info.param_info.z}
    flat = jax.vmap(flatten)(z)
    return {
        "mean": np.asarray(flat.mean(0)),
        "sd": np.asarray(flat.std(0)),
        "divergences": int(mcmc.get_extra_fields()["diverging"].sum()),
        "seconds": seconds,
    }


def _noncentered(site: dict):
    """Every latent normal site sampled non-centered (the hierarchies' funnels
    disappear; other sites, a Gaussian random walk for one, stay as they are);
    the site's value is still recorded."""
    fn = site["fn"]
    while isinstance(fn, dist.ExpandedDistribution | dist.Independent):
        fn = fn.base_dist
    decentered = site["name"].endswith("_decentered")
    if not site["is_observed"] and not decentered and type(fn) is dist.Normal:
        return LocScaleReparam(0.0)
    return None


def _unconstrain(info, name):
    from numpyro.distributions import biject_to

    transform = biject_to(info.model_trace[name]["fn"].support)
    return transform.inv


# --- fitting ------------------------------------------------------------------


def _train(model, guide, steps: int, particles: int):
    """``steps`` SVI steps, Adam on :func:`compare_guides.schedule`. Returns the
    parameters, the last loss, the first step's seconds (compilation) and the
    other steps' seconds."""
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1)
    optim = numpyro.optim.optax_to_numpyro(optax.adam(compare_guides.schedule(steps)))
    svi = SVI(model, guide, optim, loss)
    t0 = time.perf_counter()
    update = jax.jit(svi.update)
    state, value = update(svi.init(jax.random.PRNGKey(0)))
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    for _ in range(steps - 1):
        state, value = update(state)
    jax.block_until_ready(state)
    t2 = time.perf_counter()
    return svi.get_params(state), float(value), t1 - t0, t2 - t1


def fit(problem: str, guide_name: str, args) -> dict:
    """Fit one guide to one posterior; the row of the table."""
    model = make_problems()[problem]
    steps = args.steps
    if args.budget is not None:
        # a probe of 101 steps measures the compilation and the step time; the
        # run then lasts about `budget` seconds, its own compilation included
        _, _, compile_s, run_s = _train(model, GUIDES[guide_name](model), 101, args.particles)
        steps = max(2, int((args.budget - compile_s) / (run_s / 100)))
        jax.clear_caches()  # the run compiles afresh, as a user's would
    guide = GUIDES[guide_name](model)
    params, final, compile_s, run_s = _train(model, guide, steps, args.particles)
    row = {
        "guide": guide_name,
        "problem": problem,
        "steps": steps,
        "params": int(sum(np.size(v) for v in jax.tree.leaves(params))),
        "compile_s": compile_s,
        "ms_per_step": 1e3 * run_s / max(steps - 1, 1),
        "wall_s": compile_s + run_s,
        # peak resident memory of this process, read before the evaluation
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": final,
        "elbo": compare_guides.elbo(model, guide, params, args.eval_particles),
    }
    row.update(moment_errors(problem, model, guide, params))
    return row


def guide_samples(model, guide, params, n: int = 4000) -> np.ndarray:
    """Draws of the unconstrained latent vector, flattened as NumPyro's guides do."""
    from numpyro.infer import Predictive

    flatten, _ = unconstrained(model)
    info = initialize_model(jax.random.PRNGKey(0), model)
    draws = Predictive(guide, params=params, num_samples=n)(jax.random.PRNGKey(7))
    z = {name: jax.vmap(_unconstrain(info, name))(draws[name]) for name in info.param_info.z}
    return np.asarray(jax.vmap(flatten)(z))


def moment_errors(problem, model, guide, params) -> dict:
    if not REFERENCE.exists():
        return {}
    with np.load(REFERENCE) as ref:
        if f"{problem}/mean" not in ref:
            return {}
        mean, sd = ref[f"{problem}/mean"], ref[f"{problem}/sd"]
    z = guide_samples(model, guide, params)
    if not np.isfinite(z).all():
        return {"mean_err": math.nan, "sd_err": math.nan}
    em = np.abs(z.mean(0) - mean) / sd
    es = np.abs(z.std(0) - sd) / sd
    return {
        "mean_err": float(em.mean()),
        "mean_err_max": float(em.max()),
        "sd_err": float(es.mean()),
        "sd_err_max": float(es.max()),
    }


# --- driver -------------------------------------------------------------------


def exact_reference() -> dict[str, np.ndarray]:
    """The 10-d funnel's moments in closed form: ``v ~ N(0, 3)``, and each
    ``x_i`` has mean 0 and variance ``E[exp(v)] = exp(9/2)``."""
    return {
        "funnel/mean": np.zeros(10, np.float32),
        "funnel/sd": np.array([3.0] + [math.exp(9 / 4)] * 9, np.float32),
        "funnel/divergences": np.asarray(0),
    }


def make_reference(problems, args) -> None:
    """Add NUTS references for ``problems`` to the stored ones (written atomically)."""
    stored = exact_reference()
    if REFERENCE.exists():
        with np.load(REFERENCE) as old:
            stored = {**dict(old), **stored}
    for name in problems:
        if f"{name}/mean" in exact_reference():
            continue
        ref = reference(make_problems()[name], args.ref_warmup, args.ref_draws, args.ref_chains)
        seconds, divergences = ref["seconds"], ref["divergences"]
        print(f"{name}: NUTS {seconds:.0f} s, {divergences} divergences", flush=True)
        stored[f"{name}/mean"], stored[f"{name}/sd"] = ref["mean"], ref["sd"]
        stored[f"{name}/divergences"] = np.asarray(divergences)
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    partial = REFERENCE.with_suffix(".partial.npz")
    np.savez(partial, **stored)
    partial.replace(REFERENCE)


def run_one(args) -> None:
    row = fit(args.one[0], args.one[1], args)
    print("ROW " + json.dumps(row), flush=True)


def _run(cmd: list[str], timeout: float) -> dict:
    """One guide on one posterior in its own process (so that its peak memory
    is its own); a failure becomes a row with an ``error``."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    found = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
    if found:
        return json.loads(found[-1][4:])
    tail = (out.stderr or "").strip().splitlines()[-1:]
    return {"error": " ".join(tail) or f"exit status {out.returncode}"}


def main(args: argparse.Namespace) -> list[dict]:
    if args.make_reference:
        make_reference(args.problems, args)
    rows = []
    for problem in args.problems:
        for guide in args.guides:
            for protocol in args.protocols:
                cmd = [sys.executable, __file__, "--one", problem, guide]
                cmd += ["--steps", str(args.steps), "--particles", str(args.particles)]
                cmd += ["--eval-particles", str(args.eval_particles)]
                if protocol == "time":
                    cmd += ["--budget", str(args.seconds)]
                row = _run(cmd, args.timeout) | {"guide": guide, "problem": problem}
                row["protocol"] = protocol
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


COLUMNS = (
    ("guide", "guide", "{}"),
    ("steps", "steps", "{}"),
    ("params", "parameters", "{:,}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("ms_per_step", "ms/step", "{:.2f}"),
    ("peak_mb", "peak MB", "{:.0f}"),
    ("elbo", "ELBO", "{:.2f}"),
    ("mean_err", "mean err", "{:.3f}"),
    ("mean_err_max", "(max)", "{:.2f}"),
    ("sd_err", "sd err", "{:.3f}"),
    ("sd_err_max", "(max)", "{:.2f}"),
)


def summary(rows: list[dict]) -> str:
    """One line per posterior and protocol: AutoGlow's ELBO and mean moment
    errors against the best other guide's, and its step time over
    AutoIAFNormal's."""
    head = ["posterior", "protocol", "AutoGlow ELBO", "best other", "its ELBO", "difference"]
    head += ["AutoGlow mean/sd err", "best other's", "ms/step vs IAF"]
    out = [".. csv-table:: AutoGlow against the best other guide", "   :header: "]
    out[-1] += ", ".join(f'"{h}"' for h in head)
    out.append("")
    for problem, protocol in dict.fromkeys((r["problem"], r["protocol"]) for r in rows):
        group = {
            r["guide"]: r for r in rows if (r["problem"], r["protocol"]) == (problem, protocol)
        }
        glow = group.get("AutoGlow", {})
        others = [
            r
            for g, r in group.items()
            if g != "AutoGlow" and math.isfinite(r.get("elbo", math.nan))
        ]
        if "elbo" not in glow or not others:
            continue
        best = max(others, key=lambda r: r["elbo"])
        iaf = group.get("AutoIAFNormal", {}).get("ms_per_step")
        cells = [problem, protocol, f"{glow['elbo']:.2f}", best["guide"], f"{best['elbo']:.2f}"]
        cells += [f"{glow['elbo'] - best['elbo']:+.2f}"]
        cells += [f"{glow.get('mean_err', math.nan):.3f} / {glow.get('sd_err', math.nan):.3f}"]
        cells += [f"{best.get('mean_err', math.nan):.3f} / {best.get('sd_err', math.nan):.3f}"]
        cells += [f"{glow['ms_per_step'] / iaf:.1f}x" if iaf else ""]
        out.append("   " + ", ".join(f'"{c}"' for c in cells))
    return "\n".join(out) + "\n"


def table(rows: list[dict]) -> str:
    """An reStructuredText table per posterior and protocol."""
    out = []
    keys = dict.fromkeys((r["problem"], r["protocol"]) for r in rows)
    for problem, protocol in keys:
        header = ", ".join(f'"{title}"' for _, title, _ in COLUMNS)
        out += [f".. csv-table:: {problem}, {protocol}", f"   :header: {header}", ""]
        for r in rows:
            if (r["problem"], r["protocol"]) != (problem, protocol):
                continue
            if "error" in r:
                cells = [r["guide"], f"failed: {r['error'][:80]}"] + [""] * (len(COLUMNS) - 2)
            else:
                cells = [fmt.format(r[k]) if k in r else "" for k, _, fmt in COLUMNS]
            out.append("   " + ", ".join(f'"{c}"' for c in cells))
        out.append("")
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    p.add_argument("--guides", nargs="*", default=list(GUIDES))
    p.add_argument("--protocols", nargs="+", default=["steps"], choices=["steps", "time"])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--particles", type=int, default=1)
    p.add_argument("--eval-particles", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--make-reference", action="store_true")
    p.add_argument("--ref-warmup", type=int, default=1000)
    p.add_argument("--ref-draws", type=int, default=2000)
    p.add_argument("--ref-chains", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("PROBLEM", "GUIDE"), help=argparse.SUPPRESS)
    p.add_argument("--out")
    p.add_argument("--table", metavar="JSON", help="print the tables of a results file and exit")
    return p


if __name__ == "__main__":
    arguments = parser().parse_args()
    if arguments.table:
        results = json.loads(Path(arguments.table).read_text())
        rows = results["rows"] if isinstance(results, dict) else results  # merged files
        print(summary(rows) + "\n" + table(rows))
    elif arguments.one:
        run_one(arguments)
    else:
        main(arguments)
