"""``CollaboratorTransport``: a collaborator's side of one group -- the request cycle.

The transport runs every request to its answer
(:meth:`CollaboratorTransport.request`): it sends the request (whole, or
announced and streamed under credit), waits through WAIT answers, receives
a streamed reply, and after a lost connection, a BYE or an aggregator
restart has its link say HELLO again and sends the request again -- safe
because uploads are idempotent by (session, seq).  The connection and the
handshake are :class:`~zmqfed.federated.collaborator_link.CollaboratorLink`'s.

:meth:`CollaboratorTransport.request_cycle` is the request as a cycle (a
generator that yields where it would wait, see
:mod:`~zmqfed.federated.collaborator_link`); :meth:`~CollaboratorTransport.request`
drives it, blocking.
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
from zmqfed.federated.channel_ends import CollaboratorChannelEnd
from zmqfed.federated.chunked import Destination, InStream, OutStream, new_stream_id
from zmqfed.federated.collaborator_link import (
    RESEND,
    CollaboratorLink,
    Cycle,
    Wait,
    drive,
    remaining_ms,
)
from zmqfed.federated.pipe import CollaboratorPipe
from zmqfed.federated.ports import Frame, Network, WouldBlock
from zmqfed.federated.protocol import (
    REHELLO_ERRORS,
    ErrorCode,
    discard_rest,
    land_chunk,
    meta_version,
    parse_chunk,
    pump,
    stamp,
)
from zmqfed.federated.security import Curve
from zmqfed.federated.sockets import SocketOptions
from zmqfed.federated.traffic import frames_nbytes
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
from zmqfed.wire.stream import credit_meta, parse_credit_meta

__all__ = ["CollaboratorTransport"]

log = logging.getLogger(__name__)

#: Times a request is sent again after the aggregator dropped its stream.
MAX_STREAM_RETRIES = 3


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
        monitor: bool = True,
        declared: Callable[[], Collection[str] | None] | None = None,
    ) -> None:
        self.link = CollaboratorLink(
            props,
            network=network,
            limits=limits,
            options=options,
            curve=curve,
            monitor=monitor,
            declared=declared,
        )
        self.props = props
        self.nick_name = props.nick_name
        self.aggregator_name = props.aggregator_name
        self.limits = limits
        self.codec = codec
        self.stream = stream
        self.pipe = CollaboratorPipe(self)
        #: The pipe-level channel (``Pipe.direct_set``, ``upload``, ...).
        self.channel = CollaboratorChannelEnd(self)
        #: Requests sent again after a lost link, a BYE or an aggregator restart.
        self.resends = 0
        #: Chunks of streamed messages received and sent.
        self.chunks_in = 0
        self.chunks_out = 0

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
        expect_bytes: int = 0,
    ) -> Envelope:
        """Send ``kind`` and block until the aggregator answers it.

        Large messages are streamed both ways; ``destination`` may name
        tensors a streamed reply lands in.  Raises :class:`PeerTimeout` when
        ``timeout`` seconds pass, :class:`RemoteError` on an ERROR answer,
        :class:`AggregatorRewound` when a restarted aggregator is behind the
        version a PULL asks for, :class:`PeerOffline` when the federation ended.
        ``expect_bytes``: about how much the answer carries (the model, for a
        PULL), which the link's patience with a silent aggregator allows for.
        """
        cycle = self.request_cycle(
            kind,
            meta=meta,
            version=version,
            tensors=tensors,
            timeout=timeout,
            destination=destination,
            expect_bytes=expect_bytes,
        )
        return drive(cycle, self.link.current_port)

    def request_cycle(
        self,
        kind: Kind,
        *,
        meta: dict[str, Any],
        version: int,
        tensors: dict[str, Any] | None = None,
        timeout: float | None = None,
        destination: Destination | None = None,
        expect_bytes: int = 0,
    ) -> Cycle[Envelope]:
        """:meth:`request` as a cycle: yields :class:`Wait` where it would block."""
        if self.closed:
            raise PeerOffline(f"pipe to {self.aggregator_name!r} is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        link = self.link
        sending = sum(
            t.numel() * t.element_size() for f in (tensors or {}).values() for t in f.values()
        )
        link.begin_request(sending + expect_bytes)
        seq = link.next_seq()
        attempts = broken_streams = 0
        while True:
            yield from link.ensure_welcome(deadline, timeout)
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
            if not (yield from link.send(frames, deadline, timeout)):
                continue  # the link dropped before the send: handshake again
            link.traffic.sent(kind.value, frames_nbytes(frames))
            self.pipe.bytes_out += env.nbytes
            reply = yield from self._answer(kind, seq, out, destination, deadline, timeout)
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
            if code == ErrorCode.STREAM and broken_streams < MAX_STREAM_RETRIES:
                broken_streams += 1  # e.g. dropped while the aggregator was away: send again
                continue
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
    ) -> Cycle[Envelope | None]:
        """Wait for the answer to request ``seq``, running a stream on the way.

        Sends an upload's chunks as credit arrives and receives a streamed
        reply's chunks; None when the request must be sent again.
        """
        while True:
            reply = yield from self.link.wait_reply(seq, deadline, timeout, what=f"answer {kind}")
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
                    if not (yield from self._pump(out, deadline, timeout)):
                        return None
                continue
            if reply.stream is not None and reply.kind == Kind.DATA:
                return (yield from self._receive_stream(reply, seq, destination, deadline, timeout))
            return reply

    # -- streams --------------------------------------------------------------------------
    def _land(self, stream: InStream | None, frames: list[Frame]) -> bool:
        """Land a CHUNK of ``stream`` (True: consumed); drop one of another stream."""
        chunk = parse_chunk(frames[0], self.limits)
        if chunk is None:
            return False  # the ordinary path logs and drops it
        _, sid, offset, nbytes = chunk
        if stream is None or sid != stream.id:
            discard_rest(self.link.port)
            return True
        try:
            land_chunk(self.link.port, stream, offset, nbytes)
        except ProtocolError as exc:
            stream.broken = str(exc)
        self.chunks_in += 1
        self.link.traffic.received(Kind.CHUNK.value, nbytes)
        return True

    def _pump(self, out: OutStream, deadline: float | None, timeout: float | None) -> Cycle[bool]:
        """Send ``out``'s chunks while its credit lasts; False if the link was lost."""
        link = self.link
        while out.ready:
            link.link_events()
            if not link.welcomed:
                return False
            before = out.sent
            chunks = pump(link.port, out)
            if chunks:
                self.chunks_out += chunks
                link.traffic.sent(Kind.CHUNK.value, out.sent - before, chunks)
                continue
            wait = remaining_ms(deadline, link.poll_ms)
            if wait == 0:
                raise PeerTimeout(self.aggregator_name, timeout or 0.0, "take the upload's chunks")
            yield Wait(wait, writable=True)
        return True

    def _receive_stream(
        self,
        announce: Envelope,
        seq: int,
        destination: Destination | None,
        deadline: float | None,
        timeout: float | None,
    ) -> Cycle[Envelope | None]:
        """Receive the chunks of an announced reply; None when the request must be sent again.

        An ERROR about the request (e.g. ``stream-aborted``) is returned as is.
        """
        link = self.link
        stream = InStream(announce, self.stream.window_bytes, destination)

        def grant() -> list[Any] | None:
            """The CREDIT that keeps the window outstanding, if any is due."""
            credit = stream.credit()
            if not credit:
                return None
            env = stamp(
                Kind.CREDIT,
                self.nick_name,
                seq=seq,
                incarnation=link.incarnation,
                meta=credit_meta(stream.id, credit),
            )
            return encode(env, limits=self.limits)

        unsent: list[list[Any]] = []  # credit the port could not take at once

        def land(frames: list[Frame]) -> bool:
            # Credit goes out as each chunk lands, not once the queue is
            # drained: the sender never waits for a window to empty.
            consumed = self._land(stream, frames)
            if consumed and not stream.broken and not stream.done:
                credit = grant()
                if credit is not None:
                    try:
                        link.port.send(credit)
                        link.traffic.sent(Kind.CREDIT.value, frames_nbytes(credit))
                    except WouldBlock:
                        unsent.append(credit)  # sent below, where the cycle may wait
            return consumed

        while True:
            credit = grant()
            for frames in [*unsent, *([credit] if credit is not None else [])]:
                if not (yield from link.send(frames, deadline, timeout)):
                    return None
                link.traffic.sent(Kind.CREDIT.value, frames_nbytes(frames))
            unsent.clear()
            if stream.done:
                return stream.envelope()
            wait = remaining_ms(deadline, link.poll_ms)
            if wait == 0:
                raise PeerTimeout(
                    self.aggregator_name,
                    timeout or 0.0,
                    f"stream the model ({stream.received} of {stream.total} bytes arrived)",
                )
            if (yield Wait(wait)):
                reply = link.read_replies(seq, land)
                if stream.broken:
                    log.warning("%s: download stream broke: %s", self.nick_name, stream.broken)
                    return None
                if reply is RESEND:
                    return None
                if reply is not None:
                    if reply.kind == Kind.DATA and reply.stream is not None:
                        # the request went again (a reconnect): its new stream replaces this one
                        stream = InStream(reply, self.stream.window_bytes, destination)
                        continue
                    if reply.kind in (Kind.ERROR, Kind.DATA):
                        return reply
                    log.debug("%s: ignored %s during a download", self.nick_name, reply.kind)
            link.link_events()
            if not link.welcomed:
                return None  # the rest of the stream went with the link

    # -- shutdown ------------------------------------------------------------------------
    def close(self) -> None:
        """Say BYE if welcomed, then close the port."""
        self.link.close()
