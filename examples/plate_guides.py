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

Each guide trains ``--steps`` one-sample ``Trace_ELBO`` steps (Adam 3e-3 decaying
to 3e-4), full batch up to ``--full-max`` groups and subsampled (``--batch``
groups a step) above. The report: parameters, compile seconds, milliseconds per
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
        prior = -0.5 * (mu / 5.0) ** 2 - 0.5 * t2 / 4.0 + log_tau  # HalfNormal(2), d tau = tau d log tau
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


def moments(guide, params, y, batch, draws: int, key, chunk: int = 100):
    """Per-site means and standard deviations: AutoNormal's exactly from its
    parameters (its draws follow the plate's subsample), AutoGlow's from
    ``draws`` draws, in chunks."""
    if isinstance(guide, AutoNormal):
        loc = {k: np.asarray(params[f"{k}_auto_loc"], np.float64) for k in ("mu", "tau", "theta")}
        sd = {k: np.asarray(params[f"{k}_auto_scale"], np.float64) for k in loc}
        tau = np.exp(loc["tau"] + sd["tau"] ** 2 / 2)  # log-normal
        return {
            "mu": (loc["mu"], sd["mu"]),
            "tau": (tau, tau * np.sqrt(np.expm1(sd["tau"] ** 2))),
            "theta": (loc["theta"], sd["theta"]),
        }
    sums: dict = {}
    for i in range(0, draws, chunk):
        k = jax.random.fold_in(key, i)
        n = min(chunk, draws - i)
        s = guide.sample_posterior(k, params, sample_shape=(n,))
        for name in ("mu", "tau", "theta"):
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
    for name in ("mu", "tau", "theta"):
        (rm, rs), (gm, gs) = ref[name], got[name]
        em, es = np.abs(gm - rm) / rs, np.abs(gs - rs) / rs
        row[f"{name}_mean_err"] = float(np.mean(em))
        row[f"{name}_sd_err"] = float(np.mean(es))
        if np.ndim(em):
            row[f"{name}_mean_err_max"] = float(np.max(em))
            row[f"{name}_sd_err_max"] = float(np.max(es))
    return row


GUIDES = {
    "AutoGlow": lambda: AutoGlow(model),
    "AutoGlow-joint": lambda: AutoGlow(model, local_plate=None),
    "AutoNormal": lambda: AutoNormal(model),
}


def run(name: str, groups: int, args) -> dict:
    y = jnp.asarray(simulate(groups, args.seed))
    batch = None if groups <= args.full_max else args.batch
    guide = GUIDES[name]()
    schedule = optax.exponential_decay(3e-3, args.steps, 0.1)
    svi = SVI(model, guide, optax.adam(schedule), Trace_ELBO())
    key = jax.random.PRNGKey(args.seed)
    state = svi.init(key, y, batch)
    update = jax.jit(svi.update, static_argnums=2)
    t0 = time.perf_counter()
    state, _ = update(state, y, batch)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps - 1):
        state, loss = update(state, y, batch)
    jax.block_until_ready(loss)
    step_ms = 1e3 * (time.perf_counter() - t0) / (args.steps - 1)
    params = svi.get_params(state)
    row = {
        "guide": name,
        "groups": groups,
        "batch": batch,
        "steps": args.steps,
        "params": int(sum(np.size(v) for v in jax.tree.leaves(params))),
        "compile_s": round(compile_s, 2),
        "ms_per_step": round(step_ms, 3),
    }
    got = moments(guide, params, y, batch, args.draws, jax.random.PRNGKey(args.seed + 1))
    row.update(errors(reference(np.asarray(y)), got))
    if batch is None:
        elbo = Trace_ELBO(num_particles=args.eval_particles, vectorize_particles=True)
        row["elbo"] = -float(elbo.loss(jax.random.PRNGKey(7), params, model, guide, y, None))
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--guides", nargs="+", default=["AutoGlow", "AutoNormal"], choices=GUIDES)
    parser.add_argument("--joint-max", type=int, default=1000, help="AutoGlow-joint up to this G")
    parser.add_argument("--full-max", type=int, default=1000, help="full batch up to this G")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--eval-particles", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
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
