"""``Pipe``: the channel to one peer of a federated group.

On the aggregator all pipes share the group's ROUTER and are addressed by
routing id (:class:`AggregatorPipe`); on a collaborator the pipe owns its
DEALER (:class:`CollaboratorPipe`). A pipe's state is derived from what waits
on it: ``pushing`` (an upload is pending), ``pulling`` (a download request is
pending), ``zombie`` (nothing pending) or ``offline``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from zmqfed.errors import AggregatorRewound, PeerOffline, ProtocolError, RemoteError
from zmqfed.federated.stream import Destination, OutStream, new_stream_id
from zmqfed.meta import Meta
from zmqfed.wire import EncodedTensors, Envelope, encode, encode_tensors
from zmqfed.wire.stream import parse_credit_meta

if TYPE_CHECKING:
    import torch

    from zmqfed.federated.client import CollaboratorLink
    from zmqfed.federated.server import AggregatorGroup
    from zmqfed.federated.stream import InStream

__all__ = [
    "OFFLINE",
    "PULLING",
    "PUSHING",
    "ZOMBIE",
    "AggregatorPipe",
    "CollaboratorPipe",
    "Pipe",
]

log = logging.getLogger(__name__)

PUSHING, PULLING, ZOMBIE, OFFLINE = "pushing", "pulling", "zombie", "offline"

#: ERROR codes after which a collaborator says HELLO again and resends.
REHELLO_CODES = frozenset({"hello-first", "stale-incarnation"})


class Pipe:
    """State shared by both ends: the peer's name, metas and byte counters."""

    def __init__(self, nick_name: str) -> None:
        self.nick_name = nick_name
        #: The last meta received from the peer.
        self.meta: Meta = Meta()
        self._out_meta: Meta | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_seen: float | None = None

    def set_meta(self, meta: dict[str, Any]) -> None:
        """Set the meta sent with the next message to the peer (a copy is kept)."""
        self._out_meta = Meta(meta).copy()

    @property
    def state(self) -> str:
        raise NotImplementedError

    @property
    def is_pushing(self) -> bool:
        """The peer uploaded data that waits to be received."""
        return self.state == PUSHING

    @property
    def is_pulling(self) -> bool:
        """The peer asked for data that waits to be served."""
        return self.state == PULLING

    @property
    def is_zombie(self) -> bool:
        """Connected, nothing pending."""
        return self.state == ZOMBIE

    @property
    def is_offline(self) -> bool:
        """The peer left (BYE), or cannot be reached."""
        return self.state == OFFLINE

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.nick_name!r} {self.state}>"


class AggregatorPipe(Pipe):
    """The aggregator's handle on one collaborator (a routing id on the group ROUTER)."""

    def __init__(self, group: AggregatorGroup, nick_name: str) -> None:
        super().__init__(nick_name)
        self.group = group
        self.routing_id = nick_name.encode("utf-8")
        self.online = False
        #: The collaborator process's session id (from HELLO).
        self.session = ""
        #: The request waiting for the hooks: a PUSH or a PULL envelope.
        self.pending: Envelope | None = None
        #: A WAIT was sent for the pending request (sent once per request).
        self.told_to_wait = False
        #: (session, seq) of uploads already counted, for idempotent retries.
        self.accepted: dict[tuple[str, int], None] = {}
        #: A streamed upload being received, or announced and waiting for admission.
        self.in_stream: InStream | None = None
        self.announced: Envelope | None = None
        #: The largest frame the peer accepts, as its HELLO said (None: ours).
        self.peer_frame_bytes: int | None = None
        #: A streamed download being sent.
        self.out_stream: OutStream | None = None

    @property
    def state(self) -> str:
        if not self.online:
            return OFFLINE
        if self.pending is None:
            return ZOMBIE
        return PUSHING if self.pending.kind == "PUSH" else PULLING

    def offline(self) -> None:
        """Mark the peer gone; a pending request and unfinished streams are dropped."""
        self.online = False
        self.pending = None
        self.group.drop_streams(self)

    def remember_upload(self, session: str, seq: int, keep: int = 64) -> None:
        """Record an accepted upload so that a retry of it is ACKed, not counted."""
        self.accepted[(session, seq)] = None
        while len(self.accepted) > keep:
            del self.accepted[next(iter(self.accepted))]

    def reply(
        self,
        kind: str,
        *,
        meta: dict[str, Any] | None = None,
        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
        encoded: EncodedTensors | None = None,
    ) -> bool:
        """Answer the pending request (or the last one) with ``kind``."""
        seq = self.pending.seq if self.pending is not None else 0
        if meta is None:
            meta = self._out_meta if self._out_meta is not None else {}
        self._out_meta = None
        return self.group.send(self, kind, seq=seq, meta=meta, tensors=tensors, encoded=encoded)

    def take_out_meta(self) -> Meta | None:
        """The meta a hook set with :meth:`set_meta` for the next reply, if any."""
        return self._out_meta


class CollaboratorPipe(Pipe):
    """A collaborator's channel to its aggregator; owns the DEALER through ``link``."""

    def __init__(self, link: CollaboratorLink, aggregator_name: str) -> None:
        super().__init__(aggregator_name)
        self.link = link
        self._closed = False

    @property
    def state(self) -> str:
        if self._closed:
            return OFFLINE
        return ZOMBIE if self.link.connected else OFFLINE

    def request(
        self,
        kind: str,
        *,
        meta: dict[str, Any],
        version: int,
        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
        timeout: float | None = None,
        destination: Destination | None = None,
    ) -> Envelope:
        """Send ``kind`` and block until the aggregator answers it.

        Large messages are streamed both ways (:mod:`zmqfed.wire.stream`);
        ``destination`` may name tensors a streamed reply lands in.

        WAIT answers (the request is parked) keep waiting; a reconnect or an
        aggregator restart makes the pipe say HELLO again and resend, which is
        safe because uploads are idempotent. Raises :class:`PeerTimeout` when
        ``timeout`` seconds pass, :class:`RemoteError` on an ERROR answer.
        """
        if self._closed:
            raise PeerOffline(f"pipe to {self.nick_name!r} is closed")
        link = self.link
        deadline = None if timeout is None else time.monotonic() + timeout
        seq = link.next_seq()
        encoded: EncodedTensors | None = None
        limits = link.send_limits
        if tensors and link.stream.should_stream(tensors, limits):
            encoded = encode_tensors(tensors, codec="raw", limits=limits, streamed=True)
        frames: list[Any] | None = None
        encoded_for = ""  # the incarnation the frames are addressed to
        while True:
            link.ensure_welcome(deadline, timeout)
            if link.restarted:
                link.restarted = False
                wanted = meta.get("version")
                known = link.aggregator_version
                if (
                    kind == "PULL"
                    and isinstance(wanted, int)
                    and known is not None
                    and wanted > known
                ):
                    raise AggregatorRewound(self.nick_name, known, wanted)
            out: OutStream | None = None
            if encoded is not None or frames is None or encoded_for != link.incarnation:
                encoded_for = link.incarnation
                env = Envelope(
                    kind=kind,
                    sender=link.nick_name,
                    version=version,
                    seq=seq,
                    incarnation=link.incarnation,
                    meta=dict(meta),
                    tensors=tensors if encoded is None and tensors else {},
                )
                if encoded is None:
                    frames = encode(env, codec=link.codec, limits=limits)
                else:  # announce; the chunks follow as the aggregator grants credit
                    out = OutStream(
                        new_stream_id(),
                        seq,
                        encoded,
                        link.chunk_bytes,
                        sender=link.nick_name,
                        incarnation=link.incarnation,
                        version=version,
                    )
                    frames = encode(
                        env, limits=limits, encoded=encoded, stream=(out.id, out.chunk_bytes)
                    )
            assert frames is not None
            if not link.send(frames, deadline, timeout):
                continue  # link dropped before the send: handshake again
            self.bytes_out += sum(_nbytes(f) for f in frames)
            reply = self._answer(kind, seq, out, destination, deadline, timeout)
            if out is not None:
                self.bytes_out += out.sent
                out.wait_sent(timeout=5.0)  # acknowledged or abandoned: libzmq lets go
            if reply is None:
                continue  # reconnected or re-HELLO needed: resend
            self.bytes_in += reply.nbytes
            self.last_seen = time.monotonic()
            if reply.kind == "ERROR":
                code = str(reply.meta.get("code", "error"))
                if code in REHELLO_CODES:
                    link.welcomed = False
                    continue
                if code == "stream-aborted":
                    continue  # the model changed while it streamed: ask again
                raise RemoteError(self.nick_name, code, str(reply.meta.get("reason", "")))
            return reply

    def _answer(
        self,
        kind: str,
        seq: int,
        out: OutStream | None,
        destination: Destination | None,
        deadline: float | None,
        timeout: float | None,
    ) -> Envelope | None:
        """Wait for the answer to request ``seq``, running a stream on the way.

        Sends an upload's chunks as credit arrives, and receives a streamed
        reply's chunks; None when the request must be sent again.
        """
        link = self.link
        while True:
            reply = link.wait_reply(seq, deadline, timeout, what=f"answer {kind}")
            if reply is None:
                return None
            if reply.kind == "CHUNK":
                continue  # a chunk of a download abandoned before this attempt
            if reply.kind == "CREDIT":
                try:
                    sid, nbytes = parse_credit_meta(reply.meta)
                except ProtocolError as exc:
                    log.warning("%s: bad credit from %s: %s", link.nick_name, self.nick_name, exc)
                    continue
                if out is not None and sid == out.id:
                    out.grant(nbytes)
                    if not link.pump(out, deadline, timeout):
                        return None
                continue
            if reply.stream is not None and reply.kind == "DATA":
                return link.receive_stream(reply, seq, destination, deadline, timeout)
            return reply

    def close(self) -> None:
        """Say BYE (best effort) and close the DEALER."""
        if not self._closed:
            self._closed = True
            self.link.close()


def _nbytes(frame: Any) -> int:
    try:
        return memoryview(frame).nbytes
    except TypeError:
        return len(frame)
