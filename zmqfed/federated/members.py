"""Who a member is, and what it contributed: the handshake and the exactly-once rules.

One :class:`Membership` per :class:`~zmqfed.federated.aggregator_transport.AggregatorTransport`
keeps, in the members' records (:class:`~zmqfed.federated.pipe.AggregatorPipe`):
the process session each member said HELLO from (a newer process replaces an
older one; a replaced one coming back means two live processes share the
name), and the upload counted for the current version (at most one per
member and version; docs/reliability.md "Exactly once").
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from zmqfed.federated.events import PeerEvent, PeerEventKind
from zmqfed.federated.pipe import AggregatorPipe
from zmqfed.federated.protocol import (
    ErrorCode,
    declared_subset,
    hello_problem,
    peer_frame_bound,
    welcome_meta,
)
from zmqfed.wire import Envelope, Kind

if TYPE_CHECKING:
    from zmqfed.federated.aggregator_transport import AggregatorTransport

__all__ = ["Membership"]

log = logging.getLogger(__name__)

#: Accepted uploads remembered per peer for idempotent retries.
KEEP_ACCEPTED = 64
#: Seconds a replaced session of a member is remembered: if it says HELLO
#: again meanwhile, two processes share the name.
SUPERSEDED_TTL = 600.0
#: ... and at most this many of them (a member cycling sessions cannot grow memory).
KEEP_SUPERSEDED = 16


class Membership:
    """The members' sessions and counted uploads, for one transport."""

    def __init__(self, transport: AggregatorTransport) -> None:
        self.t = transport
        #: Uploads one process of a member may have counted per version: 1,
        #: unless a step policy needs more uploads than the group has members
        #: (one process simulating several clients, as OpenFed's examples do).
        self.uploads_per_member = 1

    def _counted_now(self, pipe: AggregatorPipe) -> int:
        """Uploads of ``pipe``'s member counted for the current version."""
        counted = pipe.counted
        return counted[2] if counted is not None and counted[0] == self.t.version else 0

    def contributed(self, pipe: AggregatorPipe) -> bool:
        """``pipe``'s member contributed all it may to the current version."""
        return self._counted_now(pipe) >= self.uploads_per_member

    def counted_already(self, pipe: AggregatorPipe, env: Envelope) -> bool:
        """Answer a PUSH that must not be counted (True): at most one upload per member per version
        (``uploads_per_member`` from one process, when a step policy asks for more).

        The same request again (a retry after a lost ACK), or another upload
        from the same process for a version it already contributed to (a
        user's retry after a timeout, with a new seq), is acknowledged as a
        duplicate; an upload from another process of the member (restarted
        while its round was open) is refused with ``already-counted``.
        """
        retry = (pipe.session, env.seq) in pipe.accepted
        counted = self._counted_now(pipe)
        if not retry and counted == 0:
            return False
        same_process = pipe.counted is not None and pipe.counted[1] == pipe.session
        if not retry and same_process and counted < self.uploads_per_member:
            return False  # another of the uploads this process may contribute
        if retry or same_process:
            log.debug(
                "%s: upload %d from %s is a duplicate: acknowledged, not counted",
                self.t.name,
                env.seq,
                pipe.nick_name,
            )
            self.t.stats.count_upload("duplicate")
            self.t.send(pipe, Kind.ACK, seq=env.seq, meta={"duplicate": True})
            return True
        self.t.refuse_message(
            pipe.routing_id,
            env.seq,
            ErrorCode.ALREADY_COUNTED,
            f"{pipe.nick_name} already contributed to version {self.t.version} "
            "(from an earlier process); this upload is not counted",
        )
        return True

    def hello(self, pipe: AggregatorPipe, env: Envelope, reply_to: Any) -> PeerEvent | None:
        """Welcome ``pipe``'s member (``JOINED`` if it was not online), or refuse its HELLO.

        ``reply_to`` is where the HELLO came from: refusals go there, and
        an accepted HELLO's connection gets what is sent to the member.
        """
        problem = hello_problem(env.meta, self.t.props, authenticated=self.t.curve is not None)
        if problem is not None:
            self.t.refuse_message(reply_to, env.seq, *problem)
            return None
        declared = declared_subset(env.meta, self.t.streams.known_names())
        if isinstance(declared, tuple):
            self.t.refuse_message(reply_to, env.seq, *declared)
            return None
        session = str(env.meta.get("session", ""))[:64]
        if self._superseded(pipe, session):
            log.error(
                "%s: two processes use the name %r (sessions %s and %s): refused the older one",
                self.t.name,
                pipe.nick_name,
                session,
                pipe.session,
            )
            self.t.refuse_message(
                reply_to,
                env.seq,
                ErrorCode.NAME_IN_USE,
                f"another process of {pipe.nick_name!r} took over this name; "
                "two processes must not share one node's name",
            )
            return None
        if not pipe.online and self.t.online_count >= self.t.capacity:
            self.t.refuse_over_capacity(pipe, env.seq, reply_to)
            return None
        self.t.adopt_connection(pipe, reply_to)
        pipe.peer_frame_bytes = peer_frame_bound(env.meta)
        pipe.declared = declared
        if session != pipe.session:
            # A new collaborator process: whatever the old one asked for is void.
            pipe.request = None
            self.t.streams.drop(pipe)
            if pipe.session:
                pipe.superseded[pipe.session] = time.monotonic()
                while len(pipe.superseded) > KEEP_SUPERSEDED:
                    del pipe.superseded[next(iter(pipe.superseded))]
            pipe.session = session
        joined = not pipe.online
        pipe.online = True
        self.t.stats.joins += joined
        self.t.online_count += joined
        self.t.send(
            pipe,
            Kind.WELCOME,
            seq=env.seq,
            meta=welcome_meta(incarnation=self.t.incarnation, limits=self.t.limits, joined=joined),
        )
        if not joined:
            return None
        log.info("%s: %s joined", self.t.name, pipe.nick_name)
        return PeerEvent(PeerEventKind.JOINED, pipe)

    def _superseded(self, pipe: AggregatorPipe, session: str) -> bool:
        """A session a newer process of the same name replaced lately is back: two processes live.

        A restarted process never comes back under its old session, so only a
        second live process does (ROUTER_HANDOVER hands the name back and forth).
        """
        now = time.monotonic()
        for old, when in list(pipe.superseded.items()):
            if now - when > SUPERSEDED_TTL:
                del pipe.superseded[old]
        return session in pipe.superseded

    def counted(self, pipe: AggregatorPipe, seq: int) -> None:
        """``pipe``'s upload ``seq`` is counted for the current version."""
        again = pipe.counted is not None and pipe.counted[:2] == (self.t.version, pipe.session)
        pipe.counted = (self.t.version, pipe.session, self._counted_now(pipe) + 1 if again else 1)
        pipe.accepted[(pipe.session, seq)] = None
        while len(pipe.accepted) > KEEP_ACCEPTED:
            del pipe.accepted[next(iter(pipe.accepted))]
