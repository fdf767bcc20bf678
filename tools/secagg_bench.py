"""Time and bytes of a FedAvg round with and without secure aggregation (docs/privacy.md).

One process: the aggregator runs ``API`` in the main thread, every
collaborator runs ``run_collaborator`` in a thread of its own, all over
real ZeroMQ sockets (tcp on 127.0.0.1). For each model and number of
collaborators it runs plain FedAvg (``naive_aggregation``) and then secure
aggregation (``secure_aggregation()`` on every node, defaults) in the same
run, and reports per round:

* **seconds**: the aggregator's round, from the first download served to
  the aggregate installed (``RoundRecord.seconds``). Collaborators do no
  training: a round costs only what the protocol costs, which makes the
  ratio the overhead itself (local training would add the same seconds to
  both).
* **CPU seconds**: the CPU time of the whole process over the round: every
  node's work (encoding, masking, unmasking, sockets), and unaffected by
  other load on the machine, unlike the wall seconds.
* **bytes**: every byte every node sent, header frames included (counted
  at the ZeroMQ port), over the round.

The first round of each federation (connections, handshakes) is not
counted. Collaborators share one copy of the model's tensors (their
downloads are identical), drop each download once it is unpackaged, and
upload the model plus an offset of their own, so 100 collaborators of a
10M-parameter model fit in memory.

    python tools/secagg_bench.py                          # 8 and 100 clients, digits and 10M
    python tools/secagg_bench.py --clients 8 --models digits --rounds 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shlex
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tools/secagg_bench.py` puts tools/ first
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import zmqfed.topo as topo  # noqa: E402
from examples.digits.app import build_model  # noqa: E402
from zmqfed.api import API, RoundRecord, run_collaborator  # noqa: E402
from zmqfed.core import Maintainer  # noqa: E402
from zmqfed.federated.zmq_port import ZmqPort  # noqa: E402
from zmqfed.functional import count_step, naive_aggregation, secure_aggregation  # noqa: E402
from zmqfed.optim import FederatedOptimizer  # noqa: E402

MODELS: dict[str, Callable[[], nn.Module]] = {
    "digits": lambda: build_model(0),
    "10m": lambda: nn.Sequential(nn.Linear(1000, 5000), nn.ReLU(), nn.Linear(5000, 1000)),
}


class ByteCounter:
    """Counts every byte sent on any ZeroMQ port of this process (frames, headers included)."""

    def __init__(self) -> None:
        self.sent = 0
        self._lock = threading.Lock()
        original = ZmqPort.send

        def send(port: ZmqPort, frames: Any, *, track: bool = False) -> Any:
            n = sum(_nbytes(f) for f in frames)
            with self._lock:
                self.sent += n
            return original(port, frames, track=track)

        ZmqPort.send = send  # type: ignore[method-assign]


def _nbytes(frame: Any) -> int:
    if isinstance(frame, (bytes, bytearray)):
        return len(frame)
    return memoryview(frame).nbytes


def _endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def run(
    model: str, n: int, rounds: int, secure: bool, counter: ByteCounter
) -> list[dict[str, Any]]:
    """One federation of ``n`` collaborators for ``rounds + 1`` rounds; the measured rounds."""
    star = topo.star(n, _endpoint())
    names = [node.nick_name for node in star.nodes if node.nick_name != "aggregator"]
    timeout = 1800.0
    net = MODELS[model]()
    agg = Maintainer(
        topo.analysis(star, "aggregator")[0], net.state_dict(keep_vars=True), timeout=timeout
    )
    with agg:
        count_step(n)
        if secure:
            secure_aggregation()
    shared = {k: v.detach().clone() for k, v in net.state_dict().items()}  # the clients' model
    errors: list[BaseException] = []

    def collaborator(i: int) -> None:
        m = Maintainer(topo.analysis(star, names[i])[0], shared, timeout=timeout)
        with m:
            if secure:
                secure_aggregation()
        offset = (i + 1) * 1e-3

        def own_update(state: dict[str, torch.Tensor], p: torch.Tensor) -> dict[str, torch.Tensor]:
            state["param"] = state["param"] + offset
            return state

        m.register_package_hook(0, own_update)

        def train(meta: Any) -> dict[str, Any]:
            m.data = {}  # unpackaged already: 100 copies of a 10M model need not stay around
            return {"instances": 100 + i}

        try:
            run_collaborator(m, train, rounds=rounds + 1)
        except BaseException as exc:
            errors.append(exc)
        finally:
            m.close()

    threads = [threading.Thread(target=collaborator, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    marks: list[tuple[RoundRecord, int, float]] = []
    optim = FederatedOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), "aggregator")
    api = API(
        agg,
        optim,
        rounds + 1,
        naive_aggregation,
        progress=False,
        on_round=lambda record: marks.append((record, counter.sent, time.process_time())),
    )
    api.run()
    for thread in threads:
        thread.join(timeout)
    agg.close(final=True)
    if errors:
        raise errors[0]
    out = []
    for (_, sent_before, cpu_before), (record, sent, cpu) in itertools.pairwise(marks):
        out.append(
            {"seconds": record.seconds, "cpu": cpu - cpu_before, "bytes": sent - sent_before}
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 100])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["digits", "10m"])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (digits)")
    parser.add_argument("--rounds-10m", type=int, default=1, help="measured rounds (10m)")
    parser.add_argument("--json", type=Path, help="append one JSON line per measurement here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    counter = ByteCounter()
    command = "python tools/secagg_bench.py " + shlex.join(sys.argv[1:])
    print(f"# {command}  ({platform.node()}, {os.cpu_count()} cpus, torch {torch.__version__})")
    print(
        "| model | params | clients | FedAvg s | SecAgg s | time x | FedAvg CPU s | SecAgg CPU s "
        "| CPU x | FedAvg MB | SecAgg MB | bytes x |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.models:
        params = sum(p.numel() for p in MODELS[model]().parameters())
        rounds = args.rounds_10m if model == "10m" else args.rounds
        for n in args.clients:
            result = {}
            for secure in (False, True):
                tic = time.perf_counter()
                rows = run(model, n, rounds, secure, counter)
                result[secure] = {
                    "seconds": statistics.median(r["seconds"] for r in rows),
                    "cpu": statistics.median(r["cpu"] for r in rows),
                    "bytes": statistics.median(r["bytes"] for r in rows),
                    "wall": time.perf_counter() - tic,
                }
            plain, sec = result[False], result[True]
            print(
                f"| {model} | {params:,} | {n} | {plain['seconds']:.2f} | {sec['seconds']:.2f} | "
                f"{sec['seconds'] / plain['seconds']:.1f} | {plain['cpu']:.2f} | {sec['cpu']:.2f} | "
                f"{sec['cpu'] / plain['cpu']:.1f} | {plain['bytes'] / 1e6:.1f} | "
                f"{sec['bytes'] / 1e6:.1f} | {sec['bytes'] / plain['bytes']:.2f} |",
                flush=True,
            )
            if args.json is not None:
                with args.json.open("a", encoding="utf-8") as f:
                    row = {"model": model, "params": params, "clients": n, "rounds": rounds}
                    f.write(
                        json.dumps({**row, "plain": plain, "secagg": sec, "command": command})
                        + "\n"
                    )


if __name__ == "__main__":
    main()
