"""The status document on disk, and the health verdict a monitoring check acts on.

A node writes ``NAME.status.json`` atomically (a temporary file, then
``os.replace``) after every round, on every change of state, and every
``heartbeat_interval`` seconds from a heartbeat thread, so a file that stops
changing means a node that stopped running.  :func:`health` turns a document
into one of five verdicts, each with its exit code:

======= ============ =====================================================
code    verdict      meaning
======= ============ =====================================================
0       ``running``  starting or running, heartbeat fresh
10      ``finished`` ran all its rounds
11      ``stopped``  stopped before the end (SIGTERM, SIGINT)
12      ``failed``   stopped by an error (``failure`` says which)
13      ``stale``    says running, but the heartbeat is older than allowed,
                     or its process is gone (same host)
======= ============ =====================================================

The codes avoid those of :mod:`zmqfed.cli.exitcodes` (0-4, 130); several
nodes together take the worst (highest) code.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zmqfed.errors import ConfigError

__all__ = [
    "FAILED",
    "FINISHED",
    "HEALTH_CODES",
    "RUNNING",
    "STALE",
    "STOPPED",
    "StatusFile",
    "health",
    "read_status",
    "to_json",
]

RUNNING = 0
FINISHED = 10
STOPPED = 11
FAILED = 12
STALE = 13
#: Verdict -> exit code.
HEALTH_CODES = {
    "running": RUNNING,
    "finished": FINISHED,
    "stopped": STOPPED,
    "failed": FAILED,
    "stale": STALE,
}
#: Largest status file read (a status document is a few kB, or MB for huge groups).
MAX_STATUS_BYTES = 64 * 1024 * 1024
#: Fields every status document has (older zmqfed versions wrote these).
REQUIRED = ("node", "state", "round", "rounds", "updated")


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN).

    Numbers of other types (numpy's, say) become Python ints and floats.
    """
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def to_json(doc: Mapping[str, Any], indent: int | None = None) -> str:
    """``doc`` as strict JSON: NaN and infinities become null, unknown objects strings."""
    return json.dumps(_finite(doc), indent=indent, default=str, allow_nan=False)


class StatusFile:
    """Writes one node's status document atomically; safe to call from several threads.

    A document older (by its snapshot ``seq``) than the last one written is
    skipped, so a heartbeat that raced with a round's write never brings an
    older state back.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._last_seq = -1

    def write(self, status: Mapping[str, Any], seq: int) -> bool:
        """Write ``status`` (with ``updated`` set to now); False when a newer one is on disk."""
        with self._lock:
            if seq < self._last_seq:
                return False
            self._last_seq = seq
            doc = dict(status)
            doc["updated"] = time.time()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(to_json(doc, indent=1))
            os.replace(tmp, self.path)
            return True


def read_status(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a status document; ``ConfigError`` naming the file when it is not one."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_STATUS_BYTES:
        raise ConfigError(f"{path}: {size} bytes is too large for a status file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a status file (invalid JSON: {exc})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a status file (a JSON object was expected)")
    missing = [key for key in REQUIRED if key not in doc]
    if missing:
        raise ConfigError(f"{path}: not a status file (missing {', '.join(missing)})")
    if not isinstance(doc["updated"], int | float):
        raise ConfigError(f"{path}: 'updated' must be a time in seconds, got {doc['updated']!r}")
    return doc


def _process_gone(doc: Mapping[str, Any]) -> bool:
    """True when the document's process ran on this host and no longer exists."""
    pid = doc.get("pid")
    if doc.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: it exists
        return False
    return False


def health(
    doc: Mapping[str, Any], *, stale_after: float | None = None, now: float | None = None
) -> dict[str, Any]:
    """The verdict on a status document: ``{"status", "exit_code", "heartbeat_age"}``.

    ``stale_after`` defaults to three heartbeat intervals (at least 30 s).
    """
    now = time.time() if now is None else now
    age = max(0.0, now - float(doc["updated"]))
    if stale_after is None:
        interval = doc.get("heartbeat_interval")
        interval = float(interval) if isinstance(interval, int | float) else 10.0
        stale_after = max(30.0, 3 * interval)
    state = doc["state"]
    if state in ("finished", "stopped", "failed"):
        verdict = state
    elif age > stale_after or _process_gone(doc):
        verdict = "stale"
    else:
        verdict = "running"
    return {"status": verdict, "exit_code": HEALTH_CODES[verdict], "heartbeat_age": age}
