"""Ports: the socket operations zmqfed's protocol code uses, and the networks that make them.

The protocol (handshake, requests, uploads, chunked streams, liveness) is
written once, against :class:`Port`: send a multipart message, read one
frame at a time (so a CHUNK's payload can land straight in a tensor with
``recv_into``), wait for input, and learn of link events.  Two networks
provide ports:

* :class:`zmqfed.federated.zmq_port.ZmqNetwork` -- real ZeroMQ sockets (the
  default; a ROUTER for an aggregator, a DEALER per collaborator);
* :class:`zmqfed.federated.memory.MemoryNetwork` -- in-process queues with
  ROUTER/DEALER semantics, for unit tests of the Maintainer and its hooks
  without sockets (the way httpx tests its client over a mock transport).

Both run the very same protocol code above them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from zmqfed.federated.security import ClientSecurity, ServerSecurity
    from zmqfed.federated.sockets import SocketOptions
    from zmqfed.wire import Limits

__all__ = [
    "Frame",
    "LinkEvent",
    "LinkEventKind",
    "Network",
    "Port",
    "Tracker",
    "Unreachable",
    "WouldBlock",
]


class WouldBlock(Exception):
    """Nothing to read, or no room to send right now (ZeroMQ's EAGAIN)."""


class Unreachable(Exception):
    """A ROUTER port has no connected peer with that routing id (EHOSTUNREACH)."""


class LinkEventKind(enum.Enum):
    """What a port's monitor reports about its connections."""

    CONNECTED = "connected"  # a handshake with the peer completed
    DISCONNECTED = "disconnected"  # a connection was lost
    AUTH_FAILED = "auth-failed"  # the peer refused our key (CURVE/ZAP)


@dataclass(frozen=True)
class LinkEvent:
    """One monitor event; ``value`` is the event's number (a ZAP status code, an fd)."""

    kind: LinkEventKind
    value: int = 0


class Frame(Protocol):
    """One received frame (``zmq.Frame`` satisfies it)."""

    @property
    def buffer(self) -> memoryview: ...

    @property
    def bytes(self) -> bytes: ...

    @property
    def more(self) -> bool: ...


class Tracker(Protocol):
    """Tells when the port no longer reads a zero-copy frame (``zmq.MessageTracker``)."""

    @property
    def done(self) -> bool: ...

    def wait(self, timeout: float) -> bool:
        """Block until done or ``timeout`` seconds passed; True when done."""
        ...


class Port(Protocol):
    """One socket, as the protocol code uses it.

    A ROUTER port (``routed``) prefixes every received message with the
    sender's routing id frame, and takes the destination's routing id as
    the first frame of every message it sends.
    """

    routed: bool

    def send(self, frames: Sequence[Any], *, track: bool = False) -> Tracker | None:
        """Queue one multipart message, zero-copy for large buffers.

        Returns a tracker when ``track`` and the frames were not copied.
        Raises :class:`WouldBlock` at the high-water mark, and
        :class:`Unreachable` (ROUTER) when the destination is not connected.
        """
        ...

    def recv_frame(self) -> Frame:
        """The next frame; :class:`WouldBlock` when no message is waiting."""
        ...

    def recv_into(self, view: memoryview) -> int:
        """Receive the next frame of the current message into ``view``.

        Returns the frame's length; a value above ``len(view)`` means the
        frame did not fit and was truncated.
        """
        ...

    def has_more(self) -> bool:
        """The message being read has more frames."""
        ...

    def user_id(self, frame: Any) -> str | None:
        """The name authentication gave the frame's connection (None: unauthenticated)."""
        ...

    def route(self, name: bytes, connection: bytes) -> None:
        """Send what is addressed to ``name`` on ``connection`` from now on.

        Only a port that names peers by key has connections apart from
        names (a received message's first frame then has a ``connection``);
        other ports ignore this.
        """
        ...

    def wait(self, timeout_ms: int) -> bool:
        """Block until a message or a link event is ready (True) or ``timeout_ms`` passed."""
        ...

    def wait_writable(self, timeout_ms: int) -> None:
        """Block until a send may succeed, a link event is ready, or ``timeout_ms`` passed."""
        ...

    def link_events(self) -> list[LinkEvent]:
        """Link events that happened since the last call (never blocks)."""
        ...

    def close(self) -> None:
        """Close the port; queued messages are flushed within the socket's linger."""
        ...


class Network(Protocol):
    """Makes the ports of one node: a bound ROUTER, connected DEALERs."""

    def router(
        self,
        endpoint: str,
        *,
        options: SocketOptions | None,
        limits: Limits,
        security: ServerSecurity | None = None,
    ) -> Port:
        """An aggregator's port, bound to ``endpoint``."""
        ...

    def dealer(
        self,
        endpoint: str,
        routing_id: str,
        *,
        options: SocketOptions | None,
        limits: Limits,
        security: ClientSecurity | None = None,
        monitor: bool = True,
    ) -> Port:
        """A collaborator's port with ``routing_id``, connected to ``endpoint``.

        ``monitor=False``: the port reports no link events (one socket fewer
        per collaborator, docs/zeromq.md §26).
        """
        ...
