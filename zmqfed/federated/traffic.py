"""``Traffic``: messages and bytes a transport sent and received, by message kind.

Both transports keep one and count each message where it is sent or read:
one dict increment per message, no lock (the loop thread owns it; others
read copies published by the loop, see ``docs/operations.md``).  Bytes are
the frames' lengths on the wire as zmqfed encoded them (header plus tensor
frames; a chunk of a streamed message counts its payload only), without
ZeroMQ's own framing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["Traffic", "frames_nbytes"]


def frames_nbytes(frames: Iterable[Any]) -> int:
    """Total length in bytes of ``frames`` (bytes, buffers or received frames)."""
    total = 0
    for frame in frames:
        buffer = getattr(frame, "buffer", frame)  # a received frame exposes .buffer
        total += memoryview(buffer).nbytes
    return total


class Traffic:
    """Message and byte counts by kind, in both directions (all monotonic)."""

    __slots__ = ("bytes_received", "bytes_sent", "messages_received", "messages_sent")

    def __init__(self) -> None:
        self.messages_received: dict[str, int] = {}
        self.bytes_received: dict[str, int] = {}
        self.messages_sent: dict[str, int] = {}
        self.bytes_sent: dict[str, int] = {}

    def received(self, kind: str, nbytes: int, messages: int = 1) -> None:
        """Count ``messages`` of ``kind`` with ``nbytes`` in all, read from the peer(s)."""
        self.messages_received[kind] = self.messages_received.get(kind, 0) + messages
        self.bytes_received[kind] = self.bytes_received.get(kind, 0) + nbytes

    def sent(self, kind: str, nbytes: int, messages: int = 1) -> None:
        """Count ``messages`` of ``kind`` with ``nbytes`` in all, handed to the port."""
        self.messages_sent[kind] = self.messages_sent.get(kind, 0) + messages
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + nbytes

    def as_dict(self) -> dict[str, dict[str, int]]:
        """Copies of the four counters, for a snapshot."""
        return {
            "messages_received": dict(self.messages_received),
            "bytes_received": dict(self.bytes_received),
            "messages_sent": dict(self.messages_sent),
            "bytes_sent": dict(self.bytes_sent),
        }
