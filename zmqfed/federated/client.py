"""``CollaboratorLink``: a collaborator's DEALER, its monitor and the handshake.

The link says HELLO, learns the aggregator's incarnation from WELCOME, and
watches the DEALER's monitor: after any disconnect it forgets the handshake,
so the pending request is re-sent once the aggregator is back (queued
messages toward a lost connection are dropped by ZeroMQ; ZMQ-NOTES item 5).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from zmqfed.errors import PeerOffline, PeerTimeout, ProtocolError, RemoteError, SecurityError
from zmqfed.federated.security import Curve
from zmqfed.federated.sockets import SocketOptions, make_dealer
from zmqfed.federated.stream import (
    Destination,
    InStream,
    OutStream,
    discard_rest,
    land_payload,
    recv_message,
)
from zmqfed.props import FederatedProperties
from zmqfed.wire import (
    DEFAULT_STREAM,
    PROTOCOL_VERSION,
    Envelope,
    Limits,
    StreamConfig,
    decode,
    encode,
)
from zmqfed.wire.header import parse_header
from zmqfed.wire.limits import announced_frame_bound
from zmqfed.wire.stream import credit_meta, parse_chunk_meta

__all__ = ["CollaboratorLink"]

log = logging.getLogger(__name__)

_POLL_MS = 500  # bounded waits: signals and deadlines are seen promptly
_RESEND = object()
#: ERROR codes about the connection itself, sent with seq 0 when the request
#: could not be read: they answer whatever request is pending.
_CONNECTION_ERRORS = frozenset(
    {"identity", "unknown-peer", "protocol"}
)  # the aggregator said BYE: handshake again, then resend


class CollaboratorLink:
    """The DEALER of one collaborator in one group, with handshake state."""

    def __init__(
        self,
        props: FederatedProperties,
        *,
        options: SocketOptions | None = None,
        limits: Limits,
        codec: str = "raw",
        ctx: zmq.Context | None = None,
        curve: Curve | None = None,
        stream: StreamConfig = DEFAULT_STREAM,
    ) -> None:
        assert props.address.endpoint is not None
        self.stream = stream
        self.nick_name = props.nick_name
        self.aggregator_name = props.aggregator_name
        self.endpoint = props.address.endpoint
        self.fingerprint = props.fingerprint
        self.limits = limits
        self.codec = codec
        self.session = uuid.uuid4().hex[:16]
        curve_options: dict[int, Any] | None = None
        if curve is not None:
            public, secret = curve.key_pair(self.nick_name)
            curve_options = {
                zmq.CURVE_SERVERKEY: curve.public_key(self.aggregator_name),
                zmq.CURVE_PUBLICKEY: public,
                zmq.CURVE_SECRETKEY: secret,
            }
        self.sock = make_dealer(
            self.endpoint,
            self.nick_name,
            options=options,
            limits=limits,
            ctx=ctx,
            curve=curve_options,
        )
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        )
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self._send_poller = zmq.Poller()  # room to send, or a link event
        self._send_poller.register(self.sock, zmq.POLLOUT)
        self._send_poller.register(self.monitor, zmq.POLLIN)
        self.connected = False
        self.welcomed = False
        self.incarnation = ""
        #: The aggregator's version as of the last WELCOME.
        self.aggregator_version: int | None = None
        #: The largest frame the aggregator accepts (its WELCOME says).
        self.peer_frame_bytes: int | None = None
        self._seq = 0
        self._closed = False
        #: The aggregator said the federation is over (a final BYE).
        self.finished = False
        #: A new aggregator incarnation answered (set until a request looks at it).
        self.restarted = False

    def next_seq(self) -> int:
        """A fresh sequence number for a request from this process."""
        self._seq += 1
        return self._seq

    # -- monitor -----------------------------------------------------------
    def _drain_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.debug("%s: connected to %s", self.nick_name, self.endpoint)
                self.connected = True
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise SecurityError(
                    f"aggregator {self.aggregator_name!r} at {self.endpoint} refused this "
                    f"node's key (CURVE/ZAP status {event['value']})"
                )
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                log.info(
                    "%s: lost the connection to %s (%s)",
                    self.nick_name,
                    self.aggregator_name,
                    self.endpoint,
                )
                self.connected = False
                self.welcomed = False

    # -- sending -----------------------------------------------------------
    def send(
        self,
        frames: list[Any],
        deadline: float | None,
        timeout: float | None,
        *,
        hello: bool = False,
    ) -> bool:
        """Send once a connection exists; False if the handshake was lost meanwhile."""
        while True:
            self._drain_monitor()
            if not hello and not self.welcomed:
                return False
            try:
                self.sock.send_multipart(frames, flags=zmq.DONTWAIT, copy=False)
                return True
            except zmq.Again:
                pass  # at the high-water mark (IMMEDIATE=0 queues while unconnected)
            wait = _remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(
                    self.aggregator_name, timeout or 0.0, f"take a message at {self.endpoint}"
                )
            self._send_poller.poll(wait)

    def ensure_welcome(self, deadline: float | None, timeout: float | None) -> None:
        """Say HELLO until the aggregator answers WELCOME (or refuses: RemoteError)."""
        while not self.welcomed:
            seq = self.next_seq()
            hello = Envelope(
                kind="HELLO",
                sender=self.nick_name,
                seq=seq,
                meta={
                    "protocol": PROTOCOL_VERSION,
                    "fingerprint": self.fingerprint,
                    "session": self.session,
                    "aggregator": self.aggregator_name,
                    "endpoint": self.endpoint,
                    "max_frame_bytes": self.limits.max_frame_bytes,
                },
            )
            self.send(encode(hello, limits=self.limits), deadline, timeout, hello=True)
            reply = self.wait_reply(seq, deadline, timeout, what="answer HELLO", hello=True)
            if reply is None:
                continue
            if reply.kind == "ERROR":
                raise RemoteError(
                    self.aggregator_name,
                    str(reply.meta.get("code", "error")),
                    str(reply.meta.get("reason", "")),
                )
            if reply.kind != "WELCOME":
                log.warning("%s: expected WELCOME, got %s", self.nick_name, reply.kind)
                continue
            if reply.incarnation != self.incarnation:
                self.restarted = bool(self.incarnation)
                if self.incarnation:
                    log.info(
                        "%s: aggregator %s restarted (incarnation %s)",
                        self.nick_name,
                        self.aggregator_name,
                        reply.incarnation,
                    )
                self.incarnation = reply.incarnation
            self.aggregator_version = reply.version
            self.peer_frame_bytes = announced_frame_bound(reply.meta.get("max_frame_bytes"))
            self.welcomed = True
            self.connected = True

    # -- receiving ---------------------------------------------------------
    def wait_reply(
        self,
        seq: int,
        deadline: float | None,
        timeout: float | None,
        *,
        what: str,
        hello: bool = False,
    ) -> Envelope | None:
        """The answer to request ``seq``; None when the request must be re-sent."""
        while True:
            wait = _remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(self.aggregator_name, timeout or 0.0, what)
            events = dict(self.poller.poll(wait))
            # Read what already arrived before acting on a disconnect: an
            # aggregator that ACKs and exits leaves the ACK in our queue.
            if self.sock in events:
                reply = self._read_replies(seq)
                if reply is not None:
                    return None if reply is _RESEND else reply
            if self.monitor in events:
                self._drain_monitor()
                # After a disconnect keep listening: the monitor's event can
                # overtake a reply already in flight. Resend only once the
                # link is back (a reply lost with the old link never comes).
                if not hello and not self.welcomed and self.connected:
                    reply = self._read_replies(seq)
                    return None if reply is None or reply is _RESEND else reply

    def _read_replies(self, seq: int, stream: InStream | None = None) -> Any:
        """Drain the DEALER: the reply to ``seq``, ``_RESEND`` after a BYE, or None.

        Chunks of ``stream`` land in its tensors on the way.
        """
        while True:
            try:
                frames = recv_message(self.sock, routed=False, land=lambda f: self._land(stream, f))
            except zmq.Again:
                return None
            if frames is None:
                continue  # a chunk, landed
            try:
                env = decode(frames, limits=self.limits)
            except ProtocolError as exc:
                log.warning(
                    "%s: dropped a malformed message from %s: %s",
                    self.nick_name,
                    self.aggregator_name,
                    exc,
                )
                continue
            if env.seq == seq and env.kind != "WAIT":
                return env
            if env.kind == "ERROR" and env.seq == 0 and env.meta.get("code") in _CONNECTION_ERRORS:
                return env  # refused before the aggregator could read our seq
            if env.kind == "BYE":
                log.info("%s: aggregator %s said BYE", self.nick_name, self.aggregator_name)
                self.welcomed = False
                if env.meta.get("final") is True:
                    self.finished = True
                    raise PeerOffline(
                        f"aggregator {self.aggregator_name!r} finished the federation"
                    )
                return _RESEND
            if env.kind == "WAIT" and env.seq == seq:
                log.debug("%s: request %d parked by %s", self.nick_name, seq, self.aggregator_name)
            else:
                log.debug(
                    "%s: ignored a stale %s (seq %d, waiting for %d)",
                    self.nick_name,
                    env.kind,
                    env.seq,
                    seq,
                )

    # -- streams -----------------------------------------------------------
    @property
    def send_limits(self) -> Limits:
        """Limits for messages to the aggregator: ours, within the frame bound it announced."""
        return self.limits.within_frame_bound(self.peer_frame_bytes)

    @property
    def chunk_bytes(self) -> int:
        """Payload per CHUNK this link sends: the setting, within both frame limits."""
        return self.stream.chunk_within(self.send_limits)

    def _land(self, stream: InStream | None, frames: list[Any]) -> bool:
        """Land a CHUNK of ``stream``; drop one of an abandoned stream (True: consumed)."""
        try:
            head = parse_header(frames[0], self.limits)
            sid, offset, nbytes = parse_chunk_meta(head.meta)
        except ProtocolError:
            return False  # the ordinary path logs and drops it
        if head.tensors:
            return False
        if stream is None or sid != stream.id:
            discard_rest(self.sock)
            return True
        try:
            land_payload(self.sock, stream, offset, nbytes)
        except ProtocolError as exc:
            stream.broken = str(exc)
        return True

    def pump(self, out: OutStream, deadline: float | None, timeout: float | None) -> bool:
        """Send ``out``'s chunks while its credit lasts; False if the link was lost."""

        def send(frames: list[Any]) -> Any:
            return self.sock.send_multipart(frames, flags=zmq.DONTWAIT, copy=False, track=True)

        while out.ready:
            self._drain_monitor()
            if not self.welcomed:
                return False
            if out.pump(send):
                continue
            wait = _remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(self.aggregator_name, timeout or 0.0, "take the upload's chunks")
            self._send_poller.poll(wait)
        return True

    def receive_stream(
        self,
        announce: Envelope,
        seq: int,
        destination: Destination | None,
        deadline: float | None,
        timeout: float | None,
    ) -> Envelope | None:
        """Receive the chunks of an announced reply; None when the request must be re-sent.

        An ERROR about the request (e.g. ``stream-aborted``) is returned as is.
        """
        stream = InStream(announce, self.stream.window_bytes, destination)
        while True:
            credit = stream.credit()
            if credit:
                env = Envelope(
                    kind="CREDIT",
                    sender=self.nick_name,
                    seq=seq,
                    incarnation=self.incarnation,
                    meta=credit_meta(stream.id, credit),
                )
                if not self.send(encode(env, limits=self.limits), deadline, timeout):
                    return None
            if stream.done:
                return stream.envelope()
            wait = _remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(
                    self.aggregator_name,
                    timeout or 0.0,
                    f"stream the model ({stream.received} of {stream.total} bytes arrived)",
                )
            events = dict(self.poller.poll(wait))
            if self.sock in events:
                reply = self._read_replies(seq, stream)
                if stream.broken:
                    log.warning("%s: download stream broke: %s", self.nick_name, stream.broken)
                    return None
                if reply is _RESEND:
                    return None
                if reply is not None:
                    if reply.kind == "ERROR":
                        return reply
                    log.debug("%s: ignored %s during a download", self.nick_name, reply.kind)
            if self.monitor in events:
                self._drain_monitor()
                if not self.welcomed:
                    return None  # the rest of the stream went with the link

    def close(self) -> None:
        """Say BYE if connected, then close the monitor and the DEALER."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.welcomed:
                bye = Envelope(
                    kind="BYE",
                    sender=self.nick_name,
                    seq=self.next_seq(),
                    incarnation=self.incarnation,
                )
                self.sock.send_multipart(encode(bye, limits=self.limits), flags=zmq.DONTWAIT)
        except zmq.ZMQError:
            pass
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close()


def _remaining_ms(deadline: float | None) -> int:
    if deadline is None:
        return _POLL_MS
    left = deadline - time.monotonic()
    if left <= 0:
        return 0
    return max(1, min(_POLL_MS, int(left * 1000)))
