"""A hostile or broken peer: every malformed message is a ProtocolError naming the fault.

Each case also checks that nothing was allocated or unpickled on the way: the
spies below record calls to the tensor decoder, the lz4 decompressor and
``cloudpickle.loads``, which a refused message must never reach.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lz4.block
import pytest
import torch

import zmqfed.wire.codec as codec_mod
import zmqfed.wire.frames as frames_mod
from zmqfed.errors import ProtocolError
from zmqfed.wire import MAGIC, PROTOCOL_VERSION, Envelope, Limits, decode, encode, header_only

Frames = list[Any]
#: The version byte this node speaks.
V = bytes([PROTOCOL_VERSION])


# ----------------------------------------------------------------------------- helpers
def valid(codec: str = "raw") -> Frames:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    env = Envelope("PUSH", "alice", tensors={"fc.weight": {"param": t}})
    return [bytes(memoryview(f)) for f in encode(env, codec=codec)]


def doc_of(frames: Frames) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(frames[0][len(MAGIC) + 1 :])
    return doc


def header(doc: Any, *, version: int = PROTOCOL_VERSION, magic: bytes = MAGIC) -> bytes:
    return magic + bytes([version]) + json.dumps(doc).encode()


def mutate(fn: Callable[[dict[str, Any]], Any], frames: Frames | None = None) -> Frames:
    frames = valid() if frames is None else frames
    doc = doc_of(frames)
    fn(doc)
    return [header(doc), *frames[1:]]


def desc(**changes: Any) -> Callable[[dict[str, Any]], None]:
    """Mutator changing the first tensor descriptor."""

    def fn(doc: dict[str, Any]) -> None:
        doc["tensors"][0].update(changes)

    return fn


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every call that would allocate tensor memory or unpickle."""
    calls: list[str] = []
    real_decode, real_decompress, real_loads = (
        frames_mod.decode_tensor,
        lz4.block.decompress,
        frames_mod.cloudpickle.loads,
    )

    def decode_tensor(*a: Any, **k: Any) -> Any:
        calls.append(f"decode_tensor raw_nbytes={k['raw_nbytes']}")
        return real_decode(*a, **k)

    def decompress(*a: Any, **k: Any) -> Any:
        calls.append(f"decompress {k.get('uncompressed_size')}")
        return real_decompress(*a, **k)

    def loads(*a: Any, **k: Any) -> Any:
        calls.append("loads")
        return real_loads(*a, **k)

    monkeypatch.setattr(frames_mod, "decode_tensor", decode_tensor)
    monkeypatch.setattr(codec_mod.lz4.block, "decompress", decompress)
    monkeypatch.setattr(frames_mod.cloudpickle, "loads", loads)
    return calls


def refused(frames: Any, match: str, limits: Limits | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        decode(frames, **({} if limits is None else {"limits": limits}))
    return info.value


# ----------------------------------------------------------------------------- header frame
HEADER_CASES: dict[str, tuple[Frames, str]] = {
    "no frames": ([], "no header frame"),
    "empty header": ([b""], "truncated"),
    "magic only": ([b"ZMQFED"], "truncated: 6 bytes"),
    "partial magic": ([b"ZMQ"], "truncated"),
    "wrong magic": ([b"XMQFED\x01{}"], r"not a zmqfed message.*b'XMQFED'"),
    "http": ([b"GET / HTTP/1.1\r\n"], "not a zmqfed message"),
    "wrong version": ([header({}, version=1)], "peer speaks protocol 1, this node speaks 2"),
    "version 0": ([header({}, version=0)], "peer speaks protocol 0"),
    "bad json": ([MAGIC + V + b"{not json"], "not valid UTF-8 JSON"),
    "truncated json": ([valid()[0][:40], valid()[1]], "not valid UTF-8 JSON"),
    "bad utf8": ([MAGIC + V + b'{"kind":"\xff"}'], "not valid UTF-8 JSON"),
    "not an object": ([MAGIC + V + b"[1,2]"], "must be an object, got list"),
    "NaN": ([MAGIC + V + b'{"x":NaN}'], "NaN"),
    "Infinity": ([MAGIC + V + b'{"x":-Infinity}'], "Infinity"),
    "1e999": ([MAGIC + V + b'{"x":1e999}'], "not finite"),
    "duplicate json key": (
        [MAGIC + V + b'{"kind":"PUSH","kind":"PULL"}'],
        "repeats the key 'kind'",
    ),
    "deep nesting": ([MAGIC + V + b"[" * 30_000 + b"]" * 30_000], "not valid UTF-8 JSON"),
    "huge int": ([MAGIC + V + b'{"seq":' + b"9" * 5000 + b"}"], "JSON"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_header_frame(case: str, spies: list[str]) -> None:
    frames, match = HEADER_CASES[case]
    refused(frames, match)
    assert spies == []


def test_oversized_header_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    monkeypatch.setattr("zmqfed.wire.header.json.loads", lambda *a, **k: parsed.append("x"))
    big = header({"pad": "x" * 70_000})
    refused([big], "max_header_bytes=65536")
    refused(
        [header({"pad": "x" * 300})],
        "has 318 bytes, limit max_header_bytes=256",
        Limits(max_header_bytes=256),
    )
    assert parsed == []


FIELD_CASES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "unknown kind": (lambda d: d.update(kind="EXPLODE"), "unknown message kind 'EXPLODE'"),
    "kind not str": (lambda d: d.update(kind=["PUSH"]), "unknown message kind"),
    "missing field": (lambda d: d.pop("seq"), "lacks the field 'seq'"),
    "extra field": (lambda d: d.update(evil=1), "unknown field 'evil'"),
    "sender int": (lambda d: d.update(sender=7), "'sender' must be a str"),
    "sender long": (lambda d: d.update(sender="x" * 256), "'sender' must be a str of at most 255"),
    "version bool": (lambda d: d.update(version=True), "'version' must be an int"),
    "version negative": (lambda d: d.update(version=-1), "'version' must be an int"),
    "seq float": (lambda d: d.update(seq=1.0), "'seq' must be an int"),
    "seq too big": (lambda d: d.update(seq=2**64), "'seq' must be an int"),
    "meta list": (lambda d: d.update(meta=[1]), "'meta' must be an object"),
    "tensors dict": (lambda d: d.update(tensors={}), "'tensors' must be a list"),
    "descriptor not object": (lambda d: d.update(tensors=[3]), "descriptor #0 must be an object"),
    "key not str": (desc(key=5), "descriptor #0: key and field must be strings"),
    "descriptor extra": (desc(offset=0), r"'fc.weight'/'param' has an unknown field 'offset'"),
    "descriptor missing": (lambda d: d["tensors"][0].pop("codec"), "lacks the field 'codec'"),
    "dtype object": (desc(dtype="object"), r"'fc.weight'/'param': dtype 'object' is not one of"),
    "dtype torch.float32": (desc(dtype="torch.float32"), "dtype 'torch.float32'"),
    "dtype dunder": (desc(dtype="__class__"), "dtype '__class__'"),
    "dtype int": (desc(dtype=4), "dtype 4"),
    "dtype mismatch": (
        desc(dtype="float64"),
        r"tensor 'fc.weight'/'param': shape \[3, 4\] float64 needs 96 bytes, header says 48",
    ),
    "shape mismatch": (
        desc(shape=[3, 3]),
        r"tensor 'fc.weight'/'param': shape \[3, 3\] float32 needs 36 bytes, header says 48",
    ),
    "rawbytes lie": (
        desc(rawbytes=40, nbytes=40),
        r"tensor 'fc.weight'/'param': shape \[3, 4\] float32 needs 48 bytes, header says 40",
    ),
    "raw nbytes lie": (desc(nbytes=40), "raw frame must have rawbytes=48"),
    "negative dim": (desc(shape=[-3, -4]), "shape entry must be an int"),
    "float dim": (desc(shape=[3.0, 4]), "shape entry must be an int"),
    "bool dim": (desc(shape=[True, 48]), "shape entry must be an int"),
    "shape str": (desc(shape="[3, 4]"), "shape must be a list"),
    "rank 33": (desc(shape=[1] * 33), "at most 32"),
    "prod overflows int64": (desc(shape=[2**62, 2**62], rawbytes=2**126), "too large"),
    "empty but huge strides": (desc(shape=[0, 2**62, 2**62], rawbytes=0, nbytes=0), "too large"),
    "codec auto on wire": (desc(codec="auto"), "codec 'auto' is not one of"),
    "codec unknown": (desc(codec="gzip"), "codec 'gzip'"),
    "lz4 with zero raw": (
        desc(codec="lz4", shape=[0], rawbytes=0, nbytes=5),
        "cannot hold 0 bytes",
    ),
    "duplicate key": (lambda d: d["tensors"].append(dict(d["tensors"][0])), "appears twice"),
    "object malformed": (lambda d: d.update(object=[1]), "pickle is not enabled"),
}


@pytest.mark.parametrize("case", list(FIELD_CASES))
def test_bad_header_field(case: str, spies: list[str]) -> None:
    fn, match = FIELD_CASES[case]
    refused(mutate(fn), match)
    assert spies == []


def test_header_only_reports_the_same_faults() -> None:
    with pytest.raises(ProtocolError, match="unknown message kind"):
        header_only(mutate(lambda d: d.update(kind="NOPE")))
    with pytest.raises(ProtocolError, match="no header frame"):
        header_only([])
    with pytest.raises(ProtocolError, match="not a buffer"):
        header_only(12345)


# ----------------------------------------------------------------------------- frames
def test_frame_count_and_lengths(spies: list[str]) -> None:
    h, t = valid()
    refused([h], r"message has 1 frames, header describes 2 \(1 header \+ 1 tensors\)")
    refused([h, t, t], "message has 3 frames, header describes 2")
    refused([h, t[:-1]], r"tensor 'fc.weight'/'param': frame has 47 bytes, header says 48")
    refused([h, t + b"\0"], "frame has 49 bytes, header says 48")
    refused([h, 12], "frame 1 is a int, not a buffer")
    assert spies == []


def test_not_a_frame_sequence(spies: list[str]) -> None:
    h, t = valid()
    refused(h, "needs a sequence of frames, got bytes")
    refused(None, "got NoneType")
    refused(iter([h, t]), "got list_iterator")
    refused([object()], "frame 0 is a object")
    assert spies == []


def test_too_many_descriptors_refused_before_reading_them() -> None:
    # the count is checked first: 10**5 junk descriptors cost no per-entry work
    frames = mutate(lambda d: d.update(tensors=[0] * 3))
    refused(frames, "lists 3 tensors, limit max_tensors=2", Limits(max_tensors=2))


def test_total_over_limit_refused_without_allocating(spies: list[str]) -> None:
    # one terabyte claimed by a 2-frame message; the frame itself is tiny
    frames = mutate(desc(shape=[2**38], rawbytes=2**40, nbytes=2**40))
    tiny = Limits(max_message_bytes=2**20, max_frame_bytes=2**41)
    refused(frames, r"hold 1099511627776 bytes, limit max_message_bytes=1048576", tiny)
    refused(frames, "max_frame_bytes", Limits(max_message_bytes=2**20))  # the frame check
    # the sum counts: two tensors of 600 KiB each against 1 MiB
    two = {f"t{i}": {"p": torch.zeros(150 * 1024)} for i in range(2)}
    big = [bytes(memoryview(f)) for f in encode(Envelope("PUSH", "a", tensors=two))]
    refused(
        big, "tensors up to tensor 't1'/'p' hold 1228800 bytes", Limits(max_message_bytes=2**20)
    )
    assert spies == []


def test_frame_over_max_frame_bytes(spies: list[str]) -> None:
    refused(valid(), "frame of 48 bytes exceeds max_frame_bytes=47", Limits(max_frame_bytes=47))
    assert spies == []


# ----------------------------------------------------------------------------- lz4
def test_lz4_bomb_decompressing_past_the_claim(spies: list[str]) -> None:
    bomb = lz4.block.compress(b"\0" * (1 << 20), store_size=False)  # ~4 KiB for 1 MiB
    frames = mutate(desc(codec="lz4", shape=[1024], rawbytes=4096, nbytes=len(bomb)))
    frames[1] = bomb
    refused(frames, r"tensor 'fc.weight'/'param': corrupt lz4 frame")
    assert spies == ["decode_tensor raw_nbytes=4096", "decompress 4096"]  # capped at the claim


def test_lz4_stream_shorter_than_the_claim() -> None:
    short = lz4.block.compress(b"\1" * 1000, store_size=False)
    frames = mutate(desc(codec="shuffle-lz4", shape=[1000], rawbytes=4000, nbytes=len(short)))
    frames[1] = short
    refused(frames, "shuffle-lz4 frame decompressed to 1000 bytes, header says 4000")


def test_lz4_claim_above_limit_refused_before_decompressing(spies: list[str]) -> None:
    bomb = lz4.block.compress(b"\0" * (8 << 20), store_size=False)
    frames = mutate(desc(codec="lz4", shape=[2 << 20], rawbytes=8 << 20, nbytes=len(bomb)))
    frames[1] = bomb
    refused(frames, "max_message_bytes=1048576", Limits(max_message_bytes=1 << 20))
    assert spies == []


def test_lz4_garbage_and_stored_size_ignored() -> None:
    frames = valid("lz4")
    refused([frames[0], b"\xff" * len(frames[1])], "corrupt lz4 frame")
    # a stream with a stored-size prefix is not our format: refused, not trusted
    sized = lz4.block.compress(torch.arange(12.0).numpy().tobytes(), store_size=True)
    frames = mutate(desc(codec="lz4", nbytes=len(sized)), valid("lz4"))
    frames[1] = sized
    refused(frames, "lz4 frame")


def test_bool_bytes_must_be_0_or_1() -> None:
    env = Envelope("PUSH", "a", tensors={"m": {"mask": torch.ones(4, dtype=torch.bool)}})
    h = bytes(encode(env)[0])
    refused(
        [h, b"\x01\x02\x00\x01"], r"tensor 'm'/'mask': bool tensor holds bytes other than 0 and 1"
    )


# ----------------------------------------------------------------------------- pickle
class _CreatesFile:
    """Unpickling this opens (creates) a file: a stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _pickle_message(payload: bytes) -> Frames:
    doc = doc_of(valid())
    doc["object"] = {"nbytes": len(payload)}
    return [header(doc), valid()[1], payload]


def test_pickle_frame_refused_without_unpickling(tmp_path: Path, spies: list[str]) -> None:
    target = tmp_path / "pwned"
    frames = _pickle_message(pickle.dumps(_CreatesFile(target)))
    err = refused(frames, r"pickle is not enabled here \(Limits.allow_pickle=False\)")
    assert "refused without unpickling" in str(err)
    assert not target.exists()
    assert spies == []
    # control: the payload is live, an endpoint that opted in does run it
    out = decode(frames, limits=Limits(allow_pickle=True))
    out.obj.close()
    assert target.exists()


def test_pickle_enabled_limits_and_errors(tmp_path: Path) -> None:
    on = Limits(allow_pickle=True, max_object_bytes=1000)
    env = Envelope("PUSH", "a", obj={"hello": [1, 2, 3]})
    assert decode(encode(env, limits=on), limits=on).obj == {"hello": [1, 2, 3]}
    refused(_pickle_message(b"x" * 1001), "object nbytes must be an int in", on)
    refused(_pickle_message(b"not a pickle"), "object frame cannot be unpickled", on)
    frames = _pickle_message(b"x" * 10)
    refused([*frames[:2], b"x" * 11], "object frame has 11 bytes, header says 10", on)
    refused(frames[:2], "header describes 3", on)


def test_unexpected_errors_become_protocol_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise MemoryError("simulated")

    monkeypatch.setattr(frames_mod, "decode_tensor", boom)
    err = refused(valid(), r"malformed message \(MemoryError: simulated\)")
    assert isinstance(err.__cause__, MemoryError)
