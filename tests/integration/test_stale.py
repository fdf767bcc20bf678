"""Stale uploads (answering an older model) are refused, never averaged in as fresh."""

from __future__ import annotations

import threading

import pytest
import torch

import zmqfed
import zmqfed.topo as topo
from zmqfed.api import stale_check
from zmqfed.core import Maintainer, steps
from zmqfed.data import (
    DirichletPartitioner,
    PartitionerDataset,
    digits_dataset,
    samples_distribution,
)
from zmqfed.errors import RemoteError


def test_stale_upload_is_discarded_and_a_fresh_one_counts(free_tcp_endpoint, slow_factor):
    topology = topo.star(1, free_tcp_endpoint)
    ready, result = threading.Event(), {}

    def aggregator() -> None:
        m = Maintainer(
            topo.analysis(topology, "aggregator")[0],
            {"w": torch.zeros(2)},
            timeout=60 * slow_factor,
        )
        try:
            m.update_version(3)  # serving version 3: fresh uploads are tagged 4
            m.register_step_hook(40, stale_check, steps.before_download)
            with m:
                zmqfed.functional.count_step(1)
            ready.set()
            m.step()
            result["metas"] = [dict(meta) for meta in m.meta_list]
        except BaseException as exc:
            result["error"] = exc
        finally:
            m.close()

    thread = threading.Thread(target=aggregator)
    thread.start()
    assert ready.wait(30)
    c = Maintainer(
        topo.analysis(topology, "client0")[0], {"w": torch.ones(2)}, timeout=30 * slow_factor
    )
    try:
        c.update_version(2)  # an upload answering an older model
        c.meta["instances"] = 5
        with pytest.raises(RemoteError) as info:
            c.step(download=False)
        assert info.value.code == "discarded" and "stale upload: version 2" in info.value.reason
        c.update_version(4)
        c.step(download=False)  # the fresh one is accepted
    finally:
        c.close()
    thread.join(30)
    assert "error" not in result, result
    assert [meta["version"] for meta in result["metas"]] == [4]


def test_samples_distribution_function_form():
    parts = PartitionerDataset(digits_dataset(), 4, DirichletPartitioner(alpha=0.5, seed=1))
    rows = samples_distribution(parts, verbose=False)
    assert rows == parts.samples_distribution(verbose=False)
    assert sum(map(sum, rows)) <= len(digits_dataset()) and len(rows) == 4
