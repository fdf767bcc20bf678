"""What an aggregator's transport reports and counts: peer events, statistics, refusal logs."""

from __future__ import annotations

import enum
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zmqfed.federated.protocol import ErrorCode

if TYPE_CHECKING:
    from zmqfed.federated.pipe import AggregatorPipe

__all__ = ["PeerEvent", "PeerEventKind", "RefusalLog", "TransportStats"]

#: Seconds between log lines about refused messages of one kind.
REFUSAL_LOG_INTERVAL = 10.0
#: Characters of a refusal's text that reach the log (it may echo what a peer chose).
REFUSAL_LOG_CHARS = 300


class PeerEventKind(enum.Enum):
    """What happened to a peer."""

    JOINED = "joined"  # said HELLO in this incarnation
    REQUEST = "request"  # an upload or a download request is now pending
    LEFT = "left"  # said BYE, or cannot be reached any more


@dataclass(frozen=True)
class PeerEvent:
    """One thing the transport reports to the step loop."""

    kind: PeerEventKind
    pipe: AggregatorPipe


@dataclass
class TransportStats:
    """Counters of one transport (all monotonic)."""

    messages_in: int = 0
    errors: int = 0  # ERROR replies sent
    parked: int = 0  # requests answered with WAIT
    chunks_in: int = 0
    chunks_out: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # by error code
    joins: int = 0  # peers that said HELLO while offline
    departures: int = 0  # peers that left (BYE, or unreachable)
    #: Uploads by outcome: accepted, duplicate (a retry ACKed again), or why refused.
    uploads: dict[str, int] = field(default_factory=dict)

    def count_refusal(self, code: ErrorCode) -> None:
        self.errors += 1
        self.refused[code.value] = self.refused.get(code.value, 0) + 1

    def count_upload(self, outcome: str) -> None:
        self.uploads[outcome] = self.uploads.get(outcome, 0) + 1


class RefusalLog:
    """Logs refused messages, at most once per ``REFUSAL_LOG_INTERVAL`` for each code.

    A flooding peer would otherwise turn into a log flood: the others of an
    interval are counted and reported with the next line.  A refusal's text
    may echo what the peer sent (names, reasons): it is cut to
    ``REFUSAL_LOG_CHARS`` and control characters are escaped, so one line
    stays one short line.
    """

    def __init__(self, logger: logging.Logger, prefix: str) -> None:
        self._log = logger
        self._prefix = prefix
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, code: ErrorCode | str, message: str) -> None:
        key = code.value if isinstance(code, ErrorCode) else str(code)
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self._last[key] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more {key} refusals since the last report)" if suppressed else ""
        self._log.warning("%s: %s%s", self._prefix, _printable(message), more)
        self._last[key] = (now, 0)


def _printable(text: str) -> str:
    """``text`` on one line of at most ``REFUSAL_LOG_CHARS`` characters."""
    if len(text) > REFUSAL_LOG_CHARS:
        text = f"{text[:REFUSAL_LOG_CHARS]}... ({len(text)} characters)"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
