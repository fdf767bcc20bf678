"""Credit never deadlocks a stream, whatever the chunk and window sizes (docs/protocol.md §6).

A receiver used to grant credit in whole-chunk steps only. With a window
smaller than two chunks, a small tensor packed into a chunk of its own left
the sender short of the next full chunk and the receiver waiting for a
chunk's worth of room: both sides stalled. These tests stream real models
both ways over tcp with such settings.
"""

from __future__ import annotations

import threading

import pytest
import torch

import zmqfed.topo as topo
from tests.integration.test_protocol_faults import _star
from zmqfed.core import Maintainer
from zmqfed.functional import count_step
from zmqfed.wire import StreamConfig

KiB = 1024


def _model(seed: int) -> dict[str, torch.Tensor]:
    """A 10 KiB tensor, then a 128 KiB one: packed into a chunk of its own, then two chunks."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a_small": torch.randn(10 * KiB // 4, generator=g),
        "b_large": torch.randn(32 * KiB, generator=g),
    }


@pytest.mark.parametrize(
    ("chunk", "window"),
    [(64 * KiB, 64 * KiB), (64 * KiB, 100 * KiB), (48 * KiB, 50 * KiB)],
    ids=["window=chunk", "window<2chunks", "odd-sizes"],
)
def test_streams_finish_both_ways_with_a_window_below_two_chunks(
    free_tcp_endpoint, slow_factor, chunk, window
):
    stream = StreamConfig(threshold=1, chunk_bytes=chunk, window_bytes=window)
    topology = _star(free_tcp_endpoint, ("alpha",))
    served = _model(1)
    agg = Maintainer(
        topo.analysis(topology, "aggregator")[0], served, stream=stream, timeout=20 * slow_factor
    )
    with agg:
        count_step(1)
    result: dict[str, object] = {}

    def collaborator() -> None:
        own = _model(2)
        m = Maintainer(
            topo.analysis(topology, "alpha")[0], own, stream=stream, timeout=20 * slow_factor
        )
        try:
            m.step(upload=False)  # a streamed download
            result["download"] = {k: f["param"].clone() for k, f in m.data.items()}
            m.unpackage()
            with torch.no_grad():
                own["b_large"].mul_(2)
            m.package()
            m.step(download=False)  # a streamed upload
        except BaseException as exc:
            result["error"] = exc
        finally:
            m.close()

    thread = threading.Thread(target=collaborator, daemon=True)
    thread.start()
    try:
        agg.step()
        upload = agg.data_list[0]
        stats = agg.stats
    finally:
        thread.join(30 * slow_factor)
        agg.close()
    assert "error" not in result, result.get("error")
    for name, t in served.items():
        assert torch.equal(result["download"][name], t), name  # type: ignore[index]
        want = t * 2 if name == "b_large" else t
        assert torch.equal(upload[t]["param"], want), name
    assert stats["chunks_in"] >= 3 and stats["chunks_out"] >= 3  # both ways in chunks
