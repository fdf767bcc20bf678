"""Ports on real ZeroMQ sockets: :class:`ZmqNetwork` and :class:`ZmqPort`.

The sockets themselves are made (and every option set) by
:mod:`zmqfed.federated.sockets`; this module adapts one socket and its
monitor to the :class:`~zmqfed.federated.ports.Port` the protocol code uses,
translating ``zmq.Again`` and ``EHOSTUNREACH`` into
:class:`~zmqfed.federated.ports.WouldBlock` and
:class:`~zmqfed.federated.ports.Unreachable`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from zmqfed.federated.ports import LinkEvent, LinkEventKind, Tracker, Unreachable, WouldBlock
from zmqfed.federated.security import ClientSecurity, ServerSecurity, group_authenticator
from zmqfed.federated.sockets import SocketOptions, context, make_dealer, make_router, recv_into
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


class ZmqPort:
    """A :class:`~zmqfed.federated.ports.Port` over one ZeroMQ socket and its monitor.

    ``events=None``: no monitor (the port reports no link events).  A
    monitor is a PAIR socket in this process plus one inside libzmq, so a
    monitored DEALER costs three sockets and four descriptors, an
    unmonitored one one socket and two descriptors (docs/zeromq.md §26).
    """

    def __init__(self, sock: zmq.Socket, events: int | None) -> None:
        self.sock = sock
        self.routed = sock.type == zmq.ROUTER
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
        try:
            tracker = self.sock.send_multipart(frames, flags=zmq.DONTWAIT, copy=False, track=track)
        except zmq.Again as exc:
            raise WouldBlock from exc
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise Unreachable from exc
            raise
        return _ZmqTracker(tracker) if track and tracker is not None else None

    def recv_frame(self) -> zmq.Frame:
        flags = 0 if self.sock.get(zmq.RCVMORE) else zmq.NOBLOCK
        try:
            return self.sock.recv(flags=flags, copy=False)
        except zmq.Again as exc:
            raise WouldBlock from exc

    def recv_into(self, view: memoryview) -> int:
        return recv_into(self.sock, view)

    def has_more(self) -> bool:
        return bool(self.sock.get(zmq.RCVMORE))

    def user_id(self, frame: Any) -> str | None:
        try:
            return str(frame.get("User-Id"))
        except zmq.ZMQError:  # no ZAP handler gave this connection a name
            return None

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
        curve = None
        if security is not None:
            group_authenticator(self.ctx, security.domain, security.allowed)
            curve = security.socket_options()
        sock = make_router(endpoint, options=options, limits=limits, ctx=self._ctx, curve=curve)
        # A ROUTER's monitor names fds, never peers (docs/zeromq.md §12): a
        # disconnect only tells the transport to probe its peers.
        return ZmqPort(sock, zmq.EVENT_DISCONNECTED)

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
