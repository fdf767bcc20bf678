"""Codecs, decode_tensor, sender-side checks and Limits of zmqfed.wire."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.wire import (
    DEFAULT_LIMITS,
    Envelope,
    Limits,
    decode,
    decode_tensor,
    encode,
    encode_tensor,
)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bytes (bit-exact, NaN-safe)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


# ----------------------------------------------------------------------------- codecs
def test_auto_picks_raw_for_dense_weights_and_lz4_for_sparse() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=gen)
    assert encode_tensor(w, "auto")[0] == "raw"
    d = torch.randn(256, 256, generator=gen)
    d[torch.rand(256, 256, generator=gen) < 0.9] = 0
    used, buf = encode_tensor(d, "auto")
    assert used == "lz4" and memoryview(buf).nbytes < 0.5 * d.numel() * 4
    assert encode_tensor(torch.zeros(1000), "auto")[0] == "raw"  # < 4 KiB: never compressed
    assert encode_tensor(w.bfloat16(), "auto")[0] == "shuffle-lz4"  # ~0.84, measured


def test_auto_samples_beyond_the_head() -> None:
    # zeros at the head only: the probe sees some, the whole tensor barely compresses
    t = torch.randn(1 << 20, generator=torch.Generator().manual_seed(3))
    t[: 1 << 15] = 0
    assert encode_tensor(t, "auto")[0] == "raw"


def test_encode_tensor_edge_cases() -> None:
    used, buf = encode_tensor(torch.empty(0, 3), "lz4")
    assert used == "raw" and memoryview(buf).nbytes == 0
    used, buf = encode_tensor(torch.tensor(2.5, dtype=torch.float64), "raw")
    assert memoryview(buf).nbytes == 8
    with pytest.raises(ConfigError, match="unknown codec"):
        encode_tensor(torch.zeros(1), "gzip")
    with pytest.raises(ConfigError, match="dense"):
        encode_tensor(torch.zeros(3, 3).to_sparse(), "raw")
    with pytest.raises(ConfigError, match="bytes"):
        encode_tensor(torch.empty(3, device="meta"), "raw")


@pytest.mark.parametrize("codec", ["raw", "lz4", "shuffle-lz4"])
def test_decode_tensor_directly(codec: str) -> None:
    t = torch.randn(8, 9, dtype=torch.float64)
    used, buf = encode_tensor(t, codec)
    assert used == codec
    out = decode_tensor(buf, dtype=torch.float64, shape=(8, 9), codec=used, raw_nbytes=576)
    assert_same(out, t)
    with pytest.raises(ProtocolError, match="needs 576 bytes, header says 575"):
        decode_tensor(buf, dtype=torch.float64, shape=(8, 9), codec=used, raw_nbytes=575)


def test_decode_tensor_refuses_bad_arguments() -> None:
    with pytest.raises(ProtocolError, match="non-negative ints"):
        decode_tensor(
            bytearray(16), dtype=torch.float32, shape=(-1, -4), codec="raw", raw_nbytes=16
        )
    with pytest.raises(ProtocolError, match=r"'x': cannot decode \(RuntimeError"):
        decode_tensor(
            b"", dtype=torch.float32, shape=(0, 2**62, 2**62), codec="raw", raw_nbytes=0, name="'x'"
        )
    with pytest.raises(ProtocolError, match="unknown codec 'auto'"):
        decode_tensor(bytearray(4), dtype=torch.float32, shape=(1,), codec="auto", raw_nbytes=4)
    with pytest.raises(ProtocolError, match="raw frame has 3 bytes, expected 4"):
        decode_tensor(bytearray(3), dtype=torch.float32, shape=(1,), codec="raw", raw_nbytes=4)


def test_decode_tensor_empty_and_0d() -> None:
    out = decode_tensor(b"", dtype=torch.bfloat16, shape=[0, 5], codec="raw", raw_nbytes=0)
    assert out.shape == (0, 5) and out.dtype == torch.bfloat16
    out = decode_tensor(bytearray(b"\x01"), dtype=torch.bool, shape=[], codec="raw", raw_nbytes=1)
    assert out.shape == () and out.item() is True


# ----------------------------------------------------------------------------- sender checks
def test_sender_rejects_bad_fields() -> None:
    with pytest.raises(ConfigError, match="kind 'PUSHY'"):
        encode(Envelope("PUSHY", "a"))
    with pytest.raises(ConfigError, match="sender"):
        encode(Envelope("PUSH", "x" * 256))
    with pytest.raises(ConfigError, match="version"):
        encode(Envelope("PUSH", "a", version=-1))
    with pytest.raises(ConfigError, match="seq"):
        encode(Envelope("PUSH", "a", seq=True))
    with pytest.raises(ConfigError, match="unknown codec"):
        encode(Envelope("PUSH", "a"), codec="zstd")
    with pytest.raises(ConfigError, match=r"meta\['bad'\]"):
        encode(Envelope("PUSH", "a", meta={"bad": {1, 2}}))
    with pytest.raises(ConfigError, match="non-finite"):
        encode(Envelope("PUSH", "a", meta={"x": [float("nan")]}))
    with pytest.raises(ConfigError, match="UTF-8"):
        encode(Envelope("PUSH", "a", meta={"x": "\ud800"}))
    with pytest.raises(ConfigError, match="values tensors"):
        encode(Envelope("PUSH", "a", tensors={"k": {"p": [1, 2]}}))  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="Limits"):
        encode(Envelope("PUSH", "a"), limits={"max_tensors": 1})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32]
)
def test_sender_rejects_dtypes_outside_the_table(dtype: torch.dtype) -> None:
    t = torch.zeros(2, dtype=dtype)
    with pytest.raises(ConfigError, match=r"tensor 'fc'/'param': dtype"):
        encode(Envelope("PUSH", "a", tensors={"fc": {"param": t}}))


def test_sender_enforces_limits_loudly() -> None:
    tensors = {f"t{i}": {"p": torch.zeros(10)} for i in range(5)}
    with pytest.raises(ProtocolError, match="max_tensors=4"):
        encode(Envelope("PUSH", "a", tensors=tensors), limits=Limits(max_tensors=4))
    with pytest.raises(ProtocolError, match="max_message_bytes=199"):
        encode(Envelope("PUSH", "a", tensors=tensors), limits=Limits(max_message_bytes=199))
    with pytest.raises(
        ProtocolError, match="'t0'/'p': raw frame of 40 bytes exceeds max_frame_bytes=39"
    ):
        encode(Envelope("PUSH", "a", tensors=tensors), limits=Limits(max_frame_bytes=39))
    # compressed frames are checked after compression: zeros fit, noise does not
    big = {"z": {"p": torch.zeros(10_000)}}
    assert (
        len(
            encode(
                Envelope("PUSH", "a", tensors=big), codec="lz4", limits=Limits(max_frame_bytes=1000)
            )
        )
        == 2
    )
    noisy = {"n": {"p": torch.randn(10_000)}}
    with pytest.raises(ProtocolError, match="'n'/'p': lz4 frame"):
        encode(
            Envelope("PUSH", "a", tensors=noisy), codec="lz4", limits=Limits(max_frame_bytes=1000)
        )
    with pytest.raises(ProtocolError, match="max_header_bytes=256"):
        encode(Envelope("PUSH", "a", meta={"x": "y" * 300}), limits=Limits(max_header_bytes=256))


def test_pickle_is_opt_in() -> None:
    env = Envelope("PUSH", "a", obj={"f": [1, 2]})
    with pytest.raises(ProtocolError, match="pickle is disabled"):
        encode(env)
    out = decode(
        encode(Envelope("PUSH", "a", obj=lambda x: x + 1), limits=Limits(allow_pickle=True)),
        limits=Limits(allow_pickle=True),
    )
    assert out.obj(2) == 3
    with pytest.raises(ProtocolError, match="max_object_bytes"):
        encode(
            Envelope("PUSH", "a", obj=b"x" * 1000),
            limits=Limits(allow_pickle=True, max_object_bytes=100),
        )


# ----------------------------------------------------------------------------- limits
def test_limits_defaults_and_maxmsgsize() -> None:
    assert Limits() == DEFAULT_LIMITS
    assert DEFAULT_LIMITS.max_header_bytes == 64 * 1024 and DEFAULT_LIMITS.allow_pickle is False
    assert DEFAULT_LIMITS.socket_maxmsgsize() == 4 * 2**30 + 64 * 1024
    assert Limits(max_frame_bytes=2**20).socket_maxmsgsize() == 2**20 + 65536
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_LIMITS.allow_pickle = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        Limits(1024)  # type: ignore[call-arg]  # keyword-only


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tensors": -1}, "max_tensors"),
        ({"max_frame_bytes": 2**63}, "max_frame_bytes"),
        ({"max_message_bytes": 1.5}, "max_message_bytes"),
        ({"max_object_bytes": True}, "max_object_bytes"),
        ({"max_header_bytes": 10}, "max_header_bytes"),
        ({"allow_pickle": 1}, "allow_pickle"),
    ],
)
def test_limits_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=f"Limits.{field}"):
        Limits(**kwargs)
