"""The same Glow in numpyro-glow, TensorFlow Probability and normflows, side by side.

Run (from the repository root, in the main venv; the peers live in their own venv,
see ``benchmarks/requirements-peers.txt``)::

    python benchmarks/peers.py --peers-python /work/peers-venv/bin/python
    python benchmarks/peers.py --peers-python /work/peers-venv/bin/python --quick  # smoke
    python benchmarks/peers.py --peers-python /work/peers-venv/bin/python --params-only
    python benchmarks/peers.py --device gpu --configs a,paper --peers-python python3 \\
        --stacks numpyro,normflows  # python3: one interpreter with JAX (CUDA) and torch

``--device gpu`` (on a machine with a GPU; results in ``results/peers_gpu.json``
by default): the children are not pinned to CPUs and see the GPUs; they get
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (one child at a time holds the GPU, and
JAX does not reserve most of its memory up front); JAX uses its first GPU, and
normflows moves its model and batch to ``cuda`` (``torch.cuda.is_available()``).
TFP has not been run on a GPU: TensorFlow is not installed on the machine the
GPU results in ``benchmarks/README.md`` come from. ``benchmarks/ceiling.py``
measures, on the same machine, the matrix-product ceiling the ``train TFLOP/s``
column is compared with (an 8192^3 matmul in JAX: float32 at the default
precision, TF32 on NVIDIA GPUs from Ampere on; float32 ``highest``; bfloat16).

Every (stack, config) pair runs in its own fresh subprocess, so that its peak
RSS is its own and no two frameworks share a process or fight over threads;
ours runs under ``sys.executable``, TFP and normflows under ``--peers-python``.
The parent collects one JSON line from each child, writes ``--out`` (JSON) and
a markdown table next to it after every child (so a crash or a ``--timeout``
keeps the rows before it), and prints the table at the end. Per child:

- ``params``: trainable scalars of the model.
- ``init NLL``: the mean negative log-density of the fixed batch at
  initialisation (after ActNorm's data-dependent init), in nats per dimension;
  the same architecture on the same batch should score about the same.
- ``log_prob``: images per second of the batch log-density (no gradient),
  ``batch / median(seconds per call)`` over ``--repeats`` calls after the first
  call and ``--warmup`` more; ``train step``: the same for one step of forward,
  backward and Adam (lr 1e-3) on the mean negative log-density.
- ``build``: seconds to build the model and its parameters after the import
  (numpyro-glow's includes its ActNorm data-dependent init, run eagerly on the
  batch; the peers' ActNorm initialises inside their first call).
- ``first call``: seconds of the first ``log_prob`` call and of the first train
  step: tracing plus compilation (JAX ``jit``, TF ``tf.function``), plus the
  peers' lazy ActNorm initialisation; PyTorch runs eagerly, so its first call is
  a plain (cold) call.
- ``peak RSS``: ``ru_maxrss`` of the child at the end, framework import
  included; ``after import`` is the RSS once the framework is imported, before
  the model is built (so the difference is what the model and its runs add).
  Host memory only: GPU memory is not measured.
- ``train TFLOP/s``: ``model_flops(cfg)["train"]`` (a hand count of the
  convolutions' flops, backward counted as twice the forward; see its
  docstring) over the median train-step time; the JSON also has
  ``log_prob_tflop_s`` and the count itself (``flops``). XLA's cost analysis of
  numpyro-glow's two compiled functions is kept as ``xla_flops`` but is not
  usable as a count: it sees one iteration of a rolled scan, and on GPU not the
  cuDNN convolutions.
- Ratios ``vs ours`` divide by the ``numpyro-glow`` (default ``unroll``) row of
  the same config, measured in the same run.

Configs (float32, batch 64): ``a``, 32x32x3 images, L=3 levels; ``b``, 28x28x1,
L=2; both K=8 steps per level, each ActNorm, LU-factored 1x1 convolution, affine
coupling whose network is 3x3 conv, ReLU, 1x1 conv, ReLU, zero-initialised 3x3
conv with 128 hidden channels, Glow's ``sigmoid(h + 2)`` scale; half of the
channels leave after every level but the last; fixed standard normal base.
``paper`` (for a GPU; not in the default ``--configs a,b``): the Glow paper's
CIFAR-10 configuration, 32x32x3, L=3, K=32, 512 hidden channels, batch 64
(44,051,148 parameters in numpyro-glow). ``--quick`` uses tiny shapes (8x8x3
with L=3, 4x4x1 with L=2, K=2, 16 hidden channels, batch 8; ``paper``: 8x8x3,
L=3, K=4, 32 hidden channels, batch 8) and 2 repeats.

Threads (``--device cpu``, the default): each child is pinned to ``--threads``
CPUs (2; ``sched_setaffinity``, when the machine has more), GPUs are hidden
(``CUDA_VISIBLE_DEVICES=""``, ``JAX_PLATFORMS=cpu``), and each framework is
told the same: OMP/MKL env variables,
``torch.set_num_threads``/``set_num_interop_threads``, ``tf.config.threading``
intra/inter-op. XLA's CPU thread pool has no knob; it sizes itself from the
CPUs the process may use, hence the pinning. With ``--device gpu`` nothing is
pinned and no OMP/MKL variables are set; ``--threads`` still reaches TF's
threading settings, and PyTorch's when it sees no GPU.

How each stack builds the model:

- ``numpyro-glow``: ``numpyro_glow.glow(levels=L, depth=K, hidden_channels=128,
  coupling="affine", lu=True, learn_top=False, alpha=None)`` with the default
  ``unroll`` (``default_unroll``: ``1``, rolled, on CPU; ``4`` on
  accelerators); ActNorm initialised from the batch (``init_data``); on CPU
  the conditioners' convolutions are ``nets.conv2d_same``'s matrix products.
  Variants, one stack each: ``numpyro_rolled`` (``unroll=1``),
  ``numpyro_unrolled`` (``unroll=True``), ``numpyro_unroll4`` and
  ``numpyro_unroll8``, ``numpyro_bf16`` (``precision="bfloat16"`` coupling
  nets, default ``unroll``), ``numpyro_unrolled_bf16`` (both); and three
  experiments, not options of the package, that put XLA's own convolutions
  (``lax.conv_general_dilated`` and its autodiff) in place of ``conv2d_same``
  by monkeypatching ``nets.conv_net_for`` in the child (so they differ from
  the plain rows on CPU only): ``numpyro_xla_convs`` (default ``unroll``),
  ``numpyro_rolled_xla`` (``unroll=1``) and ``numpyro_unrolled_xla``
  (``unroll=True``: the package's CPU default before ``conv2d_same``).
  ``log_prob`` is the fused one-pass ``FlowDistribution.log_prob`` under
  ``jax.jit``; the train step is a jitted ``value_and_grad`` of the mean
  negative log-density plus ``optax.adam``, parameters and optimizer state
  donated (updated in place, as the peers do).
- ``tfp``: ``tfp.bijectors.Glow(output_shape, num_glow_blocks=L,
  num_steps_per_block=K, coupling_bijector_fn=GlowDefaultNetwork(num_hidden=128),
  exit_bijector_fn=GlowDefaultExitNetwork)`` (``grab_after_block`` default:
  half out after every block but the last; ``use_actnorm=True``) pushing a
  ``Sample(Normal(0, 1))`` forward; ``log_prob`` and the train step (GradientTape
  plus ``tf_keras.optimizers.Adam``) are ``tf.function`` graphs (no XLA).
- ``normflows``: ``nf.MultiscaleFlow`` assembled as in normflows' Glow example:
  per level K ``nf.flows.GlowBlock(channels, 128, scale=True,
  scale_map="sigmoid", split_mode="channel", use_lu=True)`` and a
  ``nf.flows.Squeeze``, ``nf.flows.Merge`` between levels, and a fixed
  ``DiagGaussian(trainable=False)`` per level (``class_cond=False``); eager
  PyTorch, ``torch.optim.Adam``; ``log_prob`` under ``torch.no_grad``. On
  ``cuda`` when PyTorch sees a GPU (``--device gpu``), with PyTorch's defaults:
  TF32 for cuDNN convolutions (``torch.backends.cudnn.allow_tf32``), not for
  matmuls; both flags are recorded in the child's ``versions``.

Parameter counts (``--params-only``; numpyro-glow / TFP / normflows): config a
1,614,924 / 1,590,060 / 1,611,648, config b 433,868 / 433,132 / 433,792. The
gaps are exactly the two items below: numpyro-glow minus normflows is the split
priors' 3x3 convs (3,276 in a, 76 in b), numpyro-glow minus TFP is the unused
halves of the LU arrays, C^2 + C per step (24,864 in a, 736 in b); the
coupling networks (over 98% of the parameters) are identical in size.

Differences that remain (none can be removed through the peers' public knobs):

- Split prior. numpyro-glow and TFP model the channels that leave a level with
  a Gaussian whose mean and scale a zero-initialised 3x3 conv computes from the
  channels that stay (TFP's ``ExitBijector``); normflows' ``MultiscaleFlow`` has
  no such conditional prior: the channels that leave are scored by a fixed
  standard normal. (A few hundred to a few thousand parameters, and one 3x3
  conv per level, fewer in normflows.)
- 1x1 convolution parameters. TFP trains one packed ``lower_upper`` C x C
  matrix (``ScaleMatvecLU``), its diagonal the raw diagonal of U; numpyro-glow
  and normflows keep full C x C ``lower`` and ``upper`` arrays plus a
  ``log_s`` vector (the diagonal as sign times exp), so they count C^2 + C
  more parameters per step than TFP: the masked halves, never used (the free
  parameters are C^2 in all three).
- Coupling algebra. All three compute shift t and scale s = sigmoid(h2 + 2)
  from the first half of the channels; numpyro-glow maps the second half
  ``(x + t) * s``, TFP and normflows ``x * s + t`` (same cost). Which half of h
  is the shift and which the raw scale differs; it does not matter at
  zero initialisation.
- Weight init of the first two conv layers. numpyro-glow and TFP: He-normal;
  normflows: PyTorch's default (Kaiming-uniform). Timing is unaffected.
- TFP's exit (split prior) at initialisation. ``GlowBlock``/``ExitBijector``
  turn the network's output h into the scale ``scale_fn(h + 2)``, and the exit
  uses ``scale_fn=exp``: with the zero-initialised ``GlowDefaultExitNetwork``
  the channels that leave are multiplied by e^2 = 7.39 on their way to the
  latent, where numpyro-glow's split prior (and normflows' plain normal) start
  as the standard normal. Same parameters, same cost, but TFP's ``init NLL``
  is far higher (about 9 to 14 nats/dim against 0.1 to 0.2 in the quick run);
  an exit network whose last bias starts at -2 on the scale half brings it to
  the others' value (checked: 0.115 vs numpyro-glow's 0.167 nats/dim on the
  quick 4x4x1 config). The script keeps TFP's default exit network.
- Layout and passes. numpyro-glow and TFP are channels-last (NHWC), normflows
  channels-first (NCHW, PyTorch's native). TFP keeps the channels that already
  left in the tensor and carries them through every later level with
  ``Blockwise``/``Identity`` and the reshapes of ``Expand``, and its
  ``TransformedDistribution.log_prob`` asks the bijector for the inverse and
  for the inverse log-determinant separately: every network is traced twice
  (the ``tf.function`` graph of L=2, K=2 holds 26 ``Conv2D`` ops for 13
  convolutions; TF's graph optimizer may merge the copies at run time).
  numpyro-glow's ``log_prob`` is one fused pass, as is normflows'.
- TFP's and normflows' ActNorm initialise lazily on the first call (a
  ``tf.cond`` on an ``initialized`` variable stays in TFP's graph; an
  ``if`` in normflows), numpyro-glow's when its parameters are created.
- Execution. JAX compiles the whole step with XLA; TFP runs a TF graph with
  TF's own kernels (``tf.function`` without ``jit_compile``); normflows runs
  eagerly op by op.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
RESULT_TAG = "PEERS_RESULT "

CONFIGS = {
    "a": {"shape": (32, 32, 3), "levels": 3, "depth": 8, "hidden": 128, "batch": 64},
    "b": {"shape": (28, 28, 1), "levels": 2, "depth": 8, "hidden": 128, "batch": 64},
    # the CIFAR-10 configuration of the Glow paper (Kingma & Dhariwal 2018): for a GPU
    "paper": {"shape": (32, 32, 3), "levels": 3, "depth": 32, "hidden": 512, "batch": 64},
}
QUICK_CONFIGS = {
    "a": {"shape": (8, 8, 3), "levels": 3, "depth": 2, "hidden": 16, "batch": 8},
    "b": {"shape": (4, 4, 1), "levels": 2, "depth": 2, "hidden": 16, "batch": 8},
    "paper": {"shape": (8, 8, 3), "levels": 3, "depth": 4, "hidden": 32, "batch": 8},
}
# stack name -> (label in the table, which interpreter runs it, modules it imports)
_JAX = ("jax", "numpyro", "optax", "numpyro_glow")
STACKS = {
    "numpyro": ("numpyro-glow", "ours", _JAX),
    "numpyro_rolled": ("numpyro-glow, unroll=1 (rolled)", "ours", _JAX),
    "numpyro_unrolled": ("numpyro-glow, unrolled", "ours", _JAX),
    "numpyro_rolled_xla": ("numpyro-glow, rolled, XLA convolutions", "ours", _JAX),
    "numpyro_xla_convs": ("numpyro-glow, XLA convolutions", "ours", _JAX),
    "numpyro_unrolled_xla": ("numpyro-glow, unrolled, XLA convolutions", "ours", _JAX),
    "numpyro_bf16": ("numpyro-glow, bfloat16 nets", "ours", _JAX),
    "numpyro_unroll4": ("numpyro-glow, unroll=4", "ours", _JAX),
    "numpyro_unroll8": ("numpyro-glow, unroll=8", "ours", _JAX),
    "numpyro_unrolled_bf16": ("numpyro-glow, unrolled, bfloat16 nets", "ours", _JAX),
    "tfp": ("TFP tfb.Glow", "peers", ("tensorflow", "tensorflow_probability", "tf_keras")),
    "normflows": ("normflows", "peers", ("torch", "normflows")),
}
LEARNING_RATE = 1e-3


# --------------------------------------------------------------------------- helpers


def _rss_mib() -> float:
    """The current resident set size of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds of one call of ``fn`` (which must block until its work is done)."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _measure(fn: Callable[[], object], warmup: int, repeats: int) -> dict:
    """First-call seconds, then the median seconds over ``repeats`` calls after
    ``warmup`` more; ``fn`` returns a float (a loss or a log-density) to check."""
    first_s, first_value = _timed(fn)
    for _ in range(warmup):
        fn()
    times, value = [], first_value
    for _ in range(repeats):
        t, value = _timed(fn)
        times.append(t)
    return {
        "first_call_s": first_s,
        "median_s": statistics.median(times),
        "times_s": times,
        "first_value": float(first_value),
        "last_value": float(value),
    }


def _data(cfg: dict):
    """The fixed batch, NHWC float32 in [0, 1) (same bytes for every stack)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.uniform(0.0, 1.0, (cfg["batch"], *cfg["shape"])).astype(np.float32)


def _pin_threads(threads: int) -> None:
    """Pin this process to ``threads`` CPUs and tell the BLAS/OpenMP libraries."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > threads:
        os.sched_setaffinity(0, cpus[:threads])


# ------------------------------------------------------------------- stack builders
#
# Each builder imports its framework, builds the model of ``cfg`` on the batch
# ``x`` (NHWC numpy) and returns a namespace with ``versions``, ``params``,
# ``log_prob()`` (mean log-density of the batch, blocking) and ``train_step()``
# (one Adam step, returns the loss, blocking).


def build_numpyro(
    cfg: dict,
    x,
    threads: int,
    unroll: int | bool | None = None,
    precision: str = "float32",
    xla_convs: bool = False,
):
    """numpyro-glow: the fused ``log_prob`` and an optax Adam step, jitted.

    ``xla_convs`` (an experiment, not an option of the package): the
    conditioners use XLA's own convolutions (``lax.conv_general_dilated`` and
    its autodiff) where ``glow`` would pick ``conv2d_same``'s matrix products
    (on CPU); on GPU it changes nothing.
    """
    import functools

    import jax
    import jax.numpy as jnp
    import numpyro
    import optax
    from numpyro import handlers

    import numpyro_glow
    from numpyro_glow import nets
    from numpyro_glow.glow import default_unroll, num_parameters

    if xla_convs:
        xla_net = nets.conv_net_for(precision, matmul_convs=False)
        nets.conv_net_for = lambda precision="float32", matmul_convs=False: xla_net

    xj = jnp.asarray(x)

    def model(init_data=None):
        return numpyro_glow.glow(
            "g",
            cfg["shape"],
            levels=cfg["levels"],
            depth=cfg["depth"],
            hidden_channels=cfg["hidden"],
            coupling="affine",
            lu=True,
            learn_top=False,
            alpha=None,
            unroll=unroll,
            precision=precision,
            init_data=init_data,
        )

    trace = handlers.trace(handlers.seed(model, 0)).get_trace(xj)
    params = {k: s["value"] for k, s in trace.items() if s["type"] == "param"}
    jax.block_until_ready(params)

    def mean_log_prob(p, xb):
        return handlers.substitute(model, p)().log_prob(xb).mean()

    opt = optax.adam(LEARNING_RATE)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, xb):
        loss, grads = jax.value_and_grad(lambda q: -mean_log_prob(q, xb))(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    log_prob_jit = jax.jit(mean_log_prob)
    state = {"params": params, "opt": opt.init(params)}
    # the train step donates the parameters: log_prob reads its own copy
    lp_params = jax.tree.map(jnp.copy, params)

    def log_prob():
        return float(log_prob_jit(lp_params, xj))

    def train_step():
        state["params"], state["opt"], loss = step(state["params"], state["opt"], xj)
        return float(loss)

    notes = f"unroll={unroll if unroll is not None else default_unroll()}"
    if precision != "float32":
        notes += f", {precision}"
    if xla_convs:
        notes += ", XLA convolutions"
    return SimpleNamespace(
        versions={
            "jax": jax.__version__,
            "numpyro": numpyro.__version__,
            "optax": optax.__version__,
            "device": jax.devices()[0].device_kind,
        },
        params=num_parameters(params),
        log_prob=log_prob,
        train_step=train_step,
        notes=notes,
        xla_flops=lambda: {
            "log_prob": _xla_flops(log_prob_jit, lp_params, xj),
            "train": _xla_flops(step, state["params"], state["opt"], xj),
        },
    )


def model_flops(cfg: dict) -> dict[str, float]:
    """Floating-point operations of one batch through the model of ``cfg``, counted
    by hand: the multiply-adds (2 flops each) of every coupling network (3x3 conv
    C/2 -> h, 1x1 conv h -> h, 3x3 conv h -> C), every 1x1 invertible convolution
    (C -> C) and every split prior's 3x3 conv (C/2 -> C), on the squeezed
    (H/2^(l+1)) x (W/2^(l+1)) x 4C 2^l grid of level l; elementwise work is left
    out. ``train`` counts the backward pass as twice the forward (one product
    for the input gradient, one for the weight gradient), the usual convention.

    XLA's own count (``xla_flops`` in the JSON) is no substitute: it sees one
    iteration of a rolled scan, and on GPU not the cuDNN convolutions at all.
    """
    height, width, channels = cfg["shape"]
    hidden, forward = cfg["hidden"], 0.0
    for level in range(cfg["levels"]):
        pixels = (height // 2 ** (level + 1)) * (width // 2 ** (level + 1))
        c = channels * 4 * 2**level
        step = 9 * (c // 2) * hidden + hidden * hidden + 9 * hidden * c + c * c
        forward += cfg["depth"] * 2 * pixels * step
        if level < cfg["levels"] - 1:
            forward += 2 * pixels * 9 * (c // 2) * c
    forward *= cfg["batch"]
    return {"log_prob": forward, "train": 3 * forward}


def _xla_flops(fn, *args) -> float | None:
    """Floating-point operations of one call of the jitted ``fn``, as XLA's cost
    analysis of the compiled program counts them (None where it has none)."""
    try:
        cost = fn.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None


# numpyro-glow's rows: build_numpyro's keyword arguments per stack (labels in STACKS)
NUMPYRO_VARIANTS = {
    "numpyro": {},
    "numpyro_rolled": {"unroll": 1},
    "numpyro_unrolled": {"unroll": True},
    "numpyro_rolled_xla": {"unroll": 1, "xla_convs": True},
    "numpyro_bf16": {"precision": "bfloat16"},
    "numpyro_xla_convs": {"xla_convs": True},
    "numpyro_unrolled_xla": {"unroll": True, "xla_convs": True},
    "numpyro_unroll4": {"unroll": 4},
    "numpyro_unroll8": {"unroll": 8},
    "numpyro_unrolled_bf16": {"unroll": True, "precision": "bfloat16"},
}


def build_tfp(cfg: dict, x, threads: int):
    """TensorFlow Probability's ``tfb.Glow``, ``tf.function`` graphs."""
    import functools

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import tensorflow_probability as tfp
    import tf_keras

    tfb, tfd = tfp.bijectors, tfp.distributions
    tf.random.set_seed(0)
    bijector = tfb.Glow(
        output_shape=cfg["shape"],
        num_glow_blocks=cfg["levels"],
        num_steps_per_block=cfg["depth"],
        coupling_bijector_fn=functools.partial(tfb.GlowDefaultNetwork, num_hidden=cfg["hidden"]),
        exit_bijector_fn=tfb.GlowDefaultExitNetwork,
        seed=0,
    )
    z_shape = bijector.inverse_event_shape(cfg["shape"])
    density = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), z_shape), bijector)
    variables = bijector.trainable_variables
    opt = tf_keras.optimizers.Adam(LEARNING_RATE)
    xt = tf.constant(x)

    @tf.function
    def mean_log_prob(xb):
        return tf.reduce_mean(density.log_prob(xb))

    @tf.function
    def step(xb):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(density.log_prob(xb))
        grads = tape.gradient(loss, variables)
        opt.apply_gradients(zip(grads, variables, strict=True))
        return loss

    return SimpleNamespace(
        versions={"tensorflow": tf.__version__, "tensorflow_probability": tfp.__version__},
        params=int(sum(v.shape.num_elements() for v in variables)),
        log_prob=lambda: float(mean_log_prob(xt).numpy()),
        train_step=lambda: float(step(xt).numpy()),
        notes="tf.function",
    )


def build_normflows(cfg: dict, x, threads: int):
    """normflows' Glow blocks in a ``MultiscaleFlow``, eager PyTorch."""
    import normflows as nf
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(threads)
    torch.manual_seed(0)
    h, w, c = cfg["shape"]
    levels, hidden = cfg["levels"], cfg["hidden"]
    q0, merges, flows = [], [], []
    for i in range(levels):  # i = 0 is the coarsest level, as in normflows' example
        blocks = [
            nf.flows.GlowBlock(
                c * 2 ** (levels + 1 - i),
                hidden,
                scale=True,
                scale_map="sigmoid",
                split_mode="channel",
                use_lu=True,
            )
            for _ in range(cfg["depth"])
        ]
        flows.append([*blocks, nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
        else:
            latent = (c * 2 ** (levels + 1), h // 2**levels, w // 2**levels)
        q0.append(nf.distributions.DiagGaussian(latent, trainable=False))
    model = nf.MultiscaleFlow(q0, flows, merges, class_cond=False).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)  # NCHW

    def log_prob():
        with torch.no_grad():
            return model.log_prob(xt, None).mean().item()

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = -model.log_prob(xt, None).mean()
        loss.backward()
        opt.step()
        return loss.item()

    return SimpleNamespace(
        versions={
            "torch": torch.__version__,
            "normflows": nf.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "tf32 convs": torch.backends.cudnn.allow_tf32,
            "tf32 matmuls": torch.backends.cuda.matmul.allow_tf32,
        },
        params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        log_prob=log_prob,
        train_step=train_step,
        notes=f"eager, {device}",
    )


BUILDERS = {
    **{
        stack: functools.partial(build_numpyro, **kwargs)
        for stack, kwargs in NUMPYRO_VARIANTS.items()
    },
    "tfp": build_tfp,
    "normflows": build_normflows,
}


# --------------------------------------------------------------------------- child


def run_child(stack: str, cfg: dict, args: argparse.Namespace) -> dict:
    """Build and time one stack on one config, in this (fresh) process."""
    if args.device == "cpu":
        _pin_threads(args.threads)
    x = _data(cfg)
    import_s, _ = _timed(lambda: [importlib.import_module(m) for m in STACKS[stack][2]])
    rss_import = _rss_mib()
    build_s, bench = _timed(lambda: BUILDERS[stack](cfg, x, args.threads))
    dims = x[0].size
    result = {
        "stack": stack,
        "params": int(bench.params),
        "versions": bench.versions,
        "notes": bench.notes,
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)),
        "import_s": import_s,
        "rss_after_import_mib": rss_import,
        "build_s": build_s,
        "peak_rss_after_build_mib": _peak_rss_mib(),
    }
    if not args.params_only:
        lp = _measure(bench.log_prob, args.warmup, args.repeats)
        result["init_nll_per_dim"] = -lp["first_value"] / dims
        result["log_prob"] = lp
        result["log_prob_img_s"] = cfg["batch"] / lp["median_s"]
        result["peak_rss_after_log_prob_mib"] = _peak_rss_mib()
        tr = _measure(bench.train_step, args.warmup, args.repeats)
        result["train"] = tr
        result["train_img_s"] = cfg["batch"] / tr["median_s"]
        flops = model_flops(cfg)
        result["flops"] = flops
        for key, timing in (("log_prob", lp), ("train", tr)):
            result[f"{key}_tflop_s"] = flops[key] / timing["median_s"] / 1e12
        if hasattr(bench, "xla_flops"):  # after the timings: it compiles both again
            result["xla_flops"] = bench.xla_flops()
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


# -------------------------------------------------------------------------- parent


def _child_env(threads: int, device: str) -> dict:
    env = dict(os.environ)
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    if device == "cpu":
        env.update(
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
            OPENBLAS_NUM_THREADS=str(threads),
            CUDA_VISIBLE_DEVICES="",
            JAX_PLATFORMS="cpu",
        )
    else:  # one process at a time owns the GPU: no preallocation of 75% of it
        env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return env


def spawn(stack: str, config: str, cfg: dict, args: argparse.Namespace) -> dict:
    """Run one (stack, config) in a fresh interpreter; its JSON result, or the error."""
    python = sys.executable if STACKS[stack][1] == "ours" else args.peers_python
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--child",
        stack,
        "--child-config",
        json.dumps(cfg),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    if args.params_only:
        cmd.append("--params-only")
    print(f"[peers] {config}: {stack} ({python}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=_child_env(args.threads, args.device),
            cwd=HERE.parent,
            timeout=args.timeout,
        )
    except subprocess.TimeoutExpired:
        return {"stack": stack, "error": f"timed out after {args.timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        print(f"[peers] {config}: {stack} FAILED (rc {proc.returncode}):\n{tail}", file=sys.stderr)
        return {"stack": stack, "error": f"rc {proc.returncode}: {tail[-2000:]}"}
    result = json.loads(lines[-1][len(RESULT_TAG) :])
    result["wall_s"] = time.perf_counter() - t0
    print(f"[peers] {config}: {stack} done in {result['wall_s']:.0f} s", file=sys.stderr)
    return result


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict, configs: dict, params_only: bool) -> str:
    """One markdown table over every config and stack."""
    if params_only:
        rows = ["| config | stack | params |", "|---|---|---|"]
    else:
        rows = [
            "| config | stack | params | init NLL (nats/dim) | log_prob (img/s) | vs ours "
            "| train step (img/s) | vs ours | build (s) | log_prob first call (s) "
            "| train first call (s) | peak RSS (MiB) | after import (MiB) | train TFLOP/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for config, per_stack in results.items():
        cfg = configs[config]
        label = (
            f"{config}: {'x'.join(map(str, cfg['shape']))}, L={cfg['levels']}, "
            f"K={cfg['depth']}, {cfg['hidden']} ch, batch {cfg['batch']}"
        )
        ours = per_stack.get("numpyro", {})
        for stack, r in per_stack.items():
            name = STACKS[stack][0]
            if "error" in r:
                rows.append(f"| {label} | {name} | failed: {r['error'].splitlines()[0][:80]} |")
                continue
            if params_only:
                rows.append(f"| {label} | {name} | {r['params']:,} |")
                continue
            lp_ratio = tr_ratio = None
            if "log_prob_img_s" in ours:
                lp_ratio = r["log_prob_img_s"] / ours["log_prob_img_s"]
                tr_ratio = r["train_img_s"] / ours["train_img_s"]
            rows.append(
                f"| {label} | {name} | {r['params']:,} | {r['init_nll_per_dim']:.3f} "
                f"| {r['log_prob_img_s']:.1f} | {_fmt(lp_ratio, '.2f')}x "
                f"| {r['train_img_s']:.1f} | {_fmt(tr_ratio, '.2f')}x | {r['build_s']:.1f} "
                f"| {r['log_prob']['first_call_s']:.2f} | {r['train']['first_call_s']:.2f} "
                f"| {r['peak_rss_mib']:.0f} | {r['rss_after_import_mib']:.0f} "
                f"| {_fmt(r.get('train_tflop_s'), '.2f')} |"
            )
    return "\n".join(rows)


def _write(out: Path, results: dict, configs: dict, args: argparse.Namespace) -> str:
    """Write the JSON record and the markdown table of ``results`` so far."""
    md = table({c: r for c, r in results.items() if r}, configs, args.params_only)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
        "configs": configs,
        "results": results,
        "table": md,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(md + "\n")
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    parser.add_argument("--configs", default="a,b", help="comma-separated, from: a, b, paper")
    parser.add_argument("--batch", type=int, default=None, help="override every config's batch")
    parser.add_argument("--stacks", default=",".join(STACKS), help="from: " + ", ".join(STACKS))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats: a smoke run")
    parser.add_argument("--params-only", action="store_true", help="build and count, no timing")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every framework")
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: every child pinned to --threads CPUs, GPUs hidden; gpu: JAX and "
        "PyTorch on the first GPU (TFP is CPU-only here)",
    )
    parser.add_argument(
        "--peers-python",
        default="/work/peers-venv/bin/python",
        help="interpreter with TFP and normflows (benchmarks/requirements-peers.txt)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    parser.add_argument("--out", default=None, help="JSON path (default results/peers.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 10

    if args.child:  # a child: one stack, one config, one JSON line
        cfg = json.loads(args.child_config)
        cfg["shape"] = tuple(cfg["shape"])
        print(RESULT_TAG + json.dumps(run_child(args.child, cfg, args)), flush=True)
        return

    all_configs = QUICK_CONFIGS if args.quick else CONFIGS
    configs = {c: dict(all_configs[c]) for c in args.configs.split(",")}
    if args.batch is not None:
        for cfg in configs.values():
            cfg["batch"] = args.batch
    stacks = args.stacks.split(",")
    unknown = [s for s in stacks if s not in STACKS]
    if unknown:
        parser.error(f"unknown stacks {unknown}; choose from {list(STACKS)}")
    suffix = "_gpu" if args.device == "gpu" else ""
    suffix += "_quick" if args.quick else ""
    suffix += "_params" if args.params_only else ""
    out = Path(args.out) if args.out else HERE / "results" / f"peers{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for config, cfg in configs.items():
        results[config] = {}
        for stack in stacks:
            results[config][stack] = spawn(stack, config, cfg, args)
            md = _write(out, results, configs, args)  # after every child: a crash keeps the rest
    print(md)
    print(f"\nwrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
