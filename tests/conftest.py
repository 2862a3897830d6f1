import sys
from pathlib import Path

import pytest

# tests/cases.py is shared by the test modules
sys.path.insert(0, str(Path(__file__).parent))


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
