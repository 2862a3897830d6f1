"""The command line: generated from the configuration fields, every bad value a
one-line error with exit status 2 before anything is read or written."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from conftest import TINY_ARGS

from numpyro_glow import __version__, cli
from numpyro_glow.options import add_arguments, at_least, from_arguments, option, validate
from numpyro_glow.train import GlowConfig, TrainConfig


def _run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


BAD_TRAIN = [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--batch-size", "x"], "--batch-size"),
    (["--eval-every", "0"], "--eval-every"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--hidden-channels", "0"], "--hidden-channels"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-5"], "--steps"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--learning-rate", "nan"], "--learning-rate"),
    (["--validation-size", "1.5"], "--validation-size"),
    (["--dropout", "1"], "--dropout"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--patience", "0"], "--patience"),
    (["--seed", "-1"], "--seed"),
    (["--levels", "0"], "--levels"),
    (["--temperatures", "0.5", "0"], "--temperatures"),
    (["--devices", "0"], "--devices"),
    (["--coupling", "cubic"], "--coupling"),
    (["--alpha", "1"], "--alpha"),
]


@pytest.mark.parametrize(("args", "flag"), BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_value(args, flag, tiny_run, small_npz, capsys):
    """Refused in one line naming the option, before the existing run in --out
    (which would also be refused) is touched."""
    before = _snapshot(tiny_run)
    base = ["train", "--data", f"npz:{small_npz}", "--out", str(tiny_run), *TINY_ARGS]
    assert _run([*base, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "error" in err, err
    assert _snapshot(tiny_run) == before


BAD_SAMPLE = [
    (["--num", "0"], "--num"),
    (["--num", "-3"], "--num"),
    (["--temperature", "0"], "--temperature"),
    (["--label", "-1"], "--label"),
    (["--label", "1"], "--label needs a class-conditional checkpoint"),
    (["--seed", "-2"], "--seed"),
]


@pytest.mark.parametrize(("args", "flag"), BAD_SAMPLE, ids=[" ".join(a) for a, _ in BAD_SAMPLE])
def test_bad_sample_value(args, flag, tiny_run, tmp_path, capsys):
    png = tmp_path / "old.png"
    png.write_bytes(b"an existing file")
    assert _run(["sample", str(tiny_run / "best.npz"), "--out", str(png), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err, err
    assert png.read_bytes() == b"an existing file"


def test_missing_files_are_clear(tmp_path, capsys):
    assert _run(["evaluate", str(tmp_path / "nope.npz")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert _run(["train", "--data", f"npz:{tmp_path / 'none.npz'}", *TINY_ARGS]) == 2
    assert "none.npz" in capsys.readouterr().err


def test_help_shows_help_and_default_for_every_option():
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.option_strings)
            switch = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
            if action.option_strings and not switch and action.default is not None:
                assert "%(default)s" in action.help, (name, action.option_strings)
        assert "--help" in sub.format_help()


def test_version(capsys):
    assert _run(["--version"]) == 0
    assert f"numpyro-glow {__version__}" in capsys.readouterr().out


def test_the_parser_is_the_configuration():
    """No option given: the configuration's defaults; every field has a flag."""
    parser = cli._parser()
    args = parser.parse_args(["train"])
    assert from_arguments(TrainConfig, args) == TrainConfig()
    argv = ["train", "--dense", "--no-learn-top", "--seed", "3", "--alpha", "none"]
    args = parser.parse_args(argv)
    config = from_arguments(TrainConfig, args)
    assert config.seed == 3 and config.model.seed == 3  # one --seed sets both
    assert config.model == GlowConfig(lu=False, learn_top=False, seed=3, alpha=None)
    for devices, expected in (("all", "all"), ("2", 2)):
        args = parser.parse_args(["train", "--devices", devices])
        assert from_arguments(TrainConfig, args).devices == expected


def test_a_new_option_is_one_field():
    @dataclasses.dataclass(frozen=True)
    class Options:
        widgets: int = option(3, "how many widgets", check=at_least(1))
        fast: bool = option(False, "go fast")

        def __post_init__(self):
            validate(self)

    parser = argparse.ArgumentParser()
    add_arguments(parser, Options)
    assert from_arguments(Options, parser.parse_args(["--widgets", "5", "--fast"])) == Options(
        5, True
    )
    assert "how many widgets (default: 3)" in " ".join(parser.format_help().split())
    with pytest.raises(ValueError, match=r"widgets \(--widgets\): expected an integer >= 1, got 0"):
        Options(widgets=0)
    with pytest.raises(ValueError, match=r"expected int, got 2.5"):
        Options(widgets=2.5)
