"""``CollaboratorTransport``: a collaborator's side of one group -- the request cycle.

The transport runs every request to its answer
(:meth:`CollaboratorTransport.request`): it sends the request (whole, or
announced and streamed under credit), waits through WAIT answers, receives
a streamed reply, and after a lost connection, a BYE or an aggregator
restart has its link say HELLO again and sends the request again -- safe
because uploads are idempotent by (session, seq).  The connection and the
handshake are :class:`~zmqfed.federated.collaborator_link.CollaboratorLink`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Any

from zmqfed.errors import (
    AggregatorRewound,
    PeerOffline,
    PeerTimeout,
    ProtocolError,
    RemoteError,
)
from zmqfed.federated.chunked import Destination, InStream, OutStream, new_stream_id
from zmqfed.federated.collaborator_link import RESEND, CollaboratorLink, remaining_ms
from zmqfed.federated.pipe import CollaboratorPipe
from zmqfed.federated.ports import Frame, Network
from zmqfed.federated.protocol import (
    REHELLO_ERRORS,
    ErrorCode,
    discard_rest,
    land_chunk,
    meta_version,
    pump,
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
    encode,
    encode_tensors,
)
from zmqfed.wire.header import parse_header
from zmqfed.wire.stream import credit_meta, parse_chunk_meta, parse_credit_meta

__all__ = ["CollaboratorTransport"]

log = logging.getLogger(__name__)


class CollaboratorTransport:
    """One collaborator in one group: its link to the aggregator and the request cycle."""

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
        declared: Callable[[], Collection[str] | None] | None = None,
    ) -> None:
        self.link = CollaboratorLink(
            props, network=network, limits=limits, options=options, curve=curve, declared=declared
        )
        self.nick_name = props.nick_name
        self.aggregator_name = props.aggregator_name
        self.limits = limits
        self.codec = codec
        self.stream = stream
        self.pipe = CollaboratorPipe(self)
        #: Requests sent again after a lost link, a BYE or an aggregator restart.
        self.resends = 0

    @property
    def connected(self) -> bool:
        """A connection to the aggregator exists."""
        return self.link.connected

    @property
    def closed(self) -> bool:
        """The transport was closed."""
        return self.link.closed

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
        link = self.link
        seq = link.next_seq()
        attempts = 0
        while True:
            link.ensure_welcome(deadline, timeout)
            if link.take_restart():
                self._check_rewound(kind, meta)
            # Decided after WELCOME: the aggregator's frame bound may have changed.
            limits = link.send_limits
            env = stamp(
                kind,
                self.nick_name,
                seq=seq,
                incarnation=link.incarnation,
                version=version,
                meta=meta,
            )
            out: OutStream | None = None
            if tensors and self.stream.should_stream(tensors, limits, self.codec):
                encoded = encode_tensors(tensors, codec="raw", limits=limits, streamed=True)
                out = OutStream(
                    new_stream_id(),
                    seq,
                    encoded,
                    self.stream.chunk_within(limits),
                    sender=self.nick_name,
                    incarnation=link.incarnation,
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
            if not link.send(frames, deadline, timeout):
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
                link.forget_welcome()
                continue
            if code == ErrorCode.STREAM_ABORTED:
                continue  # the model changed while it streamed: ask again
            raise RemoteError(self.aggregator_name, code, str(reply.meta.get("reason", "")))

    def _check_rewound(self, kind: Kind, meta: dict[str, Any]) -> None:
        wanted, known = meta_version(meta), self.link.aggregator_version
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
            reply = self.link.wait_reply(seq, deadline, timeout, what=f"answer {kind}")
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

    # -- streams --------------------------------------------------------------------------
    def _land(self, stream: InStream | None, frames: list[Frame]) -> bool:
        """Land a CHUNK of ``stream`` (True: consumed); drop one of another stream."""
        try:
            head = parse_header(frames[0], self.limits)
            sid, offset, nbytes = parse_chunk_meta(head.meta)
        except ProtocolError:
            return False  # the ordinary path logs and drops it
        if head.tensors:
            return False
        if stream is None or sid != stream.id:
            discard_rest(self.link.port)
            return True
        try:
            land_chunk(self.link.port, stream, offset, nbytes)
        except ProtocolError as exc:
            stream.broken = str(exc)
        return True

    def _pump(self, out: OutStream, deadline: float | None, timeout: float | None) -> bool:
        """Send ``out``'s chunks while its credit lasts; False if the link was lost."""
        link = self.link
        while out.ready:
            link.link_events()
            if not link.welcomed:
                return False
            if pump(link.port, out):
                continue
            wait = remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(self.aggregator_name, timeout or 0.0, "take the upload's chunks")
            link.port.wait_writable(wait)
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
        link = self.link
        stream = InStream(announce, self.stream.window_bytes, destination)

        def grant() -> bool:
            credit = stream.credit()
            if not credit:
                return True
            env = stamp(
                Kind.CREDIT,
                self.nick_name,
                seq=seq,
                incarnation=link.incarnation,
                meta=credit_meta(stream.id, credit),
            )
            return link.send(encode(env, limits=self.limits), deadline, timeout)

        def land(frames: list[Frame]) -> bool:
            # Credit goes out as each chunk lands, not once the queue is
            # drained: the sender never waits for a window to empty.
            consumed = self._land(stream, frames)
            if consumed and not stream.broken and not stream.done:
                grant()
            return consumed

        while True:
            if not grant():
                return None
            if stream.done:
                return stream.envelope()
            wait = remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(
                    self.aggregator_name,
                    timeout or 0.0,
                    f"stream the model ({stream.received} of {stream.total} bytes arrived)",
                )
            if link.port.wait(wait):
                reply = link.read_replies(seq, land)
                if stream.broken:
                    log.warning("%s: download stream broke: %s", self.nick_name, stream.broken)
                    return None
                if reply is RESEND:
                    return None
                if reply is not None:
                    if reply.kind == Kind.ERROR:
                        return reply
                    log.debug("%s: ignored %s during a download", self.nick_name, reply.kind)
            link.link_events()
            if not link.welcomed:
                return None  # the rest of the stream went with the link

    # -- shutdown ------------------------------------------------------------------------
    def close(self) -> None:
        """Say BYE if welcomed, then close the port."""
        self.link.close()
