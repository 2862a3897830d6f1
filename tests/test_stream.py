"""The streaming input: ``numpyro-glow prepare``, the lazy shards of ``stream:DIR``,
grain's batches (a function of seed and step, split over processes), training
and resuming on them, ``--n-bits``, and bad input. Tiny shapes: the runs share
test_train.py's compiled model (4x4x1 images, 5 levels)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import TINY_ARGS
from PIL import Image
from test_train import _config as _train_config

from numpyro_glow import checkpoint, cli
from numpyro_glow import prepare as prep
from numpyro_glow.data import ImageData, Splits, load, reduce_bits
from numpyro_glow.stream import MANIFEST, batches, iterate
from numpyro_glow.train import Trainer, train

pytest.importorskip("grain")


def _config(tmp_path, data, **kw):
    """test_train.py's tiny run (the same compiled model) on ``data``."""
    return _train_config(tmp_path, **{"data": data, "temperatures": (1.0,), **kw})


def _metrics(folder):
    return [json.loads(s) for s in (folder / "metrics.jsonl").read_text().splitlines()]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_npz):
    """small_npz prepared in shards of 7 images (so batches cross shards)."""
    out = tmp_path_factory.mktemp("stream") / "small"
    prep.prepare(f"npz:{small_npz}", out, shard_size=7, progress=False)
    return out


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory, prepared):
    """6 uninterrupted steps on stream:prepared, checkpointed every 2."""
    tmp = tmp_path_factory.mktemp("stream_run")
    summary = train(_config(tmp, f"stream:{prepared}"))
    return tmp / "run", summary


def test_prepare_writes_what_load_reads(prepared, small_npz, tmp_path, capsys):
    got, want = load(f"stream:{prepared}"), load(f"npz:{small_npz}")
    for part in ("train", "test"):
        g, w = getattr(got, part), getattr(want, part)
        assert g.x.shape == w.x.shape and g.levels == w.levels == 5
        np.testing.assert_array_equal(g.x[:], w.x)  # across shard boundaries
        np.testing.assert_array_equal(g.y[:], w.y)
        idx = np.array([len(w.x) - 1, 0, 7, 6, 3])
        np.testing.assert_array_equal(g.x[idx], w.x[idx])
        np.testing.assert_array_equal(g.subset(idx).y[1:3], w.y[idx[1:3]])
    meta = json.loads((prepared / MANIFEST).read_text())
    assert meta["images"] == {"train": 48, "test": 12} and meta["num_classes"] == 3
    assert [r["count"] for r in meta["splits"]["train"]] == [7] * 6 + [6]
    assert not list(prepared.glob(".*"))  # no temporary or progress file left
    # the command line prints the training command, and refuses to write over a data set
    assert cli.main(["prepare", f"npz:{small_npz}", str(tmp_path / "p"), "--no-progress"]) == 0
    assert f"numpyro-glow train --data stream:{tmp_path / 'p'}" in capsys.readouterr().out
    before = _snapshot(tmp_path / "p")
    assert cli.main(["prepare", "digits", str(tmp_path / "p"), "--no-progress"]) == 2
    assert "already holds a prepared data set" in capsys.readouterr().err
    assert _snapshot(tmp_path / "p") == before


def test_prepare_resumes_after_an_interruption(small_npz, tmp_path, monkeypatch):
    calls, write = [], prep._write_npy

    def failing(path, a):
        calls.append(path.name)
        if len(calls) == 5:  # the third shard's pixels
            raise KeyboardInterrupt
        return write(path, a)

    monkeypatch.setattr(prep, "_write_npy", failing)
    out = tmp_path / "p"
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(f"npz:{small_npz}", out, shard_size=10, progress=False)
    assert not (out / MANIFEST).exists() and (out / prep.STATE).exists()
    assert sorted(p.name for p in out.glob("*.npy")) == [
        "train-00000.labels.npy",
        "train-00000.npy",
        "train-00001.labels.npy",
        "train-00001.npy",
    ]  # the interrupted shard left nothing under its name, nor a temporary file
    with pytest.raises(FileNotFoundError, match="prepare did not finish"):
        load(f"stream:{out}")
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    monkeypatch.setattr(prep, "_write_npy", write)
    resumed = prep.prepare(f"npz:{small_npz}", out, shard_size=10, progress=False)
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done  # not written again
    fresh = prep.prepare(f"npz:{small_npz}", tmp_path / "q", shard_size=10, progress=False)
    assert resumed["splits"] == fresh["splits"]  # the same shards, byte for byte
    # another source into the unfinished folder of this one is refused
    (out / MANIFEST).rename(out / "m")
    (out / prep.STATE).write_text(json.dumps({"plan": "other", "source": "x"}))
    with pytest.raises(ValueError, match="unfinished prepare of another source"):
        prep.prepare(f"npz:{small_npz}", out, shard_size=10, progress=False)


def _png(path, a):
    Image.fromarray(a).save(path)


def test_prepare_folder_resizes_validates_and_skips(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
    wide = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)  # H=4, W=6: the center is cols 1..4
    _png(folder / "cat" / "a.png", wide)
    for i in range(5):
        _png(folder / "dog" / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (folder / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    args = ["prepare", f"folder:{folder}", str(tmp_path / "p"), "--size", "4", "--no-progress"]
    args += ["--test-size", "0.5"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert str(folder / "dog" / "bad.png") in err and "--skip-bad" in err
    assert not (tmp_path / "p").exists()  # found before anything was written
    assert cli.main([*args, "--skip-bad"]) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out
    meta = json.loads((tmp_path / "p" / MANIFEST).read_text())
    assert meta["shape"] == [4, 4, 3] and meta["classes"] == ["cat", "dog"]
    assert meta["bad_files"] == [str(folder / "dog" / "bad.png")] and meta["skipped"] == 1
    splits = load(f"stream:{tmp_path / 'p'}")
    x = np.concatenate([splits.train.x[:], splits.test.x[:]])
    y = np.concatenate([splits.train.y[:], splits.test.y[:]])
    assert len(x) == 6 and sorted(y.tolist()) == [0, 1, 1, 1, 1, 1]
    np.testing.assert_array_equal(x[y == 0][0], wide[:, 1:5])  # center crop, no resize
    # without --size, images of several sizes are refused, naming one
    with pytest.raises(ValueError, match="images of several sizes.*--size"):
        prep.prepare(f"folder:{folder}", tmp_path / "r", skip_bad=True, progress=False)


def test_unreadable_or_missing_folder(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        prep.prepare(f"folder:{tmp_path / 'nope'}", tmp_path / "p", progress=False)
    folder = tmp_path / "locked"
    folder.mkdir()

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(folder), "iterdir", refuse)
    with pytest.raises(PermissionError, match=f"{folder}: cannot read the folder"):
        prep.prepare(f"folder:{folder}", tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


def test_bad_shards_are_named(prepared, tmp_path, small_npz):
    def copy():
        target = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        shutil.copytree(prepared, target)
        return target

    # a missing shard
    d = copy()
    (d / "train-00003.npy").unlink()
    with pytest.raises(FileNotFoundError, match=f"missing shard {d / 'train-00003.npy'}"):
        load(f"stream:{d}")
    # a truncated shard
    d = copy()
    with open(d / "test-00001.npy", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=f"{d / 'test-00001.npy'}: expected .* got 100"):
        load(f"stream:{d}")
    # a shard of another data set, of the same size: found when it is first read
    other = tmp_path / "other"
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "o.npz", x=rng.integers(0, 5, (60, 4, 4, 1)).astype(np.uint8))
    prep.prepare(f"npz:{tmp_path / 'o.npz'}", other, shard_size=7, progress=False)
    d = copy()
    shutil.copy(other / "train-00002.npy", d / "train-00002.npy")
    data = load(f"stream:{d}").train  # opening only stats the files
    np.testing.assert_array_equal(data.x[:14], load(f"stream:{prepared}").train.x[:14])
    with pytest.raises(ValueError, match=f"{d / 'train-00002.npy'}: .*another data set"):
        data.x[14:21]
    # a manifest of another format
    d = copy()
    (d / MANIFEST).write_text(json.dumps({"format": "tfrecord"}))
    with pytest.raises(ValueError, match=f"{d / MANIFEST}: expected format"):
        load(f"stream:{d}")


def test_batches_depend_on_seed_and_step_only(prepared):
    train_part = load(f"stream:{prepared}").train
    one = batches(train_part, 8, seed=3)
    halves = [batches(train_part, 8, 3, p, 2) for p in range(2)]
    seen = []
    for step in range(12):  # two epochs of 6 batches
        x, y = one[step]
        assert x.shape == (8, 4, 4, 1) and y.shape == (8,)
        np.testing.assert_array_equal(np.concatenate([h[step][0] for h in halves]), x)
        seen.append(x)
    # every image once per epoch, in another order the next epoch
    all_x = train_part.x[:]
    epoch = np.concatenate(seen[:6]).reshape(48, -1)
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, all_x.reshape(48, -1)))
    assert not np.array_equal(np.concatenate(seen[:6]), np.concatenate(seen[6:]))
    assert not np.array_equal(batches(train_part, 8, seed=4)[0][0], seen[0])
    # the iterator's state is the position: restored, it continues with the same batches
    it = iterate(one, threads=2)
    first = [next(it)[0] for _ in range(3)]
    assert it.get_state() == {"next_index": 3}
    again = iterate(one)
    again.set_state({"next_index": 2})
    np.testing.assert_array_equal(next(again)[0], first[2])
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        batches(train_part, 8, 0, 0, 3)


def test_train_on_a_stream(stream_run, prepared):
    out, summary = stream_run
    lines = _metrics(out)
    assert [r["step"] for r in lines[:-1]] == [2, 4, 6]
    assert math.isfinite(summary["test_bpd"]) and summary["test_images"] == 12
    assert summary["train_images"] == 36 and summary["validation_images"] == 12
    meta = checkpoint.read_metadata(out / "checkpoint.npz")
    assert meta["data_position"] == {"next_index": 6}
    # the batches of the trainer are grain's, from the validation split's rest
    cfg = _config(out.parent, f"stream:{prepared}")
    splits = load(cfg.data)
    from numpyro_glow.data import train_validation_split

    parts = train_validation_split(splits.train, cfg.validation_size, cfg.seed)
    trainer = Trainer(cfg, parts.train, parts.test, 3)
    k, _ = trainer.batch(5)
    np.testing.assert_array_equal(np.asarray(k), batches(parts.train, 8, cfg.seed)[5][0])


def test_evaluate_streams_the_test_split(stream_run, capsys):
    out, summary = stream_run
    assert cli.main(["evaluate", str(out / "best.npz")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test_images"] == 12
    np.testing.assert_allclose(result["test_bpd"], summary["test_bpd"], rtol=1e-6)


def test_resume_after_a_crash_mid_epoch_matches(stream_run, prepared, tmp_path, monkeypatch):
    """Stopped at step 5 (its batch holds the last 4 images of the first epoch and the
    first 4 of the second), resumed from step 4's checkpoint: the same losses and
    scores as the uninterrupted run.
    (The SIGKILL of a real process: test_sigkill_resume in the slow tests.)"""
    out_a, full = stream_run
    real_step = Trainer.step

    def crash(self, state, k, y):
        if int(state.step) == 4:
            raise SystemExit("killed")
        return real_step(self, state, k, y)

    monkeypatch.setattr(Trainer, "step", crash)
    with pytest.raises(SystemExit):
        train(_config(tmp_path, f"stream:{prepared}"))
    assert checkpoint.read_metadata(tmp_path / "run" / "checkpoint.npz")["step"] == 4
    monkeypatch.setattr(Trainer, "step", real_step)
    resumed = train(_config(tmp_path, f"stream:{prepared}"), resume=True)
    a = [r for r in _metrics(out_a) if "step" in r]
    b = [r for r in _metrics(tmp_path / "run") if "step" in r]
    assert [r["train_bpd"] for r in b] == [r["train_bpd"] for r in a]
    np.testing.assert_allclose([r["validation_bpd"] for r in b], [r["validation_bpd"] for r in a])
    np.testing.assert_allclose(resumed["test_bpd"], full["test_bpd"], rtol=1e-6)


def test_n_bits_5_against_a_brute_force_count(tmp_path):
    """The Glow paper's 5 bits: each 8-bit pixel becomes the number of the
    thresholds 8, 16, ..., 248 it reaches (32 levels), read from an npz and
    from its stream alike."""
    x = np.arange(256, dtype=np.uint8).reshape(16, 4, 4, 1)  # every 8-bit value
    np.savez(tmp_path / "8bit.npz", x=x)
    prep.prepare(f"npz:{tmp_path / '8bit.npz'}", tmp_path / "s", progress=False)
    for spec in (f"npz:{tmp_path / '8bit.npz'}", f"stream:{tmp_path / 's'}"):
        original = load(f"npz:{tmp_path / '8bit.npz'}")
        splits = reduce_bits(load(spec), 5)
        assert splits.train.levels == splits.test.levels == 32
        got = np.concatenate([splits.train.x[:], splits.test.x[:]])
        order = np.concatenate([original.train.x, original.test.x])
        brute = sum((order >= t).astype(np.uint8) for t in range(8, 256, 8))
        np.testing.assert_array_equal(got, brute)
    assert sorted(np.unique(got).tolist()) == list(range(32))


def test_n_bits_against_a_brute_force_count(tmp_path, capsys):
    """8-bit pixels at --n-bits 2: each pixel becomes the number of thresholds
    64, 128, 192 it reaches, 4 levels; the run's test bits/dim is the bound of
    those pixels with 4 levels."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (60, 4, 4, 1)).astype(np.uint8)
    x[0, 0, 0, 0], x[0, 0, 1, 0] = 0, 255
    np.savez(tmp_path / "8bit.npz", x=x)
    counted = sum((x >= t).astype(np.uint8) for t in (64, 128, 192))  # brute force
    prep.prepare(f"npz:{tmp_path / '8bit.npz'}", tmp_path / "s", progress=False)
    for spec in (f"npz:{tmp_path / '8bit.npz'}", f"stream:{tmp_path / 's'}"):
        splits = reduce_bits(load(spec), 2)
        assert splits.train.levels == splits.test.levels == 4
        got = np.concatenate([splits.train.x[:], splits.test.x[:]])
        want = load(f"npz:{tmp_path / '8bit.npz'}")
        order = np.concatenate([want.train.x, want.test.x])
        np.testing.assert_array_equal(got, sum((order >= t) for t in (64, 128, 192)))
        assert sorted(np.unique(got).tolist()) == [0, 1, 2, 3]
    assert sorted(np.unique(counted).tolist()) == [0, 1, 2, 3]
    cfg = _config(tmp_path, f"npz:{tmp_path / '8bit.npz'}", n_bits=2, steps=2)
    summary = train(cfg)
    from numpyro_glow.train import load_model

    density, params, _ = load_model(tmp_path / "run" / "best.npz")
    assert density.info.levels == 4
    test = load(cfg.data).test  # 8-bit
    brute = ImageData(sum((test.x >= 64 * j) for j in (1, 2, 3)).astype(np.uint8), None, 4, "b")
    bpd = density.bits_per_dim(params, brute, jax.random.PRNGKey(11))
    np.testing.assert_allclose(summary["test_bpd"], bpd, rtol=1e-6)
    assert cli.main(["evaluate", str(tmp_path / "run" / "best.npz")]) == 0  # at --n-bits 2
    np.testing.assert_allclose(json.loads(capsys.readouterr().out)["test_bpd"], bpd, rtol=1e-6)
    # 17 levels (the digits) cannot be reduced to bits
    with pytest.raises(ValueError, match="--n-bits: .* 17 pixel levels"):
        reduce_bits(
            Splits(ImageData(x[:2] % 17, None, 17, "d"), ImageData(x[:1] % 17, None, 17, "d")), 3
        )


def test_reading_does_not_map_the_data(prepared):
    """Shards are read with pread, not memory-mapped: no file of the set is mapped."""
    data = load(f"stream:{prepared}").train
    data.x[:]
    maps = open(f"/proc/{os.getpid()}/maps").read() if os.path.exists("/proc") else ""
    assert str(prepared) not in maps


# --- slow: real processes ------------------------------------------------------------

_CLI = [sys.executable, "-m", "numpyro_glow.cli"]
_KILL_AT_STEP_5 = """
import os, signal, sys
from numpyro_glow import cli
from numpyro_glow.train import Trainer
real = Trainer.step
def step(self, state, k, y):
    if int(state.step) == 4:  # after step 4's checkpoint, as step 5 crosses into epoch 2
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, state, k, y)
Trainer.step = step
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow  # two processes, each compiling the model: about a minute
def test_sigkill_resume(stream_run, prepared, tmp_path):
    """A run SIGKILLed at step 5, then ``--resume``d from the command line, writes
    the loss trajectory of the uninterrupted run."""
    out = tmp_path / "run"
    args = ["train", "--data", f"stream:{prepared}", "--out", str(out), "--steps", "6"]
    args += TINY_ARGS
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    killed = subprocess.run([sys.executable, "-c", _KILL_AT_STEP_5, *args], env=env, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint.read_metadata(out / "checkpoint.npz")["data_position"] == {"next_index": 4}
    assert not list(out.glob(".*"))  # no temporary file from the killed process
    resumed = subprocess.run([*_CLI, *args, "--resume"], env=env, timeout=600)
    assert resumed.returncode == 0
    a = [r for r in _metrics(stream_run[0]) if "step" in r]
    b = [r for r in _metrics(out) if "step" in r]
    assert [r["train_bpd"] for r in b] == [r["train_bpd"] for r in a]
    np.testing.assert_allclose([r["validation_bpd"] for r in b], [r["validation_bpd"] for r in a])


@pytest.mark.slow  # three processes compiling the model: about 2 minutes on 2 cores
def test_two_processes_stream_match_one(prepared, tmp_path):
    """``--distributed`` on stream:DIR: 2 processes with 2 host devices each, each
    reading its half of every batch, write the metrics of one process."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = ["train", "--data", f"stream:{prepared}", "--steps", "4", *TINY_ARGS]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    host2 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    multi = [
        [*_CLI, *args, "--out", str(tmp_path / "multi"), "--distributed", "--num-processes", "2"]
        + ["--coordinator-address", f"localhost:{port}", "--process-id", str(i)]
        for i in range(2)
    ]
    procs = [subprocess.Popen(c, env=host2, stderr=subprocess.PIPE, text=True) for c in multi]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:]
    one = subprocess.run([*_CLI, *args, "--out", str(tmp_path / "one")], env=env, timeout=600)
    assert one.returncode == 0
    got, want = _metrics(tmp_path / "multi"), _metrics(tmp_path / "one")
    assert len(got) == len(want) == 3
    for key in ("train_bpd", "validation_bpd"):
        np.testing.assert_allclose([r[key] for r in got[:2]], [r[key] for r in want[:2]], rtol=1e-5)
    np.testing.assert_allclose(got[2]["test_bpd"], want[2]["test_bpd"], rtol=1e-5)


_PEAK = """
import sys
from numpyro_glow import cli
rc = cli.main(sys.argv[1:])
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(f"PEAK_RSS_KB {peak}", file=sys.stderr)
sys.exit(rc)
"""


def _run_peak(args, env):
    done = subprocess.run([sys.executable, "-c", _PEAK, *args], env=env, capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    kb = int(done.stderr.split("PEAK_RSS_KB")[-1].split()[0])
    return kb * 1024, done.stdout


def _write_pngs(folder, lo, hi, size=64):
    """Images ``lo .. hi - 1``: upsampled 8x8 tiles plus a ramp, different for each
    index, compressible (small files), 8-bit RGB."""
    rng = np.random.default_rng(lo)
    ramp = np.linspace(0, 1, size)[None, :, None]
    for i in range(lo, hi):
        tile = rng.integers(0, 200, (8, 8, 3), dtype=np.uint8)
        a = np.repeat(np.repeat(tile, size // 8, 0), size // 8, 1) + ramp * (i % 50)
        Image.fromarray(a.astype(np.uint8)).save(folder / f"{i:06d}.png", compress_level=1)


@pytest.mark.slow  # writes 600,000 PNGs and 7.4 GB of shards: about 7 minutes on 2 cores
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_larger_than_memory(tmp_path, capsys):
    """A folder of 600,000 64x64x3 images (7.4 GB of pixels) from prepare to the
    test bits/dim at 5 bits, each step a fresh process whose peak resident memory
    (VmHWM) stays under a quarter of the pixels. (The floor of a training
    process here is JAX and the compiled model, about 1 GB at 64x64x3.)"""
    from concurrent.futures import ProcessPoolExecutor

    n, size = 600_000, 64
    folder = tmp_path / "images"
    folder.mkdir()
    with ProcessPoolExecutor(2) as pool:
        done = [
            pool.submit(_write_pngs, folder, lo, min(n, lo + 20_000)) for lo in range(0, n, 20_000)
        ]
        for f in done:
            f.result()
    pixels = n * size * size * 3
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "prepared"
    peak_prepare, text = _run_peak(["prepare", str(folder), str(out), "--test-size", "0.0125",
                                    "--no-progress"], env)  # fmt: skip
    assert f"--data stream:{out}" in text
    args = ["train", "--data", f"stream:{out}", "--out", str(tmp_path / "run"), "--steps", "4"]
    args += ["--levels", "1", "--depth", "1", "--hidden-channels", "4", "--batch-size", "16"]
    args += ["--dequantization", "uniform", "--validation-size", "0.01", "--no-progress"]
    args += ["--eval-every", "4", "--n-bits", "5"]
    peak_train, text = _run_peak(args, env)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert math.isfinite(summary["test_bpd"]) and summary["test_images"] == 7500
    with capsys.disabled():
        print(f"\n{pixels / 2**30:.2f} GiB of pixels; peak RSS: prepare "
              f"{peak_prepare / 2**20:.0f} MiB, train {peak_train / 2**20:.0f} MiB; "
              f"test bits/dim {summary['test_bpd']:.3f} (5 bits)")  # fmt: skip
    assert peak_prepare < pixels / 4 and peak_train < pixels / 4


def test_prepare_mnist_and_cifar10_keep_their_splits(tmp_path):
    from test_data import _cifar_dir, _mnist_dir

    _mnist_dir(tmp_path / "m")
    _cifar_dir(tmp_path / "c")
    for spec in (f"mnist:{tmp_path / 'm'}", f"cifar10:{tmp_path / 'c'}"):
        out = tmp_path / spec.split(":")[0]
        prep.prepare(spec, out, progress=False)
        got, want = load(f"stream:{out}"), load(spec)
        for part in ("train", "test"):
            g, w = getattr(got, part), getattr(want, part)
            np.testing.assert_array_equal(g.x[:], w.x)
            np.testing.assert_array_equal(g.y[:], w.y)
            assert g.num_classes == max(want.train.num_classes, want.test.num_classes)
