"""Round overhead with a tiny model, and the aggregator's small-message rate.

Round latency: N collaborators (threads of one process, each its own
``Maintainer`` and DEALER on real tcp sockets) are released together and each
runs ``step()`` (PUSH its update, then PULL the model); the aggregator (its own
process, a real ``Maintainer`` loop) ends its step after serving N downloads.
The time from release to the last collaborator's return is the round's
middleware time: the model is 2 tensors of a few bytes, so wire time is nil.

Message rate: a load process with 16 DEALERs keeps 64 PINGs each in flight to
the aggregator's ``Maintainer`` loop, which decodes, validates and answers
PONG; the same load against a bare pyzmq ROUTER echo is the baseline.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tools.bench.common import (
    Proc,
    child_setup,
    free_port,
    median,
    row,
    run_procs,
    star_props,
    time_rounds,
)


def _tiny() -> dict[str, Any]:
    import torch

    return {"fc.weight": torch.zeros(1, 4), "fc.bias": torch.zeros(1)}


# --------------------------------------------------------------------- rounds


def _round_aggregator(endpoint: str, names: list[str], rounds: int, done: Any) -> None:
    child_setup()
    from zmqfed.core import Maintainer

    m = Maintainer(star_props(endpoint, names, "aggregator"), _tiny(), idle_interval=0.5)
    served = 0

    def accept(m: Maintainer) -> bool:
        return True

    def after_upload(m: Maintainer, flag: Any) -> None:
        nonlocal served
        served += 1
        if served >= len(names):
            m.manual_stop()

    m.register_step_hook(0, accept, "before_download")
    m.register_step_hook(0, accept, "before_upload")
    m.register_step_hook(0, after_upload, "after_upload")
    try:
        for _ in range(rounds + 1):
            served = 0
            m.step(timeout=300)
            m.clear()
            m.update_version()  # a round per version: each member's upload counts once
        done.wait(300)
    finally:
        m.close()


def _round_collaborators(endpoint: str, names: list[str], rounds: int, done: Any) -> list[float]:
    child_setup()
    from zmqfed.core import Maintainer

    ms = [Maintainer(star_props(endpoint, names, n), _tiny()) for n in names]
    start = threading.Barrier(len(ms) + 1)
    end = threading.Barrier(len(ms) + 1)
    errors: list[BaseException] = []

    def work(m: Any) -> None:
        m.meta["instances"] = 1
        for _ in range(rounds + 1):
            start.wait()
            try:
                m.step(timeout=300)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
            end.wait()

    threads = [threading.Thread(target=work, args=(m,), daemon=True) for m in ms]
    times = time_rounds(threads, start, end, rounds + 1)
    done.set()
    for m in ms:
        m.close()
    if errors:
        raise errors[0]
    return times[1:]  # the first round includes the handshakes


def round_latency(n: int, rounds: int) -> list[float]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    names = [f"c{i}" for i in range(n)]

    def make(ctx: Any) -> list[Proc]:
        done = ctx.Event()
        return [
            Proc(_round_aggregator, (endpoint, names, rounds, done)),
            Proc(_round_collaborators, (endpoint, names, rounds, done)),
        ]

    return run_procs(make)[1]


# --------------------------------------------------------------- message rate


def _rate_aggregator(endpoint: str, names: list[str], done: Any, ready: Any) -> dict[str, int]:
    child_setup()
    from zmqfed.core import Maintainer

    m = Maintainer(star_props(endpoint, names, "aggregator"), _tiny(), idle_interval=0.05)

    def at_last(m: Maintainer) -> None:
        if done.is_set():
            m.manual_stop()

    m.register_step_hook(0, at_last, "at_last")
    ready.set()
    try:
        m.step(timeout=300)
    finally:
        m.close()
    return {"messages_in": m.stats["messages_in"]}


def _echo_router(endpoint: str, names: list[str], done: Any, ready: Any) -> dict[str, int]:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.set()
    count = 0
    while not done.is_set():
        if not sock.poll(50):
            continue
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            count += 1
            sock.send_multipart(frames, copy=False)
    sock.close(linger=0)
    ctx.term()
    return {"messages_in": count}


def _load(endpoint: str, names: list[str], total: int, window: int, done: Any, ready: Any) -> float:
    """Keep ``window`` PINGs in flight per DEALER until ``total`` replies came back."""
    import zmq

    from zmqfed.wire import Envelope, encode

    ready.wait(60)
    ctx = zmq.Context()
    socks = []
    frames = []
    for name in names:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, name.encode())
        s.connect(endpoint)
        socks.append(s)
        frames.append(encode(Envelope(kind="PING", sender=name, seq=1)))
    # connect and warm up: one round trip each
    for s, f in zip(socks, frames, strict=True):
        s.send_multipart(f)
    for s in socks:
        s.recv_multipart()
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    sent = received = 0
    t0 = time.perf_counter()
    for s, f in zip(socks, frames, strict=True):
        for _ in range(window):
            s.send_multipart(f)
            sent += 1
    index = {s: i for i, s in enumerate(socks)}
    while received < total:
        for s, _ in poller.poll(10000):
            while True:
                try:
                    s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                received += 1
                if sent < total:
                    s.send_multipart(frames[index[s]])
                    sent += 1
    dt = time.perf_counter() - t0
    done.set()
    for s in socks:
        s.close(linger=0)
    ctx.term()
    return received / dt


def message_rate(total: int, *, raw: bool, peers: int = 16, window: int = 64) -> float:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    names = [f"c{i}" for i in range(peers)]
    server = _echo_router if raw else _rate_aggregator

    def make(ctx: Any) -> list[Proc]:
        done, ready = ctx.Event(), ctx.Event()
        return [
            Proc(server, (endpoint, names, done, ready)),
            Proc(_load, (endpoint, names, total, window, done, ready)),
        ]

    return run_procs(make)[1]


# --------------------------------------------------------------------- family


def run(quick: bool = False, log: Any = print) -> list[dict[str, Any]]:
    rows = []
    ns = [1, 8] if quick else [1, 8, 64]
    for n in ns:
        rounds = 3 if quick else (10 if n < 64 else 5)
        log(f"overhead: round with {n} collaborators")
        t = median(round_latency(n, rounds))
        target = "<=10 ms" if n == 8 else None
        rows.append(
            row(
                f"round latency, tiny model, {n} collaborator(s) (push+pull each)",
                t * 1e3,
                "ms",
                target=target,
                met=(t * 1e3 <= 10.0) if n == 8 else None,
                note=f"{t * 1e3 / n:.2f} ms per collaborator; collaborators are threads of one process",
            )
        )
    total = 2000 if quick else 60000
    log("overhead: message rate, raw ROUTER echo")
    raw = message_rate(total, raw=True)
    log("overhead: message rate, zmqfed aggregator")
    z = message_rate(total, raw=False)
    rows.append(
        row(
            "aggregator small messages (PING->PONG through Maintainer loop)",
            z,
            "msg/s",
            baseline=raw,
            baseline_name="bare pyzmq ROUTER echo",
            ratio=z / raw,
            target=">=20000 msg/s",
            met=z >= 20000,
            note="16 DEALERs x 64 in flight, load generator on the same 2 cores",
        )
    )
    return rows
