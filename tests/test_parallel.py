"""Data-parallel training: a batch split over 4 (host) devices trains like one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from numpyro_glow import parallel
from numpyro_glow.data import ImageData
from numpyro_glow.train import GlowConfig, TrainConfig, Trainer

# XLA_FLAGS must be set before JAX starts, so the 4-device run is a subprocess. It
# trains the same tiny Glow on 8x8 digits for 6 steps on one device and on 4, in one
# process, and prints both loss trajectories and where the arrays live.
SCRIPT = textwrap.dedent(
    """
    import json

    import jax
    import numpy as np

    from numpyro_glow.data import load
    from numpyro_glow.train import GlowConfig, TrainConfig, Trainer

    splits = load("digits")
    train_part, val = splits.train.subset(slice(0, 64)), splits.test.subset(slice(0, 32))
    model = GlowConfig(levels=1, depth=2, hidden_channels=8)  # dropout 0.1: random masks
    out = {"device_count": jax.device_count()}
    for devices in (None, 4):
        config = TrainConfig(model=model, batch_size=16, dequantization="uniform", devices=devices)
        trainer = Trainer(config, train_part, val)
        density = trainer.density
        state = trainer.init_state()
        losses, shards = [], []
        for step in range(6):
            k, y = trainer.batch(step)  # on one device: NumPy, transferred by the step
            k = jax.device_put(k) if devices is None else k
            shards.append(len(k.addressable_shards))
            state = trainer.step(state, k, y)
            losses.append(float(state.loss))
        params = density.svi.get_params(state.svi)
        n = 1 if devices is None else devices
        out[str(devices)] = {
            "losses": losses,
            "batch_shards": shards,
            "batch_spec": str(k.sharding.spec) if devices else None,
            "shard_shape": list(k.addressable_shards[0].data.shape),
            "state_replicated": all(
                a.sharding.is_fully_replicated and len(a.sharding.device_set) == n
                for a in jax.tree.leaves((state.svi, state.ema, state.best, state.step))
            ),
            "validation_bpd": density.bits_per_dim(params, val, jax.random.PRNGKey(7), batch=16),
            "odd_chunk_replicated": devices is not None
            and density.place(val.x[:6])[0].sharding.is_fully_replicated,
        }
    try:
        Trainer(TrainConfig(model=model, batch_size=18, devices=4), train_part, val)
    except ValueError as e:
        out["batch_size_error"] = str(e)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def runs():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two trainings in a 4-device subprocess
def test_four_devices_match_one(runs):
    one, four = runs["None"], runs["4"]
    assert runs["device_count"] == 4
    assert len(one["losses"]) == 6 and np.all(np.isfinite(one["losses"]))
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(four["validation_bpd"], one["validation_bpd"], rtol=1e-5)


@pytest.mark.slow  # two trainings in a 4-device subprocess
def test_four_devices_split_the_batch(runs):
    one, four = runs["None"], runs["4"]
    assert one["batch_shards"] == [1] * 6 and one["shard_shape"] == [16, 8, 8, 1]
    assert four["batch_shards"] == [4] * 6 and four["shard_shape"] == [4, 8, 8, 1]
    assert "'batch'" in four["batch_spec"]  # P('batch',): axis 0 over the mesh
    assert one["state_replicated"] and four["state_replicated"]  # on 1 and on 4 devices
    assert four["odd_chunk_replicated"]  # an evaluation chunk of 6 does not split over 4


def _tiny(**kw) -> tuple[TrainConfig, ImageData]:
    x = np.random.default_rng(0).integers(0, 5, size=(16, 4, 4, 1)).astype(np.uint8)
    config = TrainConfig(model=GlowConfig(levels=1, depth=1, hidden_channels=4), **kw)
    return config, ImageData(x, None, 5, "small")


@pytest.mark.slow  # two trainings in a 4-device subprocess
def test_batch_size_must_divide_over_devices(runs):
    message = runs["batch_size_error"]  # Trainer(batch_size=18, devices=4)
    assert "batch size 18" in message and "number of devices 4" in message


def test_check_batch_size_counts_devices():
    mesh = SimpleNamespace(devices=np.empty(3, object))  # the check only counts devices
    with pytest.raises(ValueError, match=r"batch size 7 is not divisible .* devices 3"):
        parallel.check_batch_size(7, mesh)
    parallel.check_batch_size(9, mesh)


def test_too_many_devices():
    import jax

    n = jax.device_count() + 3
    config, data = _tiny(batch_size=n, devices=n)
    with pytest.raises(
        ValueError,
        match=rf"{n} devices requested but only {n - 3} .*"
        r"XLA_FLAGS=--xla_force_host_platform_device_count=N",
    ):
        Trainer(config, data, data)


def test_bad_devices_value():
    with pytest.raises(ValueError, match="positive integer or 'all'"):
        parallel.resolve_devices(0)
    assert len(parallel.resolve_devices("all")) >= 1


def test_cli_devices_flag():
    from numpyro_glow.cli import _parser

    args = _parser().parse_args(["train", "--devices", "4", "--distributed"])
    assert args.devices == 4 and args.distributed
    assert _parser().parse_args(["train", "--devices", "all"]).devices == "all"
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--devices", "0"])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """``numpyro-glow train --distributed``: 2 processes with 2 host devices each
    (a 4-device mesh over two JAX processes, on localhost) write the metrics of
    one device. About 2 minutes on 2 cores."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = ["--levels", "1", "--depth", "2", "--hidden-channels", "8", "--steps", "4"]
    args += ["--dequantization", "uniform", "--batch-size", "16", "--eval-every", "2"]
    args += ["--checkpoint-every", "2", "--no-progress"]
    cmd = [sys.executable, "-m", "numpyro_glow.cli", "train", *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    multi = [
        cmd
        + ["--out", str(tmp_path / "multi"), "--distributed", "--num-processes", "2"]
        + ["--coordinator-address", f"localhost:{port}", "--process-id", str(i)]
        for i in range(2)
    ]
    host2 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen(c, env=host2, stderr=subprocess.PIPE, text=True) for c in multi]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:]
    one = subprocess.run(cmd + ["--out", str(tmp_path / "one")], env=env, timeout=600)
    assert one.returncode == 0

    def metrics(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(s) for s in lines]

    got, want = metrics("multi"), metrics("one")
    assert len(got) == len(want) == 3  # steps 2 and 4, then the summary
    for key in ("train_bpd", "validation_bpd"):
        np.testing.assert_allclose([r[key] for r in got[:2]], [r[key] for r in want[:2]], rtol=1e-5)
    np.testing.assert_allclose(got[2]["test_bpd"], want[2]["test_bpd"], rtol=1e-5)
