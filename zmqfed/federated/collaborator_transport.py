"""``CollaboratorTransport``: a collaborator's side of one group -- its port and the request cycle.

The transport says HELLO, learns the aggregator's incarnation and frame
bound from WELCOME, and runs every request to its answer
(:meth:`CollaboratorTransport.request`): it sends the request (whole, or
announced and streamed under credit), waits through WAIT answers, and after
a lost connection, a BYE or an aggregator restart says HELLO again and sends
the request again -- safe because uploads are idempotent by (session, seq).
A HELLO that got no answer is sent again when the link comes back and every
few seconds, so a HELLO swallowed by a dying aggregator cannot stall it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

from zmqfed.errors import (
    AggregatorRewound,
    PeerOffline,
    PeerTimeout,
    ProtocolError,
    RemoteError,
    SecurityError,
)
from zmqfed.federated.chunked import Destination, InStream, OutStream, new_stream_id
from zmqfed.federated.pipe import CollaboratorPipe
from zmqfed.federated.ports import Frame, LinkEventKind, Network, WouldBlock
from zmqfed.federated.protocol import (
    CONNECTION_ERRORS,
    REHELLO_ERRORS,
    ErrorCode,
    discard_rest,
    hello_meta,
    land_chunk,
    meta_version,
    peer_frame_bound,
    pump,
    recv_message,
    stamp,
)
from zmqfed.federated.security import Curve
from zmqfed.federated.sockets import SocketOptions
from zmqfed.props import FederatedProperties
from zmqfed.wire import (
    DEFAULT_STREAM,
    Envelope,
    Kind,
    Limits,
    StreamConfig,
    decode,
    encode,
    encode_tensors,
)
from zmqfed.wire.header import parse_header
from zmqfed.wire.stream import credit_meta, parse_chunk_meta, parse_credit_meta

__all__ = ["CollaboratorTransport"]

log = logging.getLogger(__name__)

#: Longest single wait (ms): signals and deadlines are seen promptly.
POLL_MS = 500
#: Seconds after which an unanswered HELLO is sent again.
HELLO_RESEND = 3.0
_RESEND = object()


class CollaboratorTransport:
    """The DEALER port of one collaborator in one group, its handshake and requests."""

    def __init__(
        self,
        props: FederatedProperties,
        *,
        network: Network,
        limits: Limits,
        options: SocketOptions | None = None,
        codec: str = "raw",
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
        security = curve.client(self.nick_name, self.aggregator_name) if curve else None
        self.port = network.dealer(
            self.endpoint, self.nick_name, options=options, limits=limits, security=security
        )
        self.pipe = CollaboratorPipe(self)
        #: A connection to the aggregator exists (its handshake completed).
        self.connected = False
        #: The aggregator answered HELLO on the current connection.
        self.welcomed = False
        self.incarnation = ""
        #: The aggregator's version as of the last WELCOME.
        self.aggregator_version: int | None = None
        #: The largest frame the aggregator accepts (its WELCOME says).
        self.peer_frame_bytes: int | None = None
        #: The aggregator said the federation is over (a final BYE).
        self.finished = False
        #: Requests sent again after a lost link, a BYE or an aggregator restart.
        self.resends = 0
        self.closed = False
        self._seq = 0
        self._restarted = False  # a new aggregator incarnation answered HELLO
        self._lost = False  # the link dropped since the last HELLO was sent
        self._relinked = False  # ... and came back: that HELLO may be lost

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    @property
    def send_limits(self) -> Limits:
        """Limits for messages to the aggregator: ours, within the frame bound it announced."""
        return self.limits.within_frame_bound(self.peer_frame_bytes)

    # -- the request cycle ---------------------------------------------------------
    def request(
        self,
        kind: Kind,
        *,
        meta: dict[str, Any],
        version: int,
        tensors: dict[str, Any] | None = None,
        timeout: float | None = None,
        destination: Destination | None = None,
    ) -> Envelope:
        """Send ``kind`` and block until the aggregator answers it.

        Large messages are streamed both ways; ``destination`` may name
        tensors a streamed reply lands in.  Raises :class:`PeerTimeout` when
        ``timeout`` seconds pass, :class:`RemoteError` on an ERROR answer,
        :class:`AggregatorRewound` when a restarted aggregator is behind the
        version a PULL asks for, :class:`PeerOffline` when the federation ended.
        """
        if self.closed:
            raise PeerOffline(f"pipe to {self.aggregator_name!r} is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        seq = self._next_seq()
        attempts = 0
        while True:
            self._ensure_welcome(deadline, timeout)
            if self._restarted:
                self._restarted = False
                self._check_rewound(kind, meta)
            # Decided after WELCOME: the aggregator's frame bound may have changed.
            limits = self.send_limits
            env = stamp(
                kind,
                self.nick_name,
                seq=seq,
                incarnation=self.incarnation,
                version=version,
                meta=meta,
            )
            out: OutStream | None = None
            if tensors and self.stream.should_stream(tensors, limits):
                encoded = encode_tensors(tensors, codec="raw", limits=limits, streamed=True)
                out = OutStream(
                    new_stream_id(),
                    seq,
                    encoded,
                    self.stream.chunk_within(limits),
                    sender=self.nick_name,
                    incarnation=self.incarnation,
                    version=version,
                )
                frames = encode(
                    env, limits=limits, encoded=encoded, stream=(out.id, out.chunk_bytes)
                )
            else:
                env.tensors = tensors or {}
                frames = encode(env, codec=self.codec, limits=limits)
            attempts += 1
            if attempts > 1:
                self.resends += 1
            if not self._send(frames, deadline, timeout):
                continue  # the link dropped before the send: handshake again
            self.pipe.bytes_out += env.nbytes
            reply = self._answer(kind, seq, out, destination, deadline, timeout)
            if out is not None:
                self.pipe.bytes_out += out.sent
                out.wait_sent(timeout=5.0)  # acknowledged or abandoned: the port lets go
            if reply is None:
                continue  # reconnected, or the aggregator said BYE: send again
            self.pipe.bytes_in += reply.nbytes
            self.pipe.last_seen = time.monotonic()
            if reply.kind != Kind.ERROR:
                return reply
            code = str(reply.meta.get("code", "error"))
            if code in REHELLO_ERRORS:
                self.welcomed = False
                continue
            if code == ErrorCode.STREAM_ABORTED:
                continue  # the model changed while it streamed: ask again
            raise RemoteError(self.aggregator_name, code, str(reply.meta.get("reason", "")))

    def _check_rewound(self, kind: Kind, meta: dict[str, Any]) -> None:
        wanted, known = meta_version(meta), self.aggregator_version
        if kind == Kind.PULL and known is not None and wanted > known:
            raise AggregatorRewound(self.aggregator_name, known, wanted)

    def _answer(
        self,
        kind: Kind,
        seq: int,
        out: OutStream | None,
        destination: Destination | None,
        deadline: float | None,
        timeout: float | None,
    ) -> Envelope | None:
        """Wait for the answer to request ``seq``, running a stream on the way.

        Sends an upload's chunks as credit arrives and receives a streamed
        reply's chunks; None when the request must be sent again.
        """
        while True:
            reply = self._wait_reply(seq, deadline, timeout, what=f"answer {kind}")
            if reply is None:
                return None
            if reply.kind == Kind.CHUNK:
                continue  # a chunk of a download abandoned before this attempt
            if reply.kind == Kind.CREDIT:
                try:
                    sid, nbytes = parse_credit_meta(reply.meta)
                except ProtocolError as exc:
                    log.warning("%s: bad credit: %s", self.nick_name, exc)
                    continue
                if out is not None and sid == out.id:
                    out.grant(nbytes)
                    if not self._pump(out, deadline, timeout):
                        return None
                continue
            if reply.stream is not None and reply.kind == Kind.DATA:
                return self._receive_stream(reply, seq, destination, deadline, timeout)
            return reply

    # -- handshake ---------------------------------------------------------------------
    def _ensure_welcome(self, deadline: float | None, timeout: float | None) -> None:
        """Say HELLO until the aggregator answers WELCOME (or refuses: RemoteError)."""
        while not self.welcomed:
            seq = self._next_seq()
            hello = stamp(
                Kind.HELLO,
                self.nick_name,
                seq=seq,
                meta=hello_meta(
                    fingerprint=self.fingerprint,
                    session=self.session,
                    aggregator=self.aggregator_name,
                    endpoint=self.endpoint,
                    limits=self.limits,
                ),
            )
            self._lost = self._relinked = False
            self._send(encode(hello, limits=self.limits), deadline, timeout, hello=True)
            resend_at = time.monotonic() + HELLO_RESEND
            reply = self._wait_reply(
                seq, deadline, timeout, what="answer HELLO", hello_until=resend_at
            )
            if reply is None:
                continue  # unanswered: the link came back, or it is time to ask again
            if reply.kind == Kind.ERROR:
                raise RemoteError(
                    self.aggregator_name,
                    str(reply.meta.get("code", "error")),
                    str(reply.meta.get("reason", "")),
                )
            if reply.kind != Kind.WELCOME:
                log.warning("%s: expected WELCOME, got %s", self.nick_name, reply.kind)
                continue
            if reply.incarnation != self.incarnation:
                self._restarted = bool(self.incarnation)
                if self.incarnation:
                    log.info(
                        "%s: aggregator %s restarted (incarnation %s)",
                        self.nick_name,
                        self.aggregator_name,
                        reply.incarnation,
                    )
                self.incarnation = reply.incarnation
            self.aggregator_version = reply.version
            self.peer_frame_bytes = peer_frame_bound(reply.meta)
            self.welcomed = True
            self.connected = True

    # -- the port ------------------------------------------------------------------------
    def _link_events(self) -> None:
        for event in self.port.link_events():
            if event.kind is LinkEventKind.CONNECTED:
                log.debug("%s: connected to %s", self.nick_name, self.endpoint)
                self.connected = True
                self._relinked = self._lost
            elif event.kind is LinkEventKind.AUTH_FAILED:
                raise SecurityError(
                    f"aggregator {self.aggregator_name!r} at {self.endpoint} refused this "
                    f"node's key (CURVE/ZAP status {event.value})"
                )
            else:
                log.info(
                    "%s: lost the connection to %s (%s)",
                    self.nick_name,
                    self.aggregator_name,
                    self.endpoint,
                )
                self.connected = False
                self.welcomed = False
                self._lost = True

    def _send(
        self,
        frames: list[Any],
        deadline: float | None,
        timeout: float | None,
        *,
        hello: bool = False,
    ) -> bool:
        """Send once the port takes it; False if the handshake was lost meanwhile."""
        while True:
            self._link_events()
            if not hello and not self.welcomed:
                return False
            try:
                self.port.send(frames)
                return True
            except WouldBlock:
                pass  # at the high-water mark
            wait = _remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(
                    self.aggregator_name, timeout or 0.0, f"take a message at {self.endpoint}"
                )
            self.port.wait_writable(wait)

    def _wait_reply(
        self,
        seq: int,
        deadline: float | None,
        timeout: float | None,
        *,
        what: str,
        hello_until: float | None = None,
    ) -> Envelope | None:
        """The answer to request ``seq``; None when the request must be sent again.

        ``hello_until``: the request is a HELLO, sent again after this time or
        once the link came back.
        """
        while True:
            wait = _remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(self.aggregator_name, timeout or 0.0, what)
            ready = self.port.wait(wait)
            # Read what already arrived before acting on a disconnect: an
            # aggregator that ACKs and exits leaves the ACK in our queue.
            if ready:
                reply = self._read_replies(seq, None)
                if reply is not None:
                    return None if reply is _RESEND else reply
            self._link_events()
            if hello_until is not None:
                # Unanswered: ask again once the link is back, or while it stands
                # (not while it is down: the port would queue HELLO after HELLO).
                if self._relinked or (self.connected and time.monotonic() >= hello_until):
                    return None
            elif not self.welcomed and self.connected:
                # After a disconnect keep listening: the event can overtake a
                # reply in flight. Resend once the link is back (a reply lost
                # with the old link never comes).
                reply = self._read_replies(seq, None)
                return None if reply is None or reply is _RESEND else reply

    def _read_replies(self, seq: int, stream: InStream | None) -> Any:
        """Drain the port: the reply to ``seq``, ``_RESEND`` after a BYE, or None."""
        while True:
            try:
                frames = recv_message(self.port, lambda f: self._land(stream, f))
            except WouldBlock:
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
            if env.seq == seq and env.kind != Kind.WAIT:
                return env
            if (
                env.kind == Kind.ERROR
                and env.seq == 0
                and env.meta.get("code") in CONNECTION_ERRORS
            ):
                return env  # refused before the aggregator could read our seq
            if env.kind == Kind.BYE:
                log.info("%s: aggregator %s said BYE", self.nick_name, self.aggregator_name)
                self.welcomed = False
                if env.meta.get("final") is True:
                    self.finished = True
                    raise PeerOffline(
                        f"aggregator {self.aggregator_name!r} finished the federation"
                    )
                return _RESEND
            if env.kind == Kind.WAIT and env.seq == seq:
                log.debug("%s: request %d parked by %s", self.nick_name, seq, self.aggregator_name)
            else:
                log.debug(
                    "%s: ignored a stale %s (seq %d, waiting for %d)",
                    self.nick_name,
                    env.kind,
                    env.seq,
                    seq,
                )

    # -- streams --------------------------------------------------------------------------
    def _land(self, stream: InStream | None, frames: list[Frame]) -> bool:
        """Land a CHUNK of ``stream``; drop one of an abandoned stream (True: consumed)."""
        try:
            head = parse_header(frames[0], self.limits)
            sid, offset, nbytes = parse_chunk_meta(head.meta)
        except ProtocolError:
            return False  # the ordinary path logs and drops it
        if head.tensors:
            return False
        if stream is None or sid != stream.id:
            discard_rest(self.port)
            return True
        try:
            land_chunk(self.port, stream, offset, nbytes)
        except ProtocolError as exc:
            stream.broken = str(exc)
        return True

    def _pump(self, out: OutStream, deadline: float | None, timeout: float | None) -> bool:
        """Send ``out``'s chunks while its credit lasts; False if the link was lost."""
        while out.ready:
            self._link_events()
            if not self.welcomed:
                return False
            if pump(self.port, out):
                continue
            wait = _remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(self.aggregator_name, timeout or 0.0, "take the upload's chunks")
            self.port.wait_writable(wait)
        return True

    def _receive_stream(
        self,
        announce: Envelope,
        seq: int,
        destination: Destination | None,
        deadline: float | None,
        timeout: float | None,
    ) -> Envelope | None:
        """Receive the chunks of an announced reply; None when the request must be sent again.

        An ERROR about the request (e.g. ``stream-aborted``) is returned as is.
        """
        stream = InStream(announce, self.stream.window_bytes, destination)
        while True:
            credit = stream.credit()
            if credit:
                env = stamp(
                    Kind.CREDIT,
                    self.nick_name,
                    seq=seq,
                    incarnation=self.incarnation,
                    meta=credit_meta(stream.id, credit),
                )
                if not self._send(encode(env, limits=self.limits), deadline, timeout):
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
            if self.port.wait(wait):
                reply = self._read_replies(seq, stream)  # lands the chunks that came
                if stream.broken:
                    log.warning("%s: download stream broke: %s", self.nick_name, stream.broken)
                    return None
                if reply is _RESEND:
                    return None
                if reply is not None:
                    if reply.kind == Kind.ERROR:
                        return reply
                    log.debug("%s: ignored %s during a download", self.nick_name, reply.kind)
            self._link_events()
            if not self.welcomed:
                return None  # the rest of the stream went with the link

    # -- shutdown ------------------------------------------------------------------------
    def close(self) -> None:
        """Say BYE if welcomed, then close the port."""
        if self.closed:
            return
        self.closed = True
        if self.welcomed:
            bye = stamp(
                Kind.BYE, self.nick_name, seq=self._next_seq(), incarnation=self.incarnation
            )
            with contextlib.suppress(WouldBlock):
                self.port.send(encode(bye, limits=self.limits))
        self.port.close()


def _remaining_ms(deadline: float | None) -> int:
    if deadline is None:
        return POLL_MS
    left = deadline - time.monotonic()
    if left <= 0:
        return 0
    return max(1, min(POLL_MS, int(left * 1000)))
