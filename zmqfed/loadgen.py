"""``Crowd``: thousands of collaborators in one process, for load tests and simulations.

Every collaborator of a crowd is a real :class:`~zmqfed.core.Maintainer`
with its own DEALER, driven by the same protocol code as a daemon's
(:meth:`Maintainer.step_cycle`); what the crowd saves is everything around
it:

* no thread per collaborator: one :class:`~zmqfed.federated.Multiplexer`
  resumes each collaborator's step when its socket has news;
* one socket per collaborator instead of three (``link_monitor=False``:
  no socket monitor; docs/zeromq.md §26 says what liveness that costs);
* one model for all: every collaborator uploads the same tensors, drops
  each download once it has been checked, and shares the roster and limits;
* the process's descriptor limit and the Context's socket limit raised
  (:func:`zmqfed.federated.sockets.raise_fd_limit`).

Training is simulated: ``think`` seconds of waiting between download and
upload (without holding the thread).  ``tools/loadgen/run.py`` starts an
aggregator and crowds in separate processes and measures them.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from zmqfed.address import Address
from zmqfed.api import is_last_round
from zmqfed.core import Maintainer
from zmqfed.errors import AggregatorRewound, PeerOffline, RemoteError
from zmqfed.federated.collaborator_link import Cycle
from zmqfed.federated.multiplex import Gate, Multiplexer, sleep_cycle
from zmqfed.federated.protocol import CONTRIBUTED, ErrorCode, meta_version
from zmqfed.federated.sockets import SocketOptions, raise_fd_limit
from zmqfed.props import COLLABORATOR, FederatedProperties
from zmqfed.wire import Limits

__all__ = ["CROWD_SOCKET_OPTIONS", "Crowd", "CrowdReport", "process_usage"]

log = logging.getLogger(__name__)

#: A crowd's link settings (see ``Crowd``).
CROWD_SOCKET_OPTIONS = SocketOptions(
    heartbeat_ivl_ms=10_000, heartbeat_timeout_ms=30_000, handshake_ivl_ms=30_000
)


@dataclass
class CrowdReport:
    """What a crowd did and what it cost its process."""

    collaborators: int
    #: Downloads answered, summed over the collaborators.
    rounds: int = 0
    #: Collaborators whose life ended with an error, and a few of the errors.
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: Seconds from the start until every collaborator's first download.
    first_download: float = 0.0
    resumes: int = 0
    usage: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return asdict(self)


def process_usage() -> dict[str, float]:
    """This process's RSS and peak RSS (MiB), open descriptors and CPU seconds (Linux)."""
    out: dict[str, float] = {"cpu_s": time.process_time()}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss_mib" if line.startswith("VmRSS") else "peak_rss_mib"
                    out[key] = int(line.split()[1]) / 1024
        out["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        pass
    return out


class Crowd:
    """Many collaborators of one star group, in this process.

    Parameters
    ----------
    endpoint:
        The aggregator's endpoint.
    names:
        This crowd's collaborators (nick names); each is a member of ``roster``.
    roster:
        Every collaborator of the group (the topology's): both ends hash it
        into the group fingerprint.
    model:
        The state dict every collaborator uploads (shared, never modified).
    aggregator:
        The aggregator's nick name.
    rounds:
        Downloads each collaborator answers; ``None``: until the aggregator
        says the federation is over (or its ``rounds`` meta says so).
    think:
        Seconds of simulated training between download and upload; each
        collaborator draws from ``[think, think * (1 + spread)]``.
    timeout:
        Bound on each step of each collaborator.
    seed:
        Seeds the simulated training times.
    socket_options:
        Default: heartbeats every 10 s with a 30 s timeout and 30 s for a
        handshake (a daemon's are 2 s, 10 s, 10 s): ten thousand links
        cost an aggregator 5,000 heartbeats a second at 2 s, and a
        starved I/O thread then fails handshakes that would have succeeded.
    inflight:
        At most this many downloads and this many uploads of the crowd in
        flight at once (``None``: no bound).  All collaborators of a crowd
        asking at once would otherwise have every model in flight in this
        process and the aggregator's receive queues at the same time.
    """

    def __init__(
        self,
        endpoint: str,
        names: Sequence[str],
        roster: Sequence[str],
        model: Mapping[str, Tensor],
        *,
        aggregator: str = "aggregator",
        rounds: int | None = None,
        think: float = 0.0,
        spread: float = 0.0,
        timeout: float | None = 600.0,
        seed: int = 0,
        socket_options: SocketOptions | None = None,
        inflight: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.names = list(names)
        self.roster = tuple(sorted(roster))
        self.model = dict(model)
        self.aggregator = aggregator
        self.rounds = rounds
        self.think = think
        self.spread = spread
        self.timeout = timeout
        self.rng = random.Random(seed)
        self.socket_options = socket_options or CROWD_SOCKET_OPTIONS
        self.inflight = inflight
        self._downloads: Gate | None = None
        self._uploads: Gate | None = None
        self.maintainers: list[Maintainer] = []
        self.report = CrowdReport(collaborators=len(self.names))
        self._first: set[str] = set()
        self._start = 0.0

    def connect(self) -> None:
        """Make every collaborator's Maintainer (its DEALER connects now)."""
        raise_fd_limit()
        limits = Limits.for_model(self.model)
        address = Address(self.endpoint)
        for name in self.names:
            props = FederatedProperties(COLLABORATOR, name, address, self.aggregator, self.roster)
            m = Maintainer(
                props,
                self.model,
                limits=limits,
                timeout=self.timeout,
                socket_options=self.socket_options,
                link_monitor=False,
            )
            self.maintainers.append(m)

    def run(self, timeout: float | None = None) -> CrowdReport:
        """Run every collaborator until it is done; returns the report."""
        if not self.maintainers:
            self.connect()
        mux = Multiplexer(max_wait_ms=5000)
        if self.inflight is not None:
            self._downloads = Gate(mux, self.inflight)
            self._uploads = Gate(mux, self.inflight)
        self._start = time.monotonic()
        for m in self.maintainers:
            mux.spawn(self._life(m), m.port, self._done)
        finished = mux.run(timeout=timeout)
        if not finished:
            self.report.errors.append(f"{mux.running} collaborators still running at the timeout")
            self.report.failed += mux.running
        mux.close()
        self.report.seconds = time.monotonic() - self._start
        self.report.resumes = mux.resumes
        self.report.usage = process_usage()
        return self.report

    def close(self) -> None:
        """Close every collaborator (BYE where welcomed)."""
        for m in self.maintainers:
            m.close()
        self.maintainers.clear()

    def _done(self, answered: Any, error: BaseException | None) -> None:
        if error is not None:
            self.report.failed += 1
            if len(self.report.errors) < 5:
                self.report.errors.append(repr(error))
            return
        self.report.rounds += int(answered)

    def _life(self, m: Maintainer) -> Cycle[int]:
        """One collaborator's rounds, as :func:`zmqfed.api.run_collaborator` runs them."""
        wanted = answered = 0
        think = self.think * (1 + self.spread * self.rng.random())
        while self.rounds is None or answered < self.rounds:
            m.update_version(wanted)
            if self._downloads is not None:
                yield from self._downloads.acquire()
            try:
                yield from m.step_cycle(upload=False)
            except PeerOffline:
                break
            except AggregatorRewound as exc:
                wanted = exc.version
                continue
            finally:
                if self._downloads is not None:
                    self._downloads.release()
            meta = m.meta
            m.data = {}  # checked on arrival; a crowd keeps no downloads
            if m.nick_name not in self._first:
                self._first.add(m.nick_name)
                if len(self._first) == len(self.names):
                    self.report.first_download = time.monotonic() - self._start
            served = meta_version(meta)
            served = served if served >= 0 else wanted
            wanted = served + 1
            answered += 1
            if meta.get(CONTRIBUTED) is not True:
                if think > 0:
                    yield from sleep_cycle(think)
                m.update_version(served + 1)
                m.meta["instances"] = 1
                m.meta["mode"] = str(meta.get("mode", "train"))
                m.package()
                if self._uploads is not None:
                    yield from self._uploads.acquire()
                try:
                    yield from m.step_cycle(download=False)
                except RemoteError as exc:
                    if exc.code not in (ErrorCode.DISCARDED, ErrorCode.ALREADY_COUNTED):
                        raise
                except PeerOffline:
                    break
                finally:
                    if self._uploads is not None:
                        self._uploads.release()
            if is_last_round(meta):
                break
        return answered
