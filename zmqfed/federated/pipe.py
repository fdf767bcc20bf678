"""``Pipe``: the channel to one peer of a federated group, as hooks and users see it.

On the aggregator every collaborator has an :class:`AggregatorPipe` (a
routing id on the group's ROUTER); a collaborator has one
:class:`CollaboratorPipe` to its aggregator.  A pipe's state is derived from
what waits on it: ``pushing`` (an upload is pending), ``pulling`` (a download
request is pending), ``zombie`` (nothing pending) or ``offline``.

Pipes are views: the transport of their end owns every field that changes
with the protocol (:mod:`zmqfed.federated.aggregator_transport`,
:mod:`zmqfed.federated.collaborator_transport`).  What users and hooks set
on a pipe is the meta of the next reply (:meth:`Pipe.set_meta`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from zmqfed.meta import Meta
from zmqfed.wire import Kind

if TYPE_CHECKING:
    from zmqfed.federated.chunked import InStream, OutStream
    from zmqfed.federated.collaborator_transport import CollaboratorTransport
    from zmqfed.wire import Envelope

__all__ = [
    "OFFLINE",
    "PULLING",
    "PUSHING",
    "ZOMBIE",
    "AggregatorPipe",
    "CollaboratorPipe",
    "Pipe",
]

log = logging.getLogger(__name__)

PUSHING, PULLING, ZOMBIE, OFFLINE = "pushing", "pulling", "zombie", "offline"


class Pipe:
    """What both ends know of a peer: its name, the last meta it sent, byte counters."""

    def __init__(self, nick_name: str) -> None:
        self.nick_name = nick_name
        #: The last meta received from the peer.
        self.meta: Meta = Meta()
        self._out_meta: Meta | None = None
        #: Raw tensor bytes received from / sent to the peer.
        self.bytes_in = 0
        self.bytes_out = 0
        #: ``time.monotonic()`` of the last message from the peer (None: never).
        self.last_seen: float | None = None

    def set_meta(self, meta: dict[str, Any]) -> None:
        """Set the meta sent with the next message to the peer (a copy is kept)."""
        self._out_meta = Meta(meta).copy()

    def take_out_meta(self) -> Meta | None:
        """The meta set with :meth:`set_meta` for the next message, consumed once read."""
        meta, self._out_meta = self._out_meta, None
        return meta

    @property
    def state(self) -> str:
        raise NotImplementedError

    @property
    def is_pushing(self) -> bool:
        """The peer uploaded data that waits to be received."""
        return self.state == PUSHING

    @property
    def is_pulling(self) -> bool:
        """The peer asked for data that waits to be served."""
        return self.state == PULLING

    @property
    def is_zombie(self) -> bool:
        """Connected, nothing pending."""
        return self.state == ZOMBIE

    @property
    def is_offline(self) -> bool:
        """The peer left (BYE), or cannot be reached."""
        return self.state == OFFLINE

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.nick_name!r} {self.state}>"


class AggregatorPipe(Pipe):
    """The aggregator's record of one collaborator; written only by its transport."""

    def __init__(self, nick_name: str) -> None:
        super().__init__(nick_name)
        self.routing_id = nick_name.encode("utf-8")
        #: Said HELLO in this aggregator's incarnation, and not gone since.
        self.online = False
        #: The collaborator process's session id (from HELLO).
        self.session = ""
        #: Sessions newer processes of this name replaced, and when.
        self.superseded: dict[str, float] = {}
        #: The request waiting for the step hooks: a PUSH or a PULL.
        self.request: Envelope | None = None
        #: A WAIT was sent for the pending request (once per request).
        self.told_to_wait = False
        #: (session, seq) of uploads already counted, so a retry is ACKed, not counted.
        self.accepted: dict[tuple[str, int], None] = {}
        #: (aggregator version, session) of the upload counted for that version:
        #: a member contributes at most one update per version.
        self.counted: tuple[int, str] | None = None
        #: A streamed upload being received, or announced and waiting for admission.
        self.in_stream: InStream | None = None
        self.announced: Envelope | None = None
        #: The largest frame the peer accepts, as its HELLO said (None: ours).
        self.peer_frame_bytes: int | None = None
        #: A streamed download being sent.
        self.out_stream: OutStream | None = None
        #: The tensor names the peer exchanges, as its HELLO declared (None: the whole model).
        self.declared: frozenset[str] | None = None

    @property
    def state(self) -> str:
        if not self.online:
            return OFFLINE
        if self.request is None:
            return ZOMBIE
        return PUSHING if self.request.kind == Kind.PUSH else PULLING


class CollaboratorPipe(Pipe):
    """A collaborator's channel to its aggregator (the aggregator's name and meta)."""

    def __init__(self, transport: CollaboratorTransport) -> None:
        super().__init__(transport.aggregator_name)
        self.transport = transport

    @property
    def state(self) -> str:
        if self.transport.closed or not self.transport.connected:
            return OFFLINE
        return ZOMBIE

    def close(self) -> None:
        """Say BYE (best effort) and close the connection."""
        self.transport.close()
