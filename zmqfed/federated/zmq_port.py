"""Ports on real ZeroMQ sockets: :class:`ZmqNetwork` and :class:`ZmqPort`.

The sockets themselves are made (and every option set) by
:mod:`zmqfed.federated.sockets`; this module adapts one socket and its
monitor to the :class:`~zmqfed.federated.ports.Port` the protocol code uses,
translating ``zmq.Again`` and ``EHOSTUNREACH`` into
:class:`~zmqfed.federated.ports.WouldBlock` and
:class:`~zmqfed.federated.ports.Unreachable`.

An aggregator's port behind CURVE names peers by key, not by routing id: a
routing id is whatever the peer claims, and with ROUTER_HANDOVER a claim
takes over the connection that held it (docs/zeromq.md §3-4). So the first
frame of every received message is the member name the ZAP handler gave the
connection (its ``User-Id``), carrying the connection it came from. A
message sent to a member name goes to the connection the transport chose
with :meth:`ZmqPort.route` (the one whose HELLO it accepted last; before
any, the first that spoke); a message whose first frame is a received
name goes back on that name's connection. A peer holding beta's key
therefore reaches beta's record only, whatever routing id it claims; a new
connection with alpha's own key (alpha restarted) takes alpha's replies
over once its HELLO is accepted, and a second live process with alpha's
key is answered on its own connection (docs/zeromq.md §20).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from zmqfed.federated.ports import LinkEvent, LinkEventKind, Tracker, Unreachable, WouldBlock
from zmqfed.federated.security import ClientSecurity, ServerSecurity
from zmqfed.federated.sockets import (
    SocketOptions,
    context,
    copy_frame_into,
    make_dealer,
    make_router,
    recv_into,
)
from zmqfed.federated.zap import zap_handler
from zmqfed.wire import Limits

__all__ = ["ZmqNetwork", "ZmqPort", "default_network"]

log = logging.getLogger(__name__)

_EVENTS: dict[int, LinkEventKind] = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: LinkEventKind.CONNECTED,
    zmq.EVENT_DISCONNECTED: LinkEventKind.DISCONNECTED,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: LinkEventKind.AUTH_FAILED,
}


class _ZmqTracker:
    """A ``zmq.MessageTracker`` whose ``wait`` answers instead of raising ``NotDone``."""

    __slots__ = ("_tracker",)

    def __init__(self, tracker: zmq.MessageTracker) -> None:
        self._tracker = tracker

    @property
    def done(self) -> bool:
        return bool(self._tracker.done)

    def wait(self, timeout: float) -> bool:
        try:
            self._tracker.wait(timeout)
        except zmq.NotDone:
            return False
        return True


class _Named:
    """The first frame of a message on a port that names peers by key: the member's name.

    ``connection`` is the routing id of the connection it came from; a reply
    sent with this object as its first frame goes back on that connection.
    """

    __slots__ = ("_name", "connection")

    def __init__(self, name: bytes, connection: bytes) -> None:
        self._name = name
        self.connection = connection

    @property
    def bytes(self) -> bytes:
        return self._name

    @property
    def buffer(self) -> memoryview:
        return memoryview(self._name)

    @property
    def more(self) -> bool:
        return True


class ZmqPort:
    """A :class:`~zmqfed.federated.ports.Port` over one ZeroMQ socket and its monitor.

    Parameters
    ----------
    events:
        The monitor's events; ``None``: no monitor (the port reports no link
        events).  A monitor is a PAIR socket in this process plus one inside
        libzmq, so a monitored DEALER costs three sockets and four
        descriptors, an unmonitored one one socket and two descriptors
        (docs/zeromq.md §26).
    by_key:
        A ROUTER behind CURVE: peers are named by their key's ``User-Id``,
        not by the routing id they claim (see the module docstring).
    on_close:
        Called once the socket is closed (e.g. to drop its ZAP allow-list).
    """

    def __init__(
        self,
        sock: zmq.Socket,
        events: int | None,
        *,
        by_key: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.routed = sock.type == zmq.ROUTER
        self.by_key = by_key and self.routed
        #: By key: a member's name -> the routing id of the connection its sends go to.
        self.addresses: dict[bytes, bytes] = {}
        self._on_close = on_close
        #: The frame after a routing id, received early to read its ``User-Id``.
        self._peeked: Any = None
        self.monitor = sock.get_monitor_socket(events) if events is not None else None
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._send_poller = zmq.Poller()
        self._send_poller.register(sock, zmq.POLLOUT)
        if self.monitor is not None:
            self._poller.register(self.monitor, zmq.POLLIN)
            self._send_poller.register(self.monitor, zmq.POLLIN)
        self._closed = False

    def send(self, frames: Sequence[Any], *, track: bool = False) -> Tracker | None:
        if self.by_key and isinstance(frames[0], _Named):  # a reply to that very connection
            frames = [frames[0].connection, *frames[1:]]
        elif self.by_key:
            rid = self.addresses.get(bytes(frames[0]))
            if rid is None:  # that member's key has not spoken on this socket
                raise Unreachable
            frames = [rid, *frames[1:]]
        try:
            tracker = self.sock.send_multipart(frames, flags=zmq.DONTWAIT, copy=False, track=track)
        except zmq.Again as exc:
            raise WouldBlock from exc
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise Unreachable from exc
            raise
        return _ZmqTracker(tracker) if track and tracker is not None else None

    def recv_frame(self) -> Any:
        if self._peeked is not None:
            frame, self._peeked = self._peeked, None
            return frame
        first = not self.sock.get(zmq.RCVMORE)
        try:
            frame = self.sock.recv(flags=zmq.NOBLOCK if first else 0, copy=False)
        except zmq.Again as exc:
            raise WouldBlock from exc
        if first and self.by_key:
            return self._by_key(frame)
        return frame

    def _by_key(self, frame: zmq.Frame) -> Any:
        """A message's routing id frame, replaced by the name its connection's key has.

        The name is read from the frame after the routing id (received here
        and handed out by the next :meth:`recv_frame`): libzmq 4.3.4 (pyzmq
        25) attaches no ``User-Id`` to the routing id frame of a peer that set
        its own routing id (docs/zeromq.md §20).
        """
        name = None
        if frame.more:  # the rest of a message arrives with its first frame
            self._peeked = self.sock.recv(copy=False)
            name = self.user_id(self._peeked)
        if not name:  # cannot happen behind ZAP_ENFORCE_DOMAIN; the transport refuses it
            return frame
        key = name.encode()
        rid = frame.bytes
        if key not in self.addresses:  # first contact; later, HELLO moves it (route)
            self.addresses[key] = rid
        return _Named(key, rid)

    def recv_into(self, view: memoryview) -> int:
        if self._peeked is not None:
            frame, self._peeked = self._peeked, None
            return copy_frame_into(frame, view)
        return recv_into(self.sock, view)

    def has_more(self) -> bool:
        return self._peeked is not None or bool(self.sock.get(zmq.RCVMORE))

    def user_id(self, frame: Any) -> str | None:
        try:
            return str(frame.get("User-Id"))
        except zmq.ZMQError:  # no ZAP handler gave this connection a name
            return None

    def route(self, name: bytes, connection: bytes) -> None:
        if self.by_key and self.addresses.get(name) != connection:
            log.debug("%s speaks from a new connection", name.decode("utf-8", "replace"))
            self.addresses[name] = connection

    def wait(self, timeout_ms: int) -> bool:
        return bool(self._poller.poll(timeout_ms))

    def wait_writable(self, timeout_ms: int) -> None:
        self._send_poller.poll(timeout_ms)

    def link_events(self) -> list[LinkEvent]:
        out: list[LinkEvent] = []
        if self.monitor is None:
            return out
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return out
            kind = _EVENTS.get(int(event["event"]))
            if kind is not None:
                out.append(LinkEvent(kind, int(event["value"])))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self.monitor.close(linger=0)
        self.sock.close()
        if self._on_close is not None:
            self._on_close()


class ZmqNetwork:
    """Ports on real sockets of one Context (by default the process's, :func:`context`)."""

    def __init__(self, ctx: zmq.Context | None = None) -> None:
        self._ctx = ctx

    @property
    def ctx(self) -> zmq.Context:
        return self._ctx or context()

    def router(
        self,
        endpoint: str,
        *,
        options: SocketOptions | None,
        limits: Limits,
        security: ServerSecurity | None = None,
    ) -> ZmqPort:
        if security is None:
            sock = make_router(endpoint, options=options, limits=limits, ctx=self._ctx)
            # A ROUTER's monitor names fds, never peers (docs/zeromq.md §12): a
            # disconnect only tells the transport to probe its peers.
            return ZmqPort(sock, zmq.EVENT_DISCONNECTED)
        zap = zap_handler(self.ctx)
        assert zap is not None
        zap.allow(security.domain, security.group, security.allowed)
        try:
            sock = make_router(
                endpoint,
                options=options,
                limits=limits,
                ctx=self._ctx,
                curve=security.socket_options(),
            )
        except BaseException:
            zap.forget(security.domain)
            raise
        return ZmqPort(
            sock,
            zmq.EVENT_DISCONNECTED,
            by_key=True,
            on_close=lambda: zap.forget(security.domain),
        )

    def dealer(
        self,
        endpoint: str,
        routing_id: str,
        *,
        options: SocketOptions | None,
        limits: Limits,
        security: ClientSecurity | None = None,
        monitor: bool = True,
    ) -> ZmqPort:
        curve = security.socket_options() if security is not None else None
        sock = make_dealer(
            endpoint, routing_id, options=options, limits=limits, ctx=self._ctx, curve=curve
        )
        if not monitor:
            return ZmqPort(sock, None)
        return ZmqPort(
            sock,
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH,
        )


_default = ZmqNetwork()


def default_network() -> ZmqNetwork:
    """The network of real sockets on the process's Context."""
    return _default
