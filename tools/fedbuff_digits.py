"""Wall-clock time to 90% accuracy on digits: synchronous FedAvg vs FedBuff, mixed-speed clients.

One aggregator and ``--clients`` collaborators in one process (threads, each
its own Maintainer and DEALER on tcp 127.0.0.1). Every collaborator trains
the digits MLP on its Dirichlet(``--alpha``) part for ``--epochs`` local
epochs, then waits ``--delay`` seconds (its device's speed); the last
``--slow`` collaborators wait ``--slowdown`` times longer. Synchronous FedAvg
(``API`` with ``count_step(clients)``) waits for everyone every round;
FedBuff (``zmqfed.fedbuff.FedBuff``) steps every ``--buffer`` updates. The
global model is evaluated on held-out digits after every round / server step::

    .venv/bin/python tools/fedbuff_digits.py                 # 8 clients, 2 of them 10x slower
    .venv/bin/python tools/fedbuff_digits.py --seeds 0,1,2 --target 0.9
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def run(mode: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One federation; returns the accuracy curve against wall-clock seconds."""
    import torch

    import zmqfed.topo as topo
    from examples.digits.app import (
        BATCH_SIZE,
        LOCAL_LR,
        build_model,
        client_part,
        evaluate,
        held_out_split,
        train_epochs,
    )
    from zmqfed.api import API, run_collaborator
    from zmqfed.core import Maintainer
    from zmqfed.fedbuff import FedBuff
    from zmqfed.functional import count_step, naive_aggregation
    from zmqfed.optim import FederatedOptimizer

    torch.set_num_threads(1)
    n = args.clients
    topology = topo.star(n, _endpoint())
    names = sorted(p.nick_name for p in topology.nodes if p.nick_name != "aggregator")
    model = build_model(seed)
    x_test, y_test = held_out_split(seed)
    agg = Maintainer(topo.analysis(topology, "aggregator")[0], model.state_dict(keep_vars=True))
    server = FederatedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), "aggregator")
    curve: list[tuple[float, float]] = []
    stop = threading.Event()
    tic = time.perf_counter()

    def record(*_: Any) -> dict[str, Any]:
        accuracy, _loss = evaluate(model, x_test, y_test)
        curve.append((time.perf_counter() - tic, accuracy))
        if accuracy >= args.target:
            stop.set()
        return {"test_accuracy": accuracy}

    def collaborator(i: int) -> None:
        local = build_model(seed)
        x, y = client_part(i, n, args.alpha, seed)
        sgd = torch.optim.SGD(local.parameters(), lr=LOCAL_LR)
        opt = FederatedOptimizer(sgd, "collaborator")
        gen = torch.Generator().manual_seed(seed + 1000 * (i + 1))
        delay = args.delay * (args.slowdown if i >= n - args.slow else 1.0)
        m = Maintainer(topo.analysis(topology, names[i])[0], local.state_dict(keep_vars=True))

        def train(meta: Any) -> dict[str, Any]:
            loss = train_epochs(local, opt, x, y, args.epochs, BATCH_SIZE, gen)
            time.sleep(delay)
            return {"instances": len(y), "loss": loss}

        try:
            run_collaborator(m, train, fed_optim=opt)
        except Exception as exc:  # the federation was cut at the target
            print(f"  {names[i]}: {exc!r}", file=sys.stderr)
        finally:
            m.close()

    threads = [threading.Thread(target=collaborator, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    if mode == "fedavg":
        with agg:
            count_step(n)
        api = API(agg, server, args.max_rounds, naive_aggregation, progress=False, evaluate=record)
        rounds = 0
        while rounds < args.max_rounds and not stop.is_set():
            api._round(rounds, "train")
            rounds += 1
        steps = rounds
    else:
        fedbuff = FedBuff(
            agg,
            server,
            steps=args.max_rounds * n // args.buffer,
            buffer=args.buffer,
            max_staleness=args.max_staleness,
            evaluate=record,
        )
        steps = 0
        while steps < fedbuff.steps and not stop.is_set():
            fedbuff._server_step(steps)
            steps += 1
    seconds = time.perf_counter() - tic
    agg.close(final=True)
    for t in threads:
        t.join(10)
    reached = next((t for t, a in curve if a >= args.target), None)
    return {
        "mode": mode,
        "seed": seed,
        "steps": steps,
        "seconds": seconds,
        "time_to_target": reached,
        "final_accuracy": curve[-1][1] if curve else 0.0,
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--slow", type=int, default=2, help="how many clients are slow")
    parser.add_argument("--slowdown", type=float, default=10.0)
    parser.add_argument("--delay", type=float, default=0.2, help="a fast client's device time")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--buffer", type=int, default=4)
    parser.add_argument("--max-staleness", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--max-rounds", type=int, default=40)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args(argv)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for mode in ("fedavg", "fedbuff"):
            r = run(mode, args, seed)
            results.append(r)
            t = r["time_to_target"]
            print(
                f"{mode:8s} seed {seed}: {r['steps']:3d} steps, "
                f"{'-' if t is None else f'{t:.1f} s'} to {args.target:.0%}, "
                f"final {r['final_accuracy']:.4f} after {r['seconds']:.1f} s",
                flush=True,
            )
            print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
