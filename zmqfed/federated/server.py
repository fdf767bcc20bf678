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
import time
import uuid
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from zmqfed.errors import ProtocolError
from zmqfed.federated.pipe import AggregatorPipe
from zmqfed.federated.security import Curve, group_authenticator
from zmqfed.federated.sockets import SocketOptions, context, make_router
from zmqfed.meta import Meta
from zmqfed.props import FederatedProperties
from zmqfed.wire import PROTOCOL_VERSION, EncodedTensors, Envelope, Limits, decode, encode

__all__ = ["DRAINED", "AggregatorGroup"]

log = logging.getLogger(__name__)

#: ``receive_nowait`` found no message waiting.
DRAINED = object()


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
    ) -> None:
        assert props.address.endpoint is not None
        self.props = props
        self.curve = curve
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
            frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return DRAINED
        self.messages_in += 1
        rid = frames[0].bytes
        name = rid.decode("utf-8", "replace")
        pipe = self.roster.get(name)
        if pipe is None:
            log.warning("%s: dropped a message from %r, not a member of the group", self.name, name)
            self._error(
                rid,
                0,
                "unknown-peer",
                f"{name!r} is not a collaborator of {self.name!r} "
                f"(members: {', '.join(self.roster)})",
            )
            return None
        if self.curve is not None and len(frames) > 1:
            claimed_by = self._authenticated_as(frames[1])
            if claimed_by != name:
                log.warning(
                    "%s: dropped a message claiming to be %r from key of %r",
                    self.name,
                    name,
                    claimed_by,
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
            log.warning("%s: malformed message from %r: %s", self.name, name, exc)
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

    def _dispatch(self, pipe: AggregatorPipe, env: Envelope) -> AggregatorPipe | None:
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
        pipe.pending = env
        pipe.told_to_wait = False
        pipe.meta = Meta(env.meta)
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
        session = str(env.meta.get("session", ""))
        if session != pipe.session:
            # A new collaborator process: whatever the old one asked for is void.
            pipe.pending = None
            pipe.session = session
        joined = not pipe.online
        pipe.online = True
        self.send(pipe, "WELCOME", seq=env.seq, meta={"incarnation": self.incarnation})
        if joined:
            log.info("%s: %s joined", self.name, pipe.nick_name)
        return pipe if joined else None

    def drain_monitor(self) -> list[AggregatorPipe]:
        """Pipes found gone after a disconnect: a send to a departed id fails at once."""
        disconnected = False
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            disconnected |= event["event"] == zmq.EVENT_DISCONNECTED
        if not disconnected:
            return []
        gone = []
        for pipe in self.roster.values():
            if pipe.online and not self.send(pipe, "PING", seq=0, meta={}):
                gone.append(pipe)
        return gone

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
        frames = encode(env, codec=self.codec, limits=self.limits, encoded=encoded)
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
        for pipe in self.roster.values():
            if pipe.online:
                self.send(pipe, "BYE", seq=0, meta={"final": final})
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close()
