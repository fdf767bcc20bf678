"""The two ends of the pipe-level channel: what ``Pipe.direct_set`` and friends do on the sockets.

A :class:`~zmqfed.federated.pipe_channel.PipeChannel` holds what arrived;
an end sends the channel's messages and waits for what a pipe method waits
for, on its transport:

* :class:`AggregatorChannelEnd` -- the aggregator's transport hands it the
  channel messages it reads (:meth:`AggregatorChannelEnd.dispatch`). It can
  send only to a collaborator that said HELLO (docs/zeromq.md §7), so it
  waits for the peer to come online first. While a pipe method waits, it
  runs the transport's message handling (``AggregatorTransport.events``);
  requests that arrive meanwhile stay on their pipes for the next
  ``Maintainer.step()``.
* :class:`CollaboratorChannelEnd` -- its link hands it the channel messages
  it reads while it waits for anything, also for a Maintainer's reply (the
  link's ``on_channel``). It says HELLO before it waits, so the aggregator
  can reach it.

Both send one message at a time and send it again until the peer
acknowledges it: a ROUTER drops what it had queued for a peer that
disconnects (docs/zeromq.md §5), and a full inbox does not acknowledge. The
receiver keeps each message once (``PipeChannel.is_duplicate``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zmqfed.errors import PeerOffline, PeerTimeout, ProtocolError, RemoteError
from zmqfed.federated.collaborator_link import RESEND, drive, remaining_ms
from zmqfed.federated.pipe_channel import pack, parse_set, set_meta, unpack
from zmqfed.federated.ports import WouldBlock
from zmqfed.federated.protocol import REHELLO_ERRORS, ErrorCode, stamp
from zmqfed.wire import Envelope, Kind, Limits, encode, encode_tensors

if TYPE_CHECKING:
    import torch

    from zmqfed.federated.aggregator_transport import AggregatorTransport
    from zmqfed.federated.collaborator_transport import CollaboratorTransport
    from zmqfed.federated.pipe import AggregatorPipe, Pipe
    from zmqfed.props import FederatedProperties

__all__ = ["AggregatorChannelEnd", "ChannelEnd", "CollaboratorChannelEnd"]

log = logging.getLogger(__name__)

#: Seconds until an unacknowledged channel message is sent again; doubles up to ``RESEND_MAX``.
RESEND_FIRST = 2.0
RESEND_MAX = 30.0

Tensors = dict[str, dict[str, "torch.Tensor"]]


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _ms_until(when: float) -> int:
    return max(0, int((when - time.monotonic()) * 1000) + 1)


class ChannelEnd:
    """What both ends do for a pipe's methods; subclasses send and wait on their transport."""

    props: FederatedProperties
    limits: Limits

    # -- the pipe methods --------------------------------------------------------
    def direct_set(self, pipe: Pipe, key: str, value: Any, timeout: float | None) -> None:
        """Send ``value`` under ``key``; returns once the peer has it."""
        meta = set_meta(key, value)
        self._send(pipe, Kind.SET, meta, {}, None, timeout, f"take the value of {key!r}")

    def direct_get(self, pipe: Pipe, key: str, timeout: float | None) -> Any:
        """The value the peer set under ``key``, waiting until it did."""
        channel = pipe.channel
        self._wait(pipe, lambda: key in channel.values, _deadline(timeout), timeout, f"set {key!r}")
        return channel.values[key]

    def upload(self, pipe: Pipe, data: Any, timeout: float | None) -> None:
        """Send ``data`` as the next item of the peer's inbox; returns once the peer has it."""
        meta, tensors, obj = pack(data, allow_pickle=self.limits.allow_pickle)
        out = pipe.take_out_meta()
        if out is not None:
            meta["meta"] = out.to_json_dict()
        self._send(pipe, Kind.TRANSFER, meta, tensors, obj, timeout, "take an upload")

    def download(self, pipe: Pipe, timeout: float | None) -> Any:
        """The oldest item the peer uploaded, waiting until there is one."""
        channel = pipe.channel
        self._wait(pipe, lambda: bool(channel.inbox), _deadline(timeout), timeout, "upload")
        item = channel.take_item()
        if item.meta is not None:
            pipe.meta = item.meta
        return item.value

    # -- receiving -----------------------------------------------------------------
    def keep(self, pipe: Pipe, env: Envelope, origin: str) -> bool:
        """Keep a channel message of the peer process ``origin``; whether to acknowledge it.

        Raises ``ProtocolError`` for a malformed message. An upload that
        does not fit the inbox is not kept and not acknowledged: the sender
        sends it again later.
        """
        channel = pipe.channel
        if channel.is_duplicate(origin, env.seq):
            return True
        if env.kind == Kind.SET:
            channel.keep_value(*parse_set(env.meta))
        else:
            item = unpack(env)
            if not channel.has_room(item.nbytes, self.limits.max_message_bytes):
                log.debug("%s: inbox full; upload %d not kept yet", pipe.nick_name, env.seq)
                return False
            channel.keep_item(item)
            pipe.bytes_in += item.nbytes
        channel.kept(origin, env.seq)
        return True

    # -- the transport's part -------------------------------------------------------
    def _send(
        self,
        pipe: Pipe,
        kind: Kind,
        meta: dict[str, Any],
        tensors: Tensors,
        obj: Any,
        timeout: float | None,
        what: str,
    ) -> None:
        raise NotImplementedError

    def _wait(
        self,
        pipe: Pipe,
        ready: Callable[[], bool],
        deadline: float | None,
        timeout: float | None,
        what: str,
    ) -> None:
        raise NotImplementedError


class AggregatorChannelEnd(ChannelEnd):
    """The channel of every pipe of an aggregator's transport."""

    def __init__(self, transport: AggregatorTransport) -> None:
        self.transport = transport
        self.props = transport.props
        self.limits = transport.limits
        for pipe in transport.roster.values():
            pipe.channel_end = self

    def dispatch(self, pipe: AggregatorPipe, env: Envelope) -> None:
        """Handle a SET, TRANSFER or ACK the transport read from ``pipe``'s peer."""
        t = self.transport
        if env.kind == Kind.ACK:  # for one of ours; a stale one is no news
            if pipe.online and env.incarnation == t.incarnation:
                pipe.channel.acknowledged(env.seq)
            return
        if not pipe.online:
            t.refuse_message(pipe.routing_id, env.seq, ErrorCode.HELLO_FIRST, "say HELLO first")
            return
        if env.incarnation != t.incarnation:
            t.refuse_message(
                pipe.routing_id,
                env.seq,
                ErrorCode.STALE_INCARNATION,
                f"addressed to incarnation {env.incarnation!r}, this is {t.incarnation!r}",
            )
            return
        try:
            ack = self.keep(pipe, env, pipe.session)
        except ProtocolError as exc:
            t.refuse_message(pipe.routing_id, env.seq, ErrorCode.CHANNEL, str(exc))
            return
        if ack:
            t.send(pipe, Kind.ACK, seq=env.seq, meta={})

    def _send(
        self,
        pipe: Pipe,
        kind: Kind,
        meta: dict[str, Any],
        tensors: Tensors,
        obj: Any,
        timeout: float | None,
        what: str,
    ) -> None:
        t = self.transport
        peer = t.roster[pipe.nick_name]
        deadline = _deadline(timeout)
        encoded = encode_tensors(tensors, codec=t.codec, limits=t.peer_limits(peer))
        seq = peer.channel.next_seq()
        delay = RESEND_FIRST
        while True:
            self._wait(peer, lambda: peer.online, deadline, timeout, f"come online to {what}")
            t.send(peer, kind, seq=seq, meta=meta, encoded=encoded, obj=obj)
            resend_at = time.monotonic() + delay
            delay = min(2 * delay, RESEND_MAX)

            def answered_or_due(resend_at: float = resend_at) -> bool:
                return peer.channel.acked >= seq or not peer.online or time.monotonic() >= resend_at

            self._wait(peer, answered_or_due, deadline, timeout, what)
            if peer.channel.acked >= seq:
                return

    def _wait(
        self,
        pipe: Pipe,
        ready: Callable[[], bool],
        deadline: float | None,
        timeout: float | None,
        what: str,
    ) -> None:
        t = self.transport
        while not ready():
            if t.closed:
                raise PeerOffline(f"the group of {t.name!r} is closed")
            wait = remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(pipe.nick_name, timeout or 0.0, what)
            for _ in t.events(wait):
                pass  # requests and joins stay on the pipes for the next step()


class CollaboratorChannelEnd(ChannelEnd):
    """The channel of a collaborator's one pipe."""

    def __init__(self, transport: CollaboratorTransport) -> None:
        self.transport = transport
        self.link = transport.link
        self.props = transport.props
        self.limits = transport.limits
        self.link.on_channel = self._receive
        transport.pipe.channel_end = self

    def _receive(self, env: Envelope) -> None:
        """Keep a SET or TRANSFER the link read, and acknowledge it (best effort)."""
        pipe = self.transport.pipe
        try:
            ack = self.keep(pipe, env, env.incarnation)
        except ProtocolError as exc:
            log.warning(
                "%s: dropped a malformed %s from %s: %s",
                self.link.nick_name,
                env.kind,
                self.link.aggregator_name,
                exc,
            )
            return
        if ack:
            reply = stamp(Kind.ACK, self.link.nick_name, seq=env.seq, incarnation=env.incarnation)
            with contextlib.suppress(WouldBlock):  # unacknowledged, it comes again
                self.link.port.send(encode(reply, limits=self.limits))

    def _check_open(self) -> None:
        if self.link.closed or self.link.finished:
            raise PeerOffline(f"pipe to {self.link.aggregator_name!r} is closed")

    def _send(
        self,
        pipe: Pipe,
        kind: Kind,
        meta: dict[str, Any],
        tensors: Tensors,
        obj: Any,
        timeout: float | None,
        what: str,
    ) -> None:
        link = self.link
        deadline = _deadline(timeout)
        seq = link.next_seq()
        delay = RESEND_FIRST
        while True:
            self._check_open()
            drive(link.ensure_welcome(deadline, timeout), link.current_port)
            env = stamp(kind, link.nick_name, seq=seq, incarnation=link.incarnation, meta=meta)
            env.tensors, env.obj = tensors, obj
            frames = encode(env, codec=self.transport.codec, limits=link.send_limits)
            if not drive(link.send(frames, deadline, timeout), link.current_port):
                continue  # the link dropped: HELLO again, then send again
            resend_at = time.monotonic() + delay
            delay = min(2 * delay, RESEND_MAX)
            reply = self._reply(seq, deadline, timeout, what, resend_at)
            if reply is None:
                continue
            if reply.kind == Kind.ACK:
                pipe.bytes_out += env.nbytes
                return
            code = str(reply.meta.get("code", "error"))
            if reply.kind == Kind.ERROR and code in REHELLO_ERRORS:
                link.forget_welcome()
                continue
            raise RemoteError(link.aggregator_name, code, str(reply.meta.get("reason", "")))

    def _reply(
        self, seq: int, deadline: float | None, timeout: float | None, what: str, until: float
    ) -> Envelope | None:
        """The answer to channel message ``seq``; None when it is time to send it again."""
        link = self.link
        while True:
            wait = remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(link.aggregator_name, timeout or 0.0, what)
            if time.monotonic() >= until:
                return None
            if link.port.wait(min(wait, _ms_until(until))):
                reply = link.read_replies(seq)
                if reply is RESEND:
                    return None
                if reply is not None:
                    return reply
            link.link_events()
            if not link.welcomed:
                return None

    def _wait(
        self,
        pipe: Pipe,
        ready: Callable[[], bool],
        deadline: float | None,
        timeout: float | None,
        what: str,
    ) -> None:
        link = self.link
        while not ready():
            self._check_open()
            drive(
                link.ensure_welcome(deadline, timeout), link.current_port
            )  # the aggregator reaches only peers it knows
            if ready():
                return
            wait = remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(link.aggregator_name, timeout or 0.0, what)
            if link.port.wait(wait):
                reply = link.read_replies(-1)  # channel messages go to _receive
                if isinstance(reply, Envelope) and reply.kind == Kind.ERROR:
                    raise RemoteError(
                        link.aggregator_name,
                        str(reply.meta.get("code", "error")),
                        str(reply.meta.get("reason", "")),
                    )
            link.link_events()
