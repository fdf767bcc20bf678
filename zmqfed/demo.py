"""``python -m zmqfed.demo`` (``make demo``): federated training on real digits.

An aggregator and 8 collaborators run as separate processes over ZeroMQ
(``zmqfed.sim``). Each collaborator holds a Dirichlet(0.5) label-skewed part
of scikit-learn's handwritten digits and trains a small MLP locally; the
aggregator averages the updates (FedAvg) and evaluates the global model on
held-out digits after every round. The demo shows a progress bar and a table
per round, checks the final accuracy, and plots accuracy and round time.

``--seed-scripts`` instead runs the seed document's three scripts
(``examples/seed``) end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "examples" / "seed"
TARGET = 0.90
#: What the demo asks of a DP run (privacy costs accuracy: docs/privacy.md has the curve).
DP_TARGET = 0.70
#: Default noise multiplier per DP mode: about 0.95, 0.95 and 0.75 accuracy (docs/privacy.md).
DP_NOISE = {"central": 0.5, "local": 0.1, "dpsgd": 0.8}


def _rows(path: Path, seen: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines[seen:] if line.strip()]


def _plot(records: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] + 1 for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rounds, [r["metrics"].get("test_accuracy", 0) for r in records], marker="o")
    ax1.axhline(TARGET, color="grey", linestyle="--", linewidth=1, label=f"{TARGET:.0%} target")
    ax1.set(xlabel="round", ylabel="held-out accuracy", title="Global model accuracy")
    ax1.legend(loc="lower right")
    ax2.bar(rounds, [r["seconds"] for r in records])
    ax2.set(xlabel="round", ylabel="seconds", title="Round time (aggregator)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = out / "demo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_digits(args: argparse.Namespace) -> int:
    """The main job: FedAvg on digits with ``args.clients`` collaborators."""
    from tqdm import tqdm

    from zmqfed.sim import Simulation, star_topology

    out = Path(args.out).resolve()
    nodes = out / "nodes"
    if nodes.exists():
        for stale in nodes.glob("*"):
            if stale.is_file():
                stale.unlink()
    nodes.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)  # the app module lives in examples/
    topology = star_topology(args.clients, nodes, args.transport)
    options = [
        f"alpha={args.alpha}",
        f"algo={args.algo}",
        f"codec={args.codec}",
        f"epochs={args.epochs}",
        f"seed={args.seed}",
    ]
    if args.dp:
        if args.noise is None:
            args.noise = DP_NOISE[args.dp]
        options += [f"dp={args.dp}", f"noise={args.noise}", f"clip={args.clip}"]
        options += [f"delta={args.delta}", f"adaptive={int(args.adaptive)}"]
        if args.target_epsilon is not None:
            options.append(f"target_epsilon={args.target_epsilon}")
    sim = Simulation(
        topology, "examples.digits.daemon:factory", nodes, rounds=args.rounds, options=options
    )
    dp = f", {args.dp} DP (noise {args.noise}, clip {args.clip})" if args.dp else ""
    print(
        f"zmqfed demo: 1 aggregator + {args.clients} collaborators as processes over "
        f"{args.transport}, Dirichlet({args.alpha}) digits, {args.algo}, {args.rounds} rounds{dp}"
    )
    print(f"node logs: {nodes}")
    header = f"{'round':>5} {'accuracy':>9} {'loss':>7} {'clients':>7} {'kB in':>8} {'kB out':>8} {'seconds':>7}"
    if args.dp:
        header += f" {'epsilon':>8}"
    records: list[dict[str, Any]] = []
    tic = time.perf_counter()
    with sim, tqdm(total=args.rounds, unit="round", desc="federated rounds") as bar:
        bar.write(header)
        done = False
        while not done:
            done = sim.check()
            for r in _rows(nodes / "aggregator.rounds.jsonl", len(records)):
                records.append(r)
                m = r["metrics"]
                line = (
                    f"{r['round'] + 1:>5} {m.get('test_accuracy', 0):>9.4f} "
                    f"{m.get('test_loss', 0):>7.4f} {r['participants']:>7} "
                    f"{r['bytes_in'] / 1e3:>8.1f} {r['bytes_out'] / 1e3:>8.1f} "
                    f"{r['seconds']:>7.2f}"
                )
                if args.dp:
                    line += f" {m.get('epsilon', float('nan')):>8.3f}"
                bar.write(line)
                bar.set_postfix(accuracy=f"{m.get('test_accuracy', 0):.3f}")
                bar.update(1)
            if time.perf_counter() - tic > args.timeout:
                raise SystemExit(f"demo: no result after {args.timeout:.0f} s (logs in {nodes})")
            time.sleep(0.2)
    if not records:
        print("demo: the aggregator recorded no round", file=sys.stderr)
        return 1
    final = records[-1]["metrics"].get("test_accuracy", 0.0)
    plot = _plot(records, out)
    privacy = ""
    if args.dp:
        epsilon = records[-1]["metrics"].get("epsilon", float("nan"))
        privacy = f", ({epsilon:.3g}, {args.delta:g})-DP ({args.dp})"
    print(
        f"final held-out accuracy: {final:.4f} after {len(records)} rounds{privacy} "
        f"({time.perf_counter() - tic:.1f} s); plot: {plot}"
    )
    minimum = args.min_accuracy
    if minimum is None:
        minimum = DP_TARGET if args.dp else TARGET
    if final < minimum:
        print(f"demo: accuracy below the {minimum:.0%} target", file=sys.stderr)
        return 1
    return 0


def run_seed_scripts(timeout: float) -> int:
    """The seed document's aggregator and two collaborators, collaborators started first."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = {
        name: subprocess.Popen([sys.executable, str(SEED / f"{name}.py")], env=env)
        for name in ("alpha", "beta", "aggregator")
    }
    codes = {name: proc.wait(timeout=timeout) for name, proc in procs.items()}
    print("seed scripts:", ", ".join(f"{n} exit {c}" for n, c in codes.items()))
    return 0 if not any(codes.values()) else 1


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m zmqfed.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--algo", choices=("fedavg", "fedprox", "scaffold"), default="fedavg")
    parser.add_argument("--codec", choices=("raw", "lz4", "shuffle-lz4", "auto"), default="raw")
    parser.add_argument("--epochs", type=int, default=3, help="local epochs per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transport", choices=("ipc", "tcp"), default="ipc")
    parser.add_argument("--out", default="out/demo", help="where the plot and node logs go")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help=f"exit 1 when the final accuracy is lower (default {TARGET}, {DP_TARGET} with --dp)",
    )
    dp = parser.add_argument_group("differential privacy (docs/privacy.md)")
    dp.add_argument(
        "--dp",
        choices=("central", "local", "dpsgd"),
        default=None,
        help="central: the aggregator clips and noises; local: each collaborator does; "
        "dpsgd: record-level DP-SGD (Opacus) on the collaborators",
    )
    dp.add_argument(
        "--noise",
        type=float,
        default=None,
        help="noise multiplier (default: central 0.5, local 0.1, dpsgd 0.8)",
    )
    dp.add_argument(
        "--clip", type=float, default=1.0, help="update clip (DP-SGD: per-example gradient clip)"
    )
    dp.add_argument("--delta", type=float, default=1e-5)
    dp.add_argument("--target-epsilon", type=float, default=None, help="stop before exceeding it")
    dp.add_argument("--adaptive", action="store_true", help="adaptive clipping (median norm)")
    parser.add_argument(
        "--seed-scripts", action="store_true", help="run the seed document's three scripts instead"
    )
    args = parser.parse_args(argv)
    if args.seed_scripts:
        return run_seed_scripts(args.timeout)
    return run_digits(args)


if __name__ == "__main__":
    sys.exit(main())
