"""The pieces of a node's published state: group views, histograms, metric values.

Everything here runs on the node's loop thread (the thread that owns the
sockets) and returns plain, new objects: a snapshot is built from them,
published, and never changed afterwards, so the HTTP thread can read it
without a lock (``docs/operations.md``).
"""

from __future__ import annotations

import bisect
import heapq
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zmqfed.core import Maintainer

__all__ = [
    "AGGREGATE_BUCKETS",
    "MAX_METRICS",
    "ROUND_BUCKETS",
    "Histogram",
    "HistogramState",
    "eta_seconds",
    "group_view",
    "numeric_metrics",
]

#: Upper bounds (seconds) of the round-duration histogram's buckets.
ROUND_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: Upper bounds (seconds) of the aggregation-time histogram's buckets.
AGGREGATE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)
#: Numeric round metrics exported per round at most (they become label values).
MAX_METRICS = 32


@dataclass(frozen=True)
class HistogramState:
    """A histogram at one moment: cumulative counts per upper bound, sum, count."""

    buckets: tuple[tuple[float, int], ...]  # (upper bound, observations <= bound); last is +inf
    sum: float
    count: int


class Histogram:
    """Observations counted into fixed buckets (Prometheus' cumulative histogram)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must increase strictly, got {bounds!r}")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (negative or non-finite values are ignored)."""
        if not math.isfinite(value) or value < 0:
            return
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def state(self) -> HistogramState:
        """The cumulative counts now."""
        running, buckets = 0, []
        for bound, n in zip((*self.bounds, math.inf), self._counts, strict=True):
            running += n
            buckets.append((bound, running))
        return HistogramState(tuple(buckets), self._sum, running)


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a round's metrics (at most ``MAX_METRICS``, by name)."""
    out: dict[str, float] = {}
    for key in sorted(metrics):
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[str(key)] = float(value)
        if len(out) >= MAX_METRICS:
            break
    return out


def eta_seconds(seconds: Iterable[float], rounds_left: int, elapsed: float) -> float | None:
    """Time to the last round: the mean of recent round durations times the rounds left.

    ``elapsed`` is the time already spent in the current round. None when no
    round has been timed yet.
    """
    recent = list(seconds)[-10:]
    if not recent:
        return None
    if rounds_left <= 0:
        return 0.0
    return max(0.0, sum(recent) / len(recent) * rounds_left - elapsed)


def group_view(m: Maintainer, *, quorum: int, top_peers: int = 0) -> dict[str, Any]:
    """One federated group as this node sees it: peers, progress and counters.

    ``top_peers`` > 0 adds the peers with most traffic (an aggregator's
    per-peer view, bounded so that a huge group stays cheap to export).
    """
    pipes = m.all_pipes()
    online = sum(not p.is_offline for p in pipes)
    view: dict[str, Any] = {
        "group": m.fed_props.aggregator_name,
        "role": m.role,
        "peers": len(pipes),
        "online": online,
        "quorum": quorum,
        "uploads": len(m.meta_list) if m.aggregator else 0,
        "expected": len(m.fed_props.collaborators) if m.aggregator else 0,
        "stats": m.stats,
    }
    if top_peers > 0 and m.aggregator:
        now = time.monotonic()
        busiest = heapq.nlargest(top_peers, pipes, key=lambda p: p.bytes_in + p.bytes_out)
        view["top_peers"] = [
            {
                "peer": p.nick_name,
                "online": not p.is_offline,
                "bytes_in": p.bytes_in,
                "bytes_out": p.bytes_out,
                "last_seen_seconds": None if p.last_seen is None else now - p.last_seen,
            }
            for p in busiest
        ]
    return view
