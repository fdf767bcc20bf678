"""Chunked streaming of large messages under byte credit: the socket-free part.

A message whose tensors are too large for one multipart message (more raw
bytes than ``StreamConfig.threshold``, or a tensor above the peer's
``max_frame_bytes``) is *announced* instead: a PUSH or DATA header that lists
the tensors as usual and carries ``"stream": {"id", "chunk"}``, with no tensor
frames.  The receiver preallocates every tensor (bounded by
``max_message_bytes``, like any decode) and grants credit in bytes with CREDIT
messages; the sender never has more than the granted bytes in flight and sends
CHUNK messages ``[header, payload]`` whose payload is the byte range
``[offset, offset + nbytes)`` of the tensors' concatenated raw bytes, in order.
The receiver lands each payload in the tensors' own storage with
``Socket.recv_into`` (docs/zeromq.md §15-16), so neither side ever holds
more than the model plus the window, and no frame is larger than a chunk.

Streams carry the ``raw`` codec only: compression pays on slow links and
sparse updates (docs/zeromq.md §17), which are not the multi-GiB case.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.wire.header import MAGIC, MAX_STREAM_ID_CHARS, PROTOCOL_VERSION
from zmqfed.wire.limits import Limits

__all__ = [
    "CHUNK_PREFIX",
    "DEFAULT_STREAM",
    "MAX_STREAM_ID_CHARS",
    "ChunkLayout",
    "StreamConfig",
    "chunk_meta",
    "credit_meta",
    "parse_chunk_meta",
    "parse_credit_meta",
]

MiB = 2**20

#: Every CHUNK header starts with these bytes (``encode`` writes ``kind`` first),
#: which lets a receiver route chunks to ``recv_into`` without parsing JSON first.
CHUNK_PREFIX = MAGIC + bytes([PROTOCOL_VERSION]) + b'{"kind":"CHUNK"'


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """When to stream, and how much a receiver lets be in flight.

    Parameters
    ----------
    threshold : int
        Messages with more raw tensor bytes than this are streamed; smaller
        ones go as one multipart message (faster: no credit round trips).
    tensor_threshold : int
        Messages with the ``raw`` codec and a tensor of more bytes than this
        are streamed too.  A frame above glibc's 32 MiB mmap threshold is a
        fresh mapping whose pages fault in on every receive, and a multipart
        message reaches the receiver only once all of it arrived; chunks are
        separate messages, each landed in its tensor while the next one is on
        the wire (docs/performance-notes.md).
    chunk_bytes : int
        Payload bytes per CHUNK message (docs/zeromq.md §16: a few MiB).
    window_bytes : int
        Credit a receiver grants one stream: the bytes in flight, and so the
        memory beyond the model each side needs for it.  At least two chunks
        keep the link busy; a smaller window (down to one chunk) works, one
        chunk per credit round trip.
    receive_budget : int
        An aggregator allocates streamed uploads up to this many bytes at a
        time across all peers; more uploaders wait for credit (one stream is
        always admitted, so a model above the budget still gets through).

    Raises
    ------
    ConfigError
        A value is not a positive int, or ``chunk_bytes > window_bytes``.
    """

    threshold: int = 1024 * MiB
    tensor_threshold: int = 16 * MiB
    chunk_bytes: int = 8 * MiB
    window_bytes: int = 64 * MiB
    receive_budget: int = 2048 * MiB

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 2**62:
                raise ConfigError(f"StreamConfig.{f.name} must be a positive int, got {value!r}")
        if self.chunk_bytes > self.window_bytes:
            raise ConfigError(
                f"StreamConfig.chunk_bytes ({self.chunk_bytes}) must not exceed "
                f"window_bytes ({self.window_bytes}): a chunk could never be sent"
            )

    def chunk_within(self, limits: Limits) -> int:
        """Payload bytes per CHUNK for a receiver with ``limits``: the setting, within its frames."""
        return min(self.chunk_bytes, limits.max_frame_bytes)

    def should_stream(
        self, tensors: Mapping[str, Mapping[str, Any]], limits: Limits, codec: str = "raw"
    ) -> bool:
        """Whether a message with ``tensors`` must be streamed rather than sent whole.

        True when its raw bytes exceed ``threshold``, when one tensor would
        not fit the receiver's ``max_frame_bytes`` in a single frame, or, with
        the ``raw`` codec, when a tensor is above ``tensor_threshold``.
        """
        total = 0
        seen: set[int] = set()
        for fields_ in tensors.values():
            for t in fields_.values():
                n = t.numel() * t.element_size()
                if n > limits.max_frame_bytes or (codec == "raw" and n > self.tensor_threshold):
                    return True
                if id(t) not in seen:  # tied names are sent once
                    seen.add(id(t))
                    total += n
        return total > self.threshold


#: The stream settings used when none are given.
DEFAULT_STREAM = StreamConfig()


class ChunkLayout:
    """Where each tensor's bytes lie in a streamed message's concatenated raw bytes.

    Parameters
    ----------
    sizes : sequence of int
        Raw byte length of each tensor, in header order.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = tuple(int(s) for s in sizes)
        self.starts: list[int] = []
        total = 0
        for s in self.sizes:
            self.starts.append(total)
            total += s
        #: All the stream's bytes.
        self.total = total

    def pieces(self, offset: int, nbytes: int) -> list[tuple[int, int, int]]:
        """``(tensor index, start within tensor, length)`` covering ``[offset, offset+nbytes)``."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.total:
            raise ProtocolError(
                f"chunk [{offset}, {offset + nbytes}) lies outside the stream's {self.total} bytes"
            )
        out: list[tuple[int, int, int]] = []
        i = bisect.bisect_right(self.starts, offset) - 1
        end = offset + nbytes
        pos = offset
        while pos < end:
            while self.sizes[i] == 0 or pos >= self.starts[i] + self.sizes[i]:
                i += 1
            start = pos - self.starts[i]
            length = min(self.sizes[i] - start, end - pos)
            out.append((i, start, length))
            pos += length
        return out

    def plan(self, chunk_bytes: int) -> Iterator[tuple[int, int]]:
        """``(offset, nbytes)`` of each chunk, in order.

        Tensors of at least ``chunk_bytes`` are cut into chunks of their own,
        so most payloads land in (or come from) one tensor without a copy;
        runs of smaller tensors are packed together up to ``chunk_bytes``.
        """
        if chunk_bytes <= 0:
            raise ConfigError(f"chunk_bytes must be positive, got {chunk_bytes}")
        pending_start, pending = 0, 0
        for start, size in zip(self.starts, self.sizes, strict=True):
            if size >= chunk_bytes:
                if pending:
                    yield pending_start, pending
                    pending = 0
                for off in range(0, size, chunk_bytes):
                    yield start + off, min(chunk_bytes, size - off)
                continue
            if pending and pending + size > chunk_bytes:
                yield pending_start, pending
                pending = 0
            if not pending:
                pending_start = start
            pending += size
        if pending:
            yield pending_start, pending


def _stream_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_STREAM_ID_CHARS:
        raise ProtocolError(f"{what}: stream id must be a str of 1-{MAX_STREAM_ID_CHARS} chars")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**62:
        raise ProtocolError(f"{what} must be an int in [0, 2**62], got {json.dumps(value)[:40]}")
    return value


def chunk_meta(stream_id: str, offset: int, nbytes: int) -> dict[str, Any]:
    """The meta of a CHUNK message."""
    return {"stream": stream_id, "offset": offset, "nbytes": nbytes}


def parse_chunk_meta(meta: dict[str, Any]) -> tuple[str, int, int]:
    """``(stream id, offset, nbytes)`` of a CHUNK; ``ProtocolError`` if malformed."""
    if set(meta) != {"stream", "offset", "nbytes"}:
        raise ProtocolError(f"CHUNK meta must hold stream, offset and nbytes, got {sorted(meta)}")
    return (
        _stream_id(meta["stream"], "CHUNK"),
        _count(meta["offset"], "CHUNK offset"),
        _count(meta["nbytes"], "CHUNK nbytes"),
    )


def credit_meta(stream_id: str, nbytes: int) -> dict[str, Any]:
    """The meta of a CREDIT message: ``nbytes`` more may be sent."""
    return {"stream": stream_id, "bytes": nbytes}


def parse_credit_meta(meta: dict[str, Any]) -> tuple[str, int]:
    """``(stream id, bytes)`` of a CREDIT; ``ProtocolError`` if malformed."""
    if set(meta) != {"stream", "bytes"}:
        raise ProtocolError(f"CREDIT meta must hold stream and bytes, got {sorted(meta)}")
    return _stream_id(meta["stream"], "CREDIT"), _count(meta["bytes"], "CREDIT bytes")
