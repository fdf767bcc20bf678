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
it is asked to do: :meth:`serve`, :meth:`reply`, :meth:`accept_upload`,
:meth:`park`, :meth:`refuse`.  The aggregator's step loop
(:mod:`zmqfed.core.aggregator_side`) turns events into hook verdicts and
verdicts into these actions, and never writes a peer's fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from typing import Any

from zmqfed.errors import ProtocolError
from zmqfed.federated.aggregator_streams import Packaged, ServedModel, StreamDesk
from zmqfed.federated.channel_ends import AggregatorChannelEnd
from zmqfed.federated.events import PeerEvent, PeerEventKind, RefusalLog, TransportStats
from zmqfed.federated.members import Membership
from zmqfed.federated.pipe import AggregatorPipe
from zmqfed.federated.ports import Frame, LinkEventKind, Network, Unreachable, WouldBlock
from zmqfed.federated.protocol import (
    CHANNEL_KINDS,
    CONTRIBUTED,
    ErrorCode,
    discard_rest,
    error_meta,
    meta_version,
    parse_chunk,
    recv_message,
    stamp,
)
from zmqfed.federated.security import Curve, require_curve_for_pickle
from zmqfed.federated.sockets import FD_RESERVE, SocketOptions, open_descriptors, peer_capacity
from zmqfed.federated.traffic import Traffic, frames_nbytes
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
    encode_tensors,
)
from zmqfed.wire.stream import parse_credit_meta

__all__ = ["AggregatorTransport"]

log = logging.getLogger(__name__)

#: Seconds after a disconnect at which online peers are probed again.
REPROBE_DELAYS = (0.25, 1.0, 3.0)
#: Seconds between two probes of every online peer: a storm of disconnects
#: (thousands of peers leaving) costs one probe per interval, not one per
#: disconnect, which would be quadratic in the number of peers ...
PROBE_INTERVAL = 0.25
#: ... and at least this many seconds per online peer (5 s at 10,000 peers):
#: each probe is a PING to every one of them, and a churning crowd would
#: otherwise keep the aggregator's I/O thread busy with nothing but probes.
PROBE_COST = 0.0005
#: Messages handled per :meth:`AggregatorTransport.events` call: a flood must not starve timers.
DRAIN_BATCH = 512


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
        require_curve_for_pickle(limits, curve)
        self.props = props
        self.name = props.nick_name
        self.endpoint = props.address.endpoint
        self.limits = limits
        #: For peers that have not said HELLO: an object frame is never decoded for them.
        self.limits_before_hello = dataclasses.replace(limits, allow_pickle=False)
        self.codec = codec
        self.curve = curve
        #: Random per process start; requests addressed to another one are stale.
        self.incarnation = uuid.uuid4().hex[:16]
        #: The version stamped on every message (the Maintainer's).
        self.version = 0
        self.stats = TransportStats()
        self.traffic = Traffic()
        security = None
        if curve is not None:
            security = curve.server(self.name, props.group_name, props.collaborators)
        self.port = network.router(self.endpoint, options=options, limits=limits, security=security)
        self.roster: dict[str, AggregatorPipe] = {
            name: AggregatorPipe(name) for name in props.collaborators
        }
        #: Peers online now, and the most this aggregator holds at once.
        self.online_count = 0
        self.capacity = self._announce_capacity(options)
        self.served = ServedModel(served, codec=codec, limits=limits, stream=stream)
        self.streams = StreamDesk(self, stream, upload_names)
        self.members = Membership(self)
        #: The pipe-level channel (``Pipe.direct_set``, ``upload``, ...) of every pipe.
        self.channel = AggregatorChannelEnd(self)
        #: Peers whose streamed upload completed outside a message of theirs.
        self.completed: list[AggregatorPipe] = []
        #: Refusals are logged here, rate-limited (the step loop logs its own here too).
        self.log_refusal = RefusalLog(log, self.name)
        self._read_at = time.monotonic()  # when events() last ran
        self._reprobe: list[float] = []
        self._probed = -math.inf
        self._closed = False

    def _announce_capacity(self, options: SocketOptions | None) -> int:
        """Say at start how many peers this aggregator can hold, and why."""
        fds = peer_capacity()
        capacity = fds if options is None or options.max_peers is None else options.max_peers
        capacity = min(capacity, fds) if fds else capacity
        group = len(self.roster)
        how = (
            f"{capacity} peers (one descriptor each: {open_descriptors()} open, "
            f"{FD_RESERVE} in reserve, limit {fds + open_descriptors() + FD_RESERVE})"
        )
        if capacity < group:
            log.warning(
                "%s: can hold %s, fewer than the group's %d collaborators: the others "
                "are refused (over-capacity); raise the descriptor limit (ulimit -n)",
                self.name,
                how,
                group,
            )
        else:
            log.info("%s: can hold %s; the group has %d", self.name, how, group)
        return capacity

    # -- what the loop reads ---------------------------------------------------
    @property
    def next_timer(self) -> float:
        """When :meth:`events` wants to run without input (``math.inf``: never)."""
        probe = self._reprobe[0] if self._reprobe else math.inf
        return min(probe, self.streams.next_expiry())

    @property
    def closed(self) -> bool:
        """:meth:`close` was called."""
        return self._closed

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
        # An incoming stream idles only while it could be read: time away from
        # the port (aggregation, evaluation between steps) does not count.
        now = time.monotonic()
        self.streams.pause_idle(now - self._read_at)
        self._read_at = now
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
            self._reprobe = [now, *(now + d for d in REPROBE_DELAYS)]
        # However many disconnects come, probes keep their distance (which grows
        # with the peers each one visits): a probe is the aggregator's busiest work.
        earliest = self._probed + max(PROBE_INTERVAL, self.online_count * PROBE_COST)
        self._reprobe = sorted({max(t, earliest) for t in self._reprobe})
        if not self._reprobe or now < self._reprobe[0]:
            return
        self._reprobe = [t for t in self._reprobe if t > now]
        self._probed = now
        # One PING for everyone: it names no peer, so it is encoded once.
        ping = encode(
            stamp(Kind.PING, self.name, seq=0, incarnation=self.incarnation, version=self.version),
            limits=self.limits,
        )
        probed = self.online()  # all probed before any event is reported
        for pipe in probed:
            self._send_frames(pipe, Kind.PING, ping)
        for pipe in probed:
            if not pipe.online:  # unreachable (a full queue is no departure)
                yield PeerEvent(PeerEventKind.LEFT, pipe)

    def _receive(self) -> PeerEvent | None:
        """Handle one waiting message; the event it caused, if any."""
        frames = recv_message(self.port, self._land)
        self.stats.messages_in += 1
        if frames is None:  # a chunk of a streamed upload, landed in place
            return None
        rid = frames[0].bytes
        name = rid.decode("utf-8", "replace")
        # Behind CURVE the first frame also names the connection: answers go back on it.
        connection: bytes | None = getattr(frames[0], "connection", None)
        reply_to: Any = frames[0] if connection is not None else rid
        pipe = self.roster.get(name)
        if pipe is None:
            self.log_refusal(
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
            env = decode(
                frames[1:], limits=self.limits if pipe.online else self.limits_before_hello
            )
        except ProtocolError as exc:
            self.log_refusal(ErrorCode.PROTOCOL, f"malformed message from {name!r}: {exc}")
            self.refuse_message(reply_to, 0, ErrorCode.PROTOCOL, str(exc))
            return None
        self.traffic.received(env.kind, frames_nbytes(frames[1:]))
        if env.sender != name:
            # With CURVE the port named the sender by its key (docs/zeromq.md §20).
            whose = "key" if self.curve is not None else "routing id"
            self.log_refusal(
                ErrorCode.IDENTITY,
                f"dropped a message claiming to be {env.sender[:64]!r} from {whose} of {name!r}",
            )
            self.refuse_message(
                reply_to,
                env.seq,
                ErrorCode.IDENTITY,
                f"{whose} {name!r} does not match sender {env.sender!r}",
            )
            return None
        if env.kind != Kind.HELLO and _another_connection(pipe, connection):
            # Another connection of this member's key, whose HELLO was not the
            # last accepted: another process with the same key, or this one's
            # old socket. It must say HELLO, where a replaced session is told
            # name-in-use (docs/zeromq.md §20).
            self.log_refusal(
                ErrorCode.HELLO_FIRST,
                f"refused a message from a second connection of {name!r}'s key "
                "(another process with its key?)",
            )
            self.refuse_message(
                reply_to,
                env.seq,
                ErrorCode.HELLO_FIRST,
                f"this connection of {name!r} has not said HELLO; another one has since",
            )
            return None
        pipe.last_seen = time.monotonic()
        if env.kind == Kind.HELLO:
            return self.members.hello(pipe, env, reply_to)
        return self._dispatch(pipe, env, reply_to)

    def adopt_connection(self, pipe: AggregatorPipe, reply_to: Any) -> None:
        """``pipe``'s HELLO was accepted: what is sent to it goes on that HELLO's connection."""
        connection = getattr(reply_to, "connection", None)
        # An id starting with a zero byte is one libzmq gave a connection it
        # handed over (docs/zeromq.md §20): a dying one, never a route.
        if connection is not None and not connection.startswith(b"\0"):
            pipe.connection = connection
            self.port.route(pipe.routing_id, connection)

    def _authentic(self, pipe: AggregatorPipe, frames: list[Frame]) -> bool:
        """With CURVE, the key's name must be the routing id (a key cannot speak for another)."""
        if self.curve is None or len(frames) < 2:
            return True
        claimed_by = self.port.user_id(frames[1])
        if claimed_by == pipe.nick_name:
            return True
        self.log_refusal(
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
        if _another_connection(pipe, getattr(frames[0], "connection", None)):
            return False  # not from the connection that said HELLO: refused as any message
        chunk = parse_chunk(frames[1], self.limits)
        if chunk is None or chunk[0].sender != pipe.nick_name:
            return False
        head, sid, offset, nbytes = chunk
        pipe.last_seen = time.monotonic()
        self.traffic.received(Kind.CHUNK.value, nbytes)
        done = self.streams.land(pipe, head.seq, sid, offset, nbytes)
        if done is not None:
            self.completed.append(done)
        return True

    def discard_message(self) -> None:
        """Drop the rest of the message being read."""
        discard_rest(self.port)

    def _dispatch(self, pipe: AggregatorPipe, env: Envelope, reply_to: Any) -> PeerEvent | None:
        """Handle ``env`` from ``pipe``'s member; refusals go to ``reply_to``, where it came from."""
        kind = env.kind
        if kind == Kind.CREDIT:
            try:
                sid, nbytes = parse_credit_meta(env.meta)
            except ProtocolError as exc:
                self.refuse_message(reply_to, env.seq, ErrorCode.PROTOCOL, str(exc))
                return None
            self.streams.credit(pipe, sid, nbytes)
            return None
        if kind == Kind.CHUNK:
            log.debug(
                "%s: dropped a chunk of an abandoned stream from %s", self.name, pipe.nick_name
            )
            return None
        if kind == Kind.BYE:
            log.info("%s: %s said BYE", self.name, pipe.nick_name)
            return self.left(pipe)
        if kind == Kind.PING:
            self.send(pipe, Kind.PONG, seq=env.seq, meta={})
            return None
        if kind in CHANNEL_KINDS or kind == Kind.ACK:  # the pipe-level channel: no request
            self.channel.dispatch(pipe, env)
            return None
        if kind not in (Kind.PUSH, Kind.PULL, Kind.ASK):
            self.refuse_message(
                reply_to,
                env.seq,
                ErrorCode.UNEXPECTED,
                f"an aggregator does not accept {kind} messages",
            )
            return None
        if not pipe.online:
            self.refuse_message(
                reply_to, env.seq, ErrorCode.HELLO_FIRST, f"say HELLO before {kind}"
            )
            return None
        if env.incarnation != self.incarnation:
            self.refuse_message(
                reply_to,
                env.seq,
                ErrorCode.STALE_INCARNATION,
                f"request addressed to incarnation {env.incarnation!r}, "
                f"this is {self.incarnation!r}",
            )
            return None
        if kind == Kind.PUSH and self.members.counted_already(pipe, env):
            return None
        if env.stream is not None:
            if kind == Kind.ASK:  # exchanges are small: only uploads and models stream
                self.refuse_message(
                    reply_to, env.seq, ErrorCode.PROTOCOL, "an ASK cannot be streamed"
                )
                return None
            done = self.streams.announce(pipe, env)
            return None if done is None else PeerEvent(PeerEventKind.REQUEST, done)
        self.request_arrived(pipe, env)
        return PeerEvent(PeerEventKind.REQUEST, pipe)

    def request_arrived(self, pipe: AggregatorPipe, env: Envelope) -> None:
        """``env`` (a whole PUSH or PULL, or a completed stream) now waits on ``pipe``."""
        pipe.bytes_in += env.nbytes
        pipe.request = env
        pipe.told_to_wait = False
        pipe.meta = Meta(env.meta)

    def left(self, pipe: AggregatorPipe) -> PeerEvent:
        """``pipe``'s peer is gone: its pending request and streams are dropped."""
        self.stats.departures += pipe.online
        self.online_count -= pipe.online
        pipe.online = False
        pipe.request = None
        self.streams.drop(pipe)
        return PeerEvent(PeerEventKind.LEFT, pipe)

    # -- actions -------------------------------------------------------------------
    def serve(self, pipe: AggregatorPipe, meta: Meta) -> bool:
        """Answer ``pipe``'s download request with the served model (whole or in chunks)."""
        request = pipe.request
        if request is None or request.kind != Kind.PULL:
            return False  # a hook's wait let the peer leave or ask for something else
        pipe.request = None
        if self.members.contributed(pipe):  # a restarted member need not train this version again
            meta = Meta(meta)
            meta[CONTRIBUTED] = True
        encoded, streamed = self.served.frames_for(self.peer_limits(pipe), pipe.declared)
        if streamed:
            return self.streams.start(pipe, request.seq, meta.to_json_dict(), encoded)
        return self.send(
            pipe, Kind.DATA, seq=request.seq, meta=meta.to_json_dict(), encoded=encoded
        )

    def reply(
        self, pipe: AggregatorPipe, meta: Meta, tensors: dict[str, dict[str, Any]] | None = None
    ) -> bool:
        """Answer ``pipe``'s exchange (ASK) with REPLY: ``meta`` and ``tensors``, sent whole."""
        request = pipe.request
        assert request is not None and request.kind == Kind.ASK
        pipe.request = None
        encoded = encode_tensors(  # a snapshot: the hook may reuse its tensors at once
            tensors or {}, codec=self.codec, limits=self.peer_limits(pipe), snapshot=True
        )
        return self.send(
            pipe, Kind.REPLY, seq=request.seq, meta=meta.to_json_dict(), encoded=encoded
        )

    def accept_upload(self, pipe: AggregatorPipe) -> bool:
        """Count ``pipe``'s upload: ACK it, and ACK (not count) any retry of it."""
        request = pipe.request
        if request is None or request.kind != Kind.PUSH:
            return False
        pipe.request = None
        self.members.counted(pipe, request.seq)
        self.stats.count_upload("accepted")
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
        if request.kind == Kind.PUSH:  # an upload answering a model older than ours is stale
            stale = code is ErrorCode.DISCARDED and meta_version(request.meta) <= self.version
            self.stats.count_upload("stale" if stale else code.value)
        pipe.take_out_tensors()
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
        obj: Any = None,
    ) -> bool:
        """Send ``kind`` to ``pipe``; False (and the peer gone) if it cannot be reached."""
        env = stamp(
            kind, self.name, seq=seq, incarnation=self.incarnation, version=self.version, meta=meta
        )
        env.obj = obj  # only where Limits.allow_pickle: encode refuses it otherwise
        frames = encode(env, codec=self.codec, limits=self.limits, encoded=encoded, stream=stream)
        if not self._send_frames(pipe, kind, frames):
            return False
        if encoded is not None and stream is None:
            pipe.bytes_out += encoded.nbytes
        return True

    def _send_frames(self, pipe: AggregatorPipe, kind: Kind, frames: list[Any]) -> bool:
        try:
            self.port.send([pipe.routing_id, *frames])
        except Unreachable:
            log.info("%s: %s is unreachable; pipe offline", self.name, pipe.nick_name)
            self.left(pipe)
            return False
        except WouldBlock:
            log.warning("%s: %s's queue is full; %s not sent", self.name, pipe.nick_name, kind)
            return False
        self.traffic.sent(kind.value, frames_nbytes(frames))
        return True

    def refuse_over_capacity(self, pipe: AggregatorPipe, seq: int, reply_to: Any) -> None:
        """Refuse ``pipe``'s HELLO (from ``reply_to``): this aggregator holds as many peers as it can."""
        self.log_refusal(
            ErrorCode.OVER_CAPACITY,
            f"refused {pipe.nick_name!r}: {self.online_count} peers online, "
            "the most this aggregator can hold",
        )
        self.refuse_message(
            reply_to,
            seq,
            ErrorCode.OVER_CAPACITY,
            f"aggregator {self.name!r} holds {self.online_count} peers, its capacity "
            "(descriptor limit or max_peers); try again later or raise its limit",
        )

    def refuse_message(self, rid: Any, seq: int, code: ErrorCode, reason: str) -> None:
        """Answer a message from routing id ``rid`` with ERROR ``code`` (best effort).

        ``rid`` may be a received message's first frame: behind CURVE the
        answer then goes back on the connection that message came from.
        """
        self.stats.count_refusal(code)
        env = stamp(
            Kind.ERROR,
            self.name,
            seq=seq,
            incarnation=self.incarnation,
            version=self.version,
            meta=error_meta(code, reason),
        )
        frames = encode(env, limits=self.limits)
        with contextlib.suppress(Unreachable, WouldBlock):  # the offender is gone: nothing to tell
            self.port.send([rid, *frames])
            self.traffic.sent(Kind.ERROR.value, frames_nbytes(frames))

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


def _another_connection(pipe: AggregatorPipe, connection: bytes | None) -> bool:
    """Behind CURVE: ``connection`` is not the one whose HELLO ``pipe`` accepted last.

    False without CURVE (no connection) and before any HELLO was accepted.
    """
    return connection is not None and pipe.connection is not None and connection != pipe.connection
