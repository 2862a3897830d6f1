"""Training, resume, the run folder's rules, NaN and interrupts, on tiny configurations.

Every run here uses one tiny model on 4x4 images with 5 levels, so the compiled
functions are shared (``Density.of``) and each run costs only its steps."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import stat
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_ARGS
from numpyro import handlers
from PIL import Image

from numpyro_glow import bits_per_dim, checkpoint, cli
from numpyro_glow.data import ImageData, Splits
from numpyro_glow.train import (
    GlowConfig,
    TrainConfig,
    Trainer,
    density_model,
    glow_from_config,
    load_model,
    train,
)

TINY = GlowConfig(levels=1, depth=1, hidden_channels=4)


def _config(tmp_path, **kw):
    base = dict(
        data="small",
        out_dir=str(tmp_path / "run"),
        model=TINY,
        steps=6,
        batch_size=8,
        eval_every=2,
        checkpoint_every=2,
        progress=False,
        validation_size=0.25,
        temperatures=(0.5, 1.0),
        dequantization="uniform",  # fast; test_variational_dequantization_trains covers the other
    )
    base.update(kw)
    return TrainConfig(**base)


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _metrics(folder):
    return [_strict_json(s) for s in (folder / "metrics.jsonl").read_text().splitlines()]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, small_data):
    """6 uninterrupted steps, evaluated and checkpointed every 2."""
    tmp = tmp_path_factory.mktemp("full")
    summary = train(_config(tmp), data=small_data)
    return tmp / "run", summary


def test_train_writes_everything(full_run):
    out, summary = full_run
    lines = _metrics(out)
    assert [r["step"] for r in lines[:-1]] == [2, 4, 6]
    assert lines[-1]["final"] and math.isfinite(lines[-1]["test_bpd"])
    assert all(r["images_per_sec"] > 0 for r in lines[:-1])
    assert checkpoint.read_metadata(out / "checkpoint.npz")["step"] == 6
    best = checkpoint.read_metadata(out / "best.npz")
    assert best["kind"] == "model" and best["step"] == summary["best_step"]
    assert best["validation_bpd"] == summary["best_validation_bpd"]
    image = Image.open(out / "samples.png")
    assert image.size[0] > image.size[1] > 0  # 2 rows of 10 samples
    assert summary["test_images"] == 12 and summary["validation_images"] == 12
    assert _strict_json((out / "summary.json").read_text()) == summary
    assert sorted(p.name for p in out.iterdir()) == [
        "best.npz",
        "checkpoint.npz",
        "metrics.jsonl",
        "samples.png",
        "summary.json",
    ]  # no temporary files left
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(out / "checkpoint.npz").st_mode) == 0o666 & ~mask


def test_resume_matches_uninterrupted(tmp_path, small_data, full_run):
    out_a, full = full_run
    train(_config(tmp_path, steps=4), data=small_data)
    # resumed from another spelling of the folder, with more steps
    (tmp_path / "x").mkdir()
    moved = tmp_path / "x" / ".." / "run"
    resumed = train(_config(tmp_path, out_dir=str(moved)), data=small_data, resume=True)
    a = [r for r in _metrics(out_a) if "step" in r]
    b = [r for r in _metrics(tmp_path / "run") if "step" in r]
    assert [r["step"] for r in b] == [2, 4, 6]
    for ra, rb in zip(a, b, strict=True):
        assert rb["train_bpd"] == ra["train_bpd"]  # the same batches, noise and updates
        np.testing.assert_allclose(rb["validation_bpd"], ra["validation_bpd"], rtol=1e-6)
    np.testing.assert_allclose(resumed["test_bpd"], full["test_bpd"], rtol=1e-6)
    _, pa, _ = load_model(out_a / "checkpoint.npz")
    _, pb, _ = load_model(tmp_path / "run" / "checkpoint.npz")
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_resume_names_the_option_that_differs_before_reading_data(tmp_path, full_run):
    out, _ = full_run
    (tmp_path / "run").mkdir()
    for name in ("checkpoint.npz", "best.npz"):
        (tmp_path / "run" / name).write_bytes((out / name).read_bytes())
    # data=None and data="small" (not a loadable spec): reading data would fail differently
    with pytest.raises(ValueError, match=r"--learning-rate is 0\.1 here but 0\.002"):
        train(_config(tmp_path, learning_rate=0.1), resume=True)
    with pytest.raises(ValueError, match=r"--depth is 2 here but 1"):
        train(_config(tmp_path, model=dataclasses.replace(TINY, depth=2)), resume=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(_config(tmp_path / "elsewhere"), resume=True)


def test_existing_run_is_never_overwritten(tmp_path, full_run, small_data, small_npz):
    out, _ = full_run
    before = _snapshot(out)
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train(_config(out.parent, steps=2), data=small_data)
    args = ["train", "--data", f"npz:{small_npz}", "--out", str(out), *TINY_ARGS]
    assert cli.main([*args, "--steps", "2"]) == 2
    assert cli.main([*args, "--steps", "2", "--resume", "--overwrite"]) == 2
    assert _snapshot(out) == before
    # --overwrite replaces it
    copy = tmp_path / "run"
    copy.mkdir()
    for name, data in before.items():
        (copy / name).write_bytes(data)
    summary = train(_config(tmp_path, steps=2), data=small_data, overwrite=True)
    assert summary["steps_run"] == 2 and [r["step"] for r in _metrics(copy)[:-1]] == [2]


def test_default_folders_of_two_data_sets_differ(tmp_path):
    from numpyro_glow.train import canonical_data, default_out_dir

    assert default_out_dir("digits") == os.path.join("runs", "digits")
    a, b = default_out_dir(f"npz:{tmp_path}/a/d.npz"), default_out_dir(f"npz:{tmp_path}/b/d.npz")
    assert a != b and os.path.basename(a).startswith("npz-d-")
    assert default_out_dir(f"npz:{tmp_path}/a/../a/d.npz") == a
    assert canonical_data(f"folder:{tmp_path}/x/..") == f"folder:{tmp_path}"


def _poison_batch(monkeypatch, at_step: int) -> None:
    """Pixels far above the top level in the batch of ``at_step``: a NaN loss."""
    real = Trainer.batch

    def poisoned(self, step):
        k, y = real(self, step)
        return (np.full_like(k, 255) if step == at_step else k), y

    monkeypatch.setattr(Trainer, "batch", poisoned)


def test_failed_run_leaves_no_folder(tmp_path, small_data, monkeypatch):
    config = _config(tmp_path / "new" / "deeper", data=f"npz:{tmp_path / 'missing.npz'}")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        train(config)
    _poison_batch(monkeypatch, 0)  # fails after the folder and metrics.jsonl were made
    with pytest.raises(FloatingPointError, match="none yet"):
        train(_config(tmp_path / "new" / "deeper"), data=small_data)
    assert list(tmp_path.iterdir()) == []


def test_batch_larger_than_the_training_split(tmp_path, small_data):
    with pytest.raises(ValueError, match="at most the 36 training images.*got 40"):
        train(_config(tmp_path, batch_size=40), data=small_data)
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, small_data, monkeypatch):
    _poison_batch(monkeypatch, 2)
    with pytest.raises(
        FloatingPointError, match=r"not finite at step 2 .*checkpoint.npz \(step 2\)"
    ):
        train(_config(tmp_path), data=small_data)
    out = tmp_path / "run"
    assert checkpoint.read_metadata(out / "checkpoint.npz")["step"] == 2
    _, params, _ = load_model(out / "checkpoint.npz")  # finite: load_model checks
    assert [r["step"] for r in _metrics(out)] == [2]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def _interrupting(monkeypatch, at_step: int, what: BaseException):
    real = Trainer.step

    def step(self, state, k, y):
        if int(state.step) == at_step:
            raise what
        return real(self, state, k, y)

    monkeypatch.setattr(Trainer, "step", step)


def test_ctrl_c_stops_cleanly(tmp_path, small_npz, monkeypatch, capsys):
    _interrupting(monkeypatch, 3, KeyboardInterrupt())
    out = tmp_path / "run"
    args = ["train", "--data", f"npz:{small_npz}", "--out", str(out), "--steps", "6"]
    assert cli.main([*args, *TINY_ARGS]) == 130
    err = capsys.readouterr().err
    assert "checkpoint.npz (step 2); continue with --resume" in err
    assert checkpoint.read_metadata(out / "checkpoint.npz")["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["best.npz", "checkpoint.npz", "metrics.jsonl"]


def test_sigterm_during_a_checkpoint_write(tmp_path, small_npz, monkeypatch, capsys):
    """SIGTERM arrives while the second checkpoint is being written: the command
    stops (exit 143), the first checkpoint stays, no temporary file is left."""
    real, calls = np.savez, []

    def savez_then_sigterm(file, **arrays):
        calls.append(1)
        real(file, **arrays)
        if len(calls) == 4:  # best.npz, checkpoint.npz at step 2, then best.npz, checkpoint.npz
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint.np, "savez", savez_then_sigterm)
    out = tmp_path / "run"
    args = ["train", "--data", f"npz:{small_npz}", "--out", str(out), "--steps", "6"]
    assert cli.main([*args, *TINY_ARGS]) == 143
    assert "terminated" in capsys.readouterr().err
    assert checkpoint.read_metadata(out / "checkpoint.npz")["step"] == 2
    load_model(out / "best.npz")  # written (atomically) before the signal
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_elbo_is_the_dequantization_bound_in_bits(small_data):
    """With the noise fixed at u = 1/2, the model's loss is -log p(x) + D log L."""
    k = jnp.asarray(small_data.train.x[:8])
    kwargs = dict(levels=5, config=TINY)
    params = {
        name: site["value"]
        for name, site in handlers.trace(handlers.seed(density_model, 0))
        .get_trace(k, **kwargs)
        .items()
        if site["type"] == "param"
    }
    half = {"dequant": jnp.full(k.shape, 0.5)}
    trace = handlers.trace(handlers.substitute(handlers.substitute(density_model, params), half))
    tr = trace.get_trace(k, **kwargs)
    log_joint = sum(
        s["fn"].log_prob(s["value"]).sum() for s in tr.values() if s["type"] == "sample"
    )
    d = handlers.substitute(handlers.seed(glow_from_config, 0), params)(TINY, (4, 4, 1))
    log_p = d.log_prob((k + 0.5) / 5)
    expected = jnp.sum(bits_per_dim(log_p, 16, 5))
    np.testing.assert_allclose(-log_joint / (16 * math.log(2)), expected, rtol=1e-5)


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, small_data):
    tmp = tmp_path_factory.mktemp("cond")
    cfg = _config(tmp, model=dataclasses.replace(TINY, conditional=True), steps=2)
    return tmp / "run", train(cfg, data=small_data)


def test_conditional_training_and_class_sampling(conditional_run, capsys):
    out, summary = conditional_run
    assert math.isfinite(summary["test_bpd"])
    ck = str(out / "best.npz")
    png = out.parent / "three.png"
    assert cli.main(["sample", ck, "--label", "2", "--num", "3", "--out", str(png)]) == 0
    assert Image.open(png).size[1] > 0
    assert cli.main(["sample", ck, "--label", "3", "--out", str(png)]) == 2
    assert "--label: expected a class in [0, 3), got 3" in capsys.readouterr().err


def test_conditional_without_labels_is_refused(tmp_path, small_data):
    unlabeled = Splits(
        ImageData(small_data.train.x, None, 5, "small"), ImageData(small_data.test.x, None, 5, "s")
    )
    cfg = _config(tmp_path, model=dataclasses.replace(TINY, conditional=True))
    with pytest.raises(ValueError, match="needs labels"):
        train(cfg, data=unlabeled)
    assert not (tmp_path / "run").exists()


def test_variational_dequantization_trains(tmp_path, small_data):
    summary = train(_config(tmp_path, dequantization="variational", steps=2), data=small_data)
    assert math.isfinite(summary["test_bpd"])
    assert math.isfinite(summary["test_bpd_uniform_dequantization"])
    assert summary["num_parameters"] > summary["num_parameters_glow"]  # the dequantization flow


def test_cli_train_sample_evaluate_on_npz(tiny_run, small_npz, tmp_path, capsys):
    ck = str(tiny_run / "checkpoint.npz")
    # evaluating on data of another shape is refused, naming both shapes
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "e.npz", x=rng.integers(0, 256, size=(20, 8, 8, 1)).astype(np.uint8))
    assert cli.main(["evaluate", ck, "--data", f"npz:{tmp_path / 'e.npz'}"]) == 2
    assert "(4, 4, 1)" in capsys.readouterr().err
    # sampling needs only the checkpoint, not the training data
    sample_args = ["sample", ck, "--out", str(tmp_path / "s.png"), "--temperature", "0.5", "1"]
    assert cli.main(sample_args) == 0
    assert Image.open(tmp_path / "s.png").size[1] > 0
    for path in (ck, str(tiny_run / "best.npz")):
        assert cli.main(["evaluate", path]) == 0
        result = _strict_json(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["test_images"] == 12 and math.isfinite(result["test_bpd"])


def test_progress_bar_shows_the_throughput_of_metrics(tmp_path, capsys):
    """The bar's images/s are those of the steps done, as in metrics.jsonl (not those
    dispatched): on a model whose steps take longer than their dispatch, the two
    agree within 15%."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(1200, 8, 8, 1)).astype(np.uint8)
    data = Splits(ImageData(x[:1100], None, 5, "r"), ImageData(x[1100:], None, 5, "r"))
    model = GlowConfig(levels=1, depth=1, hidden_channels=32)
    config = _config(tmp_path, model=model, batch_size=512, steps=250, progress=True)
    config = dataclasses.replace(config, eval_every=250, checkpoint_every=250)
    config = dataclasses.replace(config, temperatures=(1.0,), validation_size=0.1)
    train(config, data=data)
    shown = [float(v) for v in re.findall(r"img_s=(\d+)", capsys.readouterr().err)]
    shown = [v for i, v in enumerate(shown) if i == 0 or v != shown[i - 1]]  # redrawn
    (record,) = [r for r in _metrics(tmp_path / "run") if "step" in r]
    assert len(shown) >= 2, shown
    ratio = statistics.median(shown) / record["images_per_sec"]
    assert 0.85 <= ratio <= 1.15, (shown, record["images_per_sec"])
