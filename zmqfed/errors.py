"""The zmqfed exception tree.

::

    ZmqfedError
    ├── ConfigError          a setting or argument is invalid
    ├── TopologyError        a topology graph is invalid (names the node/edge)
    ├── ProtocolError        a message violates the wire protocol (names the field)
    ├── SecurityError        authentication or authorization failed
    └── PipeError            talking to a peer failed
        ├── AggregatorRewound  the aggregator restarted behind the version asked for
        ├── PeerTimeout      a peer did not answer in time (names peer and wait)
        ├── PeerOffline      a peer left or cannot be reached
        └── RemoteError      the peer answered with an ERROR message

Lower-library errors (pyzmq, lz4, json) are translated at the boundary with
``raise ... from exc`` so callers only need to catch ``ZmqfedError``.
"""

from __future__ import annotations

__all__ = [
    "AggregatorRewound",
    "ConfigError",
    "PeerOffline",
    "PeerTimeout",
    "PipeError",
    "ProtocolError",
    "RemoteError",
    "SecurityError",
    "TopologyError",
    "ZmqfedError",
]


class ZmqfedError(Exception):
    """Base class of every error raised by zmqfed."""


class ConfigError(ZmqfedError, ValueError):
    """A setting or argument is invalid."""


class TopologyError(ZmqfedError, ValueError):
    """A topology is invalid; the message names the node or edge."""


class ProtocolError(ZmqfedError):
    """A message violates the wire protocol; the message names what was wrong."""


class SecurityError(ZmqfedError):
    """Authentication or authorization failed."""


class PipeError(ZmqfedError):
    """Communication with a peer failed."""


class PeerTimeout(PipeError, TimeoutError):
    """A peer did not answer within the allowed time."""

    def __init__(self, peer: str, seconds: float, what: str = "answer") -> None:
        self.peer = peer
        self.seconds = seconds
        self.what = what
        super().__init__(f"peer {peer!r} did not {what} within {seconds:.1f} s")


class AggregatorRewound(PipeError):
    """The aggregator restarted from a checkpoint older than the version asked for.

    The collaborator should download ``version`` and redo that round.
    """

    def __init__(self, peer: str, version: int, wanted: int) -> None:
        self.peer = peer
        self.version = version
        self.wanted = wanted
        super().__init__(
            f"aggregator {peer!r} restarted at version {version}; version {wanted} was asked for"
        )


class PeerOffline(PipeError):
    """A peer left the group or cannot be reached."""


class RemoteError(PipeError):
    """The peer answered a request with an ERROR message."""

    def __init__(self, peer: str, code: str, reason: str) -> None:
        self.peer = peer
        self.code = code
        self.reason = reason
        super().__init__(f"peer {peer!r} refused the request ({code}): {reason}")
