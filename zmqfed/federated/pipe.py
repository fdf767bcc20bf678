"""``Pipe``: the channel to one peer of a federated group, as hooks and users see it.

On the aggregator every collaborator has an :class:`AggregatorPipe` (a
routing id on the group's ROUTER); a collaborator has one
:class:`CollaboratorPipe` to its aggregator.  A pipe's state is derived from
the Maintainer's request waiting on it: ``'push'`` (an upload is pending),
``'pull'`` (a download request is pending), ``'ask'`` (an exchange, ASK, is
pending), ``'zombie'`` (nothing pending) or ``'offline'`` -- OpenFed's state
names and values, and one of zmqfed's own.

Pipes are views: the transport of their end owns every field that changes
with the protocol (:mod:`zmqfed.federated.aggregator_transport`,
:mod:`zmqfed.federated.collaborator_transport`).  What users and hooks set
on a pipe is the meta of the next reply (:meth:`Pipe.set_meta`) and, for
an exchange, the tensors of the REPLY (:meth:`Pipe.set_tensors`).

OpenFed's pipe-level API talks to the peer without a Maintainer:
:meth:`Pipe.direct_set` / :meth:`Pipe.direct_get` exchange JSON-safe values
by key, :meth:`Pipe.upload` / :meth:`Pipe.download` move tensors and
JSON-safe data in order (:mod:`zmqfed.federated.pipe_channel`, sent by the
transport's :mod:`~zmqfed.federated.channel_ends`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from zmqfed.errors import ConfigError
from zmqfed.federated.dist_props import DistributedProperties, zmqfed_lock
from zmqfed.federated.pipe_channel import PipeChannel
from zmqfed.meta import Meta
from zmqfed.props import AGGREGATOR, COLLABORATOR
from zmqfed.wire import Kind

if TYPE_CHECKING:
    from torch import Tensor

    from zmqfed.federated.channel_ends import ChannelEnd
    from zmqfed.federated.chunked import InStream, OutStream
    from zmqfed.federated.collaborator_transport import CollaboratorTransport
    from zmqfed.props import FederatedProperties
    from zmqfed.wire import Envelope

__all__ = [
    "ASKING",
    "OFFLINE",
    "PULLING",
    "PUSHING",
    "ZOMBIE",
    "AggregatorPipe",
    "CollaboratorPipe",
    "Pipe",
]

log = logging.getLogger(__name__)

PUSHING, PULLING, ASKING, ZOMBIE, OFFLINE = "push", "pull", "ask", "zombie", "offline"
#: How long the pipe-level methods wait by default (OpenFed's transfers gave up after 30 min).
PIPE_TIMEOUT = 1800.0


class Pipe:
    """What both ends know of a peer: its name, the last meta it sent, byte counters."""

    def __init__(self, nick_name: str) -> None:
        self.nick_name = nick_name
        #: The last meta received from the peer.
        self.meta: Meta = Meta()
        self._out_meta: Meta | None = None
        self._out_tensors: dict[str, dict[str, Tensor]] | None = None
        #: Raw tensor bytes received from / sent to the peer.
        self.bytes_in = 0
        self.bytes_out = 0
        #: ``time.monotonic()`` of the last message from the peer (None: never).
        self.last_seen: float | None = None
        #: What the peer sent with the pipe-level methods; written by the transport.
        self.channel = PipeChannel()
        #: Sends and waits for the pipe-level methods; set by the transport.
        self.channel_end: ChannelEnd | None = None
        #: OpenFed's process-group context: here it only holds the pipes' lock.
        self.dist_props = DistributedProperties(zmqfed_lock)

    def set_meta(self, meta: dict[str, Any]) -> None:
        """Set the meta sent with the next message to the peer (a copy is kept)."""
        self._out_meta = Meta(meta).copy()

    def take_out_meta(self) -> Meta | None:
        """The meta set with :meth:`set_meta` for the next message, consumed once read."""
        meta, self._out_meta = self._out_meta, None
        return meta

    def set_tensors(self, tensors: dict[str, dict[str, Tensor]]) -> None:
        """Set the tensors of the REPLY to the peer's pending exchange (ASK).

        ``tensors`` maps a name to ``{field: tensor}``, like an upload.
        """
        self._out_tensors = {name: dict(fields) for name, fields in tensors.items()}

    def take_out_tensors(self) -> dict[str, dict[str, Tensor]] | None:
        """The tensors set with :meth:`set_tensors`, consumed once read."""
        tensors, self._out_tensors = self._out_tensors, None
        return tensors

    # -- OpenFed's pipe-level API -------------------------------------------------------
    def _end(self) -> ChannelEnd:
        if self.channel_end is None:
            raise ConfigError(f"pipe {self.nick_name!r} is not connected to a transport")
        return self.channel_end

    def direct_set(self, key: str, value: Any, *, timeout: float | None = PIPE_TIMEOUT) -> None:
        """Set ``key`` to a JSON-safe ``value`` for the peer; returns once the peer has it.

        The peer reads it with :meth:`direct_get`; setting a key again
        replaces the value. On the aggregator this waits for the
        collaborator to come online. Raises ``ConfigError`` for a bad key or
        value, ``PeerTimeout`` after ``timeout`` seconds.
        """
        self._end().direct_set(self, key, value, timeout)

    def direct_get(self, key: str, *, timeout: float | None = PIPE_TIMEOUT) -> Any:
        """The value the peer set under ``key``, waiting until it did (``PeerTimeout``)."""
        return self._end().direct_get(self, key, timeout)

    def upload(self, data: Any, *, timeout: float | None = PIPE_TIMEOUT) -> None:
        """Send ``data`` to the peer, after whatever was uploaded before; returns once it has it.

        ``data`` is a tensor, or JSON-safe data (dicts with str keys, lists,
        numbers, strings) holding tensors anywhere; tuples arrive as lists.
        Other objects raise ``ConfigError``, unless both ends allow pickle
        (``Limits(allow_pickle=True)``, which needs CURVE). The meta set
        with :meth:`set_meta` goes with it. Do not change the tensors until
        this returns: they are sent from their own memory.
        """
        self._end().upload(self, data, timeout)

    def download(self, *, timeout: float | None = PIPE_TIMEOUT) -> Any:
        """The oldest item the peer uploaded and this end has not downloaded, waiting for one.

        If it came with a meta, :attr:`meta` becomes that meta.
        """
        return self._end().download(self, timeout)

    @property
    def fed_props(self) -> FederatedProperties:
        """This end's properties of the group."""
        return self._end().props

    @property
    def role(self) -> str:
        """This end's role: ``'aggregator'`` or ``'collaborator'``."""
        return self.fed_props.role

    @property
    def anti_role(self) -> str:
        """The peer's role."""
        return COLLABORATOR if self.role == AGGREGATOR else AGGREGATOR

    @property
    def aggregator(self) -> bool:
        """This end is the aggregator."""
        return self.role == AGGREGATOR

    @property
    def collaborator(self) -> bool:
        """This end is a collaborator."""
        return self.role == COLLABORATOR

    # -- state -------------------------------------------------------------------------
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
    def is_asking(self) -> bool:
        """The peer asked for an exchange (ASK) that waits to be answered."""
        return self.state == ASKING

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


#: A pending request's kind -> the pipe's state.
_STATES = {Kind.PUSH.value: PUSHING, Kind.PULL.value: PULLING, Kind.ASK.value: ASKING}


class AggregatorPipe(Pipe):
    """The aggregator's record of one collaborator; written only by its transport."""

    def __init__(self, nick_name: str) -> None:
        super().__init__(nick_name)
        self.routing_id = nick_name.encode("utf-8")
        #: Said HELLO in this aggregator's incarnation, and not gone since.
        self.online = False
        #: Behind CURVE: the connection whose HELLO was accepted last (its routing id).
        self.connection: bytes | None = None
        #: The collaborator process's session id (from HELLO).
        self.session = ""
        #: Sessions newer processes of this name replaced, and when.
        self.superseded: dict[str, float] = {}
        #: The request waiting for the step hooks: a PUSH, a PULL or an ASK.
        self.request: Envelope | None = None
        #: A WAIT was sent for the pending request (once per request).
        self.told_to_wait = False
        #: (session, seq) of uploads already counted, so a retry is ACKed, not counted.
        self.accepted: dict[tuple[str, int], None] = {}
        #: (aggregator version, session, uploads) counted for that version: a
        #: member contributes at most ``Membership.uploads_per_member`` per version.
        self.counted: tuple[int, str, int] | None = None
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
        return _STATES.get(self.request.kind, PULLING)


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
