"""Round trips, zero-copy guarantees, codecs and sender-side limits of zmqfed.wire."""

from __future__ import annotations

import ast
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import zmqfed.wire as wire
from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.wire import (
    CODECS,
    KINDS,
    MAGIC,
    PROTOCOL_VERSION,
    Envelope,
    Limits,
    decode,
    encode,
    encode_tensors,
    header_only,
)
from zmqfed.wire.header import DTYPES

WIRE_DIR = Path(wire.__file__).parent


# ----------------------------------------------------------------------------- helpers
def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as uint8: comparing these is bit-exact and NaN-safe."""
    return t.detach().resolve_conj().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(_bytes_of(a), _bytes_of(b))


def _address(buf: Any) -> tuple[int, int]:
    """(start address, length) of a writable or read-only buffer."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    return arr.ctypes.data, arr.nbytes


def _inside(t: torch.Tensor, buf: Any) -> bool:
    start, n = _address(buf)
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + n


def _sample(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Values that exercise every bit: NaN, ±inf and -0.0 for floats, full range ints."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.5
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        flat = t.view(-1)
        specials = [float("nan"), float("inf"), float("-inf"), -0.0]
        for i, v in enumerate(specials[: flat.numel()]):
            flat[i] = v
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


SHAPES = {
    "0d": (),
    "empty": (0, 3),
    "1d": (7,),
    "3d": (2, 3, 5),
    "transposed": (6, 4),
    "param": (4, 3),
    "large-sparse": (64, 64),
}


def _make(dtype: torch.dtype, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}/{kind}".encode()))
    t = _sample(dtype, SHAPES[kind], gen)
    if kind == "transposed":
        t = t.t()
        assert not t.is_contiguous()
    if kind == "param" and (dtype.is_floating_point or dtype.is_complex):
        t = torch.nn.Parameter(t)
    if kind == "large-sparse":  # > 4 KiB and compressible, so auto compresses
        t = torch.where(torch.rand(t.shape, generator=gen) < 0.9, torch.zeros_like(t), t)
    return t


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_round_trip_every_dtype_shape_codec(dtype_name: str, kind: str, codec: str) -> None:
    t = _make(DTYPES[dtype_name], kind)
    env = Envelope("PUSH", "alice", tensors={"m.w": {"param": t, "exp_avg": t.detach().clone()}})
    frames = encode(env, codec=codec)
    for as_bytes in (False, True):  # writable (zero-copy) and read-only (copied) frames
        given = [bytes(memoryview(f)) if as_bytes else bytearray(f) for f in frames]
        out = decode(given)
        assert_same(out.tensors["m.w"]["param"], t.detach())
        assert_same(out.tensors["m.w"]["exp_avg"], t.detach())
        assert not out.tensors["m.w"]["param"].requires_grad


def test_envelope_fields_and_meta_round_trip() -> None:
    meta = {
        "round": 3,
        "lr": 0.125,
        "names": ["a", "ü", "日本"],
        "nested": {"ok": True, "none": None, "t": (1, 2)},
        "np": np.float32(0.5),
        "torch": torch.tensor(7),
        "big": 2**70,
    }
    env = Envelope("DATA", "agg", version=9, seq=2**63 - 1, incarnation="c0ffee", meta=meta)
    out = decode(encode(env))
    assert (out.kind, out.sender, out.version, out.seq, out.incarnation) == (
        "DATA",
        "agg",
        9,
        2**63 - 1,
        "c0ffee",
    )
    assert out.meta == {
        **meta,
        "nested": {"ok": True, "none": None, "t": [1, 2]},
        "np": 0.5,
        "torch": 7,
    }
    assert out.tensors == {} and out.obj is None


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind(kind: str) -> None:
    assert decode(encode(Envelope(kind, "n"))).kind == kind


def test_header_layout() -> None:
    t = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    frames = encode(Envelope("PUSH", "a", tensors={"k": {"param": t}}))
    assert frames[0][:7] == MAGIC + bytes([PROTOCOL_VERSION])
    doc = json.loads(frames[0][7:])
    assert doc["tensors"] == [
        {
            "key": "k",
            "field": "param",
            "dtype": "int16",
            "shape": [2, 3],
            "codec": "raw",
            "nbytes": 12,
            "rawbytes": 12,
        }
    ]
    assert doc["object"] is None
    assert header_only(frames) == doc == header_only(frames[0])


def test_order_and_nesting_preserved() -> None:
    tensors = {
        f"layer{i}": {"param": torch.full((2,), float(i)), "m": torch.zeros(1)} for i in range(5)
    }
    out = decode(encode(Envelope("DATA", "a", tensors=tensors)))
    assert list(out.tensors) == list(tensors)
    assert all(list(out.tensors[k]) == ["param", "m"] for k in tensors)


def test_conj_and_neg_views_are_resolved() -> None:
    z = torch.randn(5, dtype=torch.complex64)
    out = decode(
        encode(Envelope("PUSH", "a", tensors={"z": {"c": z.conj(), "n": torch._neg_view(z)}}))
    )
    assert_same(out.tensors["z"]["c"], z.conj().resolve_conj())
    assert_same(out.tensors["z"]["n"], -z)


def test_nbytes_property() -> None:
    env = Envelope(
        "PUSH", "a", tensors={"a": {"p": torch.zeros(3, 4), "q": torch.zeros(2, dtype=torch.int8)}}
    )
    assert env.nbytes == 50
    assert decode(encode(env)).nbytes == 50
    assert "50 B" in repr(env)


# ----------------------------------------------------------------------------- zero copy
@pytest.mark.parametrize("wrap", ["bytearray", "memoryview", "frame"])
def test_raw_decode_shares_memory_with_writable_frame(wrap: str) -> None:
    t = torch.randn(100, 10)
    frames = [bytearray(f) for f in encode(Envelope("DATA", "a", tensors={"w": {"param": t}}))]

    class FakeFrame:  # what pyzmq's zmq.Frame offers: a writable .buffer memoryview
        def __init__(self, data: bytearray) -> None:
            self.buffer = memoryview(data)

    given: list[Any] = list(frames)
    if wrap == "memoryview":
        given = [memoryview(f) for f in frames]
    elif wrap == "frame":
        given = [FakeFrame(f) for f in frames]
    out = decode(given).tensors["w"]["param"]
    assert_same(out, t)
    assert _inside(out, frames[1])
    frames[1][0:4] = b"\0\0\0\0"  # the tensor *is* the frame
    assert out.view(-1)[0].item() == 0.0


def test_raw_decode_of_bytes_copies_without_warning() -> None:
    t = torch.randn(10)
    frames = [bytes(memoryview(f)) for f in encode(Envelope("DATA", "a", tensors={"w": {"p": t}}))]
    out = decode(frames).tensors["w"]["p"]  # filterwarnings=error: no "not writable" warning
    assert not _inside(out, frames[1])
    out.add_(1)  # writable, and the received bytes object is untouched
    assert frames[1] == t.numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.complex128])
def test_raw_encode_is_a_view_of_the_tensor(dtype: torch.dtype) -> None:
    t = _sample(dtype, (33, 3), torch.Generator().manual_seed(1))
    frames = encode(Envelope("DATA", "a", tensors={"w": {"p": t}}))
    buf = frames[1]
    assert isinstance(buf, np.ndarray) and buf.dtype == np.uint8
    assert buf.ctypes.data == t.data_ptr() and buf.nbytes == t.numel() * t.element_size()
    if dtype == torch.float32:
        assert np.shares_memory(buf, t.numpy())


def test_snapshot_copies_and_isolates_the_caller() -> None:
    t = torch.zeros(1000)
    env = Envelope("DATA", "a", tensors={"w": {"p": t}})
    live, snap = encode(env), encode(env, snapshot=True)
    assert np.shares_memory(live[1], t.numpy())
    assert not np.shares_memory(snap[1], t.numpy())
    t.add_(5)  # the caller keeps training while libzmq still "sends"
    assert decode([bytes(memoryview(f)) for f in snap]).tensors["w"]["p"].sum().item() == 0
    assert decode([bytes(memoryview(f)) for f in live]).tensors["w"]["p"].sum().item() == 5000


def test_snapshot_of_a_view_with_storage_offset() -> None:
    base = torch.zeros(10, 10)
    row = base[3]
    snap = encode(Envelope("DATA", "a", tensors={"r": {"p": row}}), snapshot=True)
    base.fill_(1)
    assert decode([bytearray(f) for f in snap]).tensors["r"]["p"].sum().item() == 0


def test_frames_are_reusable_for_many_peers() -> None:
    t = torch.randn(64, 64)
    frames = encode(Envelope("DATA", "a", tensors={"w": {"p": t}}), codec="lz4")
    for _ in range(3):
        assert_same(decode(frames).tensors["w"]["p"], t)


def test_encode_tensors_once_serves_many_messages() -> None:
    t = torch.randn(32, 32)
    enc = encode_tensors({"w": {"param": t}}, codec="auto", snapshot=True)
    assert enc.nbytes == 4096 and enc.encoded_nbytes == memoryview(enc.buffers[0]).nbytes
    t.zero_()
    for seq in range(3):
        frames = encode(Envelope("DATA", "agg", seq=seq, meta={"i": seq}), encoded=enc)
        out = decode(frames)
        assert out.seq == seq and out.meta == {"i": seq}
        assert out.tensors["w"]["param"].abs().sum() > 0
    with pytest.raises(ConfigError, match="not both"):
        encode(Envelope("DATA", "a", tensors={"x": {"p": t}}), encoded=enc)
    with pytest.raises(ProtocolError, match="max_message_bytes"):
        encode(Envelope("DATA", "a"), encoded=enc, limits=Limits(max_message_bytes=100))
    with pytest.raises(ConfigError, match="encode_tensors"):
        encode(Envelope("DATA", "a"), encoded=[b"x"])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- module hygiene
def test_public_api_is_pinned() -> None:
    assert sorted(wire.__all__) == sorted(
        [
            "CODECS",
            "ChunkLayout",
            "DEFAULT_LIMITS",
            "DEFAULT_STREAM",
            "KINDS",
            "Kind",
            "MAGIC",
            "PROTOCOL_VERSION",
            "EncodedTensors",
            "Envelope",
            "Limits",
            "StreamAnnounce",
            "StreamConfig",
            "decode",
            "decode_tensor",
            "encode",
            "encode_tensor",
            "encode_tensors",
            "header_only",
        ]
    )
    assert CODECS == ("raw", "lz4", "shuffle-lz4", "auto")
    assert MAGIC == b"ZMQFED" and PROTOCOL_VERSION == 2
    assert KINDS == (
        "HELLO",
        "WELCOME",
        "PULL",
        "DATA",
        "PUSH",
        "ACK",
        "WAIT",
        "ERROR",
        "BYE",
        "PING",
        "PONG",
        "CHUNK",
        "CREDIT",
        "SET",
        "TRANSFER",
        "ASK",
        "REPLY",
    )


def test_wire_is_pure() -> None:
    """zmqfed.wire imports no zmq and no higher layer (checked on the source)."""
    banned = ("zmq", "zmqfed.topo", "zmqfed.federated", "zmqfed.core")
    for path in WIRE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not any(name == b or name.startswith(b + ".") for b in banned), (
                    path.name,
                    name,
                )
