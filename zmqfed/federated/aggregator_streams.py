"""What an aggregator sends and receives in bulk: the served model and chunked streams.

:class:`ServedModel` encodes the model once per state and decides, per
peer, whether it goes as one message or in chunks.  :class:`StreamDesk`
runs the chunked streams of every peer: uploads are admitted within
``StreamConfig.receive_budget`` and granted credit as they land; downloads
are sent while the peer's credit lasts.  Both belong to one
:class:`~zmqfed.federated.aggregator_transport.AggregatorTransport`, which
is the only caller.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

import torch

from zmqfed.errors import ProtocolError
from zmqfed.federated.chunked import InStream, OutStream, new_stream_id
from zmqfed.federated.pipe import AggregatorPipe
from zmqfed.federated.ports import Unreachable
from zmqfed.federated.protocol import ErrorCode, land_chunk, pump
from zmqfed.wire import EncodedTensors, Envelope, Kind, Limits, StreamConfig, encode_tensors
from zmqfed.wire.stream import credit_meta

if TYPE_CHECKING:
    from zmqfed.federated.aggregator_transport import AggregatorTransport

__all__ = ["ServedModel", "StreamDesk"]

log = logging.getLogger(__name__)

#: Seconds an incoming stream may go without a chunk before it is dropped.
IN_STREAM_IDLE = 20.0

#: ``{tensor name: {field: tensor}}``, after the package hooks.
Packaged = Mapping[str, Mapping[str, torch.Tensor]]


class ServedModel:
    """The model served to every downloading peer, encoded once per state.

    Parameters
    ----------
    source:
        Returns what to serve (after the package hooks); called once per
        state, i.e. after each :meth:`changed`.
    """

    def __init__(
        self, source: Callable[[], Packaged], *, codec: str, limits: Limits, stream: StreamConfig
    ) -> None:
        self._source = source
        self.codec = codec
        self.limits = limits
        self.stream = stream
        self._data: Packaged | None = None
        # per subset of names (None: the whole model) and way of sending:
        # whole messages share one snapshot; streams send live views in chunks
        self._encoded: dict[tuple[frozenset[str] | None, bool], EncodedTensors] = {}
        #: Times the served model was encoded.
        self.encodes = 0

    def changed(self) -> None:
        """The served state changed: encode again on the next download."""
        self._data = None
        self._encoded.clear()

    def frames_for(
        self, peer: Limits, subset: frozenset[str] | None = None
    ) -> tuple[EncodedTensors, bool]:
        """The frames to serve a peer with limits ``peer``, and whether to stream them.

        Streamed when the model is above the stream threshold, a tensor is
        above what the peer accepts in one frame (its HELLO said), or with
        the raw codec above ``StreamConfig.tensor_threshold``.  A peer
        that declared a ``subset`` of the names gets only those; each subset
        is encoded once per state.
        """
        if self._data is None:
            with torch.no_grad():
                self._data = self._source()
        data = self._data
        if subset is not None:
            data = {name: fields for name, fields in data.items() if name in subset}
        streamed = self.stream.should_stream(data, peer, self.codec)
        encoded = self._encoded.get((subset, streamed))
        if encoded is None:
            self.encodes += 1
            if streamed:
                # Chunks are sent from the live tensors (no second copy of a huge
                # model); before anyone may change them, StreamDesk.quiesce waits
                # until the port is done with them.
                encoded = encode_tensors(data, codec="raw", limits=self.limits, streamed=True)
            else:
                # A snapshot: the port reads the buffers after send() returned,
                # while the user may already be averaging into the live tensors.
                encoded = encode_tensors(data, codec=self.codec, limits=self.limits, snapshot=True)
            self._encoded[(subset, streamed)] = encoded
        return encoded, streamed


class StreamDesk:
    """The chunked streams of an aggregator's peers, both directions."""

    def __init__(
        self,
        transport: AggregatorTransport,
        config: StreamConfig,
        names: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self.t = transport
        self.config = config
        #: The tensor names uploads may carry (None: any), checked before allocating.
        self._names = names
        #: Bytes allocated for streamed uploads being received now, and the most ever.
        self.in_bytes = 0
        self.in_bytes_peak = 0
        #: Peers whose announced upload waits for room in the receive budget.
        self._admission: deque[AggregatorPipe] = deque()
        #: Finished downloads whose zero-copy chunks the port may still be reading.
        self._sent: list[OutStream] = []
        #: The peers with an upload or a download in progress: the timers and
        #: pumps look at these, never at the whole roster (thousands of peers).
        self._receiving: dict[AggregatorPipe, None] = {}
        self._sending: dict[AggregatorPipe, None] = {}

    def known_names(self) -> Collection[str] | None:
        """The tensor names uploads may carry (None: any)."""
        return None if self._names is None else self._names()

    # -- uploads -------------------------------------------------------------
    def announce(self, pipe: AggregatorPipe, env: Envelope) -> AggregatorPipe | None:
        """Admit an announced upload now, or queue it until the budget has room.

        Returns ``pipe`` when the upload is already complete (no bytes to wait for).
        """
        assert env.stream is not None
        self.drop(pipe)  # a re-sent announce replaces the unfinished stream
        known = pipe.declared if pipe.declared is not None else self.known_names()
        if known is not None:
            unknown = [d.key for d in env.stream.tensors if d.key not in known]
            if unknown:
                self.t.refuse_message(
                    pipe.routing_id,
                    env.seq,
                    ErrorCode.BAD_UPLOAD,
                    f"the announced upload has {len(unknown)} unknown tensors, e.g. "
                    f"{[u[:64] for u in unknown[:3]]}",
                )
                return None
        pipe.announced = env
        if not self._fits(env.stream.nbytes):
            log.info(
                "%s: %s's upload of %d bytes waits for the receive budget",
                self.t.name,
                pipe.nick_name,
                env.stream.nbytes,
            )
            self._admission.append(pipe)
            return None
        return self._admit(pipe)

    def _admit(self, pipe: AggregatorPipe) -> AggregatorPipe | None:
        env = pipe.announced
        assert env is not None and env.stream is not None
        pipe.announced = None
        stream = InStream(env, self.config.window_bytes)
        self.in_bytes += stream.total
        self.in_bytes_peak = max(self.in_bytes_peak, self.in_bytes)
        pipe.in_stream = stream
        self._receiving[pipe] = None
        if stream.done:  # nothing to wait for (a stream of empty tensors)
            return self._finish(pipe, stream)
        self._grant(pipe, stream)
        return None

    def land(
        self, pipe: AggregatorPipe, seq: int, sid: str, offset: int, nbytes: int
    ) -> AggregatorPipe | None:
        """Land the payload of a CHUNK from ``pipe``; returns ``pipe`` when its upload completed."""
        stream = pipe.in_stream
        if stream is None or sid != stream.id:
            self.t.discard_message()
            log.debug(
                "%s: dropped a chunk of a finished stream from %s", self.t.name, pipe.nick_name
            )
            return None
        try:
            land_chunk(self.t.port, stream, offset, nbytes)
        except ProtocolError as exc:
            log.warning("%s: broken stream from %s: %s", self.t.name, pipe.nick_name, exc)
            self.t.refuse_message(pipe.routing_id, seq, ErrorCode.STREAM, str(exc))
            self.drop(pipe)
            return None
        self.t.stats.chunks_in += 1
        if stream.done:
            return self._finish(pipe, stream)
        self._grant(pipe, stream)
        return None

    def _grant(self, pipe: AggregatorPipe, stream: InStream) -> None:
        credit = stream.credit()
        if credit:
            self.t.send(pipe, Kind.CREDIT, seq=stream.env.seq, meta=credit_meta(stream.id, credit))

    def _finish(self, pipe: AggregatorPipe, stream: InStream) -> AggregatorPipe:
        env = stream.envelope()
        self._release(pipe)
        self.t.request_arrived(pipe, env)
        return pipe

    def _release(self, pipe: AggregatorPipe) -> None:
        """Forget ``pipe``'s incoming stream and admit waiting uploads that now fit."""
        if pipe.in_stream is not None:
            self.in_bytes -= pipe.in_stream.total
            pipe.in_stream = None
            self._receiving.pop(pipe, None)
        while self._admission:
            nxt = self._admission[0]  # drop() takes a pipe out when it withdraws
            assert nxt.announced is not None and nxt.announced.stream is not None
            if not self._fits(nxt.announced.stream.nbytes):
                break
            self._admission.popleft()
            done = self._admit(nxt)
            if done is not None:
                self.t.completed.append(done)

    def expire(self) -> None:
        """Drop incoming streams that made no progress for ``IN_STREAM_IDLE`` seconds.

        A member that announces an upload and sends nothing would otherwise
        hold its share of the receive budget (and its allocation) for good.
        """
        now = time.monotonic()
        for pipe in list(self._receiving):
            stream = pipe.in_stream
            if stream is not None and now - stream.touched > IN_STREAM_IDLE:
                log.warning(
                    "%s: %s's upload stream sent nothing for %.0f s; dropped",
                    self.t.name,
                    pipe.nick_name,
                    now - stream.touched,
                )
                self.t.refuse_message(
                    pipe.routing_id,
                    stream.env.seq,
                    ErrorCode.STREAM,
                    f"no chunk for {IN_STREAM_IDLE:.0f} s: the stream was dropped",
                )
                self.drop(pipe)

    def pause_idle(self, away: float) -> None:
        """The transport was away from its port for ``away`` seconds: that is no stream's idling."""
        if away > 1.0:
            for pipe in self.t.roster.values():
                if pipe.in_stream is not None:
                    pipe.in_stream.touched += away

    def next_expiry(self) -> float:
        """When :meth:`expire` may next drop a stream (``math.inf``: none is open)."""
        touched = [p.in_stream.touched for p in self._receiving if p.in_stream is not None]
        return min(touched) + IN_STREAM_IDLE if touched else math.inf

    def _fits(self, nbytes: int) -> bool:
        """A streamed upload of ``nbytes`` may be allocated now (always, if none is)."""
        return not self.in_bytes or self.in_bytes + nbytes <= self.config.receive_budget

    def drop(self, pipe: AggregatorPipe) -> None:
        """Abandon ``pipe``'s streams in both directions (it left, or started over)."""
        if pipe.announced is not None:
            pipe.announced = None
            with contextlib.suppress(ValueError):
                self._admission.remove(pipe)
        if pipe.in_stream is not None:
            self._release(pipe)
        self._end(pipe)  # the peer discards what is still queued for it

    # -- downloads -------------------------------------------------------------
    def start(
        self, pipe: AggregatorPipe, seq: int, meta: dict[str, Any], encoded: EncodedTensors
    ) -> bool:
        """Answer ``pipe``'s request ``seq`` with the model in chunks: announce, then pump."""
        self._end(pipe)  # a request sent again: its earlier stream is void
        chunk = self.config.chunk_within(self.t.peer_limits(pipe))
        stream = OutStream(
            new_stream_id(),
            seq,
            encoded,
            chunk,
            sender=self.t.name,
            incarnation=self.t.incarnation,
            version=self.t.version,
        )
        pipe.out_stream = stream
        self._sending[pipe] = None
        if not self.t.send(
            pipe, Kind.DATA, seq=seq, meta=meta, encoded=encoded, stream=(stream.id, chunk)
        ):
            pipe.out_stream = None
            self._sending.pop(pipe, None)
            return False
        return True

    def credit(self, pipe: AggregatorPipe, sid: str, nbytes: int) -> None:
        """The peer granted ``nbytes`` more for its download ``sid``."""
        stream = pipe.out_stream
        if stream is None or stream.id != sid:
            log.debug("%s: credit for a finished stream from %s", self.t.name, pipe.nick_name)
            return
        stream.grant(nbytes)
        self._pump(pipe, stream)

    def _pump(self, pipe: AggregatorPipe, stream: OutStream) -> None:
        before, chunks = stream.sent, 0
        try:
            chunks = pump(self.t.port, stream, [pipe.routing_id])
        except Unreachable:
            log.info("%s: stream to %s broke; pipe offline", self.t.name, pipe.nick_name)
            self.t.left(pipe)
            return
        finally:
            pipe.bytes_out += stream.sent - before
            self.t.stats.chunks_out += chunks
            self.t.traffic.sent(Kind.CHUNK.value, stream.sent - before, chunks)
        if stream.done:
            self._end(pipe)

    def _end(self, pipe: AggregatorPipe) -> OutStream | None:
        """Forget ``pipe``'s download; the port may still read its chunks (see quiesce)."""
        stream, pipe.out_stream = pipe.out_stream, None
        self._sending.pop(pipe, None)
        if stream is not None:
            self._sent.append(stream)
        return stream

    def sending(self) -> bool:
        """A streamed download is in progress."""
        return any(p.out_stream is not None for p in self._sending)

    def progress(self) -> int:
        """Bytes sent so far by the downloads in progress (a progress marker)."""
        return sum(p.out_stream.sent for p in self._sending if p.out_stream is not None)

    def pump_all(self) -> None:
        """Send what credit allows on every download (after a full send queue)."""
        for pipe in list(self._sending):
            if pipe.out_stream is not None and pipe.out_stream.ready:
                self._pump(pipe, pipe.out_stream)

    def quiesce(self, timeout: float = 30.0) -> None:
        """Before the served tensors may change: end unfinished downloads, wait for the port.

        Collaborators whose download was cut are told ``stream-aborted`` and
        ask again; zero-copy chunks already handed to the port are waited for,
        ``timeout`` seconds at most for all of them together.
        """
        for pipe in list(self._sending):
            stream = self._end(pipe)
            if stream is not None:
                self.t.refuse_message(
                    pipe.routing_id,
                    stream.seq,
                    ErrorCode.STREAM_ABORTED,
                    "the served model changed",
                )
        deadline = time.monotonic() + timeout
        for stream in self._sent:
            if not stream.wait_sent(max(0.0, deadline - time.monotonic())):
                log.warning("%s: chunks still unsent after %.0f s", self.t.name, timeout)
                break
        self._sent.clear()
