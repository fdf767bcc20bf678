"""``CollaboratorLink``: a collaborator's connection to its aggregator, and the handshake.

The link owns its port and what the connection knows: whether the
aggregator answered HELLO on it, the aggregator's incarnation, version and
frame bound.  It says HELLO until WELCOME comes -- again when the link comes
back after a drop, and every few seconds while it stands unanswered, so a
HELLO swallowed by a dying aggregator cannot stall the collaborator -- and it
reads replies, acting on BYE and on link events.  The request cycle on top
is :class:`~zmqfed.federated.collaborator_transport.CollaboratorTransport`'s.

Every method that waits is a generator (a *cycle*): it yields :class:`Wait`
where it would block, and is resumed with whether the port became ready.
:func:`drive` runs one cycle to its end, blocking on its port; a
:class:`~zmqfed.federated.multiplex.Multiplexer` runs thousands of them on
one poller (docs/zeromq.md §26).  Either way the same protocol code runs.

A link may go without a socket monitor (``monitor=False``: one ZeroMQ
socket per collaborator instead of three).  It then learns nothing of its
connection: it says HELLO again every few seconds until answered, and after
``SILENCE_RESEND`` seconds without a word from the aggregator while a
request is pending it says HELLO again as a probe: a WELCOME from another
incarnation, or one saying the HELLO rejoined the peer (``joined``), means
the request was lost, and it is sent again (safe: requests are idempotent).
A refused key then shows as a timeout, not as ``SecurityError``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from zmqfed.errors import PeerOffline, PeerTimeout, ProtocolError, RemoteError, SecurityError
from zmqfed.federated.ports import Frame, LinkEventKind, Network, Port, WouldBlock
from zmqfed.federated.protocol import (
    CHANNEL_KINDS,
    CONNECTION_ERRORS,
    ErrorCode,
    discard_rest,
    hello_meta,
    peer_frame_bound,
    recv_message,
    stamp,
)
from zmqfed.federated.security import Curve, require_curve_for_pickle
from zmqfed.federated.sockets import SocketOptions
from zmqfed.federated.traffic import Traffic, frames_nbytes
from zmqfed.props import FederatedProperties
from zmqfed.wire import Envelope, Kind, Limits, decode, encode

__all__ = [
    "RESEND",
    "CollaboratorLink",
    "Cycle",
    "PortSource",
    "Wait",
    "current_port",
    "drive",
    "remaining_ms",
]

log = logging.getLogger(__name__)

#: Longest single wait (ms): signals and deadlines are seen promptly.
POLL_MS = 500
#: ... for a link without a monitor (its timers bound the wait themselves).
UNMONITORED_POLL_MS = 5000
#: Seconds after which an unanswered HELLO is sent again.
HELLO_RESEND = 3.0
#: ``read_replies``: the aggregator said BYE; the request must be sent again.
RESEND = object()
#: Seconds without a word from the aggregator after which a link without a
#: monitor probes with a HELLO whether its pending request is still known
#: (it cannot see a lost connection).
SILENCE_RESEND = 30.0
#: Bytes per second a link is assumed to move at least, when judging silence
#: during a transfer (8 Mbit/s; a slower link needs a larger probe_silence_ms).
MIN_LINK_RATE = 2**20

T = TypeVar("T")


@dataclass(frozen=True)
class Wait:
    """Where a cycle would block: until its port has input (or room to send), at most ``ms``.

    ``idle``: just let ``ms`` pass, whatever arrives meanwhile (simulated work).
    ``gate``: a :class:`~zmqfed.federated.multiplex.Gate` whose slot the
    cycle waits for (only a Multiplexer runs such cycles).
    """

    ms: int
    writable: bool = False
    idle: bool = False
    gate: Any = None


#: A protocol step that may wait: yields :class:`Wait`, is sent whether the
#: port became ready, and returns its result.
Cycle = Generator[Wait, bool, T]


#: A port, or what returns the current one (a link may rebuild its port mid-cycle).
PortSource = Port | Callable[[], Port]


def current_port(source: PortSource) -> Port:
    """The port ``source`` stands for now."""
    return source() if callable(source) else source


def drive(cycle: Cycle[T], source: PortSource) -> T:
    """Run ``cycle`` to its end, blocking on its port wherever it waits."""
    try:
        wait = next(cycle)
        while True:
            port = current_port(source)
            if wait.gate is not None:
                raise RuntimeError("a cycle waiting for a Gate needs a Multiplexer")
            if wait.idle:
                time.sleep(wait.ms / 1000)
                ready = False
            elif wait.writable:
                port.wait_writable(wait.ms)
                ready = True
            else:
                ready = port.wait(wait.ms)
            wait = cycle.send(ready)
    except StopIteration as stop:
        result: T = stop.value
        return result


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
        monitor: bool = True,
        declared: Callable[[], Collection[str] | None] | None = None,
    ) -> None:
        assert props.address.endpoint is not None
        require_curve_for_pickle(limits, curve)
        #: The tensor names this collaborator exchanges, declared in HELLO (None: all).
        self.declared = declared
        self.nick_name = props.nick_name
        self.aggregator_name = props.aggregator_name
        self.endpoint = props.address.endpoint
        self.fingerprint = props.fingerprint
        self.limits = limits
        self.session = uuid.uuid4().hex[:16]
        security = curve.client(self.nick_name, self.aggregator_name) if curve else None
        self._new_port = lambda: network.dealer(
            self.endpoint,
            self.nick_name,
            options=options,
            limits=limits,
            security=security,
            monitor=monitor,
        )
        self.port = self._new_port()
        #: Seconds of silence from the aggregator, while a request waits, before
        #: a monitored link probes it with a PING; twice as long and the link
        #: is rebuilt.
        self.probe_after = (options or SocketOptions()).probe_silence_ms / 1000
        #: ``time.monotonic()`` of the last message heard from the aggregator.
        self.last_heard = time.monotonic()
        self._quiet_from = self.last_heard  # silence counts from here (a request's start)
        self._transfer_bytes = 0
        self._next_probe = 0.0
        #: Link events are reported (a socket monitor); without, see the module doc.
        self.monitored = monitor
        #: Longest single wait in ms. Without a monitor there are no link
        #: events to look at between waits: fewer wake-ups.
        self.poll_ms = POLL_MS if monitor else UNMONITORED_POLL_MS
        #: Seconds of silence after which an unmonitored link probes (see the module doc).
        self.silence_resend = SILENCE_RESEND * random.uniform(1.0, 1.5)
        self._heard = time.monotonic()
        self._probe_seq: int | None = None  # a HELLO sent as a probe
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
        #: Messages and bytes by kind; connections lost, and regained after a loss.
        self.traffic = Traffic()
        self.disconnects = 0
        self.reconnects = 0
        self._seq = 0
        self._restarted = False  # a new aggregator incarnation answered HELLO
        self._lost = False  # the link dropped since the last HELLO was sent
        self._relinked = False  # ... and came back: that HELLO may be lost
        #: Takes the aggregator's pipe-channel messages (SET, TRANSFER) whenever they are read.
        self.on_channel: Callable[[Envelope], None] | None = None

    def current_port(self) -> Port:
        """The port now (:meth:`_rebuild` replaces it): a cycle's :data:`PortSource`."""
        return self.port

    def next_seq(self) -> int:
        """A fresh sequence number for a message from this process."""
        self._seq += 1
        return self._seq

    @property
    def send_limits(self) -> Limits:
        """Limits for messages to the aggregator: ours, within the frame bound it announced."""
        return self.limits.within_frame_bound(self.peer_frame_bytes)

    def begin_request(self, transfer_bytes: int = 0) -> None:
        """A request starts: silence before it (local training) is no sign of trouble.

        ``transfer_bytes``: what the request and its answer may carry; a
        message is heard only once all of it arrived, so the patience with a
        silent aggregator grows with it (:data:`MIN_LINK_RATE`).
        """
        self._quiet_from = time.monotonic()
        self._transfer_bytes = max(0, int(transfer_bytes))

    def _patience(self) -> float:
        """Seconds of silence after which the connection is rebuilt."""
        return 2 * self.probe_after + self._transfer_bytes / MIN_LINK_RATE

    def forget_welcome(self) -> None:
        """Say HELLO again before the next request (the aggregator asked for it)."""
        self.welcomed = False

    def take_restart(self) -> bool:
        """Whether a new aggregator incarnation answered HELLO since the last call."""
        restarted, self._restarted = self._restarted, False
        return restarted

    # -- handshake ---------------------------------------------------------------------
    def ensure_welcome(self, deadline: float | None, timeout: float | None) -> Cycle[None]:
        """Say HELLO until the aggregator answers WELCOME (or refuses: RemoteError)."""
        while not self.welcomed:
            seq = self.next_seq()
            self._lost = self._relinked = False
            frames = self._hello(seq)
            yield from self.send(frames, deadline, timeout, hello=True)
            self.traffic.sent(Kind.HELLO.value, frames_nbytes(frames))
            # without a monitor the HELLO is said again whether or not the link
            # stands: less often, or a crowd queues HELLO after HELLO while it connects
            resend_at = time.monotonic() + HELLO_RESEND * (1 if self.monitored else 3)
            reply = yield from self.wait_reply(
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

    def _hello(self, seq: int) -> list[Any]:
        """HELLO ``seq``, encoded: who this collaborator is, and the subset it declares."""
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
        return encode(hello, limits=self.limits)

    # -- the port ------------------------------------------------------------------------
    def link_events(self) -> None:
        for event in self.port.link_events():
            if event.kind is LinkEventKind.CONNECTED:
                log.debug("%s: connected to %s", self.nick_name, self.endpoint)
                self.reconnects += self._lost
                self.connected = True
                self._quiet_from = time.monotonic()  # silence counts on this connection
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
                self.disconnects += 1

    def send(
        self,
        frames: list[Any],
        deadline: float | None,
        timeout: float | None,
        *,
        hello: bool = False,
    ) -> Cycle[bool]:
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
            wait = remaining_ms(deadline, self.poll_ms)
            if wait == 0:
                raise PeerTimeout(
                    self.aggregator_name, timeout or 0.0, f"take a message at {self.endpoint}"
                )
            yield Wait(wait, writable=True)

    def wait_reply(
        self,
        seq: int,
        deadline: float | None,
        timeout: float | None,
        *,
        what: str,
        hello_until: float | None = None,
    ) -> Cycle[Envelope | None]:
        """The answer to request ``seq``; None when the request must be sent again.

        ``hello_until``: the request is a HELLO, sent again after this time or
        once the link came back.
        """
        self._heard = time.monotonic()
        while True:
            wait = remaining_ms(deadline, self.poll_ms)
            if wait == 0:
                raise PeerTimeout(self.aggregator_name, timeout or 0.0, what)
            if hello_until is not None and not self.monitored:
                wait = max(1, min(wait, int((hello_until - time.monotonic()) * 1000) + 1))
            ready = yield Wait(wait)
            # Read what already arrived before acting on a disconnect: an
            # aggregator that ACKs and exits leaves the ACK in our queue.
            if ready:
                reply = self.read_replies(seq)
                if reply is not None:
                    return None if reply is RESEND else reply
            self.link_events()
            now = time.monotonic()
            silent = now - max(self.last_heard, self._quiet_from)
            if self.connected and silent > self._patience():
                self._rebuild(silent)
                return None
            if self.connected and silent > self.probe_after and now >= self._next_probe:
                self._ping()
                self._next_probe = now + self.probe_after
            if hello_until is not None:
                # Unanswered: ask again once the link is back, or while it stands
                # (not while it is down: the port would queue HELLO after HELLO).
                # Without a monitor the link's state is unknown: ask again anyway.
                standing = self.connected or not self.monitored
                if self._relinked or (standing and time.monotonic() >= hello_until):
                    return None
            elif not self.monitored:
                if time.monotonic() - self._heard >= self.silence_resend:
                    self._hello_probe()
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
            self._heard = self.last_heard = time.monotonic()
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
            self.traffic.received(env.kind, frames_nbytes(frames))
            if env.kind in CHANNEL_KINDS and self.on_channel is not None:
                self.on_channel(env)  # never a reply, whatever its seq
                continue
            if self._probe_seq is not None and env.seq == self._probe_seq:
                answer = self._probed(env)
                if answer is not None:
                    return answer
                continue
            if env.seq == seq and env.kind != Kind.WAIT:
                return env
            if (
                env.kind == Kind.ERROR
                and env.seq == 0
                and env.meta.get("code") in CONNECTION_ERRORS
            ):
                return env  # refused before the aggregator could read our seq
            if env.kind == Kind.ERROR and env.meta.get("code") == ErrorCode.HELLO_FIRST:
                # Refused a PING or a CREDIT: the aggregator does not take this
                # connection for ours (another process with our key said HELLO
                # since). Say HELLO, and learn whether we were replaced.
                log.info("%s: %s asks for HELLO again", self.nick_name, self.aggregator_name)
                self.welcomed = False
                return RESEND
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

    def _ping(self) -> None:
        """Ask a silent aggregator for a sign of life (its PONG is heard like any message)."""
        ping = stamp(Kind.PING, self.nick_name, seq=self.next_seq(), incarnation=self.incarnation)
        with contextlib.suppress(WouldBlock):
            self.port.send(encode(ping, limits=self.limits))

    def _rebuild(self, silent: float) -> None:
        """Connect anew: the aggregator stayed silent on a connection that looks alive.

        ZMTP heartbeats keep a connection up even when the aggregator's ROUTER
        no longer routes to it: another process connected with this node's name
        and took the routing id over (ROUTER_HANDOVER), and whatever this
        connection sends is dropped (docs/zeromq.md §3). A new connection takes
        the name back; the HELLO on it tells the aggregator who is who (a
        second live process is refused with ``name-in-use``). An aggregator
        that was merely busy just answers the HELLO.
        """
        log.warning(
            "%s: %s has not answered for %.0f s on a live connection; connecting anew",
            self.nick_name,
            self.aggregator_name,
            silent,
        )
        self.port.close()
        self.port = self._new_port()
        self.connected = self.welcomed = False
        self._lost = True
        self._quiet_from = time.monotonic()

    def _hello_probe(self) -> None:
        """Say HELLO to learn whether the pending request is still known (no monitor)."""
        log.debug("%s: no word from %s; asking", self.nick_name, self.aggregator_name)
        self._heard = time.monotonic()
        self._probe_seq = self.next_seq()
        with contextlib.suppress(WouldBlock):  # full: the next silence asks again
            self.port.send(self._hello(self._probe_seq))

    def _probed(self, env: Envelope) -> Any:
        """The answer to a probe: RESEND when the pending request was lost, else None."""
        self._probe_seq = None
        if env.kind == Kind.ERROR:
            return env
        if env.incarnation != self.incarnation:
            log.info(
                "%s: aggregator %s restarted (incarnation %s)",
                self.nick_name,
                self.aggregator_name,
                env.incarnation,
            )
            self._restarted = bool(self.incarnation)
            self.incarnation = env.incarnation
            self.aggregator_version = env.version
            self.peer_frame_bytes = peer_frame_bound(env.meta)
            return RESEND
        if env.meta.get("joined") is True:
            log.info(
                "%s: %s had dropped this link; sending again", self.nick_name, self.aggregator_name
            )
            return RESEND
        return None

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


def remaining_ms(deadline: float | None, cap: int = POLL_MS) -> int:
    """Milliseconds to wait now: what is left of ``deadline``, at most ``cap``."""
    if deadline is None:
        return cap
    left = deadline - time.monotonic()
    if left <= 0:
        return 0
    return max(1, min(cap, int(left * 1000)))
