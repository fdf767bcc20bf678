"""Final test accuracy of FedAvg, FedProx and SCAFFOLD on digits over real sockets.

Runs ``examples/digits/app.py`` as one aggregator plus ``--clients``
collaborator processes per algorithm (TCP on 127.0.0.1, a free port each),
then the centralized baseline, and prints a Markdown table (the one in
``docs/accuracy.md``)::

    .venv/bin/python tools/digits_accuracy.py            # 8 clients, 20 rounds, alpha 0.5, seed 0
    .venv/bin/python tools/digits_accuracy.py --algos fedavg --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FINAL = re.compile(r"^FINAL accuracy=([0-9.]+)", re.MULTILINE)


@dataclass
class Result:
    algo: str
    accuracy: float
    seconds: float
    participants: list[int]


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def client_names(clients: int) -> list[str]:
    """The collaborators' names in ``zmqfed.topo.star(clients)``."""
    width = len(str(clients - 1))
    return [f"client{i:0{width}d}" for i in range(clients)]


def run_federation(
    algo: str,
    *,
    clients: int = 8,
    rounds: int = 20,
    alpha: float = 0.5,
    seed: int = 0,
    extra: Sequence[str] = (),
    timeout: float = 600.0,
    echo: bool = False,
) -> Result:
    """One aggregator and ``clients`` collaborators, each its own process."""
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    common = (
        f"--endpoint {endpoint} --clients {clients} --rounds {rounds} --algo {algo} "
        f"--alpha {alpha} --seed {seed}"
    ).split()
    common += extra
    with tempfile.TemporaryDirectory(prefix="zmqfed-digits-") as tmp:
        records = Path(tmp) / "records.jsonl"
        argv = [sys.executable, "-m", "examples.digits.app"]
        tic = time.perf_counter()
        popen = {
            "cwd": REPO_ROOT,
            "env": _env(),
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
            "text": True,
        }
        agg_args = ["--role", "aggregator", "--name", "aggregator", "--records", str(records)]
        procs = {"aggregator": subprocess.Popen([*argv, *agg_args, *common], **popen)}
        for name in client_names(clients):
            client_args = ["--role", "collaborator", "--name", name]
            procs[name] = subprocess.Popen([*argv, *client_args, *common], **popen)
        try:
            outputs = {name: p.communicate(timeout=timeout) for name, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
        seconds = time.perf_counter() - tic
        failed = [n for n, p in procs.items() if p.returncode != 0]
        if failed:
            detail = "\n".join(
                f"--- {n} (exit {procs[n].returncode})\n{outputs[n][1][-3000:]}" for n in failed
            )
            raise RuntimeError(f"{algo}: {failed} failed\n{detail}")
        out = outputs["aggregator"][0]
        if echo:
            print(out, end="", flush=True)
        match = FINAL.search(out)
        if match is None:
            raise RuntimeError(f"{algo}: the aggregator printed no FINAL line:\n{out}")
        participants = [
            json.loads(line)["participants"]
            for line in records.read_text().splitlines()
            if line.strip()
        ]
    return Result(algo, float(match.group(1)), seconds, participants)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", nargs="+", default=["fedavg", "fedprox", "scaffold"])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="local epochs (app default)")
    p.add_argument("--lr", type=float, default=None, help="local SGD lr (app default)")
    p.add_argument("--batch-size", type=int, default=None, help="local batch size (app default)")
    p.add_argument("--echo", action="store_true", help="show the aggregators' round tables")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from examples.digits import app

    epochs = args.epochs or app.LOCAL_EPOCHS
    lr = args.lr or app.LOCAL_LR
    batch_size = args.batch_size or app.BATCH_SIZE
    extra = ["--epochs", str(epochs), "--lr", str(lr), "--batch-size", str(batch_size)]
    results = [
        run_federation(
            a,
            clients=args.clients,
            rounds=args.rounds,
            alpha=args.alpha,
            seed=args.seed,
            extra=extra,
            echo=args.echo,
        )
        for a in args.algos
    ]
    tic = time.perf_counter()
    central = app.centralized_baseline(
        args.rounds * epochs, lr=lr, batch_size=batch_size, seed=args.seed
    )
    central_s = time.perf_counter() - tic

    print(
        f"\ndigits, {args.clients} clients, Dirichlet({args.alpha}), {args.rounds} rounds x "
        f"{epochs} local epochs, lr {lr}, batch {batch_size}, seed {args.seed}\n"
    )
    print("| algorithm | final test accuracy | rounds with all clients | wall time (s) |")
    print("|---|---|---|---|")
    for r in results:
        full = sum(n == args.clients for n in r.participants)
        print(f"| {r.algo} | {r.accuracy:.4f} | {full}/{len(r.participants)} | {r.seconds:.1f} |")
    print(
        f"| centralized ({args.rounds * epochs} epochs, all training data) | {central:.4f} "
        f"| - | {central_s:.1f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
