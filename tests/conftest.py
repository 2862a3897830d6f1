import gc
import sys
from pathlib import Path

import numpy as np
import pytest

# tests/cases.py is shared by the test modules
sys.path.insert(0, str(Path(__file__).parent))

# a tiny Glow for the command line, on small_npz: the model and every array shape of
# test_train.py's runs on small_data, so all of them share one compiled model
# (numpyro_glow.train.Density.of)
TINY_ARGS = ["--levels", "1", "--depth", "1", "--hidden-channels", "4", "--no-progress"]
TINY_ARGS += ["--dequantization", "uniform", "--batch-size", "8", "--validation-size", "0.25"]
TINY_ARGS += ["--eval-every", "2", "--checkpoint-every", "2"]


#: Linux allows a process vm.max_map_count (65,530) memory maps, and every compiled
#: XLA executable holds some. The whole suite in one process went over it, and LLVM
#: crashed (a segmentation fault) compiling the next function. Above this many maps,
#: JAX's caches are cleared after a test module (the next module recompiles).
MAX_MAPS = 30_000


def _maps() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True, scope="module")
def _bounded_compiled_code():
    yield
    if _maps() > MAX_MAPS:
        import jax

        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory):
    """A tiny Glow trained for 2 steps on the embedded digits, as the CLI writes it
    (shared by the prior and the inpainting-example tests)."""
    from numpyro_glow.train import GlowConfig, TrainConfig, train

    out = tmp_path_factory.mktemp("digits")
    config = TrainConfig(
        data="digits",
        out_dir=str(out),
        model=GlowConfig(levels=1, depth=1, hidden_channels=4),
        steps=2,
        eval_every=2,
        checkpoint_every=2,
        dequantization="uniform",
        temperatures=(1.0,),
        progress=False,
    )
    train(config)
    return out / "checkpoint.npz"


@pytest.fixture(scope="session")
def small_data():
    """60 random 4x4 'images' with 5 levels and 3 classes: fast to train on."""
    from numpyro_glow.data import ImageData, Splits

    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(60, 4, 4, 1)).astype(np.uint8)
    y = rng.integers(0, 3, size=60).astype(np.int32)
    train_part = ImageData(x[:48], y[:48], 5, "small")
    test_part = ImageData(x[48:], y[48:], 5, "small")
    return Splits(train_part, test_part)


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory, small_data):
    """The same images as an ``npz:`` data set (same shape and levels, so the same
    compiled model)."""
    path = tmp_path_factory.mktemp("data") / "small.npz"
    x = np.concatenate([small_data.train.x, small_data.test.x])
    y = np.concatenate([small_data.train.y, small_data.test.y])
    np.savez(path, x=x, y=y, levels=np.int64(5))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_npz):
    """A run of ``numpyro-glow train`` on ``small_npz``: 4 steps, evaluated and
    checkpointed every 2. Tests copy its files; none may change them."""
    from numpyro_glow import cli

    out = tmp_path_factory.mktemp("tiny") / "run"
    args = ["train", "--data", f"npz:{small_npz}", "--out", str(out), "--steps", "4"]
    assert cli.main([*args, *TINY_ARGS]) == 0
    return out
