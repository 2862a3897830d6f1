"""Plot the bits/dim curves of a ``numpyro-glow train`` run.

Reads the ``metrics.jsonl`` that ``numpyro-glow train`` writes (one JSON object per
evaluation with ``step``, ``train_bpd``, ``validation_bpd``,
``best_validation_bpd``, ...; the last line has ``"final": true`` and the test
result ``test_bpd``) and draws training and validation bits per dimension
against the step, the test bits/dim at the best validation checkpoint as a
dashed horizontal line, and the best validation step as a marker.

``train_bpd`` is the loss of the single batch at that step (current parameters,
dropout on), so it is noisy; ``validation_bpd`` is the averaged (EMA) parameters
without dropout on the whole validation set.

Usage (from the repository root)::

    python benchmarks/plot_metrics.py [METRICS_JSONL] [OUTPUT_PNG]

Defaults: ``benchmarks/results/digits_default_metrics.jsonl`` and
``docs/_static/digits_bpd.png``. Needs matplotlib (``pip install matplotlib``),
which the package itself does not depend on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_INPUT = "benchmarks/results/digits_default_metrics.jsonl"
DEFAULT_OUTPUT = "docs/_static/digits_bpd.png"


def read_metrics(path: Path) -> tuple[list[dict], dict | None]:
    """The evaluation records, one per step, and the last final summary (``None`` if
    the run has not finished)."""
    records, final = [], None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e})") from e
            if record.get("final"):
                final = record
            else:
                records.append(record)
    if not records:
        raise ValueError(f"{path}: no evaluation records (lines with 'step')")
    # a resumed run re-evaluates the steps after its last checkpoint: keep the latest
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)], final


def plot(records: list[dict], final: dict | None, output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=120)
    ax.plot(
        steps,
        [r["train_bpd"] for r in records],
        color="tab:gray",
        lw=1.0,
        marker=".",
        ms=4,
        label="train (one batch, dropout on)",
    )
    ax.plot(
        steps,
        [r["validation_bpd"] for r in records],
        color="tab:blue",
        lw=1.8,
        label="validation (EMA parameters)",
    )

    # the run's own record of its best checkpoint; the minimum of the curve otherwise
    best = min(records, key=lambda r: r["validation_bpd"])
    summary = final or {}
    best_step = summary.get("best_step", best["step"])
    best_val = summary.get("best_validation_bpd", best["validation_bpd"])
    ax.plot(
        [best_step],
        [best_val],
        marker="*",
        ms=13,
        color="tab:orange",
        ls="none",
        label=f"best validation {best_val:.4f} (step {best_step})",
    )
    if final is not None and "test_bpd" in final:
        test = final["test_bpd"]
        ax.axhline(test, color="tab:red", ls="--", lw=1.2, label=f"test {test:.4f} (at best)")

    # the first evaluation (step ``eval_every``, before the averaged parameters have
    # caught up) can be far above the rest: leave it out of the range, and say so
    values = [r[k] for r in records for k in ("train_bpd", "validation_bpd")]
    if final is not None and "test_bpd" in final:
        values.append(final["test_bpd"])
    lo = min(values)
    hi = max(values[:1] + values[2:]) if len(records) > 2 else max(values)
    pad = 0.05 * (hi - lo) if hi > lo else 0.1
    ax.set_ylim(lo - pad, hi + pad)
    clipped = [r for r in records if r["validation_bpd"] > hi + pad]
    if clipped:
        ax.text(
            0.02,
            0.02,
            "above the plot: validation "
            + ", ".join(f"{r['validation_bpd']:.3f} (step {r['step']})" for r in clipped[:3]),
            transform=ax.transAxes,
            ha="left",
            va="bottom",
            fontsize=8,
            color="tab:blue",
        )

    ax.set_xlabel("training step")
    ax.set_ylabel("bits per dimension")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", nargs="?", default=DEFAULT_INPUT, help="a metrics.jsonl")
    p.add_argument("output", nargs="?", default=DEFAULT_OUTPUT, help="the PNG to write")
    p.add_argument("--title", default=None, help="default: from the data name in the summary")
    args = p.parse_args(argv)

    try:
        records, final = read_metrics(Path(args.input))
    except (OSError, ValueError) as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 2
    title = args.title
    if title is None:
        data = final.get("data", "") if final else ""
        title = f"numpyro-glow train{f' --data {data}' if data else ''}: bits per dimension"
    plot(records, final, Path(args.output), title)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
