"""Training, checkpoints, resume and the command line, on tiny configurations."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from PIL import Image

from numpyro_glow import bits_per_dim, cli
from numpyro_glow.data import ImageData, Splits
from numpyro_glow.train import (
    GlowConfig,
    TrainConfig,
    Trainer,
    density_model,
    glow_from_config,
    load_checkpoint,
    save_checkpoint,
    train,
)

TINY = GlowConfig(levels=1, depth=1, hidden_channels=4)
TINY_ARGS = ["--levels", "1", "--depth", "1", "--hidden-channels", "4", "--no-progress"]
TINY_ARGS += ["--dequantization", "uniform"]


@pytest.fixture(scope="module")
def small_data():
    """60 random 4x4 'images' with 5 levels and 3 classes: fast to train on."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(60, 4, 4, 1)).astype(np.uint8)
    y = rng.integers(0, 3, size=60).astype(np.int32)
    train_part = ImageData(x[:48], y[:48], 5, "small")
    test_part = ImageData(x[48:], y[48:], 5, "small")
    return Splits(train_part, test_part)


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


def test_train_writes_everything(tmp_path, small_data):
    summary = train(_config(tmp_path), data=small_data)
    out = tmp_path / "run"
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines[:-1]] == [2, 4, 6]
    assert lines[-1]["final"] and math.isfinite(lines[-1]["test_bpd"])
    assert load_checkpoint(out / "checkpoint.pkl")["step"] == 6
    image = Image.open(out / "samples.png")
    assert image.size[0] > image.size[1] > 0  # 2 rows of 10 samples
    assert summary["test_images"] == 12 and summary["validation_images"] == 12


def test_resume_matches_uninterrupted(tmp_path, small_data):
    full = train(_config(tmp_path / "a"), data=small_data)
    train(_config(tmp_path / "b", steps=4), data=small_data)
    resumed = train(_config(tmp_path / "b"), data=small_data, resume=True)
    history = lambda d: [  # noqa: E731
        json.loads(s) for s in (d / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    a = [r for r in history(tmp_path / "a") if "step" in r]
    b = [r for r in history(tmp_path / "b") if "step" in r]
    assert [r["step"] for r in b] == [2, 4, 6]
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_allclose(rb["train_bpd"], ra["train_bpd"], rtol=1e-5)
        np.testing.assert_allclose(rb["validation_bpd"], ra["validation_bpd"], rtol=1e-5)
    np.testing.assert_allclose(resumed["test_bpd"], full["test_bpd"], rtol=1e-5)


def test_resume_with_other_options_is_refused(tmp_path, small_data):
    train(_config(tmp_path, steps=2), data=small_data)
    with pytest.raises(ValueError, match="another configuration"):
        train(_config(tmp_path, learning_rate=0.1), data=small_data, resume=True)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, small_data, monkeypatch):
    update = Trainer.__init__

    def init_with_nan_at_step_3(self, *args, **kwargs):
        update(self, *args, **kwargs)
        real, calls = self._update, []

        def flaky(state, k, y):
            calls.append(1)
            new_state, loss = real(state, k, y)
            return new_state, (jnp.nan if len(calls) == 3 else loss)

        self._update = flaky

    monkeypatch.setattr(Trainer, "__init__", init_with_nan_at_step_3)
    with pytest.raises(FloatingPointError, match="step 2: the loss is nan.*checkpoint.pkl"):
        train(_config(tmp_path), data=small_data)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pkl")
    assert state["step"] == 2
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(state["ema"]))


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "ck.pkl"
    good = {"format": "numpyro-glow/1", "value": np.arange(3)}
    save_checkpoint(path, good)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(path, {"format": "numpyro-glow/1", "bad": lambda: None})
    with open(path, "rb") as f:
        np.testing.assert_array_equal(pickle.load(f)["value"], np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pkl"]


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        load_checkpoint(tmp_path / "missing.pkl")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="bad.pkl.*expected a numpyro-glow checkpoint"):
        load_checkpoint(bad)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="other.pkl"):
        load_checkpoint(other)


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


def test_conditional_training_and_class_sampling(tmp_path, small_data):
    cfg = _config(tmp_path, model=dataclasses.replace(TINY, conditional=True), steps=2)
    summary = train(cfg, data=small_data)
    assert math.isfinite(summary["test_bpd"])


def test_conditional_without_labels_is_refused(tmp_path, small_data):
    unlabeled = Splits(
        ImageData(small_data.train.x, None, 5, "small"), ImageData(small_data.test.x, None, 5, "s")
    )
    cfg = _config(tmp_path, model=dataclasses.replace(TINY, conditional=True))
    with pytest.raises(ValueError, match="needs labels"):
        train(cfg, data=unlabeled)


def test_variational_dequantization_trains(tmp_path, small_data):
    summary = train(_config(tmp_path, dequantization="variational", steps=4), data=small_data)
    assert math.isfinite(summary["test_bpd"])


def test_cli_train_sample_evaluate_on_npz(tmp_path, capsys):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, size=(40, 4, 4, 1)).astype(np.uint8))
    out = tmp_path / "run"
    args = ["train", "--data", f"npz:{tmp_path / 'd.npz'}", "--out", str(out), "--steps", "4"]
    assert cli.main(args + ["--eval-every", "2", "--batch-size", "8", *TINY_ARGS]) == 0
    printed = capsys.readouterr().out
    assert "test bits/dim" in printed and str(out / "samples.png") in printed
    ck = str(out / "checkpoint.pkl")
    # evaluating on data of another shape is refused, naming both shapes
    np.savez(tmp_path / "e.npz", x=rng.integers(0, 256, size=(20, 8, 8, 1)).astype(np.uint8))
    assert cli.main(["evaluate", ck, "--data", f"npz:{tmp_path / 'e.npz'}"]) == 2
    assert "(4, 4, 1)" in capsys.readouterr().err
    # sampling needs only the checkpoint, not the training data
    (tmp_path / "d.npz").rename(tmp_path / "moved.npz")
    sample_args = ["sample", ck, "--out", str(tmp_path / "s.png"), "--temperature", "0.5", "1"]
    assert cli.main(sample_args) == 0
    (tmp_path / "moved.npz").rename(tmp_path / "d.npz")
    assert Image.open(tmp_path / "s.png").size[1] > 0
    assert cli.main(["evaluate", ck]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test_images"] == 8 and math.isfinite(result["test_bpd"])


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "nope.pkl")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli.main(["train", "--data", f"npz:{tmp_path / 'none.npz'}", *TINY_ARGS]) == 2
    assert "none.npz" in capsys.readouterr().err
