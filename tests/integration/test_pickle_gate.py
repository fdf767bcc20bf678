"""The pickle gate holds at every entry point, and for peers that have not said HELLO.

``Limits(allow_pickle=True)`` lets peers run code on a node, so it needs
CURVE. Only ``Maintainer`` used to check; ``init_federated_group`` and the
transports took it without CURVE, and an outsider claiming a member's
routing id then had ``cloudpickle.loads`` run on its object frame before any
HELLO. Now every transport refuses it before making a socket, and behind
CURVE an object frame is decoded only for a member that completed HELLO.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth

import zmqfed.topo as topo
from tests.integration.test_protocol_faults import _ask, _star
from zmqfed.core import Maintainer, steps
from zmqfed.errors import ConfigError
from zmqfed.federated import (
    AggregatorTransport,
    CollaboratorTransport,
    Curve,
    create_keys,
    default_network,
    init_federated_group,
)
from zmqfed.wire import PROTOCOL_VERSION, Envelope, Limits, encode

PICKLE = Limits(allow_pickle=True)


class _Touch:
    """Unpickling this creates a file: proof of whether ``cloudpickle.loads`` ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _endpoint_is_free(endpoint: str) -> bool:
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.ROUTER) as probe:
        probe.linger = 0
        try:
            probe.bind(endpoint)
        except zmq.ZMQError:
            return False
    return True


def test_every_entry_point_refuses_pickle_without_curve(free_tcp_endpoint):
    topology = _star(free_tcp_endpoint, ("alpha",))
    agg, alpha = (topo.analysis(topology, name)[0] for name in ("aggregator", "alpha"))
    state = {"w": torch.zeros(2)}
    makers = [
        lambda: init_federated_group(agg, limits=PICKLE),
        lambda: init_federated_group(alpha, limits=PICKLE),
        lambda: AggregatorTransport(agg, network=default_network(), served=dict, limits=PICKLE),
        lambda: CollaboratorTransport(alpha, network=default_network(), limits=PICKLE),
        lambda: Maintainer(agg, state, limits=PICKLE),
        lambda: Maintainer(alpha, state, limits=PICKLE),
    ]
    for make in makers:
        with pytest.raises(ConfigError, match="only allowed behind CURVE"):
            make()
    assert _endpoint_is_free(free_tcp_endpoint)  # refused before any socket was bound


class _CurveAggregator(threading.Thread):
    """An aggregator with CURVE and pickle enabled, stepping until told to stop."""

    def __init__(self, endpoint: str, keys: Path) -> None:
        super().__init__(daemon=True)
        self.props = topo.analysis(_star(endpoint, ("alpha", "beta")), "aggregator")[0]
        self.keys = keys
        self.ready, self.stop = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            m = Maintainer(self.props, {"w": torch.zeros(2)}, curve=Curve(self.keys), limits=PICKLE)
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return
        try:
            m.register_step_hook(
                0, lambda m: m.manual_stop() if self.stop.is_set() else None, steps.at_last
            )
            self.ready.set()
            m.step(timeout=120)
        except BaseException as exc:
            self.error = exc
        finally:
            m.close()


def test_no_object_frame_is_unpickled_before_hello(tmp_path, free_tcp_endpoint, slow_factor):
    keys = tmp_path / "keys"
    for name in ("aggregator", "alpha", "beta"):
        create_keys(keys, name)
    agg = _CurveAggregator(free_tcp_endpoint, keys)
    agg.start()
    assert agg.ready.wait(30 * slow_factor) and agg.error is None, agg.error
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        # alpha's own valid key: a member, but one that has not said HELLO
        sock.curve_serverkey = zmq.auth.load_certificate(keys / "aggregator.key")[0]
        sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(
            keys / "alpha.key_secret"
        )
        sock.routing_id = b"alpha"
        sock.connect(free_tcp_endpoint)
        before = tmp_path / "unpickled-before-hello"
        push = Envelope(kind="PUSH", sender="alpha", seq=1, obj=_Touch(before))
        reply = _ask(sock, encode(push, limits=PICKLE), timeout=30 * slow_factor)
        assert (reply.kind, reply.meta["code"]) == ("ERROR", "protocol")
        assert "pickle is not enabled here" in reply.meta["reason"]
        assert not before.exists()

        # After HELLO the member gets what the endpoint opted into, behind CURVE.
        hello = Envelope(
            kind="HELLO",
            sender="alpha",
            seq=2,
            meta={
                "protocol": PROTOCOL_VERSION,
                "fingerprint": agg.props.fingerprint,
                "session": uuid.uuid4().hex[:16],
            },
        )
        welcome = _ask(sock, encode(hello), timeout=30 * slow_factor)
        assert welcome.kind == "WELCOME", welcome.meta
        after = tmp_path / "unpickled-after-hello"
        push = Envelope(
            kind="PUSH",
            sender="alpha",
            seq=3,
            incarnation=welcome.incarnation,
            obj=_Touch(after),
        )
        sock.send_multipart(encode(push, limits=PICKLE))
        for _ in range(100):
            if after.exists():
                break
            sock.poll(100)
        assert after.exists()
    finally:
        sock.close(0)
        ctx.term()
        agg.stop.set()
        agg.join(30 * slow_factor)
    assert agg.error is None, agg.error
