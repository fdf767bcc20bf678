"""Pipe-channel messages (SET, TRANSFER) from a raw DEALER to an aggregator in the middle of a step.

The aggregator runs a Maintainer's ``step()`` in a thread (one owner thread
per socket); a raw DEALER sends hand-made channel messages. Each is kept
once and acknowledged, or refused with an ERROR naming the fault; nothing is
unpickled, the keys a peer may set are bounded, and afterwards both members
complete a normal round.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import torch
from torch import nn

import zmqfed.topo as topo
from tests.integration._helpers import download_then_upload
from tests.integration.test_hostile import _Evil
from tests.integration.test_protocol_faults import _ask, _dealer, _model, _star
from zmqfed.core import Maintainer, steps
from zmqfed.federated import Pipe
from zmqfed.federated.pipe_channel import MAX_KEYS
from zmqfed.wire import PROTOCOL_VERSION, Envelope, Limits, encode


class ChannelAggregator(threading.Thread):
    """Runs one aggregator ``step()`` until told to stop; keeps its pipes for inspection."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.timeout = endpoint, timeout
        self.ready, self.stop = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.roster: dict[str, Pipe] = {}
        self.uploads = -1

    def run(self) -> None:
        try:
            props = topo.analysis(_star(self.endpoint), "aggregator")[0]
            m = Maintainer(props, _model().state_dict(keep_vars=True), idle_interval=0.05)
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return
        try:
            self.roster = {p.nick_name: p for p in m._side.pipes()}  # pipes outlive the step
            m.register_step_hook(
                0, lambda m: m.manual_stop() if self.stop.is_set() else None, steps.at_last
            )
            self.ready.set()
            m.step(timeout=self.timeout)
            self.uploads = len(m.meta_list)
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


def _message(kind: str, seq: int, incarnation: str, meta: dict[str, Any], **kw: Any) -> list:
    limits = kw.pop("limits", Limits())
    env = Envelope(kind=kind, sender="alpha", seq=seq, incarnation=incarnation, meta=meta, **kw)
    return encode(env, limits=limits)


def test_channel_messages_are_checked_kept_once_and_bounded(
    zmq_ctx, free_tcp_endpoint, slow_factor, tmp_path
) -> None:
    agg = ChannelAggregator(free_tcp_endpoint, timeout=120 * slow_factor)
    agg.start()
    assert agg.ready.wait(10) and agg.error is None
    props = topo.analysis(_star(free_tcp_endpoint), "alpha")[0]
    seq = iter(range(2, 10**6))

    with _dealer(zmq_ctx, free_tcp_endpoint, "alpha") as sock:
        # 1. Before HELLO: refused, the sender is told to say HELLO.
        reply = _ask(sock, _message("SET", 1, "", {"key": "k", "value": 1}))
        assert (reply.kind, reply.seq, reply.meta["code"]) == ("ERROR", 1, "hello-first")
        hello = {
            "protocol": PROTOCOL_VERSION,
            "fingerprint": props.fingerprint,
            "session": uuid.uuid4().hex,
        }
        welcome = _ask(sock, _message("HELLO", next(seq), "", hello))
        assert welcome.kind == "WELCOME"
        inc = welcome.incarnation

        def ask(kind: str, meta: dict[str, Any], n: int | None = None, **kw: Any) -> Envelope:
            return _ask(sock, _message(kind, next(seq) if n is None else n, inc, meta, **kw))

        # 2. A SET is kept and ACKed; its repeat (same seq) is ACKed, not kept again.
        n = next(seq)
        assert (ask("SET", {"key": "k", "value": [1, 2]}, n).kind, n) == ("ACK", n)
        assert ask("SET", {"key": "k", "value": ["changed"]}, n).kind == "ACK"
        # 3. Addressed to another aggregator process: refused.
        stale = _ask(sock, _message("SET", next(seq), "other", {"key": "k", "value": 0}))
        assert stale.meta["code"] == "stale-incarnation"
        # 4. Malformed channel messages: refused with ERROR channel, naming the fault.
        for meta, tensors, fault in [
            ({"key": "", "value": 1}, {}, "a key must be a str of 1-256"),
            ({"key": "k"}, {}, "fields key and value"),
        ]:
            reply = ask("SET", meta, tensors=tensors)
            assert (reply.kind, reply.meta["code"]) == ("ERROR", "channel"), reply
            assert fault in reply.meta["reason"]
        bad_paths = ask(
            "TRANSFER",
            {"value": {"w": None}, "paths": [["v"]]},
            tensors={"0": {"tensor": torch.zeros(2)}},
        )
        assert bad_paths.meta["code"] == "channel"
        assert "path 0 leads nowhere" in bad_paths.meta["reason"]
        # 5. A pickled object: refused on its header, never unpickled.
        marker = tmp_path / "pwned"
        evil = ask(
            "TRANSFER",
            {"value": None, "paths": []},
            obj=_Evil(str(marker)),
            limits=Limits(allow_pickle=True),
        )
        assert (evil.kind, evil.meta["code"]) == ("ERROR", "protocol")
        assert "pickle" in evil.meta["reason"] and not marker.exists()
        # 6. A well-formed upload is kept and ACKed.
        item = ask(
            "TRANSFER",
            {"value": {"w": None, "n": 3}, "paths": [["w"]], "meta": {"instances": 5}},
            tensors={"0": {"tensor": torch.arange(4.0)}},
        )
        assert item.kind == "ACK"
        # 7. A peer sets at most MAX_KEYS keys; a new one beyond them is refused.
        for i in range(MAX_KEYS - 1):
            assert ask("SET", {"key": f"k{i}", "value": i}).kind == "ACK"
        over = ask("SET", {"key": "one-too-many", "value": 0})
        assert over.meta["code"] == "channel" and f"{MAX_KEYS} keys" in over.meta["reason"]
        assert ask("SET", {"key": "k0", "value": "again"}).kind == "ACK"  # known keys: fine

    # 8. Afterwards both members complete a normal round.
    for name in ("alpha", "beta"):
        member = topo.analysis(_star(free_tcp_endpoint), name)[0]
        state = nn.Linear(4, 1).state_dict(keep_vars=True)
        download_then_upload(member, state, timeout=30 * slow_factor)
    agg.finish()
    assert agg.uploads == 2
    alpha = agg.roster["alpha"]
    assert len(alpha.channel.values) == MAX_KEYS
    assert alpha.channel.values["k"] == [1, 2] and alpha.channel.values["k0"] == "again"
    assert alpha.direct_get("k", timeout=0) == [1, 2]  # kept: no waiting
    got = alpha.download(timeout=0)
    assert got["n"] == 3 and got["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert alpha.meta["instances"] == 5
    assert not agg.roster["beta"].channel.values and not agg.roster["beta"].channel.inbox
