"""Chunked streaming under byte credit over real sockets (docs/protocol.md §6).

The stream settings are shrunk (KiB instead of MiB) so that small models take
every path a multi-GiB one does: tensors larger than a frame may be, small
tensors packed into one chunk, ``recv_into`` straight into the receiver's own
parameters, credit, the aggregator's receive budget, aborted streams, and a
peer that breaks the stream protocol.
"""

from __future__ import annotations

import threading

import pytest
import torch
import zmq

import zmqfed.topo as topo
from tests.integration._helpers import node_results
from tests.integration.test_protocol_faults import _ask, _dealer, _hello, _star
from zmqfed.core import Maintainer, aggregator_side, steps
from zmqfed.functional import count_step
from zmqfed.wire import Envelope, Limits, StreamConfig, decode, encode, encode_tensors
from zmqfed.wire.stream import chunk_meta, parse_credit_meta

KiB = 1024
STREAM = StreamConfig(threshold=16 * KiB, chunk_bytes=8 * KiB, window_bytes=24 * KiB)
# A 40 KiB tensor can only travel in chunks: no frame may exceed 12 KiB (+ slack).
LIMITS = Limits(max_frame_bytes=12 * KiB)
NAMES = ("alpha", "beta")


def model(seed: int) -> dict[str, torch.Tensor]:
    """Mixed sizes and dtypes, like a real model: one big tensor, small ones, an empty one."""
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(10_000, generator=g),
        "mid": torch.randn(30, 100, generator=g).to(torch.bfloat16),
        "bias": torch.randn(3, generator=g),
        "steps": torch.arange(5) + seed,
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(float(seed)),
    }


def star(endpoint: str) -> topo.Topology:
    return _star(endpoint, NAMES)


COLLABORATOR = """
import json, sys, torch
import zmqfed.topo as topo
from zmqfed.core import Maintainer
from tests.integration.test_chunked import LIMITS, STREAM, model, star

endpoint, name, in_place = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
own = model(7)
m = Maintainer(topo.analysis(star(endpoint), name)[0], own, stream=STREAM, limits=LIMITS,
               download_in_place=in_place, timeout=60)
m.step(upload=False)
got = {k: f["param"] for k, f in m.data.items()}
same_storage = all(got[k].data_ptr() == own[k].data_ptr() for k in own if own[k].numel())
sums = {k: v.double().sum().item() for k, v in got.items()}  # before training changes them
m.unpackage()
with torch.no_grad():
    own["big"].add_(1.0 if name == "alpha" else 2.0)
m.package()
m.step(download=False)
m.close()
print("RESULT " + json.dumps({
    "download": sums,
    "same_storage": same_storage,
}), flush=True)
"""


def test_a_model_streams_both_ways_between_processes(free_tcp_endpoint, run_python, slow_factor):
    agg_model = model(1)
    props = topo.analysis(star(free_tcp_endpoint), "aggregator")[0]
    m = Maintainer(props, agg_model, stream=STREAM, limits=LIMITS, timeout=60 * slow_factor)
    with m:
        count_step(2)
    procs = {
        name: run_python(COLLABORATOR, args=[free_tcp_endpoint, name, str(int(name == "alpha"))])
        for name in NAMES
    }
    try:
        m.step()
        results = node_results(procs, timeout=60 * slow_factor)
        uploads = {meta_pipe: up for meta_pipe, up in zip(range(2), m.data_list, strict=True)}
        stats = m.stats
    finally:
        m.close()
    expected = {k: v.double().sum().item() for k, v in model(1).items()}
    for name in NAMES:
        assert results[name]["download"] == expected, name
    # alpha received into its own tensors; beta into fresh ones
    assert results["alpha"]["same_storage"] is True
    assert results["beta"]["same_storage"] is False
    # each upload is the aggregator's model with "big" raised by 1 (alpha) or 2 (beta)
    shifts = set()
    for upload in uploads.values():
        for name, p in agg_model.items():
            got = upload[p]["param"]
            if name == "big":
                shift = got - p
                assert torch.allclose(shift, shift[0].expand_as(shift))
                shifts.add(round(shift[0].item(), 4))
            else:
                assert torch.equal(got, p), name
    assert shifts == {1.0, 2.0}
    raw = sum(t.numel() * t.element_size() for t in agg_model.values())
    assert stats["encodes"] == 1  # served twice from one encoding
    assert stats["bytes_out"] == 2 * raw and stats["bytes_in"] == 2 * raw
    assert stats["errors"] == 0


class StreamingAggregator(threading.Thread):
    """An aggregator in a thread with the shrunk stream settings; stops when told."""

    def __init__(self, endpoint: str, *, stream: StreamConfig = STREAM, count: int = 0) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.stream, self.count = endpoint, stream, count
        self.ready, self.stop = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.model = model(1)
        self.uploads: list[dict] = []
        self.errors = -1
        self.peak_stream_bytes = 0
        self.fingerprint = ""

    def run(self) -> None:
        props = topo.analysis(star(self.endpoint), "aggregator")[0]
        self.fingerprint = props.fingerprint
        m = Maintainer(props, self.model, stream=self.stream, idle_interval=0.05)
        try:

            def watch(m: Maintainer) -> None:
                self.peak_stream_bytes = m.stats["stream_bytes_peak"]
                if self.stop.is_set() or (self.count and len(m.meta_list) >= self.count):
                    m.manual_stop()

            m.register_step_hook(0, watch, steps.at_last)
            self.ready.set()
            m.step(timeout=60)
            self.uploads = [
                {n: up[p]["param"] for n, p in self.model.items()} for up in m.data_list
            ]
            self.errors = m.stats["errors"]
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()
            m.close()

    def finish(self) -> None:
        self.stop.set()
        self.join(20)
        assert not self.is_alive(), "aggregator thread did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def streaming_aggregator(free_tcp_endpoint):
    agg = StreamingAggregator(free_tcp_endpoint)
    agg.start()
    assert agg.ready.wait(10)
    yield agg
    agg.stop.set()
    agg.join(20)


def _announce(seq: int, sid: str, chunk: int = 4 * KiB) -> list:
    enc = encode_tensors({k: {"param": v} for k, v in model(3).items()}, streamed=True)
    return encode(
        Envelope("PUSH", "alpha", seq=seq, incarnation=INCARNATION[0]),
        encoded=enc,
        stream=(sid, chunk),
    )


INCARNATION = [""]


def _chunk(seq: int, sid: str, offset: int, payload: bytes, nbytes: int | None = None) -> list:
    n = len(payload) if nbytes is None else nbytes
    head = encode(
        Envelope(
            "CHUNK", "alpha", seq=seq, incarnation=INCARNATION[0], meta=chunk_meta(sid, offset, n)
        )
    )[0]
    return [head, payload]


def test_broken_streams_get_errors_and_the_aggregator_still_serves(
    streaming_aggregator, zmq_ctx, slow_factor
):
    agg = streaming_aggregator
    total = sum(t.numel() * t.element_size() for t in model(3).values())
    with _dealer(zmq_ctx, agg.endpoint, "alpha") as sock:
        welcome = _hello(sock, agg.fingerprint)
        assert welcome.kind == "WELCOME"
        INCARNATION[0] = welcome.incarnation
        cases = {
            "wrong offset": lambda sid: _chunk(5, sid, 4 * KiB, bytes(4 * KiB)),
            "payload larger than the header says": lambda sid: _chunk(
                5, sid, 0, bytes(4 * KiB), 100
            ),
            "chunk larger than announced": lambda sid: _chunk(5, sid, 0, bytes(6 * KiB)),
            "two payload frames": lambda sid: [*_chunk(5, sid, 0, bytes(1024)), b"x"],
            "beyond the stream": lambda sid: _chunk(5, sid, total - 10, bytes(1024)),
        }
        for i, (what, make) in enumerate(cases.items()):
            sid = f"s{i}"
            credit = _ask(sock, _announce(5, sid))
            assert credit.kind == "CREDIT", (what, credit)
            assert parse_credit_meta(credit.meta) == (sid, STREAM.window_bytes)
            if what == "beyond the stream":  # first fill the stream up to its last bytes
                ok = _send_range(sock, sid, 0, total - 10)
                assert ok, what
            reply = _ask(sock, make(sid))
            assert (reply.kind, reply.meta.get("code")) == ("ERROR", "stream"), (what, reply)
        # An announce above the receiver's message limit is refused before allocation.
        huge = bytes(_announce(6, "big")[0]).replace(b'"shape":[10000]', b'"shape":[4000000000]')
        huge = huge.replace(
            b'"nbytes":40000,"rawbytes":40000', b'"nbytes":16000000000,"rawbytes":16000000000'
        )
        reply = _ask(sock, [huge])
        assert (reply.kind, reply.meta["code"]) == ("ERROR", "protocol")
        assert "max_message_bytes" in reply.meta["reason"]
        # A stream abandoned half-way (the peer vanishes) does not wedge anything.
        credit = _ask(sock, _announce(7, "gone"))
        assert credit.kind == "CREDIT"
        sock.send_multipart(_chunk(7, "gone", 0, bytes(4 * KiB)))
    # The aggregator serves a normal (streamed) round to a real collaborator.
    props = topo.analysis(star(agg.endpoint), "beta")[0]
    own = model(9)
    beta = Maintainer(props, own, stream=STREAM, timeout=30 * slow_factor)
    try:
        beta.step(upload=False)
        assert all(torch.equal(beta.data[k]["param"], v) for k, v in model(1).items())
        beta.package()
        beta.step(download=False)
    finally:
        beta.close()
    agg.finish()
    assert len(agg.uploads) == 1 and all(
        torch.equal(agg.uploads[0][k], v) for k, v in model(9).items()
    )
    assert agg.errors == len(cases) + 1


def _send_range(sock: zmq.Socket, sid: str, start: int, end: int) -> bool:
    """Stream zero bytes [start, end) in 4 KiB chunks, waiting for credit as needed."""
    credit_end = STREAM.window_bytes
    pos = start
    while pos < end:
        n = min(4 * KiB, end - pos)
        while pos + n > credit_end:
            if not sock.poll(10_000):
                return False
            env = decode(sock.recv_multipart())
            if env.kind == "CREDIT":
                credit_end += parse_credit_meta(env.meta)[1]
        sock.send_multipart(_chunk(5, sid, pos, bytes(n)))
        pos += n
    return True


def test_the_receive_budget_admits_one_large_upload_at_a_time(free_tcp_endpoint, slow_factor):
    size = sum(t.numel() * t.element_size() for t in model(1).values())
    budget = StreamConfig(
        threshold=16 * KiB, chunk_bytes=8 * KiB, window_bytes=8 * KiB, receive_budget=size
    )
    agg = StreamingAggregator(free_tcp_endpoint, stream=budget, count=2)
    agg.start()
    assert agg.ready.wait(10)
    errors: list[BaseException] = []

    def upload(name: str, seed: int) -> None:
        try:
            props = topo.analysis(star(free_tcp_endpoint), name)[0]
            m = Maintainer(props, model(seed), stream=budget, timeout=30 * slow_factor)
            try:
                m.package()
                m.step(download=False)
            finally:
                m.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(n, s)) for n, s in (("alpha", 2), ("beta", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    agg.join(60)
    assert not errors, errors
    assert agg.error is None
    assert agg.peak_stream_bytes == size  # never both models allocated at once
    got = sorted(up["steps"].tolist() for up in agg.uploads)
    assert got == [[2, 3, 4, 5, 6], [3, 4, 5, 6, 7]]
    for up in agg.uploads:
        seed = up["steps"][0].item()
        assert all(torch.equal(up[k], v) for k, v in model(seed).items())


def test_a_stalled_download_is_aborted_when_the_step_ends(
    streaming_aggregator, zmq_ctx, monkeypatch
):
    """``step()`` lets started downloads finish, but not forever: a stalled one is aborted.

    The served tensors may change after ``step()`` returns, so no chunk of
    them may still be sent by then.
    """
    monkeypatch.setattr(aggregator_side, "STREAM_STALL", 1.0)
    agg = streaming_aggregator
    with _dealer(zmq_ctx, agg.endpoint, "alpha") as sock:
        welcome = _hello(sock, agg.fingerprint)
        INCARNATION[0] = welcome.incarnation
        pull = encode(
            Envelope("PULL", "alpha", seq=9, incarnation=welcome.incarnation, meta={"version": 0})
        )
        announce = _ask(sock, pull)
        assert announce.kind == "DATA" and announce.stream is not None
        # No credit is ever granted; the aggregator's step ends, the served model may change.
        agg.stop.set()
        assert sock.poll(20_000)
        reply = decode(sock.recv_multipart())
        while reply.kind == "PING":
            assert sock.poll(20_000)
            reply = decode(sock.recv_multipart())
        assert (reply.kind, reply.seq, reply.meta["code"]) == ("ERROR", 9, "stream-aborted")
    agg.finish()
    assert agg.errors == 1


def test_chunks_fit_the_frame_bound_the_receiver_announced(free_tcp_endpoint, slow_factor):
    """A collaborator accepting only 64 KiB frames gets 64 KiB chunks from an aggregator set to 256.

    A chunk above the receiver's MAXMSGSIZE would be dropped without a word,
    and the download would never complete.
    """
    stream = StreamConfig(threshold=16 * KiB, chunk_bytes=256 * KiB, window_bytes=512 * KiB)
    agg_model = {"w": torch.arange(300_000, dtype=torch.float32)}  # 1.2 MB: one tensor
    props = topo.analysis(star(free_tcp_endpoint), "aggregator")[0]
    agg = Maintainer(props, agg_model, stream=stream, idle_interval=0.05)
    agg.register_step_hook(0, lambda m, ok: m.manual_stop(), steps.after_upload)
    got: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def download() -> None:
        small = Limits(max_frame_bytes=64 * KiB)
        alpha_props = topo.analysis(star(free_tcp_endpoint), "alpha")[0]
        m = Maintainer(alpha_props, {"w": torch.zeros(300_000)}, stream=stream, limits=small)
        try:
            m.step(upload=False, timeout=30 * slow_factor)
            got.update({k: v["param"] for k, v in m.data.items()})
        except BaseException as exc:
            errors.append(exc)
        finally:
            m.close()

    thread = threading.Thread(target=download)
    thread.start()
    try:
        agg.step(timeout=30 * slow_factor)
    finally:
        thread.join(60)
        agg.close()
    assert not errors, errors
    assert torch.equal(got["w"], agg_model["w"])
