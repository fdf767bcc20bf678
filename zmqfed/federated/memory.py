"""An in-process network with ROUTER/DEALER semantics, for unit tests.

``Maintainer(props, state_dict, network=MemoryNetwork())`` runs the whole
protocol (handshake, requests, chunked streams, hooks) over queues in one
process, so hooks, step policies and codecs can be unit-tested without
sockets.  What it keeps of ZeroMQ's behaviour:

* a DEALER's messages queue until a ROUTER is bound at its endpoint
  (IMMEDIATE=0), and it reconnects to the next ROUTER bound there;
* a ROUTER prefixes received messages with the sender's routing id and
  refuses to send to an id that is not connected (ROUTER_MANDATORY);
* a DEALER connecting with a routing id in use takes it over
  (ROUTER_HANDOVER): the old connection stays up, but what it sends is
  dropped and nothing reaches it any more (docs/zeromq.md §3); other
  disconnects show up as link events on both sides.

Frames are copied when sent, so a sender may change its tensors at once.
It has no CURVE, no heartbeats and no size limits: integration tests use
real sockets (:class:`~zmqfed.federated.zmq_port.ZmqNetwork`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from zmqfed.errors import ConfigError
from zmqfed.federated.ports import (
    LinkEvent,
    LinkEventKind,
    Tracker,
    Unreachable,
    WouldBlock,
)

if TYPE_CHECKING:
    from zmqfed.federated.security import ClientSecurity, ServerSecurity
    from zmqfed.federated.sockets import SocketOptions
    from zmqfed.wire import Limits

__all__ = ["MemoryFrame", "MemoryNetwork", "MemoryPort"]


class MemoryFrame:
    """A received frame: a writable buffer and whether more frames follow."""

    __slots__ = ("_data", "more")

    def __init__(self, data: bytearray, more: bool) -> None:
        self._data = data
        self.more = more

    @property
    def buffer(self) -> memoryview:
        return memoryview(self._data)

    @property
    def bytes(self) -> bytes:
        return bytes(self._data)


class MemoryPort:
    """One end of an in-process link (see :class:`MemoryNetwork`)."""

    def __init__(self, network: MemoryNetwork, endpoint: str, routing_id: bytes | None) -> None:
        self._net = network
        self.endpoint = endpoint
        self.routed = routing_id is None
        self.routing_id = routing_id
        self._cond = threading.Condition(network.lock)
        self._inbox: deque[list[bytearray]] = deque()
        self._reading: deque[bytearray] = deque()
        self._events: deque[LinkEvent] = deque()
        self._outbox: deque[list[bytearray]] = deque()  # a DEALER's, while unconnected
        self.peers: dict[bytes, MemoryPort] = {}  # a ROUTER's connected DEALERs
        self.router: MemoryPort | None = None  # a DEALER's ROUTER
        self.orphaned = False  # a DEALER whose routing id another connection took over
        self.monitored = True  # False: link events are not reported
        self.closed = False

    # -- delivery (network lock held) ---------------------------------------
    def _deliver(self, message: list[bytearray]) -> None:
        self._inbox.append(message)
        self._cond.notify_all()

    def _event(self, kind: LinkEventKind) -> None:
        if self.monitored:
            self._events.append(LinkEvent(kind))
            self._cond.notify_all()

    # -- Port ---------------------------------------------------------------
    def send(self, frames: Sequence[Any], *, track: bool = False) -> Tracker | None:
        message = [bytearray(memoryview(f).cast("B")) for f in frames]
        with self._net.lock:
            if self.closed:
                raise ConfigError("send on a closed port")
            if self.routed:
                peer = self.peers.get(bytes(message[0]))
                if peer is None:
                    raise Unreachable(bytes(message[0]))
                peer._deliver(message[1:])
            elif self.orphaned:
                pass  # the ROUTER no longer routes this connection: dropped, no error
            elif self.router is None:
                self._outbox.append(message)  # delivered when a ROUTER is bound
            else:
                assert self.routing_id is not None
                self.router._deliver([bytearray(self.routing_id), *message])
        return None  # copied: nothing to track

    def recv_frame(self) -> MemoryFrame:
        with self._net.lock:
            if not self._reading:
                if not self._inbox:
                    raise WouldBlock
                self._reading.extend(self._inbox.popleft())
            data = self._reading.popleft()
            return MemoryFrame(data, bool(self._reading))

    def recv_into(self, view: memoryview) -> int:
        with self._net.lock:
            data = self._reading.popleft()
        n = min(len(data), len(view))
        view[:n] = memoryview(data)[:n]
        return len(data)

    def has_more(self) -> bool:
        with self._net.lock:
            return bool(self._reading)

    def user_id(self, frame: Any) -> str | None:
        return None

    def route(self, name: bytes, connection: bytes) -> None:
        return None  # peers are named by routing id: nothing to route

    def wait(self, timeout_ms: int) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: bool(self._inbox or self._reading or self._events or self.closed),
                timeout=timeout_ms / 1000,
            )

    def wait_writable(self, timeout_ms: int) -> None:
        return None  # queues are unbounded

    def link_events(self) -> list[LinkEvent]:
        with self._net.lock:
            out = list(self._events)
            self._events.clear()
            return out

    def close(self) -> None:
        self._net.close(self)


class MemoryNetwork:
    """Endpoints in one process; ``router``/``dealer`` as on :class:`ZmqNetwork`.

    Ports may be used from different threads (one thread per port).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._routers: dict[str, MemoryPort] = {}
        self._dealers: dict[str, list[MemoryPort]] = {}

    def router(
        self,
        endpoint: str,
        *,
        options: SocketOptions | None = None,
        limits: Limits | None = None,
        security: ServerSecurity | None = None,
    ) -> MemoryPort:
        """A ROUTER bound at ``endpoint``; waiting DEALERs connect to it."""
        _no_security(security)
        port = MemoryPort(self, endpoint, None)
        with self.lock:
            if endpoint in self._routers:
                raise ConfigError(f"cannot bind {endpoint}: address already in use")
            self._routers[endpoint] = port
            for dealer in self._dealers.get(endpoint, []):
                dealer.orphaned = False
                self._attach(dealer, port)
        return port

    def dealer(
        self,
        endpoint: str,
        routing_id: str,
        *,
        options: SocketOptions | None = None,
        limits: Limits | None = None,
        security: ClientSecurity | None = None,
        monitor: bool = True,
    ) -> MemoryPort:
        """A DEALER with ``routing_id``, connected (now or once bound) to ``endpoint``."""
        _no_security(security)
        rid = routing_id.encode("utf-8")
        if not 0 < len(rid) <= 255 or rid.startswith(b"\x00"):
            raise ConfigError(
                f"nick name {routing_id!r} cannot be a routing id (1-255 bytes, no leading NUL)"
            )
        port = MemoryPort(self, endpoint, rid)
        port.monitored = monitor
        with self.lock:
            self._dealers.setdefault(endpoint, []).append(port)
            router = self._routers.get(endpoint)
            if router is not None:
                self._attach(port, router)
        return port

    def _attach(self, dealer: MemoryPort, router: MemoryPort) -> None:
        assert dealer.routing_id is not None
        old = router.peers.get(dealer.routing_id)
        if old is not None:  # handover: the new connection takes the id, silently
            old.orphaned = True
        router.peers[dealer.routing_id] = dealer
        dealer.router = router
        dealer._event(LinkEventKind.CONNECTED)
        while dealer._outbox:
            router._deliver([bytearray(dealer.routing_id), *dealer._outbox.popleft()])

    def close(self, port: MemoryPort) -> None:
        with self.lock:
            if port.closed:
                return
            port.closed = True
            port._cond.notify_all()
            if port.routed:
                self._routers.pop(port.endpoint, None)
                for dealer in self._dealers.get(port.endpoint, []):
                    if dealer.router is port:
                        dealer.router = None
                        dealer.orphaned = False
                        dealer._event(LinkEventKind.DISCONNECTED)
                port.peers.clear()
                return
            self._dealers[port.endpoint].remove(port)
            router = port.router
            assert port.routing_id is not None
            if router is not None and router.peers.get(port.routing_id) is port:
                del router.peers[port.routing_id]
                router._event(LinkEventKind.DISCONNECTED)


def _no_security(security: object) -> None:
    if security is not None:
        raise ConfigError("MemoryNetwork has no CURVE; test security over real sockets")
