"""The socket-free part of chunked streaming: layout, config, announce headers, meta checks."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.wire import (
    ChunkLayout,
    Envelope,
    Limits,
    StreamConfig,
    decode,
    encode,
    encode_tensors,
)
from zmqfed.wire.limits import announced_frame_bound
from zmqfed.wire.stream import (
    CHUNK_PREFIX,
    chunk_meta,
    credit_meta,
    parse_chunk_meta,
    parse_credit_meta,
)

KiB = 1024


# ----------------------------------------------------------------------------- layout
@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=30),
    chunk=st.integers(1, 3000),
)
def test_plan_covers_every_byte_once_and_pieces_map_back(sizes: list[int], chunk: int) -> None:
    layout = ChunkLayout(sizes)
    plan = list(layout.plan(chunk))
    assert sum(n for _, n in plan) == layout.total == sum(sizes)
    pos = 0
    for offset, n in plan:
        assert offset == pos and 0 < n <= chunk  # in order, no gaps, within the chunk
        pieces = layout.pieces(offset, n)
        assert sum(length for _, _, length in pieces) == n
        for i, start, length in pieces:
            assert start >= 0 and start + length <= sizes[i] and length > 0
        pos += n
    # a tensor of at least one chunk is never packed with another one
    for offset, n in plan:
        tensors = {i for i, _, _ in layout.pieces(offset, n)}
        if len(tensors) > 1:
            assert all(sizes[i] < chunk for i in tensors)


def test_pieces_refuse_ranges_outside_the_stream() -> None:
    layout = ChunkLayout([10, 0, 5])
    assert layout.pieces(8, 4) == [(0, 8, 2), (2, 0, 2)]
    with pytest.raises(ProtocolError, match="outside"):
        layout.pieces(10, 6)
    with pytest.raises(ProtocolError, match="outside"):
        layout.pieces(-1, 2)


def test_stream_config_validates_and_decides() -> None:
    with pytest.raises(ConfigError, match="window_bytes"):
        StreamConfig(chunk_bytes=10, window_bytes=5)
    with pytest.raises(ConfigError, match="threshold"):
        StreamConfig(threshold=0)
    with pytest.raises(ConfigError, match="receive_budget"):
        StreamConfig(receive_budget=True)
    cfg = StreamConfig(threshold=1000, chunk_bytes=100, window_bytes=400)
    small = {"w": {"param": torch.zeros(10)}}
    assert not cfg.should_stream(small, Limits())
    assert cfg.should_stream({"w": {"param": torch.zeros(300)}}, Limits())  # 1200 B total
    # one tensor above the peer's frame limit streams even under the threshold
    assert cfg.should_stream({"w": {"param": torch.zeros(100)}}, Limits(max_frame_bytes=200))


# ----------------------------------------------------------------------------- announce
def _announce(**kw) -> list:
    tensors = {"a": {"param": torch.zeros(1000)}, "b": {"param": torch.ones(3, dtype=torch.int64)}}
    enc = encode_tensors(tensors, codec="raw", streamed=True, limits=kw.pop("limits", Limits()))
    return encode(Envelope("PUSH", "alpha", seq=4), encoded=enc, stream=("s1", 512), **kw)


def test_announce_round_trip_is_one_header_frame() -> None:
    frames = _announce()
    assert len(frames) == 1
    env = decode(frames)
    assert env.kind == "PUSH" and env.seq == 4 and env.tensors == {}
    assert env.stream is not None and (env.stream.id, env.stream.chunk) == ("s1", 512)
    assert env.stream.nbytes == 4000 + 24
    assert [(d.key, d.dtype, d.shape) for d in env.stream.tensors] == [
        ("a", "float32", (1000,)),
        ("b", "int64", (3,)),
    ]


def test_a_streamed_tensor_may_exceed_the_frame_limit_but_not_the_message_limit() -> None:
    limits = Limits(max_frame_bytes=1024)
    env = decode(_announce(limits=limits), limits=limits)  # 4000-byte tensor, 512-byte chunks
    assert env.stream is not None
    with pytest.raises(ProtocolError, match="max_message_bytes"):
        decode(_announce(), limits=Limits(max_message_bytes=2000))
    with pytest.raises(ProtocolError, match="stream chunk"):
        decode(_announce(), limits=Limits(max_frame_bytes=256))  # chunk 512 > frame limit
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        encode(
            Envelope("PUSH", "alpha"),
            encoded=encode_tensors({"a": {"p": torch.zeros(8)}}, streamed=True),
            stream=("s", 4096),
            limits=Limits(max_frame_bytes=1024),
        )


def _forge(frames: list, **changes) -> list:
    doc = json.loads(bytes(frames[0])[7:])
    doc.update(changes)
    return [bytes(frames[0])[:7] + json.dumps(doc).encode()]


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"kind": "PULL"}, "only PUSH and DATA"),
        ({"stream": {"id": "", "chunk": 5}}, "stream id"),
        ({"stream": {"id": "x" * 65, "chunk": 5}}, "stream id"),
        ({"stream": {"id": "s", "chunk": 0}}, "chunk must be positive"),
        ({"stream": {"id": "s", "chunk": -1}}, "stream chunk"),
        ({"stream": {"id": "s"}}, "lacks the field 'chunk'"),
        ({"stream": {"id": "s", "chunk": 5, "x": 1}}, "unknown field"),
        ({"stream": [1]}, "must be an object"),
        ({"object": {"nbytes": 3}}, "pickle"),
    ],
)
def test_forged_announces_are_refused(changes: dict, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode(_forge(_announce(), **changes))


def test_announce_with_frames_or_compressed_tensors_is_refused() -> None:
    with pytest.raises(ProtocolError, match="one header frame"):
        decode([*_announce(), b"\0" * 4000])
    frames = _announce()
    doc = json.loads(bytes(frames[0])[7:])
    doc["tensors"][0].update(codec="lz4", nbytes=10)
    with pytest.raises(ProtocolError, match="raw codec"):
        decode([bytes(frames[0])[:7] + json.dumps(doc).encode()])
    with pytest.raises(ConfigError, match="raw codec"):
        encode(
            Envelope("PUSH", "a"),
            encoded=encode_tensors({"z": {"p": torch.zeros(5000)}}, codec="lz4"),
            stream=("s", 64),
        )
    with pytest.raises(ConfigError, match="only PUSH and DATA"):
        encode(Envelope("ACK", "a"), encoded=encode_tensors({}), stream=("s", 64))


# ----------------------------------------------------------------------------- chunk / credit
def test_chunk_header_starts_with_the_routing_prefix() -> None:
    header = encode(Envelope("CHUNK", "alpha", seq=3, meta=chunk_meta("s1", 1024, 512)))[0]
    assert bytes(header).startswith(CHUNK_PREFIX)
    assert parse_chunk_meta(decode([header]).meta) == ("s1", 1024, 512)
    assert parse_credit_meta(credit_meta("s1", 2048)) == ("s1", 2048)


@pytest.mark.parametrize(
    "meta",
    [
        {},
        {"stream": "s", "offset": 0},
        {"stream": "s", "offset": -1, "nbytes": 5},
        {"stream": "s", "offset": 0, "nbytes": 1.5},
        {"stream": "s", "offset": True, "nbytes": 5},
        {"stream": 7, "offset": 0, "nbytes": 5},
        {"stream": "s", "offset": 0, "nbytes": 5, "extra": 1},
    ],
)
def test_malformed_chunk_meta_is_refused(meta: dict) -> None:
    with pytest.raises(ProtocolError, match="CHUNK"):
        parse_chunk_meta(meta)


@pytest.mark.parametrize(
    "meta", [{}, {"stream": "s"}, {"stream": "s", "bytes": -5}, {"stream": "", "bytes": 5}]
)
def test_malformed_credit_meta_is_refused(meta: dict) -> None:
    with pytest.raises(ProtocolError, match="CREDIT"):
        parse_credit_meta(meta)


# ----------------------------------------------------------------------------- limits from the model
def test_limits_for_model_bound_frames_and_messages_by_the_model() -> None:
    model = {"w": torch.zeros(4 * 2**20), "b": torch.zeros(10)}  # 16 MiB + 40 B
    limits = Limits.for_model(model)
    assert limits.max_frame_bytes == 32 * 2**20  # 2x the largest tensor
    assert limits.max_message_bytes == 4 * (16 * 2**20 + 40)  # 2 x headroom x model
    assert limits.socket_maxmsgsize() == 32 * 2**20 + 64 * KiB
    # a tiny model still allows 1 MiB frames and 64 MiB messages
    tiny = Limits.for_model({"b": torch.zeros(3)})
    assert (tiny.max_frame_bytes, tiny.max_message_bytes) == (2**20, 64 * 2**20)
    # frames never above the stream threshold: larger tensors travel in chunks
    capped = Limits.for_model(model, stream_threshold=4 * 2**20)
    assert capped.max_frame_bytes == 4 * 2**20
    assert StreamConfig(threshold=2**40).should_stream({"w": {"param": model["w"]}}, capped)
    assert Limits.for_model(model, allow_pickle=True).allow_pickle
    with pytest.raises(ConfigError, match="headroom"):
        Limits.for_model(model, headroom=0.5)


def test_a_peers_announced_frame_bound_only_ever_lowers_ours() -> None:
    ours = Limits(max_frame_bytes=2**20)
    assert ours.within_frame_bound(None) is ours
    assert ours.within_frame_bound(2**30) is ours
    assert ours.within_frame_bound(2**17).max_frame_bytes == 2**17
    assert (
        StreamConfig(chunk_bytes=2**19, window_bytes=2**20).chunk_within(
            ours.within_frame_bound(2**17)
        )
        == 2**17
    )
    assert announced_frame_bound(2**17) == 2**17
    for nonsense in (None, True, "1048576", 1.5e6, 100, -(2**20)):
        assert announced_frame_bound(nonsense) is None
