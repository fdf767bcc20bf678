"""``sockets.recv_into``: pyzmq's own where it exists (>= 26.4), the fallback otherwise.

Both paths must agree: the return value is the frame's size, and a frame
larger than the target is truncated (and reported by that size).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from zmqfed.federated import sockets

PATHS = [
    pytest.param(
        True,
        id="native",
        marks=pytest.mark.skipif(
            not hasattr(zmq.Socket, "recv_into"), reason=f"pyzmq {zmq.__version__}: no recv_into"
        ),
    ),
    pytest.param(False, id="fallback"),
]


@pytest.fixture(params=PATHS)
def pair(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    monkeypatch.setattr(sockets, "_HAVE_RECV_INTO", request.param)
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://recv-into")
    b.connect("inproc://recv-into")
    try:
        yield a, b
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def test_frame_lands_in_the_view(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    payload = bytes(range(256)) * 16
    a.send_multipart([b"head", payload])
    assert b.recv() == b"head"
    target = bytearray(len(payload) + 8)
    view = memoryview(target)[4 : 4 + len(payload)]
    assert sockets.recv_into(b, view) == len(payload)
    assert target[4 : 4 + len(payload)] == payload
    assert target[:4] == target[-4:] == b"\0" * 4  # nothing written outside the view


def test_larger_frame_is_truncated_and_says_so(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    a.send(b"0123456789")
    target = bytearray(4)
    assert sockets.recv_into(b, target) == 10  # > len(target): truncated
    assert target == b"0123"


def test_smaller_frame_reports_its_size(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    a.send(b"abc")
    target = bytearray(b"xxxxxx")
    assert sockets.recv_into(b, memoryview(target)) == 3
    assert target == b"abcxxx"
