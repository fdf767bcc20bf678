"""``CollaboratorLink``: a collaborator's connection to its aggregator, and the handshake.

The link owns its port and what the connection knows: whether the
aggregator answered HELLO on it, the aggregator's incarnation, version and
frame bound.  It says HELLO until WELCOME comes -- again when the link comes
back after a drop, and every few seconds while it stands unanswered, so a
HELLO swallowed by a dying aggregator cannot stall the collaborator -- and it
reads replies, acting on BYE and on link events.  The request cycle on top
is :class:`~zmqfed.federated.collaborator_transport.CollaboratorTransport`'s.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any

from zmqfed.errors import PeerOffline, PeerTimeout, ProtocolError, RemoteError, SecurityError
from zmqfed.federated.ports import Frame, LinkEventKind, Network, WouldBlock
from zmqfed.federated.protocol import (
    CONNECTION_ERRORS,
    discard_rest,
    hello_meta,
    peer_frame_bound,
    recv_message,
    stamp,
)
from zmqfed.federated.security import Curve
from zmqfed.federated.sockets import SocketOptions
from zmqfed.props import FederatedProperties
from zmqfed.wire import Envelope, Kind, Limits, decode, encode

__all__ = ["RESEND", "CollaboratorLink", "remaining_ms"]

log = logging.getLogger(__name__)

#: Longest single wait (ms): signals and deadlines are seen promptly.
POLL_MS = 500
#: Seconds after which an unanswered HELLO is sent again.
HELLO_RESEND = 3.0
#: ``read_replies``: the aggregator said BYE; the request must be sent again.
RESEND = object()


class CollaboratorLink:
    """The DEALER port of one collaborator in one group, and the handshake on it."""

    def __init__(
        self,
        props: FederatedProperties,
        *,
        network: Network,
        limits: Limits,
        options: SocketOptions | None = None,
        curve: Curve | None = None,
        declared: Callable[[], Collection[str] | None] | None = None,
    ) -> None:
        assert props.address.endpoint is not None
        #: The tensor names this collaborator exchanges, declared in HELLO (None: all).
        self.declared = declared
        self.nick_name = props.nick_name
        self.aggregator_name = props.aggregator_name
        self.endpoint = props.address.endpoint
        self.fingerprint = props.fingerprint
        self.limits = limits
        self.session = uuid.uuid4().hex[:16]
        security = curve.client(self.nick_name, self.aggregator_name) if curve else None
        self.port = network.dealer(
            self.endpoint, self.nick_name, options=options, limits=limits, security=security
        )
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
        self.closed = False
        self._seq = 0
        self._restarted = False  # a new aggregator incarnation answered HELLO
        self._lost = False  # the link dropped since the last HELLO was sent
        self._relinked = False  # ... and came back: that HELLO may be lost

    def next_seq(self) -> int:
        """A fresh sequence number for a message from this process."""
        self._seq += 1
        return self._seq

    @property
    def send_limits(self) -> Limits:
        """Limits for messages to the aggregator: ours, within the frame bound it announced."""
        return self.limits.within_frame_bound(self.peer_frame_bytes)

    def forget_welcome(self) -> None:
        """Say HELLO again before the next request (the aggregator asked for it)."""
        self.welcomed = False

    def take_restart(self) -> bool:
        """Whether a new aggregator incarnation answered HELLO since the last call."""
        restarted, self._restarted = self._restarted, False
        return restarted

    # -- handshake ---------------------------------------------------------------------
    def ensure_welcome(self, deadline: float | None, timeout: float | None) -> None:
        """Say HELLO until the aggregator answers WELCOME (or refuses: RemoteError)."""
        while not self.welcomed:
            seq = self.next_seq()
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
                    tensors=self.declared() if self.declared is not None else None,
                ),
            )
            self._lost = self._relinked = False
            self.send(encode(hello, limits=self.limits), deadline, timeout, hello=True)
            resend_at = time.monotonic() + HELLO_RESEND
            reply = self.wait_reply(
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
    def link_events(self) -> None:
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

    def send(
        self,
        frames: list[Any],
        deadline: float | None,
        timeout: float | None,
        *,
        hello: bool = False,
    ) -> bool:
        """Send once the port takes it; False if the handshake was lost meanwhile."""
        while True:
            self.link_events()
            if not hello and not self.welcomed:
                return False
            try:
                self.port.send(frames)
                return True
            except WouldBlock:
                pass  # at the high-water mark
            wait = remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(
                    self.aggregator_name, timeout or 0.0, f"take a message at {self.endpoint}"
                )
            self.port.wait_writable(wait)

    def wait_reply(
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
            wait = remaining_ms(deadline)
            if wait == 0:
                raise PeerTimeout(self.aggregator_name, timeout or 0.0, what)
            ready = self.port.wait(wait)
            # Read what already arrived before acting on a disconnect: an
            # aggregator that ACKs and exits leaves the ACK in our queue.
            if ready:
                reply = self.read_replies(seq)
                if reply is not None:
                    return None if reply is RESEND else reply
            self.link_events()
            if hello_until is not None:
                # Unanswered: ask again once the link is back, or while it stands
                # (not while it is down: the port would queue HELLO after HELLO).
                if self._relinked or (self.connected and time.monotonic() >= hello_until):
                    return None
            elif not self.welcomed and self.connected:
                # After a disconnect keep listening: the event can overtake a
                # reply in flight. Resend once the link is back (a reply lost
                # with the old link never comes).
                reply = self.read_replies(seq)
                return None if reply is None or reply is RESEND else reply

    def read_replies(self, seq: int, land: Callable[[list[Frame]], bool] | None = None) -> Any:
        """Drain the port: the reply to ``seq``, ``RESEND`` after a BYE, or None.

        ``land`` consumes CHUNK messages of the stream being received; by
        default they are dropped (their stream was abandoned).
        """
        while True:
            try:
                frames = recv_message(self.port, land or self._drop_chunk)
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
                return RESEND
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

    def _drop_chunk(self, frames: list[Frame]) -> bool:
        """A CHUNK of a stream nobody waits for any more: consume and drop it."""
        discard_rest(self.port)
        return True

    def close(self) -> None:
        """Say BYE if welcomed, then close the port."""
        if self.closed:
            return
        self.closed = True
        if self.welcomed:
            bye = stamp(Kind.BYE, self.nick_name, seq=self.next_seq(), incarnation=self.incarnation)
            with contextlib.suppress(WouldBlock):
                self.port.send(encode(bye, limits=self.limits))
        self.port.close()


def remaining_ms(deadline: float | None) -> int:
    """Milliseconds to wait now: what is left of ``deadline``, at most ``POLL_MS``."""
    if deadline is None:
        return POLL_MS
    left = deadline - time.monotonic()
    if left <= 0:
        return 0
    return max(1, min(POLL_MS, int(left * 1000)))
