"""The open checkpoint format: no code runs on load, every bad file is a clear error,
writes are atomic (even under SIGKILL), old pickles convert only when trusted."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_ARGS

from numpyro_glow import checkpoint, cli, load_glow
from numpyro_glow.train import load_model

MARKER = "pwned.txt"


class Payload:
    """Unpickling this creates a marker file: the code-execution test."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- the format ---------------------------------------------------------------------
def test_round_trip_and_layout(tmp_path):
    tree = {"a": np.arange(3, dtype=np.float32), "b": {"c": np.ones((2, 2), np.int32)}}
    path = tmp_path / "x.npz"
    checkpoint.write(path, checkpoint.flatten(tree, "t"), {"kind": "test", "score": float("nan")})
    with np.load(path, allow_pickle=False) as z:  # plain NumPy reads it, without pickle
        assert sorted(z.files) == ["__metadata__", "t/a", "t/b/c"]
        meta = json.loads(z["__metadata__"].tobytes())
    assert meta == {"format": "numpyro-glow", "version": 1, "kind": "test", "score": None}
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    trees, meta = checkpoint.read(path, {"t": template})
    np.testing.assert_array_equal(trees["t"]["b"]["c"], tree["b"]["c"])
    assert meta["kind"] == "test"


def test_write_refuses_object_arrays_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.npz"
    checkpoint.write(path, {"a": np.arange(3)}, {})
    with pytest.raises(ValueError, match="'b' has dtype object; expected numbers"):
        checkpoint.write(path, {"b": np.array([Payload(tmp_path / MARKER)], dtype=object)}, {})
    with np.load(path, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["a"], np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="'p/a/b'"):
        checkpoint.flatten({"a/b": np.zeros(1), "a": {"b": np.zeros(1)}}, "p")


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from numpyro_glow import checkpoint

    path = sys.argv[1]
    checkpoint.write(path, {"a": np.arange(3.0)}, {"n": 1})

    def slow_savez(file, **arrays):  # half a file, then the process is killed
        file.write(b"PK\\x03\\x04" + bytes(1 << 20))
        file.flush()
        print("writing", flush=True)
        time.sleep(600)

    checkpoint.np.savez = slow_savez
    checkpoint.write(path, {"a": np.arange(1e6)}, {"n": 2})
    """
)


def test_sigkill_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.npz"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.kill()  # SIGKILL: no handler runs
    finally:
        proc.wait(timeout=60)
    assert checkpoint.read_metadata(path)["n"] == 1
    with np.load(path, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["a"], np.arange(3.0))
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1  # what the killed writer left; the next write removes it
    checkpoint.write(path, {"a": np.arange(2.0)}, {"n": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]


# --- bad files, from every entry point ------------------------------------------------------
def _parts(path: Path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files if n != "__metadata__"}
        meta = json.loads(z["__metadata__"].tobytes())
    return arrays, meta


def _save_raw(path: Path, arrays: dict, meta: dict) -> None:
    blob = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays, __metadata__=blob)


def _weight(arrays: dict) -> str:
    return next(n for n in sorted(arrays) if n.endswith("coupling/w1") and "/ema/" in n)


def _edited(edit):
    def make(good: Path, bad: Path, marker: Path) -> None:
        arrays, meta = _parts(good)
        edit(arrays, meta, marker)
        _save_raw(bad, arrays, meta)

    return make


def _pickle(good, bad, marker):  # the old format, with a payload
    bad.write_bytes(pickle.dumps({"format": "numpyro-glow/1", "x": Payload(marker)}))


def _garbage(good, bad, marker):
    bad.write_bytes(b"this is not a checkpoint")


def _truncated(good, bad, marker):
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])


def _missing(arrays, meta, marker):
    del arrays[_weight(arrays)]


def _extra(arrays, meta, marker):
    arrays["state/extra"] = np.zeros(3, np.float32)


def _poisoned_extra(arrays, meta, marker):  # np.savez pickles an object array
    arrays["state/poison"] = np.array([Payload(marker)], dtype=object)


def _shape(arrays, meta, marker):
    name = _weight(arrays)
    arrays[name] = np.zeros((*arrays[name].shape[:-1], arrays[name].shape[-1] + 1), np.float32)


def _dtype(arrays, meta, marker):
    name = _weight(arrays)
    arrays[name] = arrays[name].astype(np.float64)


def _nan(arrays, meta, marker):
    name = _weight(arrays)
    arrays[name] = np.full_like(arrays[name], np.nan)


def _format(arrays, meta, marker):
    meta["format"] = "something-else"


CASES = {
    "pickle": (_pickle, r"pickle checkpoint.*numpyro-glow convert-checkpoint --trust-pickle"),
    "garbage": (_garbage, r"expected a numpyro-glow checkpoint \(an \.npz archive\)"),
    "truncated": (_truncated, r"truncated or corrupt"),
    "missing array": (_edited(_missing), r"missing 1 array\(s\).*coupling/w1"),
    "extra array": (_edited(_extra), r"1 unexpected array\(s\).*'state/extra'"),
    "poisoned extra array": (_edited(_poisoned_extra), r"unexpected array\(s\).*'state/poison'"),
    "wrong shape": (_edited(_shape), r"coupling/w1': expected float32\(1, 3, 3, 2, 4\), found"),
    "wrong dtype": (_edited(_dtype), r"expected float32\(1, 3, 3, 2, 4\), found float64"),
    "NaN array": (_edited(_nan), r"holds 72 NaN or infinite value"),
    "wrong format": (_edited(_format), r"expected format 'numpyro-glow'.*'something-else'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_a_clear_error_everywhere(case, tiny_run, small_npz, tmp_path, capsys):
    make, message = CASES[case]
    marker = tmp_path / MARKER
    bad = tmp_path / "run" / "checkpoint.npz"  # where train --resume reads it
    bad.parent.mkdir()
    make(tiny_run / "checkpoint.npz", bad, marker)
    before = bad.read_bytes()

    with pytest.raises(ValueError, match=message) as raised:
        load_glow(bad)
    assert str(bad) in str(raised.value)
    png = tmp_path / "s.png"
    resume = ["train", "--data", f"npz:{small_npz}", "--out", str(bad.parent), "--resume"]
    for argv in (
        ["sample", str(bad), "--out", str(png)],
        ["evaluate", str(bad)],
        [*resume, "--steps", "6", *TINY_ARGS],
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(bad) in err, err
        assert re.search(message, err), err
    assert not marker.exists()  # no code ran
    assert not png.exists()
    assert bad.read_bytes() == before and sorted(os.listdir(bad.parent)) == ["checkpoint.npz"]


def test_old_pickle_checkpoint_converts_only_when_trusted(tiny_run, tmp_path, capsys):
    """An old ``checkpoint.pkl`` (as numpyro-glow 0.1 wrote it) is refused with the
    conversion command; the command needs ``--trust-pickle``; the result loads."""
    density, best, _ = load_model(tiny_run / "best.npz")
    arrays, meta = _parts(tiny_run / "checkpoint.npz")
    state = jax.tree.map(
        np.asarray,
        checkpoint.read(tiny_run / "checkpoint.npz", {"state": _template(density)})[0]["state"],
    )
    old = {
        "format": "numpyro-glow/1",
        "config": meta["config"],
        "step": meta["step"],
        "svi_state": tuple(state.svi),
        "ema": state.ema,
        "best": {"params": state.best, "validation_bpd": meta["best_score"], "step": 4},
        "history": meta["history"],
        "bad_evals": meta["bad_evals"],
        "data": {k: meta["data"][k] for k in ("levels", "event_shape", "num_classes")},
    }
    pkl = tmp_path / "checkpoint.pkl"
    pkl.write_bytes(pickle.dumps(old))
    with pytest.raises(ValueError, match="convert-checkpoint --trust-pickle"):
        load_model(pkl)
    assert cli.main(["convert-checkpoint", str(pkl)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.npz").exists()
    assert cli.main(["convert-checkpoint", str(pkl), "--trust-pickle"]) == 0
    _, converted, meta2 = load_model(tmp_path / "checkpoint.npz")
    assert meta2["step"] == meta["step"] and meta2["history"] == meta["history"]
    for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(best), strict=True):
        np.testing.assert_array_equal(a, b)
    load_model(tmp_path / "best.npz")
    assert cli.main(["convert-checkpoint", str(pkl), "--trust-pickle"]) == 2  # never overwrites


def _template(density):
    from numpyro_glow.train.density import _arrays_only

    return _arrays_only(density.state_template())


def test_trusted_conversion_still_refuses_code(tmp_path, capsys):
    """``--trust-pickle`` reads only NumPy arrays and optax states: a payload is
    refused and never runs."""
    marker = tmp_path / MARKER
    pkl = tmp_path / "checkpoint.pkl"
    pkl.write_bytes(pickle.dumps({"format": "numpyro-glow/1", "x": Payload(marker)}))
    assert cli.main(["convert-checkpoint", str(pkl), "--trust-pickle"]) == 2
    assert "refusing to load global" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "checkpoint.npz").exists()
