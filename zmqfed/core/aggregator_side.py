"""``AggregatorSide``: an aggregator's ``step()`` -- events in, hook verdicts, actions out.

No sleeps and no busy waiting: the loop blocks on the transport until a
message arrives, a hook asked to be woken (``Maintainer.wake_at``), the idle
interval passes (so idle and time-based hooks run) or the step's deadline
expires.  Each event (a peer joined, a request is pending, a peer left)
makes the loop run the step points of that peer
(:mod:`zmqfed.core.step_points`); the verdicts become the transport's
actions: serve, accept, park, refuse.  Requests the hooks park are looked at
again whenever state changes -- after the next message, at the next step, a
version change, a wake-up or an idle tick.

Nothing per message costs time in proportion to the number of peers (there
may be ten thousand): the step's members are kept in a set beside
``Maintainer.pipes``, parked requests in their own index, and the idle tick,
which does visit every peer, comes at most as often as keeps its cost under
``IDLE_SHARE`` of the loop's time.  A download parked because it asks for a
version the aggregator has not reached waits for the version (or the next
step, wake-up or idle tick): no message can serve it sooner.  Other parked
requests are looked at again after a message only while there are at most
``RECHECK_LIMIT`` of them; beyond that (thousands of collaborators a sample
left out) they too wait for the next step, wake-up or idle tick.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from zmqfed.core import step_points as points
from zmqfed.core.contracts import StepResult
from zmqfed.core.received import check_upload_meta
from zmqfed.errors import PeerTimeout, ProtocolError
from zmqfed.federated import AggregatorPipe, AggregatorTransport, PeerEvent, PeerEventKind
from zmqfed.federated.protocol import ErrorCode, meta_version
from zmqfed.meta import Meta
from zmqfed.wire import Kind

if TYPE_CHECKING:
    from zmqfed.core.maintainer import Maintainer
    from zmqfed.federated import Pipe

__all__ = ["AggregatorSide"]

log = logging.getLogger(__name__)

#: Seconds a streamed download may go without progress before the drain gives up.
STREAM_STALL = 5.0
#: Seconds ``step()`` waits at most, after its end, for streamed downloads it started.
DRAIN_LIMIT = 10.0
#: Parked requests looked at again after each message, at most (see the module doc).
RECHECK_LIMIT = 32
#: The idle tick visits every peer; it is spaced so it takes at most this
#: share of the loop's time.
IDLE_SHARE = 0.1


class AggregatorSide:
    """Runs ``Maintainer.step()`` on an aggregator, over an :class:`AggregatorTransport`."""

    def __init__(
        self, maintainer: Maintainer, transport: AggregatorTransport, *, idle_interval: float
    ) -> None:
        self.m = maintainer
        self.transport = transport
        self.idle_interval = idle_interval
        self.stopped = False
        self._wake = math.inf
        self._uploads = 0
        self._downloads = 0
        #: The pipes of ``Maintainer.pipes``, as a set (membership tests per message).
        self._members: set[Pipe] = set()
        #: Pipes whose request was parked, in the order they were parked; those
        #: asking for a version not reached yet are kept apart (see the module doc).
        self._parked: dict[AggregatorPipe, None] = {}
        self._ahead: dict[AggregatorPipe, None] = {}

    # -- what the Maintainer asks ------------------------------------------------
    def pipes(self) -> list[Pipe]:
        return list(self.transport.roster.values())

    def version_changed(self) -> None:
        self.transport.version = max(self.m.version, 0)
        self.transport.model_changed()

    def model_changed(self) -> None:
        self.transport.model_changed()

    def manual_stop(self) -> None:
        self.stopped = True

    def wake_at(self, when: float) -> None:
        self._wake = min(self._wake, when)

    def discard(self, pipe: Pipe | None, reason: str) -> None:
        if not isinstance(pipe, AggregatorPipe) or pipe.request is None:
            return
        self.transport.log_refusal(  # rate-limited: a peer may send such requests in a loop
            ErrorCode.DISCARDED, f"discarded {pipe.request.kind} from {pipe.nick_name}: {reason}"
        )
        self.transport.refuse(pipe, ErrorCode.DISCARDED, reason)

    def stats(self) -> dict[str, Any]:
        stats = self.transport.stats
        return {
            "messages_in": stats.messages_in,
            "errors": stats.errors,
            "parked": stats.parked,
            "encodes": self.transport.served.encodes,
            "refused": dict(stats.refused),
            "chunks_in": stats.chunks_in,
            "chunks_out": stats.chunks_out,
            "stream_bytes_peak": self.transport.streams.in_bytes_peak,
            "joins": stats.joins,
            "departures": stats.departures,
            "uploads": dict(stats.uploads),
            **self.transport.traffic.as_dict(),
        }

    def close(self, *, final: bool) -> None:
        self.transport.close(final=final)

    # -- the loop ------------------------------------------------------------------
    def step(self, timeout: float | None) -> StepResult:
        m, t = self.m, self.transport
        self.stopped = False
        self._uploads = self._downloads = 0
        parked = t.stats.parked
        t.model_changed()
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        self._run(points.step_started, None)
        # This step's view: whoever is online now; requests that waited come first.
        self._members = set(m.pipes)
        for pipe in t.online():
            self._join(pipe)
        self._cycle_pending(everyone=True)
        idle = self.idle_interval
        next_idle = time.monotonic() + idle
        while not self.stopped:
            until = min(deadline, next_idle, self._wake, t.next_timer)
            wait_ms = max(0, math.ceil((until - time.monotonic()) * 1000))
            for event in t.events(wait_ms):
                self._on(event)
                if self.stopped:
                    break
            now = time.monotonic()
            if not self.stopped and (now >= next_idle or now >= self._wake):
                self._wake = math.inf
                t.streams.pump_all()
                for member in list(m.pipes):
                    if self.stopped:
                        break
                    assert isinstance(member, AggregatorPipe)
                    self._cycle(member)
                if not m.pipes:  # nobody joined yet: time-based policies still decide
                    self._run(points.after_peer, None)
                done = time.monotonic()
                idle = max(self.idle_interval, (done - now) / IDLE_SHARE)
                next_idle = done + idle
            if not self.stopped and time.monotonic() >= deadline:
                t.streams.quiesce()
                self._timed_out(timeout or 0.0)
        self._finish_downloads(deadline)
        t.streams.quiesce()
        return StepResult(
            uploads=self._uploads, downloads=self._downloads, parked=t.stats.parked - parked
        )

    def _join(self, pipe: AggregatorPipe) -> None:
        """Add ``pipe`` to this step's view (``Maintainer.pipes``) if it is not there."""
        if len(self._members) != len(self.m.pipes):  # a hook edited the list itself
            self._members = set(self.m.pipes)
        if pipe not in self._members:
            self._members.add(pipe)
            self.m.pipes.append(pipe)

    def _on(self, event: PeerEvent) -> None:
        pipe = event.pipe
        if event.kind is not PeerEventKind.LEFT and pipe.online:
            self._join(pipe)
        if pipe in self._members:  # (a peer that left unseen by this step is no news)
            self._cycle(pipe)  # a peer that left: the destroy points run
            self._cycle_pending(exclude=pipe)

    def _finish_downloads(self, deadline: float) -> None:
        """Let streamed downloads that were started finish before ``step()`` returns, briefly.

        Only credit is served here; requests that arrive meanwhile wait on
        their peers for the next step.  The wait is bounded whatever the
        peers do: at most ``DRAIN_LIMIT`` seconds in all, and a download that
        makes no progress for ``STREAM_STALL`` seconds ends it sooner (a
        member trickling credit, or announcing a tiny frame bound, cannot
        hold every step).  What is unfinished then is aborted
        (``stream-aborted``): those collaborators ask again and get the next
        version.
        """
        streams = self.transport.streams
        start = progress_at = time.monotonic()
        progress = -1
        while streams.sending():
            now = time.monotonic()
            sent = streams.progress()
            if sent != progress:
                progress, progress_at = sent, now
            until = min(deadline, start + DRAIN_LIMIT, progress_at + STREAM_STALL)
            if now >= until:
                log.warning(
                    "%s: streamed downloads unfinished %.1f s after the step; aborting them",
                    self.m.nick_name,
                    now - start,
                )
                return
            for _ in self.transport.events(max(1, math.ceil(min(until - now, 0.5) * 1000))):
                pass  # the transport keeps what arrived on the peers
            streams.pump_all()

    def _cycle_pending(
        self, exclude: AggregatorPipe | None = None, *, everyone: bool = False
    ) -> None:
        """Look at parked requests again (all of them with ``everyone``: a new step).

        After a message, only while there are at most ``RECHECK_LIMIT``.
        """
        if everyone:
            pending = [p for p in self.m.pipes if isinstance(p, AggregatorPipe) and p.request]
        elif len(self._parked) <= RECHECK_LIMIT:
            pending = list(self._parked)
        else:
            return
        for pipe in pending:
            if self.stopped:
                return
            if pipe is not exclude and pipe.request and pipe in self._members:
                self._cycle(pipe)

    def _run(self, point: str, pipe: Pipe | None, flag: bool | None = None) -> bool | None:
        return self.m.run_step_point(point, pipe, flag)

    def _cycle(self, pipe: AggregatorPipe) -> None:
        """One peer's points: ``before_peer``, the branch of its state, ``after_peer``."""
        self._parked.pop(pipe, None)  # parked again below if the hooks say so
        self._ahead.pop(pipe, None)
        self._run(points.before_peer, pipe)
        if pipe.is_offline:
            self._run(points.peer_leaving, pipe)
            if pipe in self._members:
                self._members.discard(pipe)
                self.m.pipes.remove(pipe)
            self._run(points.peer_left, pipe, True)
        elif pipe.is_zombie:
            self._run(points.peer_idle, pipe)
        elif pipe.is_pushing:
            if self._run(points.upload_received, pipe) is not False:
                # (a hook that waited on the pipe channel may have seen the request go)
                received = pipe.is_pushing and self._receive_upload(pipe)
                self._run(points.upload_handled, pipe, received)
            else:
                self._park(pipe)
        elif pipe.is_pulling:
            verdict = self._run(points.download_requested, pipe)
            if verdict is None:  # no hook decided: serve versions already reached
                verdict = meta_version(pipe.meta) <= self.m.version
            if verdict:
                served = pipe.is_pulling and self._serve(pipe)
                self._run(points.download_served, pipe, served)
            else:
                self._park(pipe)
        elif pipe.is_asking:
            self._exchange(pipe)
        else:
            self._run(points.peer_invalid, pipe)
        self._run(points.after_peer, pipe)

    def _exchange(self, pipe: AggregatorPipe) -> None:
        """An exchange (ASK): a hook answers it (REPLY), parks it, or nobody knows its topic."""
        verdict = self._run(points.exchange_requested, pipe)
        if pipe.request is None:  # a hook discarded it
            return
        if verdict is None:
            topic = str(pipe.meta.get("topic", ""))[:64]
            self.transport.refuse(
                pipe, ErrorCode.UNEXPECTED, f"no hook on {self.m.nick_name} answers topic {topic!r}"
            )
        elif verdict:
            meta, tensors = pipe.take_out_meta() or Meta(), pipe.take_out_tensors()
            self._run(points.exchange_answered, pipe, self.transport.reply(pipe, meta, tensors))
        else:
            self._park(pipe)

    def _park(self, pipe: AggregatorPipe) -> None:
        self.transport.park(pipe)
        request = pipe.request
        if request is not None:  # (a hook may have refused it meanwhile)
            ahead = request.kind == Kind.PULL and meta_version(pipe.meta) > self.m.version
            (self._ahead if ahead else self._parked)[pipe] = None
        self._run(points.request_parked, pipe)

    def _receive_upload(self, pipe: AggregatorPipe) -> bool:
        """Validate ``pipe``'s pending upload; count and ACK it, or refuse it."""
        m, request = self.m, pipe.request
        if request is None:  # a hook discarded it meanwhile
            return False
        try:
            data = m.receive(request.tensors, pipe.nick_name, pipe.declared)
            check_upload_meta(request.meta, pipe.nick_name)
        except ProtocolError as exc:
            # rate-limited and cut short: the reason quotes what the peer sent
            self.transport.log_refusal(
                ErrorCode.BAD_UPLOAD, f"refused an upload from {pipe.nick_name}: {exc}"
            )
            self.transport.refuse(pipe, ErrorCode.BAD_UPLOAD, str(exc))
            return False
        m.record_upload(data, Meta(request.meta), pipe.nick_name)
        self.transport.accept_upload(pipe)
        self._uploads += 1
        log.debug(
            "%s: received upload %d from %s (%d bytes)",
            m.nick_name,
            request.seq,
            pipe.nick_name,
            request.nbytes,
        )
        return True

    def _serve(self, pipe: AggregatorPipe) -> bool:
        meta = pipe.take_out_meta()
        if meta is None:
            meta = Meta(self.m.meta)
            meta["version"] = self.m.version
        ok = self.transport.serve(pipe, meta)
        self._downloads += ok
        return ok

    def _timed_out(self, timeout: float) -> None:
        m = self.m
        online = sorted(p.nick_name for p in m.pipes)
        missing = sorted(set(m.fed_props.collaborators) - set(online))
        raise PeerTimeout(
            ", ".join(missing) or m.nick_name,
            timeout,
            f"let {m.nick_name} finish its step ({len(m.meta_list)} uploads received; "
            f"online: {online}; never joined or left: {missing})",
        )
