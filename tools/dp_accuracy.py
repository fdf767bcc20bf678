"""Accuracy against epsilon for zmqfed's DP mechanisms on the digits federation: a table and a plot.

Each run is the digits demo's federation (``examples/digits/daemon.py``: 8
collaborators with Dirichlet(0.5) parts, an MLP 64-64-10, FedAvg, 20 rounds,
3 local epochs) as one process per node over real sockets
(``zmqfed.sim.Simulation``, like ``make demo ARGS="--dp ..."``), with one
DP mechanism at one noise multiplier. The aggregator's round records give
the held-out accuracy and the epsilon (delta 1e-5) after every round::

    .venv/bin/python tools/dp_accuracy.py                       # the sweep in docs/privacy.md
    .venv/bin/python tools/dp_accuracy.py --modes central --noise 0.5 1.0 --rounds 10

It prints a Markdown table (final accuracy and epsilon per run), appends the
runs to ``docs/bench/dp_accuracy.jsonl`` and draws ``docs/dp-accuracy.png``:
on the left final accuracy against final epsilon per mechanism, on the
right accuracy against epsilon round by round for one noise level.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
APP = "examples.digits.daemon:factory"
MODES = ("central", "local", "dpsgd")
DEFAULT_NOISE = {
    "central": (0.3, 0.5, 1.0, 2.0, 4.0),
    "local": (0.02, 0.05, 0.1, 0.3),
    "dpsgd": (0.5, 0.8, 1.0, 1.5, 3.0),
}
LABEL = {
    "none": "no DP",
    "central": "central DP (user level)",
    "local": "local DP (user level)",
    "dpsgd": "DP-SGD (record level)",
}


def run(
    mode: str, noise: float, workdir: Path, *, rounds: int, clip: float, timeout: float
) -> dict[str, Any]:
    """One federation; its per-round accuracy and epsilon."""
    from zmqfed.sim import Simulation, star_topology

    nodes = workdir / f"{mode}-{noise:g}"
    nodes.mkdir(parents=True)
    options = ["seed=0"]
    if mode != "none":
        options += [f"dp={mode}", f"noise={noise}", f"clip={clip}"]
    sim = Simulation(star_topology(8, nodes), APP, nodes, rounds=rounds, options=options)
    tic = time.perf_counter()
    with sim:
        sim.wait(timeout)
    seconds = time.perf_counter() - tic
    lines = (nodes / "aggregator.rounds.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {
        "mode": mode,
        "noise": noise,
        "clip": clip,
        "delta": 1e-5,
        "rounds": len(records),
        "accuracy": [r["metrics"]["test_accuracy"] for r in records],
        "epsilon": [r["metrics"].get("epsilon", math.inf) for r in records],
        "seconds": round(seconds, 1),
    }


def table(runs: Sequence[dict[str, Any]]) -> str:
    out = [
        "| mechanism | noise multiplier | final accuracy | epsilon (delta 1e-5) |",
        "|---|---:|---:|---:|",
    ]
    for r in runs:
        eps = r["epsilon"][-1]
        noise = "-" if r["mode"] == "none" else f"{r['noise']:g}"
        eps_text = "-" if r["mode"] == "none" else f"{eps:.3g}"
        out.append(f"| {LABEL[r['mode']]} | {noise} | {r['accuracy'][-1]:.3f} | {eps_text} |")
    return "\n".join(out)


def plot(runs: Sequence[dict[str, Any]], path: Path, per_round_noise: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    baseline = [r for r in runs if r["mode"] == "none"]
    for mode in MODES:
        mine = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["epsilon"][-1])
        if mine:
            left.plot(
                [r["epsilon"][-1] for r in mine],
                [r["accuracy"][-1] for r in mine],
                marker="o",
                label=LABEL[mode],
            )
            for r in mine:
                left.annotate(
                    f"z={r['noise']:g}", (r["epsilon"][-1], r["accuracy"][-1]), fontsize=7
                )
        for r in runs:
            if r["mode"] == mode and math.isclose(r["noise"], per_round_noise):
                right.plot(r["epsilon"], r["accuracy"], marker=".", label=LABEL[mode])
    for ax in (left, right):
        if baseline:
            ax.axhline(baseline[0]["accuracy"][-1], color="grey", linestyle="--", label="no DP")
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (delta = 1e-5)")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right", fontsize=8)
    left.set_title("after 20 rounds, by noise multiplier z")
    right.set_title(f"round by round, z = {per_round_noise:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--noise", nargs="+", type=float, default=None, help="for every mode")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--per-round-noise", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "bench" / "dp_accuracy.jsonl"))
    parser.add_argument("--png", default=str(REPO_ROOT / "docs" / "dp-accuracy.png"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    import os

    os.chdir(REPO_ROOT)  # the app module lives in examples/
    runs = []
    with tempfile.TemporaryDirectory(prefix="zmqfed-dp-") as tmp:
        plan = [("none", 0.0)] + [
            (mode, z) for mode in args.modes for z in (args.noise or DEFAULT_NOISE[mode])
        ]
        if not any(m != "none" and math.isclose(z, args.per_round_noise) for m, z in plan):
            plan += [(m, args.per_round_noise) for m in args.modes]
        for mode, z in plan:
            result = run(
                mode, z, Path(tmp), rounds=args.rounds, clip=args.clip, timeout=args.timeout
            )
            print(
                f"{mode} z={z:g}: accuracy {result['accuracy'][-1]:.3f}, "
                f"epsilon {result['epsilon'][-1]:.3g} ({result['seconds']} s)",
                flush=True,
            )
            runs.append(result)
    with open(args.out, "a", encoding="utf-8") as f:
        for r in runs:
            f.write(json.dumps({**r, "date": time.strftime("%Y-%m-%d")}) + "\n")
    plot(runs, Path(args.png), args.per_round_noise)
    print(table(runs))
    print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
