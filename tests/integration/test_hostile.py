"""Attacks on a running aggregator from outside; afterwards it still serves a normal round.

Counts of what was tried are printed (run with ``-s``) and recorded in
docs/reliability.md.
"""

from __future__ import annotations

import random
import socket
import tracemalloc

import lz4.block
import torch
from torch import nn

import zmqfed.topo as topo
from tests.integration._helpers import download_then_upload
from tests.integration.test_protocol_faults import (
    _ask,
    _dealer,
    _hello,
    _star,
)
from tests.integration.test_protocol_faults import aggregator as aggregator  # the fixture
from zmqfed.wire import Envelope, Limits, encode


class _Evil:
    """Unpickling this creates a file: proof that nothing was unpickled if it is absent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _lz4_bomb() -> list:
    """A PUSH whose 4 KiB tensor frame decompresses to 64 MiB."""
    frames = encode(
        Envelope(
            kind="PUSH",
            sender="alpha",
            seq=2,
            incarnation="x",
            tensors={"bias": {"param": torch.zeros(1024)}},
        ),
        codec="raw",
    )
    bomb = lz4.block.compress(bytes(64 * 2**20), store_size=False)
    header = (
        bytes(frames[0])
        .replace(b'"codec":"raw"', b'"codec":"lz4"')
        .replace(b'"nbytes":4096', b'"nbytes":%d' % len(bomb))
    )
    return [header, bomb]


def test_hostile_inputs_do_not_hurt_a_running_aggregator(
    aggregator,
    zmq_ctx,
    tmp_path,
    slow_factor,
):
    counts = {"raw_tcp_connections": 0, "garbage_messages": 0, "protocol_errors": 0}
    rng = random.Random(7)
    host, port = aggregator.endpoint.removeprefix("tcp://").rsplit(":", 1)

    # 1. Random bytes straight onto the TCP port (no ZMTP greeting at all).
    for _ in range(50):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(rng.randbytes(rng.randint(1, 4096)))
        counts["raw_tcp_connections"] += 1

    with _dealer(zmq_ctx, aggregator.endpoint, "alpha") as sock:
        assert _hello(sock, aggregator.fingerprint).kind == "WELCOME"
        # 2. A flood of random multipart garbage from a member.
        for _ in range(300):
            frames = [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(1, 4))]
            reply = _ask(sock, frames)
            counts["garbage_messages"] += 1
            counts["protocol_errors"] += reply.kind == "ERROR" and reply.meta["code"] == "protocol"

        # 3. An lz4 bomb: refused, and the aggregator never held the 64 MiB.
        bomb = _lz4_bomb()
        tracemalloc.start()
        reply = _ask(sock, bomb)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (reply.kind, reply.meta["code"]) == ("ERROR", "protocol")
        assert "stale-incarnation" not in reply.meta["reason"]
        assert peak < 16 * 2**20, f"peak {peak} bytes while refusing an lz4 bomb"

        # 4. A pickle that would create a file: refused without being unpickled.
        marker = tmp_path / "pwned"
        evil = encode(
            Envelope(kind="PUSH", sender="alpha", seq=3, obj=_Evil(str(marker))),
            limits=Limits(allow_pickle=True),
        )
        reply = _ask(sock, evil)
        assert (reply.kind, reply.meta["code"]) == ("ERROR", "protocol")
        assert "pickle" in reply.meta["reason"]
        assert not marker.exists()

    # 5. Afterwards both members complete a normal round.
    for name in ("alpha", "beta"):
        props = topo.analysis(_star(aggregator.endpoint), name)[0]
        state = nn.Linear(4, 1).state_dict(keep_vars=True)
        download_then_upload(props, state, timeout=30 * slow_factor)
    aggregator.finish()
    assert aggregator.uploads == 2
    assert counts["protocol_errors"] == counts["garbage_messages"]
    print(f"\nhostile inputs: {counts}, lz4 bomb peak {peak / 2**20:.1f} MiB, crashes 0")
