"""The examples run end to end with tiny arguments."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # compiles two guides and computes log Z by quadrature
def test_compare_guides(tmp_path):
    example = _load("compare_guides")
    out = tmp_path / "guides.json"
    args = example.parser().parse_args(
        ["--problems", "eight_schools", "--protocols", "default", "--steps", "20"]
        + ["--seeds", "0", "--guides", "AutoGlow", "AutoMultivariateNormal"]
        + ["--eval-particles", "20", "--out", str(out)]
    )
    results = example.main(args)
    # constrained sites (HalfCauchy) and a plate
    assert abs(results["log_z"]["eight_schools"] - (-31.31)) < 0.05
    runs = results["runs"]["eight_schools"]["0"]
    assert set(runs) == {"AutoGlow @ 20", "AutoMultivariateNormal @ 20"}
    for r in runs.values():
        assert math.isfinite(r["elbo"]) and r["steps"] == 20 and r["train_s"] > 0
    assert json.loads(out.read_text())["runs"] == json.loads(json.dumps(results["runs"]))
    assert "| eight_schools |" in example.table(results)


@pytest.mark.slow  # one subprocess per guide and protocol
def test_scale_guides(tmp_path):
    example = _load("scale_guides")
    out = tmp_path / "scale.json"
    args = example.parser().parse_args(
        ["--problems", "eight_schools", "--guides", "AutoGlow", "AutoNormal"]
        + ["--protocols", "steps", "time", "--steps", "20", "--seconds", "15"]
        + ["--out", str(out)]
    )
    rows = example.main(args)
    assert len(rows) == 4 and json.loads(out.read_text()) == rows
    for row in rows:
        assert "error" not in row, row
        assert math.isfinite(row["elbo"]) and row["params"] > 0 and row["peak_mb"] > 0
        # moments against the stored NUTS reference
        assert 0 <= row["mean_err"] < 10 and 0 <= row["sd_err"] < 10
    steps = {(r["guide"], r["protocol"]): r["steps"] for r in rows}
    assert steps[("AutoGlow", "steps")] == 20 and steps[("AutoNormal", "time")] > 20
    assert '   "AutoGlow", "20",' in example.table(rows)


@pytest.mark.slow  # SVI then NUTS twice; NeuTra itself is tested in test_autoguide
def test_neutra_funnel(tmp_path):
    example = _load("neutra_funnel")
    args = example.parser().parse_args(
        ["--dim", "3", "--svi-steps", "10", "--num-warmup", "10", "--num-samples", "10"]
        + ["--num-flows", "2", "--particles", "2"]
        + ["--out", str(tmp_path / "neutra.json")]
    )
    results = example.main(args)
    assert set(results) == {"NUTS", "NeuTra(AutoGlow) + NUTS"}
    for r in results.values():
        assert math.isfinite(r["v_mean"]) and r["ess_bulk"] > 0 and r["divergences"] >= 0
        assert r["r_hat"] >= 0.9  # two chains: a number (inf if they disagree), not NaN
    assert (tmp_path / "neutra.json").is_file()


@pytest.mark.slow  # trains a tiny Glow, then NUTS; the prior itself is tested in test_prior
def test_inpainting(tmp_path, digits_checkpoint):
    example = _load("inpainting")
    args = example.parser().parse_args(
        ["--checkpoint", str(digits_checkpoint), "--num-warmup", "10", "--num-samples", "10"]
        + ["--mask", "random", "--out-dir", str(tmp_path)]
    )
    results = example.main(args)
    assert results["hidden_pixels"] == 64 - int(example.make_mask("random", (8, 8, 1), 0).sum())
    assert results["draws"] == 20  # 2 chains x 10
    assert math.isfinite(results["rmse_hidden_posterior_mean"]) and results["ess_bulk_min"] > 0
    assert math.isfinite(results["r_hat_max"])
    assert (tmp_path / "inpainting.png").stat().st_size > 0
    assert json.loads((tmp_path / "inpainting.json").read_text()) == results
