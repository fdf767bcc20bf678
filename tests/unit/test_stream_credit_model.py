"""The credit rule of ``InStream`` never leaves a stream stuck, for any chunk and window.

A model of one stream: the sender follows ``ChunkLayout.plan`` and sends
while its credit covers the next chunk; the receiver lands chunks one at a
time and grants what ``InStream.credit`` says after each.  A stall is a
moment with nothing in flight, the next chunk above the sender's credit,
and no grant coming.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqfed.federated.chunked import InStream
from zmqfed.wire import ChunkLayout, Envelope, Limits, decode, encode, encode_tensors


def _announce(sizes: list[int], chunk: int) -> Envelope:
    tensors = {
        f"t{i:02d}": {"param": torch.zeros(n, dtype=torch.uint8)} for i, n in enumerate(sizes)
    }
    limits = Limits(max_frame_bytes=max(chunk, 1024))
    encoded = encode_tensors(tensors, codec="raw", limits=limits, streamed=True)
    frames = encode(Envelope("PUSH", "alpha"), limits=limits, encoded=encoded, stream=("s", chunk))
    return decode(frames, limits=limits)


def _run(sizes: list[int], chunk: int, window: int) -> int:
    """Stream ``sizes`` under the credit rule; the CREDIT messages it took (fails on a stall)."""
    env = _announce(sizes, chunk)
    receiver = InStream(env, window)
    plan = list(ChunkLayout(sizes).plan(chunk))
    credit, in_flight, credits = receiver.credit(), [], 1
    while plan or in_flight:
        while plan and plan[0][1] <= credit:  # send while credit lasts
            offset, nbytes = plan.pop(0)
            credit -= nbytes
            in_flight.append((offset, nbytes))
        if not in_flight:
            raise AssertionError(
                f"stalled at {receiver.received}/{receiver.total} bytes: next chunk "
                f"{plan[0][1]} > credit {credit} (chunk {chunk}, window {window})"
            )
        offset, nbytes = in_flight.pop(0)
        receiver.target(offset, nbytes)  # checks offset, size and credit
        receiver.landed(offset, nbytes)
        grant = receiver.credit()
        if grant:
            credit += grant
            credits += 1
    assert receiver.done
    return credits


def test_a_small_tensor_before_a_large_one_with_window_equal_to_chunk() -> None:
    KiB = 1024  # the reported case: 10 KiB then 128 KiB, 64 KiB chunks and window
    _run([10 * KiB, 128 * KiB], 64 * KiB, 64 * KiB)


@settings(max_examples=400, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 700), min_size=1, max_size=12),
    chunk=st.integers(1, 400),
    extra=st.integers(0, 900),
)
def test_no_chunk_and_window_sizes_stall_a_stream(sizes: list[int], chunk: int, extra: int) -> None:
    _run(sizes, chunk, chunk + extra)


def test_a_wide_window_still_batches_credit_per_chunk() -> None:
    # 64 chunks of 100 bytes under a window of 8 chunks: about one CREDIT per chunk, not per byte
    credits = _run([6400], 100, 800)
    assert credits <= 64 + 1
