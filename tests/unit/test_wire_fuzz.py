"""Property tests: whatever a peer sends, ``decode`` raises ProtocolError or succeeds,
and never allocates beyond the configured limits.

Python-level allocations (the header copy, JSON objects, the lz4 output
bytearray) are measured with tracemalloc; torch's own allocations are not
visible to it, so successful decodes are also checked against the limit.
Examples are derandomized so the suite is reproducible; each test runs
``MAX_EXAMPLES`` examples.
"""

from __future__ import annotations

import json
import random
import tracemalloc
from typing import Any

import lz4.block
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmqfed.errors import ProtocolError
from zmqfed.wire import CODECS, MAGIC, PROTOCOL_VERSION, Envelope, Limits, decode, encode
from zmqfed.wire.header import DTYPES

MAX_EXAMPLES = 400
LIMITS = Limits(max_message_bytes=1 << 20, max_frame_bytes=1 << 20, max_tensors=64)
# decoded tensors (1 MiB) + lz4's output buffer and its bytearray copy (2 x 1 MiB)
# + the 64 KiB header parsed into Python objects: 8 MiB is a generous ceiling.
PEAK_BOUND = 8 << 20
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PREFIX = MAGIC + bytes([PROTOCOL_VERSION])
peaks: list[int] = []


def check(frames: list[Any]) -> Envelope | None:
    """Decode; only ProtocolError may escape, and memory stays bounded."""
    # trace only the decode: tracing hypothesis itself would slow it down tenfold
    tracemalloc.start()
    try:
        env: Envelope | None = decode(frames, limits=LIMITS)
    except ProtocolError:
        env = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    peaks.append(peak)
    assert peak < PEAK_BOUND, peak
    if env is not None:
        assert env.nbytes <= LIMITS.max_message_bytes
        assert len(frames) == 1 + sum(len(f) for f in env.tensors.values()) + (env.obj is not None)
    return env


def _base_messages() -> list[list[bytes]]:
    gen = torch.Generator().manual_seed(0)
    sparse = torch.randn(64, 64, generator=gen)
    sparse[torch.rand(64, 64, generator=gen) < 0.9] = 0
    tensors = {
        "fc.weight": {"param": sparse, "exp_avg": torch.zeros(64, 64, dtype=torch.bfloat16)},
        "fc.bias": {"param": torch.randn(3, generator=gen)},
        "mask": {"param": torch.ones(5, dtype=torch.bool)},
        "empty": {"param": torch.empty(0, 2, dtype=torch.int64)},
        "scalar": {"param": torch.tensor(1.5, dtype=torch.float64)},
    }
    env = Envelope("PUSH", "alice", 3, 4, "inc", {"lr": 0.1, "names": ["a", "b"]}, tensors)
    return [[bytes(memoryview(f)) for f in encode(env, codec=c)] for c in CODECS]


BASES = _base_messages()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


# ----------------------------------------------------------------------------- raw bytes
@FUZZ
@given(st.binary(max_size=2048), st.booleans())
def test_random_header_bytes(data: bytes, prefixed: bool) -> None:
    check([PREFIX + data if prefixed else data])


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=256), st.sampled_from(BASES[0])), max_size=6))
def test_random_frame_lists(frames: list[bytes]) -> None:
    check(frames)


# ----------------------------------------------------------------------------- mutations
@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    frames = [bytearray(f) for f in draw(st.sampled_from(BASES))]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "splice", "drop", "dup", "swap"]))
        i = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op == "flip" and frames and frames[i]:
            pos = draw(st.integers(0, len(frames[i]) - 1))
            frames[i][pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate" and frames:
            frames[i] = frames[i][: draw(st.integers(0, len(frames[i])))]
        elif op == "splice" and frames:
            pos = draw(st.integers(0, len(frames[i])))
            frames[i][pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "drop" and frames:
            del frames[i]
        elif op == "dup" and frames:
            frames.insert(i, bytearray(frames[i]))
        elif op == "swap" and len(frames) > 1:
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
    return [bytes(f) for f in frames]


@FUZZ
@given(mutated())
def test_mutated_valid_messages(frames: list[bytes]) -> None:
    check(frames)


@FUZZ
@given(st.sampled_from(BASES), st.data())
def test_json_leaf_replaced(base: list[bytes], data: st.DataObject) -> None:
    """Replace one value anywhere in a valid header with arbitrary JSON."""
    doc = json.loads(base[0][len(PREFIX) :])
    node: Any = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if not isinstance(child, (dict, list)) or not child or data.draw(st.booleans()):
            node[key] = data.draw(json_values)
            break
        node = child
    check([PREFIX + json.dumps(doc).encode(), *base[1:]])


# ----------------------------------------------------------------------------- structured
def _often(draw: st.DrawFn, percent: int = 80) -> bool:
    """Usually True: keep most fields consistent so that decoding goes deep."""
    return draw(st.integers(0, 99)) < percent


@st.composite
def descriptor_messages(draw: st.DrawFn) -> list[bytes]:
    """Plausible headers with sizes near and over the limits, and frames that mostly match."""
    descs, frames = [], []
    for i in range(draw(st.integers(0, 4))):
        dtype = (
            draw(st.sampled_from(list(DTYPES)))
            if _often(draw, 95)
            else draw(st.sampled_from(["object", "float", "torch.int8"]))
        )
        if _often(draw, 90):
            shape = draw(st.lists(st.integers(0, 300), max_size=3))
        else:
            shape = draw(st.lists(st.sampled_from([0, 2**18, 2**31, 2**62, -1]), max_size=3))
        codec = draw(st.sampled_from(["raw", "lz4", "shuffle-lz4"])) if _often(draw, 95) else "auto"
        n = DTYPES[dtype].itemsize if dtype in DTYPES else 4
        for s in shape:
            n *= s
        rawbytes = (
            n if _often(draw) else draw(st.sampled_from([n + 1, max(n - 1, 0), 1 << 20, 2**40]))
        )
        rng = random.Random(draw(st.integers(0, 2**32)))
        if _often(draw):  # a body of the claimed size, else a slightly or hugely wrong one
            size = max(rawbytes, 0)
        else:
            size = draw(st.sampled_from([0, 1, max(rawbytes - 1, 0), rawbytes + 7, 2 << 20]))
        size = min(size, 2 << 20)
        body = bytes(size) if draw(st.booleans()) else rng.randbytes(size)
        frame = body if codec == "raw" else lz4.block.compress(body, store_size=False)
        nbytes = len(frame) if _often(draw) else draw(st.sampled_from([rawbytes, len(frame) + 1]))
        key = f"k{i}" if _often(draw, 95) else "dup"
        descs.append(
            {"key": key, "field": "p", "dtype": dtype, "shape": shape, "codec": codec}
            | {"nbytes": nbytes, "rawbytes": rawbytes}
        )
        frames.append(frame)
    doc = {"kind": "PUSH", "sender": "s", "version": 0, "seq": 0, "incarnation": ""}
    doc |= {"meta": {}, "tensors": descs, "object": None}
    extra = [] if _often(draw) else [draw(st.binary(max_size=8))]
    return [PREFIX + json.dumps(doc).encode(), *frames, *extra]


@FUZZ
@given(descriptor_messages())
def test_structured_headers(frames: list[bytes]) -> None:
    check(frames)


# ----------------------------------------------------------------------------- round trip
tensor_dicts = st.dictionaries(
    st.text(max_size=10),
    st.dictionaries(
        st.sampled_from(["param", "exp_avg", "step"]),
        st.tuples(
            st.sampled_from(list(DTYPES)),
            st.lists(st.integers(0, 9), max_size=3),
            st.integers(0, 2**31 - 1),
        ),
        min_size=1,
        max_size=2,
    ),
    max_size=4,
)


def _tensor(dtype_name: str, shape: list[int], seed: int) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(
        0,
        256,
        (n * DTYPES[dtype_name].itemsize,),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(seed),
    )
    if dtype_name == "bool":
        raw &= 1
    return raw.view(DTYPES[dtype_name]).reshape(shape)


@FUZZ
@given(tensor_dicts, st.sampled_from(CODECS), json_values)
def test_round_trip_property(spec: dict[str, dict[str, Any]], codec: str, meta_value: Any) -> None:
    tensors = {k: {f: _tensor(*v) for f, v in fields.items()} for k, fields in spec.items()}
    env = Envelope("DATA", "agg", meta={"v": meta_value}, tensors=tensors)
    out = decode(encode(env, codec=codec))
    assert out.meta == json.loads(json.dumps({"v": meta_value}))
    assert list(out.tensors) == list(tensors)
    for k, fields in tensors.items():
        for f, t in fields.items():
            got = out.tensors[k][f]
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_peak_memory_at_and_over_the_limit() -> None:
    """tracemalloc sees lz4's output: at the limit ~2x the data, over it ~nothing."""
    at_limit = Envelope(
        "DATA", "a", tensors={"z": {"p": torch.zeros(LIMITS.max_message_bytes // 4)}}
    )
    frames = [bytes(memoryview(f)) for f in encode(at_limit, codec="lz4")]
    assert len(frames[1]) < 10_000
    assert check(frames) is not None
    assert LIMITS.max_message_bytes <= peaks[-1] < 3 * LIMITS.max_message_bytes
    over = Envelope("DATA", "a", tensors={"z": {"p": torch.zeros(LIMITS.max_message_bytes)}})
    frames = [bytes(memoryview(f)) for f in encode(over, codec="lz4")]
    assert check(frames) is None
    assert peaks[-1] < 64 * 1024


def test_peak_memory_was_measured() -> None:
    """Runs last in this module: the fuzzers above really exercised decode."""
    if len(peaks) < 5 * MAX_EXAMPLES // 2:
        pytest.skip("only meaningful after the whole module ran")
    assert max(peaks) < PEAK_BOUND
