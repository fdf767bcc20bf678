"""``Telemetry``: a node's state, published as immutable snapshots for other threads.

The node's loop thread calls :meth:`Telemetry.record` after each round and
:meth:`Telemetry.publish` whenever its state may have changed (a round, a
step starting, at most once a second while a step runs); each publish
builds a new :class:`Snapshot` and swaps one reference.  The HTTP thread
(metrics, dashboard, ``/status.json``) and the heartbeat thread only read
:attr:`Telemetry.latest`: they never touch a Maintainer or a socket.

A snapshot's ``status`` is the status document (``NAME.status.json``,
``/status.json``, ``zmqfed-node status --json``: the fields are listed in
``docs/operations.md``); the rest feeds ``/metrics`` and the dashboard's charts.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zmqfed.core import StepContext, step_points
from zmqfed.ops.snapshot import (
    AGGREGATE_BUCKETS,
    ROUND_BUCKETS,
    Histogram,
    HistogramState,
    eta_seconds,
    group_view,
)

if TYPE_CHECKING:
    from zmqfed.core import Maintainer

__all__ = ["SCHEMA", "ErrorLog", "Snapshot", "Telemetry"]

#: Version of the status document's layout.
SCHEMA = 1
#: Round records kept for the dashboard's charts.
CHART_POINTS = 500
#: Warnings and errors kept for the dashboard and the status document.
KEEP_ERRORS = 20
#: Longest message kept of one log record.
ERROR_CHARS = 500
#: Most of the loop's time publishing may take: a huge group publishes less often.
MAX_PUBLISH_SHARE = 0.01


class ErrorLog(logging.Handler):
    """Keeps the last warnings and errors logged in this process, and counts them.

    ``emit`` runs on whichever thread logs; it only appends to a bounded
    deque and increments a counter.
    """

    def __init__(self, keep: int = KEEP_ERRORS) -> None:
        super().__init__(level=logging.WARNING)
        self.records: deque[dict[str, Any]] = deque(maxlen=keep)
        self.counts: dict[str, int] = {}
        self._count_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break the logging thread
            message = str(record.msg)
        self.records.append(
            {
                "time": record.created,
                "level": record.levelname,
                "logger": record.name,
                "message": message[:ERROR_CHARS],
            }
        )
        with self._count_lock:
            self.counts[record.levelname] = self.counts.get(record.levelname, 0) + 1

    def counts_copy(self) -> dict[str, int]:
        """Records logged so far, by level name."""
        with self._count_lock:
            return dict(self.counts)


@dataclass(frozen=True)
class Snapshot:
    """What a node published at one moment (never changed once published)."""

    seq: int
    status: Mapping[str, Any]
    records: tuple[Mapping[str, Any], ...] = ()
    round_seconds: HistogramState = field(default_factory=lambda: Histogram(ROUND_BUCKETS).state())
    aggregate_seconds: HistogramState = field(
        default_factory=lambda: Histogram(AGGREGATE_BUCKETS).state()
    )
    rounds_completed: int = 0
    last_round_time: float | None = None
    log_counts: Mapping[str, int] = field(default_factory=dict)


class Telemetry:
    """One node's published state.

    Parameters
    ----------
    node:
        The node's nick name.
    roles:
        ``aggregator`` and/or ``collaborator``.
    rounds:
        Rounds the node expects to run.
    heartbeat_interval:
        Seconds between status-file heartbeats (recorded in the status).
    top_peers:
        Per-peer entries kept per aggregator group (0: none).
    publish_interval:
        Least seconds between two publishes while a step runs (more when a
        publish costs more than ``MAX_PUBLISH_SHARE`` of that time).
    """

    def __init__(
        self,
        node: str,
        roles: Sequence[str],
        rounds: int,
        *,
        heartbeat_interval: float = 5.0,
        top_peers: int = 0,
        publish_interval: float = 1.0,
    ) -> None:
        self.node = node
        self.roles = list(roles)
        self.rounds = rounds
        self.heartbeat_interval = heartbeat_interval
        self.top_peers = top_peers
        self.publish_interval = publish_interval
        self.started = time.time()
        self.host = socket.gethostname()
        #: Where this node serves metrics and its dashboard (set once they listen).
        self.endpoints: dict[str, str] = {}
        self.errors = ErrorLog()
        self.phase = "starting"
        self._chart: deque[dict[str, Any]] = deque(maxlen=CHART_POINTS)
        self._record_seq = 0
        self._round_seconds = Histogram(ROUND_BUCKETS)
        self._aggregate_seconds = Histogram(AGGREGATE_BUCKETS)
        self._rounds_completed = 0
        self._completions: deque[float] = deque(maxlen=11)  # time.monotonic() of each
        self._last_round_time: float | None = None
        self._round_started: float | None = None  # time.monotonic() of the step's start
        self._round_started_wall: float | None = None
        self._next_publish = 0.0
        self._seq = 0
        #: The snapshot other threads read (a reference swap publishes a new one).
        self.latest = Snapshot(0, {"schema": SCHEMA, "node": node, "state": "starting"})

    # -- the loop thread -------------------------------------------------------------
    def restore(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Show rounds run before a restart in the charts (not counted as completed now)."""
        for record in records:
            self._add_to_chart(record)

    def round_started(self) -> None:
        """A round (an aggregator's step) starts now."""
        self._round_started = time.monotonic()
        self._round_started_wall = time.time()

    def watch(self, m: Maintainer, publish: Callable[[], Any], *, nice: int = 1000) -> None:
        """Hook an aggregator's steps: note each step's start, ``publish()`` while due.

        The hooks run after the others of their points (``nice``); between
        two publishes they cost one clock read.
        """

        def started(ctx: StepContext) -> None:
            self.round_started()
            if self.due():
                publish()

        def after_peer(ctx: StepContext) -> None:
            if self.due():
                publish()

        m.on(step_points.step_started, started, nice=nice)
        m.on(step_points.after_peer, after_peer, nice=nice)

    def record(self, record: Mapping[str, Any]) -> None:
        """One round completed: ``record`` is a :class:`~zmqfed.api.RoundRecord` as a dict."""
        self._rounds_completed += 1
        self._completions.append(time.monotonic())
        self._last_round_time = time.time()
        self._round_seconds.observe(float(record.get("seconds", 0.0)))
        if record.get("mode", "train") == "train" and "aggregate_seconds" in record:
            self._aggregate_seconds.observe(float(record["aggregate_seconds"]))
        self._add_to_chart(record)
        self._round_started = self._round_started_wall = None

    def _add_to_chart(self, record: Mapping[str, Any]) -> None:
        self._record_seq += 1
        self._chart.append({**record, "seq": self._record_seq})

    def due(self) -> bool:
        """Whether :meth:`tick` would publish now (cheap: one clock read)."""
        return time.monotonic() >= self._next_publish

    def publish(
        self,
        *,
        state: str,
        round: int,
        groups: Sequence[tuple[Maintainer, int]],
        failure: str | None = None,
    ) -> Snapshot:
        """Build and publish a new snapshot; ``groups`` pairs each Maintainer with its quorum."""
        now_mono = time.monotonic()
        online: list[str] = []
        offline: list[str] = []
        views = []
        version = 0
        for m, quorum in groups:
            version = max(version, m.version)
            views.append(group_view(m, quorum=quorum, top_peers=self.top_peers))
            for pipe in m.all_pipes():
                (offline if pipe.is_offline else online).append(pipe.nick_name)
        chart = tuple(self._chart)
        eta = None
        if state in ("starting", "running"):
            done = list(self._completions)
            if len(done) >= 2:  # the pace of this process: time between rounds
                durations = [b - a for a, b in itertools.pairwise(done)]
                elapsed = now_mono - done[-1]
            else:  # a round's own duration (restored rounds included)
                durations = [float(r.get("seconds", 0.0)) for r in chart]
                elapsed = 0.0 if self._round_started is None else now_mono - self._round_started
            eta = eta_seconds(durations, self.rounds - round, elapsed)
        self._seq += 1
        status = {
            "schema": SCHEMA,
            "node": self.node,
            "roles": list(self.roles),
            "state": state,
            "failure": failure,
            "phase": self.phase,
            "round": round,
            "rounds": self.rounds,
            "version": version,
            "pid": os.getpid(),
            "host": self.host,
            "started": self.started,
            "activity": time.time(),
            "updated": time.time(),
            "heartbeat_interval": self.heartbeat_interval,
            "online_peers": sorted(online),
            "offline_peers": sorted(offline),
            "progress": {
                "uploads": sum(v["uploads"] for v in views),
                "expected": sum(v["expected"] for v in views),
                "round_started": self._round_started_wall,
            },
            "eta_seconds": eta,
            "last_record": dict(chart[-1]) if chart else None,
            "groups": views,
            "errors": list(self.errors.records),
            "endpoints": dict(self.endpoints),
        }
        snap = Snapshot(
            seq=self._seq,
            status=status,
            records=chart,
            round_seconds=self._round_seconds.state(),
            aggregate_seconds=self._aggregate_seconds.state(),
            rounds_completed=self._rounds_completed,
            last_round_time=self._last_round_time,
            log_counts=self.errors.counts_copy(),
        )
        self.latest = snap
        cost = time.monotonic() - now_mono
        self._next_publish = now_mono + max(self.publish_interval, cost / MAX_PUBLISH_SHARE)
        return snap
