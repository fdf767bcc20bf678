"""``AggregatorTransport``: the aggregator's side of one group -- its port, its peers, the protocol.

The transport owns everything the protocol changes: each peer's record
(:class:`~zmqfed.federated.pipe.AggregatorPipe`: online, session, pending
request, uploads already counted, streams), the served model's encoding and
the chunked streams.  It checks every message before anyone sees it: the
routing id must be on the roster and equal the message's sender (and, with
CURVE, the key's name), the handshake must have happened in this
incarnation, malformed frames are answered with ERROR instead of crashing the
node, and a retried upload is acknowledged again rather than counted twice.

What it reports, as :class:`PeerEvent` from :meth:`events`: a peer joined,
a request (an upload or a download) is pending on a peer, a peer left.  What
it is asked to do: :meth:`serve`, :meth:`accept_upload`, :meth:`park`,
:meth:`refuse`.  The aggregator's step loop
(:mod:`zmqfed.core.aggregator_side`) turns events into hook verdicts and
verdicts into these actions, and never writes a peer's fields.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from typing import Any

from zmqfed.errors import ProtocolError
from zmqfed.federated.aggregator_streams import Packaged, ServedModel, StreamDesk
from zmqfed.federated.events import PeerEvent, PeerEventKind, RefusalLog, TransportStats
from zmqfed.federated.pipe import AggregatorPipe
from zmqfed.federated.ports import Frame, LinkEventKind, Network, Unreachable, WouldBlock
from zmqfed.federated.protocol import (
    CONTRIBUTED,
    ErrorCode,
    declared_subset,
    discard_rest,
    error_meta,
    hello_problem,
    peer_frame_bound,
    recv_message,
    stamp,
    welcome_meta,
)
from zmqfed.federated.security import Curve
from zmqfed.federated.sockets import SocketOptions
from zmqfed.meta import Meta
from zmqfed.props import FederatedProperties
from zmqfed.wire import (
    DEFAULT_STREAM,
    EncodedTensors,
    Envelope,
    Kind,
    Limits,
    StreamConfig,
    decode,
    encode,
)
from zmqfed.wire.header import parse_header
from zmqfed.wire.stream import parse_chunk_meta, parse_credit_meta

__all__ = ["AggregatorTransport"]

log = logging.getLogger(__name__)

#: Seconds after a disconnect at which online peers are probed again.
REPROBE_DELAYS = (0.25, 1.0, 3.0)
#: Messages handled per :meth:`AggregatorTransport.events` call: a flood must not starve timers.
DRAIN_BATCH = 512
#: Accepted uploads remembered per peer for idempotent retries.
KEEP_ACCEPTED = 64
#: Seconds a replaced session of a member is remembered: if it says HELLO
#: again meanwhile, two processes share the name.
SUPERSEDED_TTL = 600.0
#: ... and at most this many of them (a member cycling sessions cannot grow memory).
KEEP_SUPERSEDED = 16


class AggregatorTransport:
    """One federated group seen from its aggregator: a ROUTER port and one pipe per member.

    Parameters
    ----------
    props:
        The group (this node is its aggregator).
    network:
        Makes the ROUTER port (real sockets, or an in-memory network in tests).
    served:
        Returns the model to serve, after the package hooks (see :class:`ServedModel`).
    upload_names:
        Returns the tensor names an upload may carry; a streamed upload naming
        others is refused before anything is allocated for it.
    """

    def __init__(
        self,
        props: FederatedProperties,
        *,
        network: Network,
        served: Callable[[], Packaged],
        limits: Limits,
        options: SocketOptions | None = None,
        codec: str = "raw",
        curve: Curve | None = None,
        stream: StreamConfig = DEFAULT_STREAM,
        upload_names: Callable[[], Collection[str]] | None = None,
    ) -> None:
        assert props.address.endpoint is not None
        self.props = props
        self.name = props.nick_name
        self.endpoint = props.address.endpoint
        self.limits = limits
        self.codec = codec
        self.curve = curve
        #: Random per process start; requests addressed to another one are stale.
        self.incarnation = uuid.uuid4().hex[:16]
        #: The version stamped on every message (the Maintainer's).
        self.version = 0
        self.stats = TransportStats()
        security = None
        if curve is not None:
            security = curve.server(self.name, props.group_name, props.collaborators)
        self.port = network.router(self.endpoint, options=options, limits=limits, security=security)
        self.roster: dict[str, AggregatorPipe] = {
            name: AggregatorPipe(name) for name in props.collaborators
        }
        self.served = ServedModel(served, codec=codec, limits=limits, stream=stream)
        self.streams = StreamDesk(self, stream, upload_names)
        #: Peers whose streamed upload completed outside a message of theirs.
        self.completed: list[AggregatorPipe] = []
        self._log_refusal = RefusalLog(log, self.name)
        self._reprobe: list[float] = []
        self._closed = False

    # -- what the loop reads ---------------------------------------------------
    @property
    def next_timer(self) -> float:
        """When :meth:`events` wants to run without input (``math.inf``: never)."""
        probe = self._reprobe[0] if self._reprobe else math.inf
        return min(probe, self.streams.next_expiry())

    def online(self) -> list[AggregatorPipe]:
        """Peers that said HELLO in this incarnation and have not left."""
        return [p for p in self.roster.values() if p.online]

    def peer_limits(self, pipe: AggregatorPipe) -> Limits:
        """Limits for messages to ``pipe``: ours, within the frame bound its HELLO announced."""
        return self.limits.within_frame_bound(pipe.peer_frame_bytes)

    # -- events ------------------------------------------------------------------
    def events(self, wait_ms: int) -> Iterator[PeerEvent]:
        """Wait up to ``wait_ms`` for input, then report what happened, one event at a time.

        Handles at most ``DRAIN_BATCH`` messages; the caller may stop
        iterating at any event (the rest stays queued on the port).
        """
        ready = self.port.wait(wait_ms)
        yield from self._liveness(probe=ready)
        self.streams.expire()
        while self.completed:
            yield PeerEvent(PeerEventKind.REQUEST, self.completed.pop(0))
        if not ready:
            return
        for _ in range(DRAIN_BATCH):
            try:
                event = self._receive()
            except WouldBlock:
                return
            if event is not None:
                yield event
            while self.completed:
                yield PeerEvent(PeerEventKind.REQUEST, self.completed.pop(0))

    def _liveness(self, *, probe: bool) -> Iterator[PeerEvent]:
        """Peers found gone: after a disconnect a send to a departed id fails at once.

        The port may report the disconnect before it has dropped the routing
        id, and then the probe still succeeds; so a disconnect also schedules
        probes a little later (``next_timer``).
        """
        now = time.monotonic()
        disconnected = probe and any(
            e.kind is LinkEventKind.DISCONNECTED for e in self.port.link_events()
        )
        if disconnected:
            self._reprobe = [now + delay for delay in REPROBE_DELAYS]
        elif self._reprobe and now >= self._reprobe[0]:
            self._reprobe = [t for t in self._reprobe if t > now]
        else:
            return
        for pipe in self.online():
            if not self.send(pipe, Kind.PING, seq=0, meta={}):
                yield PeerEvent(PeerEventKind.LEFT, pipe)

    def _receive(self) -> PeerEvent | None:
        """Handle one waiting message; the event it caused, if any."""
        frames = recv_message(self.port, self._land)
        self.stats.messages_in += 1
        if frames is None:  # a chunk of a streamed upload, landed in place
            return None
        rid = frames[0].bytes
        name = rid.decode("utf-8", "replace")
        pipe = self.roster.get(name)
        if pipe is None:
            self._log_refusal(
                ErrorCode.UNKNOWN_PEER,
                f"dropped a message from {name[:64]!r}, not a member of the group",
            )
            # the roster is not told to whoever asks
            self.refuse_message(
                rid, 0, ErrorCode.UNKNOWN_PEER, f"{name!r} is not a collaborator of {self.name!r}"
            )
            return None
        if not self._authentic(pipe, frames):
            return None
        try:
            env = decode(frames[1:], limits=self.limits)
        except ProtocolError as exc:
            self._log_refusal(ErrorCode.PROTOCOL, f"malformed message from {name!r}: {exc}")
            self.refuse_message(rid, 0, ErrorCode.PROTOCOL, str(exc))
            return None
        if env.sender != name:
            self.refuse_message(
                rid,
                env.seq,
                ErrorCode.IDENTITY,
                f"routing id {name!r} does not match sender {env.sender!r}",
            )
            return None
        pipe.last_seen = time.monotonic()
        return self._dispatch(pipe, env)

    def _authentic(self, pipe: AggregatorPipe, frames: list[Frame]) -> bool:
        """With CURVE, the key's name must be the routing id (a key cannot speak for another)."""
        if self.curve is None or len(frames) < 2:
            return True
        claimed_by = self.port.user_id(frames[1])
        if claimed_by == pipe.nick_name:
            return True
        self._log_refusal(
            ErrorCode.IDENTITY,
            f"dropped a message claiming to be {pipe.nick_name!r} from key of {claimed_by!r}",
        )
        self.refuse_message(
            pipe.routing_id,
            0,
            ErrorCode.IDENTITY,
            f"this connection authenticated as {claimed_by!r}, not {pipe.nick_name!r}",
        )
        return False

    def _land(self, frames: list[Frame]) -> bool:
        """Receive a CHUNK of a streamed upload into its tensors (True: consumed).

        Anything that is not a well-formed chunk from the peer it names is
        left to the ordinary path to refuse.
        """
        pipe = self.roster.get(frames[0].bytes.decode("utf-8", "replace"))
        if pipe is None:
            return False
        if self.curve is not None and self.port.user_id(frames[1]) != pipe.nick_name:
            return False
        try:
            head = parse_header(frames[1], self.limits)
            sid, offset, nbytes = parse_chunk_meta(head.meta)
        except ProtocolError:
            return False
        if head.sender != pipe.nick_name or head.tensors:
            return False
        pipe.last_seen = time.monotonic()
        done = self.streams.land(pipe, head.seq, sid, offset, nbytes)
        if done is not None:
            self.completed.append(done)
        return True

    def discard_message(self) -> None:
        """Drop the rest of the message being read."""
        discard_rest(self.port)

    def _dispatch(self, pipe: AggregatorPipe, env: Envelope) -> PeerEvent | None:
        kind = env.kind
        if kind == Kind.CREDIT:
            try:
                sid, nbytes = parse_credit_meta(env.meta)
            except ProtocolError as exc:
                self.refuse_message(pipe.routing_id, env.seq, ErrorCode.PROTOCOL, str(exc))
                return None
            self.streams.credit(pipe, sid, nbytes)
            return None
        if kind == Kind.CHUNK:
            log.debug(
                "%s: dropped a chunk of an abandoned stream from %s", self.name, pipe.nick_name
            )
            return None
        if kind == Kind.HELLO:
            return self._hello(pipe, env)
        if kind == Kind.BYE:
            log.info("%s: %s said BYE", self.name, pipe.nick_name)
            return self.left(pipe)
        if kind == Kind.PING:
            self.send(pipe, Kind.PONG, seq=env.seq, meta={})
            return None
        if kind not in (Kind.PUSH, Kind.PULL):
            self.refuse_message(
                pipe.routing_id,
                env.seq,
                ErrorCode.UNEXPECTED,
                f"an aggregator does not accept {kind} messages",
            )
            return None
        if not pipe.online:
            self.refuse_message(
                pipe.routing_id, env.seq, ErrorCode.HELLO_FIRST, f"say HELLO before {kind}"
            )
            return None
        if env.incarnation != self.incarnation:
            self.refuse_message(
                pipe.routing_id,
                env.seq,
                ErrorCode.STALE_INCARNATION,
                f"request addressed to incarnation {env.incarnation!r}, "
                f"this is {self.incarnation!r}",
            )
            return None
        if kind == Kind.PUSH and self._counted_already(pipe, env):
            return None
        if env.stream is not None:
            done = self.streams.announce(pipe, env)
            return None if done is None else PeerEvent(PeerEventKind.REQUEST, done)
        self.request_arrived(pipe, env)
        return PeerEvent(PeerEventKind.REQUEST, pipe)

    def contributed(self, pipe: AggregatorPipe) -> bool:
        """``pipe``'s member already has an upload counted for the current version."""
        return pipe.counted is not None and pipe.counted[0] == self.version

    def _counted_already(self, pipe: AggregatorPipe, env: Envelope) -> bool:
        """Answer a PUSH that must not be counted (True): at most one upload per member per version.

        The same request again (a retry after a lost ACK), or another upload
        from the same process for a version it already contributed to (a
        user's retry after a timeout, with a new seq), is acknowledged as a
        duplicate; an upload from another process of the member (restarted
        while its round was open) is refused with ``already-counted``.
        """
        retry = (pipe.session, env.seq) in pipe.accepted
        if not retry and not self.contributed(pipe):
            return False
        assert pipe.counted is not None or retry
        if retry or (pipe.counted is not None and pipe.counted[1] == pipe.session):
            log.debug(
                "%s: upload %d from %s is a duplicate: acknowledged, not counted",
                self.name,
                env.seq,
                pipe.nick_name,
            )
            self.send(pipe, Kind.ACK, seq=env.seq, meta={"duplicate": True})
            return True
        self.refuse_message(
            pipe.routing_id,
            env.seq,
            ErrorCode.ALREADY_COUNTED,
            f"{pipe.nick_name} already contributed to version {self.version} "
            "(from an earlier process); this upload is not counted",
        )
        return True

    def request_arrived(self, pipe: AggregatorPipe, env: Envelope) -> None:
        """``env`` (a whole PUSH or PULL, or a completed stream) now waits on ``pipe``."""
        pipe.bytes_in += env.nbytes
        pipe.request = env
        pipe.told_to_wait = False
        pipe.meta = Meta(env.meta)

    def _hello(self, pipe: AggregatorPipe, env: Envelope) -> PeerEvent | None:
        problem = hello_problem(env.meta, self.props)
        if problem is not None:
            self.refuse_message(pipe.routing_id, env.seq, *problem)
            return None
        declared = declared_subset(env.meta, self.streams.known_names())
        if isinstance(declared, tuple):
            self.refuse_message(pipe.routing_id, env.seq, *declared)
            return None
        session = str(env.meta.get("session", ""))[:64]
        if self._superseded(pipe, session):
            log.error(
                "%s: two processes use the name %r (sessions %s and %s): refused the older one",
                self.name,
                pipe.nick_name,
                session,
                pipe.session,
            )
            self.refuse_message(
                pipe.routing_id,
                env.seq,
                ErrorCode.NAME_IN_USE,
                f"another process of {pipe.nick_name!r} took over this name; "
                "two processes must not share one node's name",
            )
            return None
        pipe.peer_frame_bytes = peer_frame_bound(env.meta)
        pipe.declared = declared
        if session != pipe.session:
            # A new collaborator process: whatever the old one asked for is void.
            pipe.request = None
            self.streams.drop(pipe)
            if pipe.session:
                pipe.superseded[pipe.session] = time.monotonic()
                while len(pipe.superseded) > KEEP_SUPERSEDED:
                    del pipe.superseded[next(iter(pipe.superseded))]
            pipe.session = session
        joined = not pipe.online
        pipe.online = True
        self.send(
            pipe,
            Kind.WELCOME,
            seq=env.seq,
            meta=welcome_meta(incarnation=self.incarnation, limits=self.limits),
        )
        if not joined:
            return None
        log.info("%s: %s joined", self.name, pipe.nick_name)
        return PeerEvent(PeerEventKind.JOINED, pipe)

    def _superseded(self, pipe: AggregatorPipe, session: str) -> bool:
        """A session a newer process of the same name replaced lately is back: two processes live.

        A restarted process never comes back under its old session, so only a
        second live process does (ROUTER_HANDOVER hands the name back and forth).
        """
        now = time.monotonic()
        for old, when in list(pipe.superseded.items()):
            if now - when > SUPERSEDED_TTL:
                del pipe.superseded[old]
        return session in pipe.superseded

    def left(self, pipe: AggregatorPipe) -> PeerEvent:
        """``pipe``'s peer is gone: its pending request and streams are dropped."""
        pipe.online = False
        pipe.request = None
        self.streams.drop(pipe)
        return PeerEvent(PeerEventKind.LEFT, pipe)

    # -- actions -------------------------------------------------------------------
    def serve(self, pipe: AggregatorPipe, meta: Meta) -> bool:
        """Answer ``pipe``'s download request with the served model (whole or in chunks)."""
        request = pipe.request
        assert request is not None and request.kind == Kind.PULL
        pipe.request = None
        if self.contributed(pipe):  # a restarted member need not train this version again
            meta = Meta(meta)
            meta[CONTRIBUTED] = True
        encoded, streamed = self.served.frames_for(self.peer_limits(pipe), pipe.declared)
        if streamed:
            return self.streams.start(pipe, request.seq, meta.to_json_dict(), encoded)
        return self.send(
            pipe, Kind.DATA, seq=request.seq, meta=meta.to_json_dict(), encoded=encoded
        )

    def accept_upload(self, pipe: AggregatorPipe) -> bool:
        """Count ``pipe``'s upload: ACK it, and ACK (not count) any retry of it."""
        request = pipe.request
        assert request is not None and request.kind == Kind.PUSH
        pipe.request = None
        pipe.counted = (self.version, pipe.session)
        pipe.accepted[(pipe.session, request.seq)] = None
        while len(pipe.accepted) > KEEP_ACCEPTED:
            del pipe.accepted[next(iter(pipe.accepted))]
        return self.send(pipe, Kind.ACK, seq=request.seq, meta={"version": self.version})

    def park(self, pipe: AggregatorPipe) -> None:
        """Keep ``pipe``'s request for later; tell the collaborator to wait (once)."""
        if pipe.request is None or pipe.told_to_wait:
            return
        pipe.told_to_wait = True
        self.stats.parked += 1
        self.send(pipe, Kind.WAIT, seq=pipe.request.seq, meta={"version": self.version})

    def refuse(self, pipe: AggregatorPipe, code: ErrorCode, reason: str) -> None:
        """Refuse ``pipe``'s pending request for good, telling the collaborator why."""
        request = pipe.request
        if request is None:
            return
        pipe.request = None
        pipe.take_out_meta()
        self.refuse_message(pipe.routing_id, request.seq, code, reason)

    def model_changed(self) -> None:
        """The served state changed: encode it again, and stop serving the old one."""
        self.served.changed()
        self.streams.quiesce()

    def send(
        self,
        pipe: AggregatorPipe,
        kind: Kind,
        *,
        seq: int,
        meta: dict[str, Any],
        encoded: EncodedTensors | None = None,
        stream: tuple[str, int] | None = None,
    ) -> bool:
        """Send ``kind`` to ``pipe``; False (and the peer gone) if it cannot be reached."""
        env = stamp(
            kind, self.name, seq=seq, incarnation=self.incarnation, version=self.version, meta=meta
        )
        frames = encode(env, codec=self.codec, limits=self.limits, encoded=encoded, stream=stream)
        try:
            self.port.send([pipe.routing_id, *frames])
        except Unreachable:
            log.info("%s: %s is unreachable; pipe offline", self.name, pipe.nick_name)
            self.left(pipe)
            return False
        except WouldBlock:
            log.warning("%s: %s's queue is full; %s not sent", self.name, pipe.nick_name, kind)
            return False
        if encoded is not None and stream is None:
            pipe.bytes_out += encoded.nbytes
        return True

    def refuse_message(self, rid: bytes, seq: int, code: ErrorCode, reason: str) -> None:
        """Answer a message from routing id ``rid`` with ERROR ``code`` (best effort)."""
        self.stats.count_refusal(code)
        env = stamp(
            Kind.ERROR,
            self.name,
            seq=seq,
            incarnation=self.incarnation,
            version=self.version,
            meta=error_meta(code, reason),
        )
        with contextlib.suppress(Unreachable, WouldBlock):  # the offender is gone: nothing to tell
            self.port.send([rid, *encode(env, limits=self.limits)])

    # -- shutdown ----------------------------------------------------------------
    def close(self, *, final: bool = False) -> None:
        """Say BYE to every online collaborator and close the port.

        ``final`` tells them the federation is over, so they stop instead of
        waiting for this aggregator to come back.
        """
        if self._closed:
            return
        self._closed = True
        self.streams.quiesce(timeout=5.0)
        for pipe in self.online():
            self.send(pipe, Kind.BYE, seq=0, meta={"final": final})
        self.port.close()
