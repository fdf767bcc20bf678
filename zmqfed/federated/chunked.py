"""Chunked transfers: the two ends of one stream of a large message.

The wire side (announce header, CHUNK/CREDIT meta, chunk layout) lives in
:mod:`zmqfed.wire.stream`.  Here :class:`OutStream` sends a message's raw
tensor bytes as CHUNK messages while the receiver's credit lasts, zero-copy
from the tensors' own memory; :class:`InStream` preallocates the tensors (or
borrows the receiver's own, see ``destination``) and says where each payload
lands.  Reading and sending on a port is :mod:`zmqfed.federated.protocol`'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from zmqfed.errors import ProtocolError
from zmqfed.federated.ports import Tracker, WouldBlock
from zmqfed.federated.protocol import stamp
from zmqfed.wire import ChunkLayout, EncodedTensors, Envelope, Kind, encode
from zmqfed.wire.codec import tensor_bytes
from zmqfed.wire.header import DTYPES, TensorDesc
from zmqfed.wire.stream import chunk_meta
from zmqfed.wire.tensors import apply_tied

__all__ = [
    "HUGE_PAGE_BYTES",
    "ChunkSender",
    "Destination",
    "InStream",
    "OutStream",
    "fresh_tensor",
    "new_stream_id",
]

log = logging.getLogger(__name__)

#: ``destination(desc)`` may return a tensor of the descriptor's dtype and
#: shape to receive into (e.g. the receiver's own parameter), or None.
Destination = Callable[[TensorDesc], "torch.Tensor | None"]
#: Sends one CHUNK message's frames; returns a tracker for zero-copy frames,
#: None when the frames were copied, or raises ``WouldBlock`` at the HWM.
ChunkSender = Callable[[list[Any]], "Tracker | None"]


#: Fresh receive tensors from this size on are backed by transparent huge pages.
HUGE_PAGE_BYTES = 4 * 2**20


def fresh_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor to receive into, cheap to fault in when it is large.

    A fresh tensor's pages fault in on first write, 4 KiB at a time, which
    costs more than receiving the bytes (docs/performance-notes.md). From
    ``HUGE_PAGE_BYTES`` on, the memory is an anonymous mapping advised to use
    transparent huge pages (2 MiB per fault; measured 6 GB/s against 2 GB/s
    for filling a fresh ``torch.empty``); the tensor keeps the mapping alive.
    Where huge pages are unavailable the advice is ignored.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    with warnings.catch_warnings():  # the mapping is writable; torch warns for read-only ones
        warnings.simplefilter("ignore")
        flat = torch.frombuffer(mapping, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def new_stream_id() -> str:
    """A fresh random stream id."""
    return uuid.uuid4().hex


def _byte_view(buf: Any) -> memoryview:
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8).data
    return memoryview(buf).cast("B")


class OutStream:
    """The sending side of one stream: chunks go out while credit lasts.

    Parameters
    ----------
    stream_id : str
        Named by every CHUNK and CREDIT of this stream.
    seq : int
        The request the stream answers (or is), copied into every CHUNK.
    encoded : EncodedTensors
        Raw frames from ``encode_tensors(..., codec='raw', streamed=True)``.
        They alias the caller's tensors: do not mutate those until
        :meth:`wait_sent` returned.
    chunk_bytes : int
        Largest payload per CHUNK.
    sender, incarnation : str
        Header fields of the CHUNK messages.
    """

    def __init__(
        self,
        stream_id: str,
        seq: int,
        encoded: EncodedTensors,
        chunk_bytes: int,
        *,
        sender: str,
        incarnation: str,
        version: int = 0,
    ) -> None:
        self.id = stream_id
        self.seq = seq
        self.chunk_bytes = chunk_bytes
        self.sender = sender
        self.incarnation = incarnation
        self.version = version
        self._views = [_byte_view(b) for b in encoded.buffers]
        self._layout = ChunkLayout([int(d["rawbytes"]) for d in encoded.descriptors])
        self._plan = self._layout.plan(chunk_bytes)
        self._next = next(self._plan, None)
        self.total = self._layout.total
        self.credit = 0
        self.sent = 0
        self._trackers: list[Tracker] = []

    @property
    def done(self) -> bool:
        """Every chunk was handed to the socket."""
        return self._next is None

    @property
    def ready(self) -> bool:
        """The next chunk fits the credit: :meth:`pump` would send something."""
        return self._next is not None and self._next[1] <= self.credit

    def grant(self, nbytes: int) -> None:
        """The receiver allows ``nbytes`` more in flight."""
        self.credit += nbytes

    def _payload(self, offset: int, nbytes: int) -> Any:
        pieces = self._layout.pieces(offset, nbytes)
        if len(pieces) == 1:
            i, start, length = pieces[0]
            return self._views[i][start : start + length]  # zero-copy slice
        return b"".join(self._views[i][s : s + n] for i, s, n in pieces)  # small tensors packed

    def pump(self, send: ChunkSender) -> int:
        """Send chunks while credit allows; returns how many were sent."""
        sent = 0
        self._trackers = [t for t in self._trackers if not t.done]
        while self.ready:
            assert self._next is not None
            offset, nbytes = self._next
            header = encode(
                stamp(
                    Kind.CHUNK,
                    self.sender,
                    seq=self.seq,
                    incarnation=self.incarnation,
                    version=self.version,
                    meta=chunk_meta(self.id, offset, nbytes),
                )
            )[0]
            try:
                tracker = send([header, self._payload(offset, nbytes)])
            except WouldBlock:
                break  # at the high-water mark: pumped again on the next credit or poll
            if tracker is not None:
                self._trackers.append(tracker)
            self.credit -= nbytes
            self.sent += nbytes
            sent += 1
            self._next = next(self._plan, None)
        return sent

    def wait_sent(self, timeout: float) -> bool:
        """Block until libzmq released every zero-copy payload (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        for tracker in self._trackers:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not tracker.wait(left):
                return False
        self._trackers.clear()
        return True


class InStream:
    """The receiving side of one stream: preallocated tensors filled chunk by chunk.

    Parameters
    ----------
    env : Envelope
        The announced PUSH or DATA (``env.stream`` set).
    window : int
        Bytes of credit kept outstanding.
    destination : callable, optional
        Returns a contiguous tensor of the descriptor's dtype and shape to
        receive into, or None for a fresh one.
    """

    def __init__(self, env: Envelope, window: int, destination: Destination | None = None) -> None:
        assert env.stream is not None
        self.env = env
        self.id = env.stream.id
        self.chunk = env.stream.chunk
        self.window = max(window, self.chunk)
        descs = env.stream.tensors
        self._layout = ChunkLayout([d.rawbytes for d in descs])
        self.total = self._layout.total
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._views: list[memoryview] = []
        for desc in descs:
            t = self._allocate(desc, destination)
            self.tensors.setdefault(desc.key, {})[desc.field] = t
            self._views.append(tensor_bytes(t).data)  # a view: t is contiguous CPU
        self.received = 0
        self.granted = 0
        #: ``time.monotonic()`` of the stream's last progress (admission, a chunk).
        self.touched = time.monotonic()
        self._scratch: bytearray | None = None
        #: Why the stream cannot be completed (a peer broke the protocol), or "".
        self.broken = ""

    def _allocate(self, desc: TensorDesc, destination: Destination | None) -> torch.Tensor:
        dtype = DTYPES[desc.dtype]
        if destination is not None:
            t = destination(desc)
            if (
                t is not None
                and t.dtype == dtype
                and tuple(t.shape) == desc.shape
                and t.is_contiguous()
                and t.device.type == "cpu"
            ):
                return t.detach()
        return fresh_tensor(desc.shape, dtype)

    @property
    def done(self) -> bool:
        """Every byte arrived."""
        return self.received == self.total

    def credit(self) -> int:
        """Bytes to grant now so that ``window`` stays outstanding (0: nothing to send).

        Grants come in chunk-sized steps at least (one CREDIT per chunk, not
        per landed byte), except when fewer than a chunk's bytes are
        outstanding: the sender may then be unable to send its next chunk
        (at most ``chunk`` bytes), and waiting for a whole chunk's worth of
        room would stall both ends (a small tensor packed into a chunk of its
        own with a window below two chunks did; docs/protocol.md §6).
        """
        outstanding = self.granted - self.received
        want = min(self.window, self.total - self.received) - outstanding
        if want <= 0:
            return 0
        if want < self.chunk and outstanding >= self.chunk and self.granted + want < self.total:
            return 0  # the sender can still send a whole chunk: batch this grant
        self.granted += want
        return want

    def target(self, offset: int, nbytes: int) -> memoryview:
        """Where the payload of CHUNK ``(offset, nbytes)`` must land; checks it first."""
        if offset != self.received:
            raise ProtocolError(f"stream {self.id}: chunk at {offset}, expected {self.received}")
        if not 0 < nbytes <= self.chunk:
            raise ProtocolError(
                f"stream {self.id}: chunk of {nbytes} bytes, announced at most {self.chunk}"
            )
        if offset + nbytes > self.granted:
            raise ProtocolError(
                f"stream {self.id}: chunk ends at {offset + nbytes}, beyond the "
                f"{self.granted} bytes of credit granted"
            )
        pieces = self._layout.pieces(offset, nbytes)
        if len(pieces) == 1:
            i, start, length = pieces[0]
            return self._views[i][start : start + length]
        if self._scratch is None or len(self._scratch) < nbytes:
            self._scratch = bytearray(self.chunk)
        return memoryview(self._scratch)[:nbytes]

    def landed(self, offset: int, nbytes: int) -> None:
        """The payload of CHUNK ``(offset, nbytes)`` is in its :meth:`target`."""
        pieces = self._layout.pieces(offset, nbytes)
        if len(pieces) > 1:
            assert self._scratch is not None
            pos = 0
            for i, start, length in pieces:
                self._views[i][start : start + length] = self._scratch[pos : pos + length]
                pos += length
        self.received += nbytes
        self.touched = time.monotonic()

    def envelope(self) -> Envelope:
        """The announced message with its tensors, once :attr:`done`."""
        env = self.env
        return Envelope(
            kind=env.kind,
            sender=env.sender,
            version=env.version,
            seq=env.seq,
            incarnation=env.incarnation,
            meta=env.meta,
            tensors=apply_tied(dict(self.tensors), env.stream.tied if env.stream else ()),
        )
