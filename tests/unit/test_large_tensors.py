"""Large tensors: a message with one is streamed and lands in the model's own tensors.

The Maintainer cases run the real transports over an in-memory network, whose
ports land chunks with ``recv_into`` exactly like ZeroMQ's; the sizes are
scaled down with ``StreamConfig``.
"""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest
import torch

import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.federated import MemoryNetwork
from zmqfed.federated.chunked import HUGE_PAGE_BYTES, fresh_tensor
from zmqfed.functional import count_step
from zmqfed.wire import Limits, StreamConfig

KiB = 1024


def test_a_raw_message_with_a_large_tensor_is_streamed() -> None:
    config = StreamConfig(tensor_threshold=64 * KiB, chunk_bytes=16 * KiB, window_bytes=64 * KiB)
    limits = Limits()
    small = {"a": {"param": torch.zeros(16 * KiB // 4)}, "b": {"param": torch.zeros(10)}}
    large = {"a": {"param": torch.zeros(64 * KiB // 4 + 1)}}
    assert not config.should_stream(small, limits)
    assert config.should_stream(large, limits)
    assert not config.should_stream(large, limits, codec="lz4")  # compression keeps its frames
    # tied names count once towards the message threshold
    emb = torch.zeros(40 * KiB // 4)
    tied = {"wte": {"param": emb}, "head": {"param": emb}}
    assert not StreamConfig(threshold=64 * KiB).should_stream(tied, limits)
    assert StreamConfig(threshold=64 * KiB).should_stream(
        {"wte": {"param": emb}, "head": {"param": emb.clone()}}, limits
    )


def test_fresh_receive_tensors_keep_their_memory_alive() -> None:
    t = fresh_tensor((HUGE_PAGE_BYTES // 4 + 12,), torch.float32)
    assert t.dtype == torch.float32 and t.is_contiguous() and t.numel() == HUGE_PAGE_BYTES // 4 + 12
    t.fill_(2.5)
    view = t[-3:]
    del t
    gc.collect()
    view.add_(1.0)  # the mapping outlives the tensor that made it
    assert view.tolist() == [3.5, 3.5, 3.5]
    small = fresh_tensor((3, 2), torch.bfloat16)
    assert small.shape == (3, 2) and small.dtype == torch.bfloat16


STREAM = StreamConfig(tensor_threshold=32 * KiB, chunk_bytes=16 * KiB, window_bytes=64 * KiB)


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(256, 64, generator=g),  # 64 KiB: above the tensor threshold
        "proj": torch.randn(64, 64, generator=g),
        "bias": torch.randn(64, generator=g),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


@pytest.mark.parametrize("in_place", [True, False])
def test_large_tensor_download_lands_in_the_model_and_upload_arrives(in_place: bool) -> None:
    net = MemoryNetwork()
    star = topo.star(1, "ipc:///memory/large")
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
        assert agg.stats["chunks_out"] >= 4 and agg.stats["chunks_in"] >= 4  # streamed both ways
        (update,) = agg.data_list
        by_name = {n: update[p]["param"] for n, p in agg_sd.items()}
        torch.testing.assert_close(by_name["embed"], agg_sd["embed"] + 1.0, rtol=0, atol=0)
        assert torch.equal(by_name["steps"], agg_sd["steps"])
    finally:
        col.close()
        agg.close()
