"""AutoGlow on a plate of many groups, against an exact posterior.

The model: a global mean and scale, one effect per group, ``J = 4`` Gaussian
observations per group (unit noise), the effects centered (a funnel at small
``tau``)::

    mu ~ N(0, 5),  tau ~ HalfNormal(2),
    theta_g ~ N(mu, tau),  y_gj ~ N(theta_g, 1)    (g = 1..G, j = 1..4).

Given ``(mu, tau)`` each effect integrates out (``ybar_g ~ N(mu, tau^2 + 1/4)``),
so the posterior of ``(mu, log tau)`` is a two-dimensional quadrature (sufficient
statistics, any ``G``) and each effect's posterior mean and variance follow
exactly from six moments of it. Data: ``theta_g ~ N(1, 0.5)``.

``--problem logistic``: a hierarchical logistic regression, one intercept per
group, a shared slope, ``J = 10`` binary observations per group with a
standard-normal covariate::

    mu ~ N(0, 2),  tau ~ HalfNormal(1),  beta ~ N(0, 2),
    alpha_g ~ N(mu, tau),  y_gj ~ Bernoulli(logit = alpha_g + beta x_gj),

simulated with ``mu = -0.5, tau = 1, beta = 0.8``; its reference is NUTS
(``alpha`` non-centered, 2 chains of 1,000 draws after 500 warm-up), stored in
``benchmarks/results/plate_reference.npz`` by ``--make-reference``.

Each guide trains ``--steps`` one-sample ``Trace_ELBO`` steps (Adam 3e-3 decaying
to 3e-4, the parameters averaged over the last ``--average`` fraction), full
batch up to ``--full-max`` groups and subsampled (``--batch`` groups a step)
above. The report: parameters, compile seconds, milliseconds per
step, the errors of the guide's means and standard deviations (from
``--draws`` draws) in reference standard deviations, for the globals and for
every group's effect (mean and max over groups), and the ELBO from
``--eval-particles`` draws (full batch only).

Run: ``python examples/plate_guides.py --groups 1000 10000 100000``
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_glow import AutoGlow

OBS = 4  # observations per group (unit noise)


def model(y, batch=None):
    groups = y.shape[0]
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    with numpyro.plate("groups", groups, subsample_size=batch) as idx:
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta[:, None], 1.0).to_event(1), obs=y[idx])


def logistic_model(x, y, batch=None):
    groups = y.shape[0]
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.0))
    with numpyro.plate("groups", groups, subsample_size=batch) as idx:
        alpha = numpyro.sample("alpha", dist.Normal(mu, tau))
        logits = alpha[:, None] + beta * x[idx]
        numpyro.sample("y", dist.Bernoulli(logits=logits).to_event(1), obs=y[idx])


def simulate_logistic(groups: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    alpha = rng.normal(-0.5, 1.0, groups)
    x = rng.normal(size=(groups, 10)).astype(np.float32)
    p = 1 / (1 + np.exp(-(alpha[:, None] + 0.8 * x)))
    return x, (rng.uniform(size=p.shape) < p).astype(np.float32)


def nuts_reference(groups: int, seed: int) -> dict:
    """The logistic problem's posterior moments from NUTS, non-centered."""
    from numpyro.diagnostics import split_gelman_rubin
    from numpyro.infer import MCMC, NUTS
    from numpyro.infer.reparam import LocScaleReparam

    x, y = simulate_logistic(groups, seed)
    model = numpyro.handlers.reparam(logistic_model, {"alpha": LocScaleReparam(0)})
    mcmc = MCMC(
        NUTS(model),
        num_warmup=500,
        num_samples=1000,
        num_chains=2,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), jnp.asarray(x), jnp.asarray(y))
    draws = mcmc.get_samples()
    grouped = mcmc.get_samples(group_by_chain=True)
    r_hat = max(float(np.max(split_gelman_rubin(np.asarray(v)))) for v in grouped.values())
    divergences = int(mcmc.get_extra_fields()["diverging"].sum())
    print(f"NUTS at {groups} groups: max split r-hat {r_hat:.3f}, {divergences} divergences")
    return {
        k: (np.asarray(draws[k]).mean(0), np.asarray(draws[k]).std(0))
        for k in ("mu", "tau", "beta", "alpha")
    }


REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks/results/plate_reference.npz"


def stored_reference(groups: int, seed: int) -> dict:
    key = f"logistic_{groups}_{seed}"
    if not REFERENCE.exists():
        raise FileNotFoundError(f"{REFERENCE}: run with --make-reference first")
    with np.load(REFERENCE) as f:
        if f"{key}_mu" not in f:
            raise ValueError(f"{REFERENCE} has no reference for {key}; run --make-reference")
        return {k: (f[f"{key}_{k}"][0], f[f"{key}_{k}"][1]) for k in ("mu", "tau", "beta", "alpha")}


def make_reference(groups: int, seed: int) -> None:
    ref = nuts_reference(groups, seed)
    stored = dict(np.load(REFERENCE)) if REFERENCE.exists() else {}
    for k, (m, s) in ref.items():
        stored[f"logistic_{groups}_{seed}_{k}"] = np.stack([m, s])
    tmp = REFERENCE.with_name(REFERENCE.stem + ".tmp.npz")
    np.savez(tmp, **stored)
    tmp.replace(REFERENCE)


def simulate(groups: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    theta = rng.normal(1.0, 0.5, groups)
    return (theta[:, None] + rng.normal(size=(groups, OBS))).astype(np.float32)


def reference(y: np.ndarray, grid: int = 801) -> dict:
    """Exact posterior moments by quadrature over ``(mu, log tau)``."""
    ybar = y.mean(1).astype(np.float64)
    g, s2 = len(ybar), 1.0 / OBS
    s1, sq = ybar.sum(), (ybar**2).sum()

    def log_post(mu, log_tau):
        t2 = np.exp(2 * log_tau)
        v = t2 + s2
        lik = -0.5 * g * np.log(2 * np.pi * v) - (sq - 2 * mu * s1 + g * mu**2) / (2 * v)
        # N(0, 5) and HalfNormal(2) priors; d tau = tau d log tau
        prior = -0.5 * (mu / 5.0) ** 2 - 0.5 * t2 / 4.0 + log_tau
        return lik + prior

    # a wide box, then a box of +-8 posterior standard deviations around the mass
    lo, hi = np.array([ybar.mean() - 3, -6.0]), np.array([ybar.mean() + 3, 2.0])
    for _ in range(3):
        mu, lt = np.meshgrid(np.linspace(lo[0], hi[0], grid), np.linspace(lo[1], hi[1], grid))
        lp = log_post(mu, lt)
        w = np.exp(lp - lp.max())
        w /= w.sum()
        mean = np.array([(w * mu).sum(), (w * lt).sum()])
        sd = np.sqrt(np.array([(w * (mu - mean[0]) ** 2).sum(), (w * (lt - mean[1]) ** 2).sum()]))
        sd = np.maximum(sd, np.array([hi[0] - lo[0], hi[1] - lo[1]]) / grid)
        lo, hi = mean - 8 * sd, mean + 8 * sd
    tau = np.exp(lt)
    wt = tau**2 / (tau**2 + s2)  # weight of the group's own mean
    a, b = mu * (1 - wt), wt  # E[theta_g | mu, tau] = a + b ybar_g
    e = {k: (w * v).sum() for k, v in dict(a=a, b=b, aa=a * a, ab=a * b, bb=b * b).items()}
    v = (w * s2 * wt).sum()  # E[Var(theta_g | mu, tau)]
    m = e["a"] + e["b"] * ybar
    var = v + e["aa"] + 2 * e["ab"] * ybar + e["bb"] * ybar**2 - m**2
    tau_mean = (w * tau).sum()
    return {
        "mu": ((w * mu).sum(), math.sqrt((w * (mu - (w * mu).sum()) ** 2).sum())),
        "tau": (tau_mean, math.sqrt((w * (tau - tau_mean) ** 2).sum())),
        "theta": (m, np.sqrt(var)),
    }


def moments(guide, params, names, draws: int, key, chunk: int = 100):
    """Per-site means and standard deviations: AutoNormal's exactly from its
    parameters (its draws follow the plate's subsample; ``tau`` is log-normal),
    AutoGlow's from ``draws`` draws, in chunks."""
    if isinstance(guide, AutoNormal):
        out = {}
        for k in names:
            loc = np.asarray(params[f"{k}_auto_loc"], np.float64)
            sd = np.asarray(params[f"{k}_auto_scale"], np.float64)
            if k == "tau":
                mean = np.exp(loc + sd**2 / 2)
                loc, sd = mean, mean * np.sqrt(np.expm1(sd**2))
            out[k] = (loc, sd)
        return out
    sums: dict = {}
    for i in range(0, draws, chunk):
        k = jax.random.fold_in(key, i)
        n = min(chunk, draws - i)
        s = guide.sample_posterior(k, params, sample_shape=(n,))
        for name in names:
            x = np.asarray(s[name], np.float64)
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] = acc[0] + x.sum(0)
            acc[1] = acc[1] + (x**2).sum(0)
    out = {}
    for name, (s1, s2) in sums.items():
        mean = s1 / draws
        out[name] = (mean, np.sqrt(np.maximum(s2 / draws - mean**2, 0.0)))
    return out


def errors(ref: dict, got: dict) -> dict:
    row = {}
    for name in ref:
        (rm, rs), (gm, gs) = ref[name], got[name]
        em, es = np.abs(gm - rm) / rs, np.abs(gs - rs) / rs
        row[f"{name}_mean_err"] = float(np.mean(em))
        row[f"{name}_sd_err"] = float(np.mean(es))
        if np.ndim(em):
            row[f"{name}_mean_err_max"] = float(np.max(em))
            row[f"{name}_sd_err_max"] = float(np.max(es))
    return row


GUIDES = {
    "AutoGlow": lambda model: AutoGlow(model),
    "AutoGlow-joint": lambda model: AutoGlow(model, local_plate=None),
    "AutoNormal": lambda model: AutoNormal(model),
}


def problem(name: str, groups: int, seed: int):
    """``(model, data, reference)`` of a problem at ``groups`` groups."""
    if name == "normal":
        y = simulate(groups, seed)
        return model, (jnp.asarray(y),), reference(y)
    x, y = simulate_logistic(groups, seed)
    return logistic_model, (jnp.asarray(x), jnp.asarray(y)), stored_reference(groups, seed)


def run(name: str, groups: int, args) -> dict:
    target, data, ref = problem(args.problem, groups, args.seed)
    batch = None if groups <= args.full_max else args.batch
    guide = GUIDES[name](target)
    schedule = optax.exponential_decay(args.lr, args.steps, args.final_lr / args.lr)
    svi = SVI(target, guide, optax.adam(schedule), Trace_ELBO())
    key = jax.random.PRNGKey(args.seed)
    state = svi.init(key, *data, batch)
    update = jax.jit(svi.update, static_argnums=len(data) + 1)
    t0 = time.perf_counter()
    state, _ = update(state, *data, batch)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    # Polyak averaging of the unconstrained parameters over the last steps, for
    # every guide alike: the globals' posterior narrows as 1 / sqrt(G), below
    # the jitter that single-sample gradients leave in the last iterate
    average_from = args.steps - int(args.average * args.steps)
    unconstrained = jax.jit(lambda st: svi.optim.get_params(st.optim_state))
    add = jax.jit(lambda total, st: jax.tree.map(jnp.add, total, unconstrained(st)))
    total, count = None, 0
    t0 = time.perf_counter()
    for step in range(1, args.steps):
        state, loss = update(state, *data, batch)
        if step >= average_from:
            total = unconstrained(state) if total is None else add(total, state)
            count += 1
    jax.block_until_ready(loss)
    step_ms = 1e3 * (time.perf_counter() - t0) / (args.steps - 1)
    if count:
        params = svi.constrain_fn(jax.tree.map(lambda t: t / count, total))
    else:
        params = svi.get_params(state)
    row = {
        "problem": args.problem,
        "guide": name,
        "groups": groups,
        "batch": batch,
        "steps": args.steps,
        "average": args.average,
        "params": int(sum(np.size(v) for v in jax.tree.leaves(params))),
        "compile_s": round(compile_s, 2),
        "ms_per_step": round(step_ms, 3),
    }
    got = moments(guide, params, list(ref), args.draws, jax.random.PRNGKey(args.seed + 1))
    row.update(errors(ref, got))
    if batch is None:
        elbo = Trace_ELBO(num_particles=args.eval_particles, vectorize_particles=True)
        loss = elbo.loss(jax.random.PRNGKey(7), params, target, guide, *data, None)
        row["elbo"] = -float(loss)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", choices=("normal", "logistic"), default="normal")
    parser.add_argument("--groups", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument(
        "--make-reference", action="store_true", help="run NUTS for the logistic problem"
    )
    parser.add_argument("--guides", nargs="+", default=["AutoGlow", "AutoNormal"], choices=GUIDES)
    parser.add_argument("--joint-max", type=int, default=1000, help="AutoGlow-joint up to this G")
    parser.add_argument("--full-max", type=int, default=1000, help="full batch up to this G")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's first learning rate")
    parser.add_argument("--final-lr", type=float, default=3e-4, help="its last (exponential decay)")
    parser.add_argument(
        "--average", type=float, default=0.2, help="average the parameters over this last fraction"
    )
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--eval-particles", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.make_reference:
        for groups in args.groups:
            make_reference(groups, args.seed)
        return
    rows = []
    for groups in args.groups:
        for name in args.guides:
            if name == "AutoGlow-joint" and groups > args.joint_max:
                continue
            row = run(name, groups, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
