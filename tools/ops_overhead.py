"""What metrics cost the message loop: counters, the telemetry hooks, snapshots and scrapes.

Four measurements, each against a baseline taken in the same run:

1. **Message rate with the traffic counters** (every message counted by kind
   in both directions): 16 DEALERs keep 64 PINGs each in flight to an
   aggregator's ``Maintainer`` loop; the baseline is the same loop with the
   counting turned into no-ops in that process.  And the counting's own
   cost per message (``timeit``), as a share of the loop's time per message.
2. **Round latency with the telemetry hooks** (``Telemetry.watch``:
   ``step_started`` and ``after_peer``, publishing at most once a second, as
   ``zmqfed-node run`` registers them whenever a status file or a server
   exists): 8
   collaborators, a tiny model, push+pull each; baseline without the hooks.
   A and B alternate, several times each.
3. **Publishing a snapshot** of a group of N peers (done by the loop thread
   at most once a second): time per publish, and its share of one second.
4. **Rendering ``/metrics``** (done by the HTTP thread, never the loop).

Run it as::

    .venv/bin/python tools/ops_overhead.py            # the figures in docs/operations.md
    .venv/bin/python tools/ops_overhead.py --quick    # a smoke run

It prints one line per figure and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench.common import (
    Proc,
    child_setup,
    free_port,
    run_procs,
    star_props,
    time_rounds,
)
from tools.bench.overhead import _load


def _tiny() -> dict[str, Any]:
    import torch

    return {"fc.weight": torch.zeros(1, 4), "fc.bias": torch.zeros(1)}


def _no_counting() -> None:
    """Turn the traffic counters into no-ops in this process (the baseline)."""
    from zmqfed.federated import aggregator_transport, traffic

    traffic.Traffic.received = lambda self, kind, nbytes, messages=1: None  # type: ignore[method-assign]
    traffic.Traffic.sent = lambda self, kind, nbytes, messages=1: None  # type: ignore[method-assign]
    aggregator_transport.frames_nbytes = lambda frames: 0  # type: ignore[attr-defined]


# -- 1. message rate -------------------------------------------------------------------
def _rate_aggregator(endpoint: str, names: list[str], done: Any, ready: Any, count: bool) -> int:
    child_setup()
    if not count:
        _no_counting()
    from zmqfed.core import Maintainer

    m = Maintainer(star_props(endpoint, names, "aggregator"), _tiny(), idle_interval=0.05)
    m.register_step_hook(0, lambda m: done.is_set() and m.manual_stop(), "at_last")
    ready.set()
    try:
        m.step(timeout=300)
    finally:
        m.close()
    return int(m.stats["messages_in"])


def message_rate(total: int, count: bool, peers: int = 16, window: int = 64) -> float:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    names = [f"c{i}" for i in range(peers)]

    def make(ctx: Any) -> list[Proc]:
        done, ready = ctx.Event(), ctx.Event()
        return [
            Proc(_rate_aggregator, (endpoint, names, done, ready, count)),
            Proc(_load, (endpoint, names, total, window, done, ready)),
        ]

    return float(run_procs(make)[1])


def counting_cost(repeat: int = 200_000) -> float:
    """Seconds the counters add to one message: ``frames_nbytes`` and one ``received``."""
    import timeit

    from zmqfed.federated.traffic import Traffic, frames_nbytes
    from zmqfed.wire import Envelope, encode

    frames = encode(Envelope(kind="PUSH", sender="c0", seq=1))
    traffic = Traffic()

    def count() -> None:
        traffic.received("PUSH", frames_nbytes(frames))

    return min(timeit.repeat(count, number=repeat, repeat=5)) / repeat


def hook_cost(repeat: int = 200_000) -> float:
    """Seconds one ``after_peer`` call of the telemetry hook costs when no publish is due."""
    import timeit

    from zmqfed.ops import Telemetry

    telemetry = Telemetry("aggregator", ["aggregator"], rounds=1, publish_interval=3600.0)
    telemetry.publish(state="running", round=0, groups=[])  # the next one is an hour away

    def after_peer() -> None:  # the body of the hook Telemetry.watch registers
        if telemetry.due():
            raise AssertionError("not due")

    return min(timeit.repeat(after_peer, number=repeat, repeat=5)) / repeat


# -- 2. round latency ----------------------------------------------------------------
def _round_aggregator(endpoint: str, names: list[str], rounds: int, done: Any, hooks: bool) -> None:
    child_setup()
    from zmqfed.core import Maintainer
    from zmqfed.ops import Telemetry

    m = Maintainer(star_props(endpoint, names, "aggregator"), _tiny(), idle_interval=0.5)
    served = 0

    def after_upload(m: Maintainer, flag: Any) -> None:
        nonlocal served
        served += 1
        if served >= len(names):
            m.manual_stop()

    m.register_step_hook(0, lambda m: True, "before_download")
    m.register_step_hook(0, lambda m: True, "before_upload")
    m.register_step_hook(0, after_upload, "after_upload")
    if hooks:  # the hooks NodeOps.watch registers, publishing a snapshot when due
        telemetry = Telemetry("aggregator", ["aggregator"], rounds)
        telemetry.watch(
            m, lambda: telemetry.publish(state="running", round=0, groups=[(m, len(names))])
        )
    try:
        for _ in range(rounds + 1):
            served = 0
            m.step(timeout=300)
            m.clear()
        done.wait(300)
    finally:
        m.close()


def _round_collaborators(endpoint: str, names: list[str], rounds: int, done: Any) -> list[float]:
    child_setup()
    from zmqfed.core import Maintainer

    ms = [Maintainer(star_props(endpoint, names, n), _tiny()) for n in names]
    start = threading.Barrier(len(ms) + 1)
    end = threading.Barrier(len(ms) + 1)

    def work(m: Any) -> None:
        m.meta["instances"] = 1
        for _ in range(rounds + 1):
            start.wait()
            m.step(timeout=300)
            end.wait()

    threads = [threading.Thread(target=work, args=(m,), daemon=True) for m in ms]
    times = time_rounds(threads, start, end, rounds + 1)
    done.set()
    for m in ms:
        m.close()
    return times[1:]  # the first round includes the handshakes


def round_latency(n: int, rounds: int, hooks: bool) -> list[float]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    names = [f"c{i}" for i in range(n)]

    def make(ctx: Any) -> list[Proc]:
        done = ctx.Event()
        return [
            Proc(_round_aggregator, (endpoint, names, rounds, done, hooks)),
            Proc(_round_collaborators, (endpoint, names, rounds, done)),
        ]

    return list(run_procs(make)[1])


# -- 3 and 4. snapshots and scrapes ------------------------------------------------------
def publish_and_render(peers: int, repeat: int) -> tuple[float, float, int]:
    """Seconds per publish and per /metrics render for a group of ``peers`` (in memory)."""
    import zmqfed.topo as topo
    from zmqfed.core import Maintainer
    from zmqfed.federated import MemoryNetwork
    from zmqfed.ops import MetricsExporter, Telemetry

    star = topo.star(peers, "ipc:///memory/ops-bench")
    m = Maintainer(topo.analysis(star, "aggregator")[0], _tiny(), network=MemoryNetwork())
    telemetry = Telemetry("aggregator", ["aggregator"], rounds=10, top_peers=0)
    telemetry.record({"round": 0, "seconds": 1.0, "metrics": {"loss": 0.5, "accuracy": 0.9}})
    exporter = MetricsExporter(telemetry)
    try:
        t0 = time.perf_counter()
        for _ in range(repeat):
            telemetry.publish(state="running", round=1, groups=[(m, peers)])
        publish = (time.perf_counter() - t0) / repeat
        t0 = time.perf_counter()
        for _ in range(repeat):
            text = exporter.render()
        render = (time.perf_counter() - t0) / repeat
    finally:
        m.close()
    return publish, render, len(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    args = parser.parse_args(argv)
    reps = 1 if args.quick else 5
    total = 4000 if args.quick else 60000

    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(reps):
        for count in (False, True):
            rates[count].append(message_rate(total, count))
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(
        f"message rate, PING->PONG through the loop: {on:.0f} msg/s counted, "
        f"{off:.0f} msg/s not counted: ratio {on / off:.3f} "
        f"(runs: {[round(x) for x in rates[True]]} vs {[round(x) for x in rates[False]]})"
    )

    cost = counting_cost(20_000 if args.quick else 200_000)
    print(
        f"counting one message: {cost * 1e6:.3f} us, {cost * on * 100:.2f}% of the loop's "
        f"time per message at {on:.0f} msg/s"
    )

    rounds = 5 if args.quick else 20
    lat: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(reps):
        for hooks in (False, True):
            lat[hooks].extend(round_latency(8, rounds, hooks))
    off_ms, on_ms = statistics.median(lat[False]) * 1e3, statistics.median(lat[True]) * 1e3
    print(
        f"round latency, 8 collaborators, tiny model: {on_ms:.2f} ms with the telemetry hooks, "
        f"{off_ms:.2f} ms without: ratio {on_ms / off_ms:.3f} ({len(lat[True])} rounds each)"
    )

    tick = hook_cost(20_000 if args.quick else 200_000)
    print(
        f"telemetry hook between publishes: {tick * 1e6:.3f} us per after_peer call "
        f"(a round of 8 push+pull collaborators runs after_peer about 24 times: "
        f"{24 * tick * 1e6:.1f} us)"
    )

    for peers in (100, 1000) if args.quick else (100, 1000, 10000):
        publish, render, size = publish_and_render(peers, 3 if args.quick else 20)
        print(
            f"{peers} peers: publish {publish * 1e3:.2f} ms ({publish * 100:.2f}% of the "
            f"loop at one publish a second); /metrics render {render * 1e3:.2f} ms, "
            f"{size} bytes (per-peer series off)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
