"""A running aggregator facing hostile or confused peers keeps serving.

The aggregator runs in a thread that creates, steps and closes its
Maintainer (one owner thread per socket). Raw DEALERs speak to it with
hand-made frames; every reply is decoded with ``zmqfed.wire.decode``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest
import torch
import zmq
from torch import nn

import zmqfed
import zmqfed.topo as topo
from zmqfed.core import Maintainer, steps
from zmqfed.wire import MAGIC, PROTOCOL_VERSION, Envelope, decode, encode

NAMES = ("alpha", "beta")


def _star(endpoint: str, names=NAMES) -> topo.Topology:
    topology = topo.Topology()
    aggregator = topology.add_node(topo.Node("aggregator", endpoint))
    for name in names:
        topology.add_edge(topo.Node(name), aggregator)
    return topology


def _model() -> nn.Linear:
    network = nn.Linear(4, 1)
    with torch.no_grad():
        for p in network.parameters():
            p.fill_(0.25)
    return network


class AggregatorThread(threading.Thread):
    """Creates the aggregator, runs one ``step()`` until told to stop, closes it."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.timeout = endpoint, timeout
        self.ready, self.stop = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.uploads = self.errors = -1
        self.fingerprint = ""

    def run(self) -> None:
        try:
            props = topo.analysis(_star(self.endpoint), "aggregator")[0]
            self.fingerprint = props.fingerprint
            m = Maintainer(props, _model().state_dict(keep_vars=True), idle_interval=0.05)
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return
        try:
            m.register_step_hook(
                0, lambda m: m.manual_stop() if self.stop.is_set() else None, steps.at_last
            )
            self.ready.set()
            m.step(timeout=self.timeout)
            self.uploads, self.errors = len(m.meta_list), m.stats["errors"]
        except BaseException as exc:
            self.error = exc
        finally:
            m.close()

    def finish(self) -> None:
        self.stop.set()
        self.join(15)
        assert not self.is_alive(), "aggregator thread did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def aggregator(free_tcp_endpoint, slow_factor):
    agg = AggregatorThread(free_tcp_endpoint, timeout=60 * slow_factor)
    agg.start()
    assert agg.ready.wait(10)
    yield agg
    if agg.is_alive():
        agg.stop.set()
        agg.join(15)


def _dealer(ctx: zmq.Context, endpoint: str, rid: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, rid.encode())
    sock.connect(endpoint)
    return sock


def _ask(sock: zmq.Socket, frames: list, timeout: float = 10.0) -> Envelope:
    """Send ``frames``; the aggregator's answer, skipping its liveness probes (PING)."""
    sock.send_multipart(frames)
    while True:
        assert sock.poll(int(timeout * 1000)), "no reply from the aggregator"
        reply = decode(sock.recv_multipart())
        if reply.kind != "PING":
            return reply


def _envelope(kind: str, sender: str = "alpha", seq: int = 1, **kw) -> list:
    return encode(Envelope(kind=kind, sender=sender, seq=seq, **kw))


def _hello(
    sock: zmq.Socket,
    fingerprint: str,
    seq: int = 1,
    protocol: int = PROTOCOL_VERSION,
    sender: str = "alpha",
) -> Envelope:
    return _ask(
        sock,
        _envelope(
            "HELLO",
            sender,
            seq,
            meta={
                "protocol": protocol,
                "fingerprint": fingerprint,
                "session": uuid.uuid4().hex[:16],
            },
        ),
    )


def _lying_sizes() -> list[bytes]:
    """A well-formed PUSH whose header then claims 1000 floats in a 4-float frame."""
    frames = encode(
        Envelope(kind="PUSH", sender="alpha", seq=3, tensors={"bias": {"param": torch.ones(4)}})
    )
    doc = json.loads(bytes(frames[0])[len(MAGIC) + 1 :])
    doc["tensors"][0].update(shape=[1000], nbytes=4000, rawbytes=4000)
    header = MAGIC + bytes([PROTOCOL_VERSION]) + json.dumps(doc).encode()
    return [header, bytes(memoryview(frames[1]))]


# what to send -> what the ERROR's reason must say
GARBAGE = {
    "random-bytes": (lambda: [os.urandom(64), os.urandom(16)], "not a zmqfed message"),
    "wrong-magic": (
        lambda: [b"OPENFED" + bytes(_envelope("PUSH")[0])[len(MAGIC) :]],
        "not a zmqfed message",
    ),
    "lying-sizes": (_lying_sizes, "frame has 16 bytes, header says 4000"),
    "missing-frame": (lambda: _lying_sizes()[:1], "message has 1 frames, header describes 2"),
}


def test_garbage_gets_protocol_errors_and_a_round_still_completes(aggregator, zmq_ctx, slow_factor):
    with _dealer(zmq_ctx, aggregator.endpoint, "alpha") as sock:
        for what, (make, reason) in GARBAGE.items():
            reply = _ask(sock, make())
            assert reply.kind == "ERROR", what
            assert reply.meta["code"] == "protocol", (what, reply.meta)
            assert reason in reply.meta["reason"], (what, reply.meta)
            assert reply.sender == "aggregator"
    # The aggregator survived: a normal collaborator completes a round.
    props = topo.analysis(_star(aggregator.endpoint), "beta")[0]
    network = nn.Linear(4, 1)
    beta = Maintainer(props, network.state_dict(keep_vars=True))
    try:
        beta.step(upload=False, timeout=20 * slow_factor)
        beta.unpackage()
        assert all(torch.equal(p, torch.full_like(p, 0.25)) for p in network.parameters())
        beta.package()
        beta.step(download=False, timeout=20 * slow_factor)
    finally:
        beta.close()
    aggregator.finish()
    assert aggregator.uploads == 1
    assert aggregator.errors == len(GARBAGE)


def test_unknown_peer_and_hello_first(aggregator, zmq_ctx):
    with _dealer(zmq_ctx, aggregator.endpoint, "mallory") as sock:
        reply = _ask(sock, _envelope("HELLO", "mallory", meta={"protocol": PROTOCOL_VERSION}))
        assert (reply.kind, reply.meta["code"]) == ("ERROR", "unknown-peer")
        assert "mallory" in reply.meta["reason"]
        assert "alpha" not in reply.meta["reason"]  # the roster is not disclosed
    with _dealer(zmq_ctx, aggregator.endpoint, "alpha") as sock:
        reply = _ask(sock, _envelope("PUSH", tensors={"bias": {"param": torch.ones(1)}}))
        assert (reply.kind, reply.meta["code"]) == ("ERROR", "hello-first")
        assert reply.seq == 1
    aggregator.finish()
    assert aggregator.uploads == 0


def test_hello_with_another_protocol_is_refused(aggregator, zmq_ctx):
    with _dealer(zmq_ctx, aggregator.endpoint, "alpha") as sock:
        reply = _hello(sock, aggregator.fingerprint, protocol=PROTOCOL_VERSION - 1)
        assert (reply.kind, reply.meta["code"]) == ("ERROR", "protocol")
        assert f"peer speaks protocol {PROTOCOL_VERSION - 1}" in reply.meta["reason"]
        # ... and nothing was half-accepted: a request still needs a HELLO
        reply = _ask(sock, _envelope("PULL", seq=2))
        assert (reply.kind, reply.meta["code"]) == ("ERROR", "hello-first")
    aggregator.finish()


def test_other_topology_gets_fingerprint_error(aggregator, slow_factor):
    # Same aggregator name and endpoint, but other peers: another group.
    props = topo.analysis(_star(aggregator.endpoint, ("alpha", "zeta")), "alpha")[0]
    alpha = Maintainer(props, nn.Linear(4, 1).state_dict(keep_vars=True))
    try:
        with pytest.raises(zmqfed.RemoteError) as info:
            alpha.step(upload=False, timeout=20 * slow_factor)
    finally:
        alpha.close()
    assert info.value.code == "fingerprint"
    assert info.value.peer == "aggregator"
    aggregator.finish()


def test_replayed_push_is_acked_and_counted_once(aggregator, zmq_ctx):
    with _dealer(zmq_ctx, aggregator.endpoint, "alpha") as sock:
        welcome = _hello(sock, aggregator.fingerprint)
        assert welcome.kind == "WELCOME", welcome
        push = _envelope(
            "PUSH",
            seq=7,
            version=0,
            incarnation=welcome.incarnation,
            meta={"version": 0},
            tensors={"weight": {"param": torch.ones(1, 4)}, "bias": {"param": torch.ones(1)}},
        )
        first = _ask(sock, push)
        assert (first.kind, first.seq) == ("ACK", 7)
        assert not first.meta.get("duplicate")
        again = _ask(sock, push)
        assert (again.kind, again.seq) == ("ACK", 7)
        assert again.meta.get("duplicate") is True
    aggregator.finish()
    assert aggregator.uploads == 1


def test_pull_for_a_version_ahead_waits(aggregator, zmq_ctx):
    with _dealer(zmq_ctx, aggregator.endpoint, "alpha") as sock:
        welcome = _hello(sock, aggregator.fingerprint)
        assert welcome.kind == "WELCOME"
        reply = _ask(
            sock,
            _envelope(
                "PULL", seq=2, version=5, incarnation=welcome.incarnation, meta={"version": 5}
            ),
        )
        assert (reply.kind, reply.seq) == ("WAIT", 2)
        assert reply.meta["version"] == 0
        # parked, not answered: no DATA follows while the aggregator stays at 0
        assert not sock.poll(300)
    aggregator.finish()


def test_absent_aggregator_times_out(free_tcp_endpoint):
    props = topo.analysis(_star(free_tcp_endpoint), "alpha")[0]
    alpha = Maintainer(props, nn.Linear(4, 1).state_dict(keep_vars=True))
    tic = time.monotonic()
    try:
        with pytest.raises(zmqfed.PeerTimeout) as info:
            alpha.step(upload=False, timeout=1.5)
    finally:
        alpha.close()
    elapsed = time.monotonic() - tic
    assert 1.4 <= elapsed < 10, elapsed  # bounded by the timeout, not by retries
    assert info.value.peer == "aggregator"
    assert info.value.seconds == 1.5
    assert "'aggregator'" in str(info.value) and "1.5 s" in str(info.value)
