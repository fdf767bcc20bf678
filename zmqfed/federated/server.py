"""``AggregatorGroup``: the aggregator's ROUTER, its roster and the protocol.

The group checks every message before the Maintainer sees it: the routing id
must be on the roster and equal the message's sender, the handshake must have
happened in this incarnation, and malformed frames are answered with ERROR
instead of crashing the node. Uploads already counted are ACKed again, not
counted twice (at-least-once delivery made idempotent).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections import deque
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from zmqfed.errors import ProtocolError
from zmqfed.federated.pipe import AggregatorPipe
from zmqfed.federated.security import Curve, group_authenticator
from zmqfed.federated.sockets import SocketOptions, context, make_router
from zmqfed.federated.stream import (
    InStream,
    OutStream,
    discard_rest,
    land_payload,
    new_stream_id,
    recv_message,
)
from zmqfed.meta import Meta
from zmqfed.props import FederatedProperties
from zmqfed.wire import (
    DEFAULT_STREAM,
    PROTOCOL_VERSION,
    EncodedTensors,
    Envelope,
    Limits,
    StreamConfig,
    decode,
    encode,
)
from zmqfed.wire.header import parse_header
from zmqfed.wire.limits import announced_frame_bound
from zmqfed.wire.stream import credit_meta, parse_chunk_meta, parse_credit_meta

__all__ = ["DRAINED", "AggregatorGroup"]

log = logging.getLogger(__name__)

#: ``receive_nowait`` found no message waiting.
DRAINED = object()
#: Seconds after a disconnect at which online pipes are probed again.
REPROBE_DELAYS = (0.25, 1.0, 3.0)
#: Seconds between log lines about refused messages of one kind.
REFUSAL_LOG_INTERVAL = 10.0


class AggregatorGroup:
    """One federated group seen from its aggregator: a ROUTER and one pipe per collaborator."""

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
        self.props = props
        self.curve = curve
        self.stream = stream
        #: Bytes allocated for streamed uploads being received now, and the most ever.
        self.stream_bytes = 0
        self.stream_bytes_peak = 0
        #: Pipes whose announced upload waits for room in ``stream.receive_budget``.
        self._admission: deque[AggregatorPipe] = deque()
        #: The pipe whose streamed upload the last landed chunk completed.
        self._completed: AggregatorPipe | None = None
        self.name = props.nick_name
        self.endpoint = props.address.endpoint
        self.limits = limits
        self.codec = codec
        #: Random per process start; requests addressed to another one are stale.
        self.incarnation = uuid.uuid4().hex[:16]
        #: The version announced in replies; the Maintainer keeps it current.
        self.version = 0
        self.sock = make_router(
            self.endpoint, options=options, limits=limits, ctx=ctx, curve=self._curve_options(ctx)
        )
        # The ROUTER's monitor only names fds, never peers (ZMQ-NOTES item 11): a
        # DISCONNECTED event triggers a probe of every online pipe instead.
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.roster: dict[str, AggregatorPipe] = {
            name: AggregatorPipe(self, name) for name in props.collaborators
        }
        self.messages_in = 0
        self.errors = 0
        self._closed = False
        self._refusal_log: dict[str, tuple[float, int]] = {}
        self._reprobe: list[float] = []
        #: Finished downloads whose zero-copy chunks libzmq may still be reading.
        self._sent_streams: list[OutStream] = []

    def _curve_options(self, ctx: zmq.Context | None) -> dict[int, Any] | None:
        """CURVE server keys and the group's ZAP domain, with its allow-list running."""
        if self.curve is None:
            return None
        public, secret = self.curve.key_pair(self.name)
        allowed = {name: self.curve.public_key(name) for name in self.props.collaborators}
        group_authenticator(ctx or context(), self.props.group_name, allowed)
        return {
            zmq.CURVE_SERVER: 1,
            zmq.CURVE_PUBLICKEY: public,
            zmq.CURVE_SECRETKEY: secret,
            zmq.ZAP_DOMAIN: self.props.group_name.encode(),
            zmq.ZAP_ENFORCE_DOMAIN: 1,  # fail closed when no ZAP handler answers
        }

    def _authenticated_as(self, frame: Any) -> str | None:
        """The node name ZAP gave this connection, or None without authentication."""
        try:
            return str(frame.get("User-Id"))
        except zmq.ZMQError:
            return None

    # -- receiving ---------------------------------------------------------
    def receive_nowait(self) -> Any:
        """Handle one waiting message.

        Returns ``DRAINED`` when none waits, the pipe whose state changed
        (a request became pending, it came online or went offline), or None
        when the message was fully handled here (errors, duplicates, pings).
        """
        try:
            frames = recv_message(self.sock, routed=True, land=self._land_chunk)
        except zmq.Again:
            return DRAINED
        self.messages_in += 1
        if frames is None:  # a chunk of a streamed upload, landed in place
            pipe, self._completed = self._completed, None
            return pipe
        rid = frames[0].bytes
        name = rid.decode("utf-8", "replace")
        pipe = self.roster.get(name)
        if pipe is None:
            self._refused(
                "unknown-peer",
                f"dropped a message from {name[:64]!r}, not a member of the group "
                f"(members: {', '.join(self.roster)})",
            )
            # the roster is not told to whoever asks
            self._error(rid, 0, "unknown-peer", f"{name!r} is not a collaborator of {self.name!r}")
            return None
        if self.curve is not None and len(frames) > 1:
            claimed_by = self._authenticated_as(frames[1])
            if claimed_by != name:
                self._refused(
                    "identity",
                    f"dropped a message claiming to be {name!r} from key of {claimed_by!r}",
                )
                self._error(
                    rid,
                    0,
                    "identity",
                    f"this connection authenticated as {claimed_by!r}, not {name!r}",
                )
                return None
        try:
            env = decode(frames[1:], limits=self.limits)
        except ProtocolError as exc:
            self._refused("protocol", f"malformed message from {name!r}: {exc}")
            self._error(rid, 0, "protocol", str(exc))
            return None
        if env.sender != name:
            self._error(
                rid,
                env.seq,
                "identity",
                f"routing id {name!r} does not match sender {env.sender!r}",
            )
            return None
        pipe.last_seen = time.monotonic()
        pipe.bytes_in += env.nbytes
        return self._dispatch(pipe, env)

    def _refused(self, what: str, message: str) -> None:
        """Log a refused message, at most once per ``REFUSAL_LOG_INTERVAL`` for each kind.

        A flooding peer would otherwise turn into a log flood: the others of
        an interval are counted and reported with the next line.
        """
        now = time.monotonic()
        last, suppressed = self._refusal_log.get(what, (-math.inf, 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self._refusal_log[what] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more {what} refusals since the last report)" if suppressed else ""
        log.warning("%s: %s%s", self.name, message, more)
        self._refusal_log[what] = (now, 0)

    def _land_chunk(self, frames: list[Any]) -> bool:
        """Receive a CHUNK of a streamed upload into its tensors (True: consumed).

        A chunk of a stream that no longer exists (the peer started over, or
        went offline meanwhile) is dropped; anything that is not a well-formed
        chunk from the peer it names is left to the ordinary path to refuse.
        """
        rid = frames[0].bytes
        pipe = self.roster.get(rid.decode("utf-8", "replace"))
        if pipe is None:
            return False
        if self.curve is not None and self._authenticated_as(frames[1]) != pipe.nick_name:
            return False
        try:
            head = parse_header(frames[1], self.limits)
            sid, offset, nbytes = parse_chunk_meta(head.meta)
        except ProtocolError:
            return False
        if head.sender != pipe.nick_name or head.tensors:
            return False
        stream = pipe.in_stream
        if stream is None or sid != stream.id:
            discard_rest(self.sock)
            log.debug("%s: dropped a chunk of a finished stream from %s", self.name, pipe.nick_name)
            return True
        try:
            land_payload(self.sock, stream, offset, nbytes)
        except ProtocolError as exc:
            log.warning("%s: broken stream from %s: %s", self.name, pipe.nick_name, exc)
            self._error(rid, head.seq, "stream", str(exc))
            self.drop_streams(pipe)
            return True
        pipe.last_seen = time.monotonic()
        if stream.done:
            self._finish_in_stream(pipe, stream)
        else:
            self._grant(pipe, stream)
        return True

    def _grant(self, pipe: AggregatorPipe, stream: InStream) -> None:
        credit = stream.credit()
        if credit:
            self.send(pipe, "CREDIT", seq=stream.env.seq, meta=credit_meta(stream.id, credit))

    def _finish_in_stream(self, pipe: AggregatorPipe, stream: InStream) -> None:
        env = stream.envelope()
        self._release(pipe)
        pipe.bytes_in += env.nbytes
        _set_pending(pipe, env)
        self._completed = pipe

    def _start_in_stream(self, pipe: AggregatorPipe, env: Envelope) -> None:
        """Admit an announced upload now, or queue it until the budget has room."""
        assert env.stream is not None
        self.drop_streams(pipe)  # a re-sent announce replaces the unfinished stream
        pipe.announced = env
        if not self._fits(env.stream.nbytes):
            log.info(
                "%s: %s's upload of %d bytes waits for the receive budget",
                self.name,
                pipe.nick_name,
                env.stream.nbytes,
            )
            self._admission.append(pipe)
            return
        self._admit(pipe)

    def _admit(self, pipe: AggregatorPipe) -> None:
        env = pipe.announced
        assert env is not None and env.stream is not None
        pipe.announced = None
        stream = InStream(env, self.stream.window_bytes)
        self.stream_bytes += stream.total
        self.stream_bytes_peak = max(self.stream_bytes_peak, self.stream_bytes)
        pipe.in_stream = stream
        if stream.done:  # nothing to wait for (a stream of empty tensors)
            self._finish_in_stream(pipe, stream)
            return
        self._grant(pipe, stream)

    def _release(self, pipe: AggregatorPipe) -> None:
        """Forget ``pipe``'s incoming stream and admit waiting uploads that now fit."""
        if pipe.in_stream is not None:
            self.stream_bytes -= pipe.in_stream.total
            pipe.in_stream = None
        while self._admission:
            nxt = self._admission[0]  # drop_streams takes a pipe out when it withdraws
            assert nxt.announced is not None and nxt.announced.stream is not None
            if not self._fits(nxt.announced.stream.nbytes):
                break
            self._admission.popleft()
            self._admit(nxt)

    def _fits(self, nbytes: int) -> bool:
        """A streamed upload of ``nbytes`` may be allocated now (always, if none is)."""
        return not self.stream_bytes or self.stream_bytes + nbytes <= self.stream.receive_budget

    def drop_streams(self, pipe: AggregatorPipe) -> None:
        """Abandon ``pipe``'s streams in both directions (it left, or started over)."""
        if pipe.announced is not None:
            pipe.announced = None
            with contextlib.suppress(ValueError):
                self._admission.remove(pipe)
        if pipe.in_stream is not None:
            self._release(pipe)
        pipe.out_stream = None  # the peer discards what is still queued for it

    def start_out_stream(
        self, pipe: AggregatorPipe, kind: str, *, meta: dict[str, Any], encoded: EncodedTensors
    ) -> bool:
        """Answer ``pipe``'s pending request with a streamed ``kind`` (the model, in chunks)."""
        seq = pipe.pending.seq if pipe.pending is not None else 0
        chunk = self.stream.chunk_within(self.peer_limits(pipe))
        stream = OutStream(
            new_stream_id(),
            seq,
            encoded,
            chunk,
            sender=self.name,
            incarnation=self.incarnation,
            version=max(self.version, 0),
        )
        pipe.out_stream = stream
        if not self.send(
            pipe, kind, seq=seq, meta=meta, encoded=encoded, stream=(stream.id, chunk)
        ):
            pipe.out_stream = None
            return False
        return True

    def _credit(self, pipe: AggregatorPipe, env: Envelope) -> None:
        try:
            sid, nbytes = parse_credit_meta(env.meta)
        except ProtocolError as exc:
            self._error(pipe.routing_id, env.seq, "protocol", str(exc))
            return
        stream = pipe.out_stream
        if stream is None or stream.id != sid:
            log.debug("%s: credit for a finished stream from %s", self.name, pipe.nick_name)
            return
        stream.grant(nbytes)
        self._pump(pipe, stream)

    def _pump(self, pipe: AggregatorPipe, stream: OutStream) -> None:
        def send(frames: list[Any]) -> Any:  # zmq.Again at the high-water mark
            return self.sock.send_multipart(
                [pipe.routing_id, *frames], flags=zmq.DONTWAIT, copy=False, track=True
            )

        before = stream.sent
        try:
            stream.pump(send)
        except zmq.ZMQError as exc:
            log.info("%s: stream to %s broke: %s; pipe offline", self.name, pipe.nick_name, exc)
            pipe.offline()
            return
        finally:
            pipe.bytes_out += stream.sent - before
        if stream.done:
            self._end_out_stream(pipe)

    def _end_out_stream(self, pipe: AggregatorPipe) -> OutStream | None:
        """Forget ``pipe``'s download stream; libzmq may still read its chunks (see quiesce)."""
        stream, pipe.out_stream = pipe.out_stream, None
        if stream is not None:
            self._sent_streams.append(stream)
        return stream

    def peer_limits(self, pipe: AggregatorPipe) -> Limits:
        """Limits for messages to ``pipe``: ours, within the frame bound its HELLO announced."""
        return self.limits.within_frame_bound(pipe.peer_frame_bytes)

    def sending(self) -> bool:
        """A streamed download is in progress."""
        return any(p.out_stream is not None for p in self.roster.values())

    def streamed_bytes(self) -> int:
        """Bytes sent so far by the streamed downloads in progress (progress marker)."""
        return sum(p.out_stream.sent for p in self.roster.values() if p.out_stream is not None)

    def pump_all(self) -> None:
        """Send what credit allows on every download stream (after a full send queue)."""
        for pipe in self.roster.values():
            if pipe.out_stream is not None and pipe.out_stream.ready:
                self._pump(pipe, pipe.out_stream)

    def quiesce(self, timeout: float = 30.0) -> None:
        """Before the served tensors may change: end unfinished downloads, wait for libzmq.

        Collaborators whose download was cut are told ``stream-aborted`` and
        ask again; zero-copy chunks already handed to libzmq are waited for.
        """
        for pipe in self.roster.values():
            stream = self._end_out_stream(pipe)
            if stream is not None:
                self._error(
                    pipe.routing_id, stream.seq, "stream-aborted", "the served model changed"
                )
        for stream in self._sent_streams:
            if not stream.wait_sent(timeout):
                log.warning("%s: libzmq still holds chunks after %.0f s", self.name, timeout)
        self._sent_streams.clear()

    def _dispatch(self, pipe: AggregatorPipe, env: Envelope) -> AggregatorPipe | None:
        if env.kind == "CREDIT":
            self._credit(pipe, env)
            return None
        if env.kind == "CHUNK":
            log.debug(
                "%s: dropped a chunk of an abandoned stream from %s", self.name, pipe.nick_name
            )
            return None
        if env.kind == "HELLO":
            return self._hello(pipe, env)
        if env.kind == "BYE":
            log.info("%s: %s said BYE", self.name, pipe.nick_name)
            pipe.offline()
            return pipe
        if env.kind == "PING":
            self.send(pipe, "PONG", seq=env.seq, meta={})
            return None
        if env.kind not in ("PUSH", "PULL"):
            self._error(
                pipe.routing_id,
                env.seq,
                "unexpected",
                f"an aggregator does not accept {env.kind} messages",
            )
            return None
        if not pipe.online:
            self._error(pipe.routing_id, env.seq, "hello-first", "say HELLO before " + env.kind)
            return None
        if env.incarnation != self.incarnation:
            self._error(
                pipe.routing_id,
                env.seq,
                "stale-incarnation",
                f"request addressed to incarnation {env.incarnation!r}, "
                f"this is {self.incarnation!r}",
            )
            return None
        if env.kind == "PUSH" and (pipe.session, env.seq) in pipe.accepted:
            log.debug(
                "%s: duplicate upload %d from %s acknowledged again",
                self.name,
                env.seq,
                pipe.nick_name,
            )
            self.send(pipe, "ACK", seq=env.seq, meta={"duplicate": True})
            return None
        if env.stream is not None:
            self._start_in_stream(pipe, env)
            return None
        _set_pending(pipe, env)
        return pipe

    def _hello(self, pipe: AggregatorPipe, env: Envelope) -> AggregatorPipe | None:
        protocol = env.meta.get("protocol")
        if protocol != PROTOCOL_VERSION:
            self._error(
                pipe.routing_id,
                env.seq,
                "protocol",
                f"peer speaks protocol {protocol!r}, {self.name} speaks {PROTOCOL_VERSION}",
            )
            return None
        fingerprint = env.meta.get("fingerprint")
        if fingerprint != self.props.fingerprint:
            self._error(
                pipe.routing_id,
                env.seq,
                "fingerprint",
                f"group fingerprint {fingerprint!r} differs from {self.name}'s "
                f"{self.props.fingerprint!r}: the aggregator's topology has endpoint "
                f"{self.endpoint} and collaborators {list(self.props.collaborators)}",
            )
            return None
        pipe.peer_frame_bytes = announced_frame_bound(env.meta.get("max_frame_bytes"))
        session = str(env.meta.get("session", ""))
        if session != pipe.session:
            # A new collaborator process: whatever the old one asked for is void.
            pipe.pending = None
            self.drop_streams(pipe)
            pipe.session = session
        joined = not pipe.online
        pipe.online = True
        self.send(
            pipe,
            "WELCOME",
            seq=env.seq,
            meta={"incarnation": self.incarnation, "max_frame_bytes": self.limits.max_frame_bytes},
        )
        if joined:
            log.info("%s: %s joined", self.name, pipe.nick_name)
        return pipe if joined else None

    def drain_monitor(self) -> list[AggregatorPipe]:
        """Pipes found gone after a disconnect: a send to a departed id fails at once.

        libzmq may report the disconnect before the ROUTER has dropped the
        routing id (pipe termination is asynchronous), and then the probe
        still succeeds; so a disconnect also schedules probes a little later
        (``next_probe``), which the loop runs when their time comes.
        """
        disconnected = False
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            disconnected |= event["event"] == zmq.EVENT_DISCONNECTED
        now = time.monotonic()
        if disconnected:
            self._reprobe = [now + delay for delay in REPROBE_DELAYS]
        elif self._reprobe and now >= self._reprobe[0]:
            self._reprobe = [t for t in self._reprobe if t > now]
        else:
            return []
        gone = []
        for pipe in self.roster.values():
            if pipe.online and not self.send(pipe, "PING", seq=0, meta={}):
                gone.append(pipe)
        return gone

    @property
    def next_probe(self) -> float:
        """When :meth:`drain_monitor` wants to probe again (``math.inf``: no need)."""
        return self._reprobe[0] if self._reprobe else math.inf

    # -- sending -----------------------------------------------------------
    def send(
        self,
        pipe: AggregatorPipe,
        kind: str,
        *,
        seq: int,
        meta: dict[str, Any],
        tensors: dict[str, Any] | None = None,
        encoded: EncodedTensors | None = None,
        stream: tuple[str, int] | None = None,
    ) -> bool:
        """Send ``kind`` to ``pipe``; False (and the pipe offline) if the peer is gone."""
        env = Envelope(
            kind=kind,
            sender=self.name,
            version=max(self.version, 0),
            seq=seq,
            incarnation=self.incarnation,
            meta=dict(meta),
            tensors=tensors or {},
        )
        frames = encode(env, codec=self.codec, limits=self.limits, encoded=encoded, stream=stream)
        try:
            self.sock.send_multipart([pipe.routing_id, *frames], flags=zmq.DONTWAIT, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                log.info("%s: %s is unreachable; pipe offline", self.name, pipe.nick_name)
                pipe.offline()
            else:
                log.warning("%s: could not send %s to %s: %s", self.name, kind, pipe.nick_name, exc)
            return False
        # A served model comes pre-encoded (``encoded``): env.tensors is empty then.
        if stream is None:
            pipe.bytes_out += env.nbytes if encoded is None else encoded.nbytes
        return True

    def _error(self, rid: bytes, seq: int, code: str, reason: str) -> None:
        self.errors += 1
        env = Envelope(
            kind="ERROR",
            sender=self.name,
            version=max(self.version, 0),
            seq=seq,
            incarnation=self.incarnation,
            meta={"code": code, "reason": reason},
        )
        with contextlib.suppress(zmq.ZMQError):  # the offender is gone: nothing to tell
            self.sock.send_multipart([rid, *encode(env, limits=self.limits)], flags=zmq.DONTWAIT)

    def close(self, *, final: bool = False) -> None:
        """Say BYE to every online collaborator and close the ROUTER.

        ``final`` tells them the federation is over, so they stop instead of
        waiting for this aggregator to come back.
        """
        if self._closed:
            return
        self._closed = True
        self.quiesce(timeout=5.0)
        for pipe in self.roster.values():
            if pipe.online:
                self.send(pipe, "BYE", seq=0, meta={"final": final})
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close()


def _set_pending(pipe: AggregatorPipe, env: Envelope) -> None:
    """``env`` is the request now waiting on ``pipe`` for the hooks."""
    pipe.pending = env
    pipe.told_to_wait = False
    pipe.meta = Meta(env.meta)
