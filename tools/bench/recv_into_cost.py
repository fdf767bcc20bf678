"""Per-chunk cost of ``zmqfed.federated.sockets.recv_into``: native vs fallback.

pyzmq >= 26.4 has ``Socket.recv_into``; older pyzmq gets zmqfed's fallback
(``recv(copy=False)``, then a copy of the frame's buffer into the target).
This times only what ``protocol.land_chunk`` does per CHUNK: COUNT messages
``[header, payload]`` are first queued on an inproc PAIR (unbounded HWMs),
then the drain is timed: ``recv()`` of the header and ``recv_into`` of the
payload into one preallocated, already-touched buffer. Under pyzmq >= 26.4
both paths are measured, alternating rounds; under older pyzmq only the
fallback exists. Not part of ``run.py``: run it under each pyzmq::

    python tools/bench/recv_into_cost.py [SIZE [COUNT [ROUNDS]]]
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import zmq

from zmqfed.federated import sockets


def main(argv: list[str]) -> None:
    size, count, rounds = (int(a) for a in (argv + ["8388608", "16", "15"][len(argv) :]))
    ctx = sockets.context()  # also tunes malloc, as every zmqfed process does
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for s in (a, b):
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
    a.bind("inproc://recv-into-cost")
    b.connect("inproc://recv-into-cost")
    payload = bytes(np.ones(size, np.uint8))
    target = np.zeros(size, np.uint8)
    view = target.data
    native = sockets._HAVE_RECV_INTO
    modes = ["native", "fallback"] if native else ["fallback"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for i in range(rounds * len(modes)):
            mode = modes[i % len(modes)]
            sockets._HAVE_RECV_INTO = mode == "native"
            for _ in range(count):
                a.send_multipart([b"CHUNK", payload])  # copied into libzmq messages
            t0 = time.perf_counter()
            for _ in range(count):
                b.recv()
                if sockets.recv_into(b, view) != size:
                    raise AssertionError("short frame")
            times[mode].append((time.perf_counter() - t0) / count)
            if target[0] != 1 or target[-1] != 1:
                raise AssertionError("payload did not land")
            target[:] = 0
    finally:
        sockets._HAVE_RECV_INTO = native
        a.close(linger=0)
        b.close(linger=0)
        sockets.shutdown()
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(
            f"pyzmq {zmq.__version__} {mode:8s} chunk {size / 2**20:g} MiB: "
            f"median {med * 1e6:.1f} us/chunk ({size / med / 1e9:.2f} GB/s), "
            f"best {min(ts) * 1e6:.1f} us, {len(ts)} rounds of {count}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
