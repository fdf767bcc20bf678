"""Segmented messages: a tensor of any size travels in frames of a few MiB and lands in place.

Wire cases encode and decode real frames; the Maintainer cases run the real
transports over an in-memory network, whose ports land frames with
``recv_into`` exactly like ZeroMQ's.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.federated import MemoryNetwork
from zmqfed.functional import count_step
from zmqfed.wire import MAGIC, PROTOCOL_VERSION, ChunkLayout, Envelope, StreamConfig, decode, encode

SEG = 4096


def _tensors() -> dict[str, dict[str, torch.Tensor]]:
    emb = torch.randn(3000)  # 12,000 bytes: three segments of its own
    return {
        "emb": {"param": emb, "exp_avg": torch.randn(3000)},
        "small": {"param": torch.arange(7, dtype=torch.int64)},
        "mask": {"param": torch.tensor([True, False, True])},
        "empty": {"param": torch.zeros(0, 4)},
        "half": {"param": torch.randn(50, dtype=torch.bfloat16)},
        "head": {"param": emb},  # tied to emb's param only: not a tied name
        "tail": {"param": torch.randn(1500)},
    }


def _bytes(frames: list[Any]) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in frames]


def test_segmented_round_trip_keeps_every_tensor_and_bounds_every_frame() -> None:
    tensors = _tensors()
    frames = encode(Envelope("DATA", "agg", tensors=tensors), segment=SEG)
    doc = json.loads(frames[0][len(MAGIC) + 1 :])
    assert doc["segment"] == SEG
    sizes = [len(f) for f in _bytes(frames[1:])]
    assert max(sizes) <= SEG and len(frames) - 1 == 12
    env = decode(_bytes(frames))
    for key, fields in tensors.items():
        for field, t in fields.items():
            got = env.tensors[key][field]
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)


@given(st.lists(st.integers(0, 20_000), max_size=12), st.integers(1, 9000))
def test_layout_count_matches_the_plan(sizes: list[int], chunk: int) -> None:
    layout = ChunkLayout(sizes)
    plan = list(layout.plan(chunk))
    assert layout.count(chunk) == len(plan)
    assert sum(n for _, n in plan) == sum(sizes)


def _doc(frames: list[Any]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(bytes(frames[0])[len(MAGIC) + 1 :])
    return doc


def _with(doc: dict[str, Any]) -> bytes:
    return MAGIC + bytes([PROTOCOL_VERSION]) + json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda fr, d: (fr[:-1], d), "has 11 data frames, its header describes 12"),
        (lambda fr, d: ([*fr, b"x"], d), "has 13 data frames"),
        (lambda fr, d: ([*fr[:2], fr[2][:-1], *fr[3:]], d), "segment frame 3 has 3807 bytes"),
        (lambda fr, d: (fr, {**d, "segment": 100}), "at least 4096"),
        (lambda fr, d: (fr, {**d, "segment": 8192}), "header describes"),
        (lambda fr, d: (fr, {**d, "stream": {"id": "s", "chunk": 4096}}), "streamed or segmented"),
        (lambda fr, d: (fr, {**d, "kind": "PULL"}), "only PUSH and DATA can be segmented"),
        (
            lambda fr, d: (
                fr,
                {**d, "tensors": [{**d["tensors"][0], "codec": "lz4"}, *d["tensors"][1:]]},
            ),
            "must use the raw codec",
        ),
    ],
)
def test_malformed_segmented_messages_are_refused(change: Any, match: str) -> None:
    frames = _bytes(encode(Envelope("PUSH", "c", tensors=_tensors()), segment=SEG))
    data, doc = change(frames[1:], _doc(frames))
    with pytest.raises(ProtocolError, match=match):
        decode([_with(doc), *data])


def test_segments_are_for_raw_push_and_data() -> None:
    env = Envelope("PUSH", "c", tensors=_tensors())
    with pytest.raises(ConfigError, match="segment must be in"):
        encode(env, segment=100)
    with pytest.raises(ConfigError, match="only PUSH and DATA"):
        encode(Envelope("PULL", "c"), segment=SEG)
    assert StreamConfig(chunk_bytes=SEG).segment_for(_tensors(), _limits(), "lz4") is None
    assert StreamConfig(chunk_bytes=SEG).segment_for(_tensors(), _limits(), "raw") == SEG
    assert StreamConfig(chunk_bytes=2**20).segment_for(_tensors(), _limits(), "raw") is None


def _limits() -> Any:
    from zmqfed.wire import Limits

    return Limits()


# ----------------------------------------------------------------------------- Maintainers
STREAM = StreamConfig(chunk_bytes=16 * 1024, window_bytes=64 * 1024)


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(256, 64, generator=g),  # 64 KiB: four segments
        "proj": torch.randn(64, 64, generator=g),  # 16 KiB: one
        "bias": torch.randn(64, generator=g),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


@pytest.mark.parametrize("in_place", [True, False])
def test_segmented_download_lands_in_the_model_and_upload_arrives_whole(in_place: bool) -> None:
    net = MemoryNetwork()
    star = topo.star(1, "ipc:///memory/segments")
    agg_sd = _model(0)
    agg = Maintainer(
        topo.analysis(star, "aggregator")[0], agg_sd, network=net, stream=STREAM, timeout=20
    )
    own = _model(1)
    col = Maintainer(
        topo.analysis(star, "client0")[0],
        own,
        network=net,
        stream=STREAM,
        timeout=20,
        download_in_place=in_place,
    )
    seen: dict[str, Any] = {}
    errors: list[BaseException] = []

    def work() -> None:
        try:
            col.step(upload=False)
            seen["same_storage"] = all(
                col.data[k]["param"].data_ptr() == own[k].data_ptr() for k in ("embed", "proj")
            )
            seen["equal"] = all(torch.equal(col.data[k]["param"], agg_sd[k]) for k in agg_sd)
            col.unpackage()
            with torch.no_grad():
                own["embed"].add_(1.0)
            col.meta["instances"] = 1
            col.package()
            col.step(download=False)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with agg:
        count_step(1)
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        agg.step()
        thread.join(20)
        assert not errors, errors
        assert seen == {"same_storage": in_place, "equal": True}
        (update,) = agg.data_list
        by_name = {n: update[p]["param"] for n, p in agg_sd.items()}
        torch.testing.assert_close(by_name["embed"], agg_sd["embed"] + 1.0, rtol=0, atol=0)
        assert torch.equal(by_name["steps"], agg_sd["steps"])
    finally:
        col.close()
        agg.close()
