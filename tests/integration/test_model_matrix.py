"""Real architectures, one federated round each, between real processes.

ResNet-50 (320 tensors, BatchNorm buffers with an int64 counter), GPT-2
(tied embedding and head), BERT-base, and a LLaMA wrapped by ``peft`` LoRA
whose collaborators hold only the adapters: built from ``transformers``
configs at a few MiB with the published structure (tools/bench/models.py,
nothing downloaded). The aggregator (this process) serves its model over
tcp on 127.0.0.1 to two collaborator processes, which download, take one
local SGD step and upload; it then aggregates with FedAvg and a server SGD.

The result is checked exactly: the same rule and optimizer applied in this
process to the uploads the collaborators wrote to disk, in the order they
were counted, give bit-identical tensors; and it is the instance-weighted
mean (float tensors), the maximum (integer buffers) or unchanged (tensors
nobody uploaded, the frozen LLaMA base).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import zmqfed.topo as topo
from tools.bench.models import MATRIX, available, build, exchanged
from zmqfed.core import Maintainer
from zmqfed.functional import count_step, naive_aggregation
from zmqfed.optim import FederatedOptimizer
from zmqfed.props import AGGREGATOR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="needs the models extra (transformers, peft)"),
]

HERE = Path(__file__).resolve().parent
WEIGHTS = {"client0": 1, "client1": 3}


def _server(model: Any) -> FederatedOptimizer:
    return FederatedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), AGGREGATOR)


@pytest.mark.parametrize("name", MATRIX)
def test_one_round_of_a_real_model(name, run_python, free_tcp_endpoint, tmp_path, slow_factor):
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = build(name, "small", seed=0)
    initial = copy.deepcopy(model)
    sd = model.state_dict(keep_vars=True)
    agg = Maintainer(topo.analysis(topo.star(2, free_tcp_endpoint), "aggregator")[0], sd)
    with agg:
        count_step(2)
    procs = {
        col: run_python(
            script=HERE / "model_collaborator.py",
            args=[free_tcp_endpoint, col, name, str(i + 7), str(w), str(tmp_path / f"{col}.pt")],
            env={"HF_HUB_OFFLINE": "1"},
        )
        for i, (col, w) in enumerate(WEIGHTS.items())
    }
    try:
        agg.step(timeout=240 * slow_factor)
        senders = list(agg.sender_list)
        server = _server(model)
        server.zero_grad()
        naive_aggregation(agg.data_list, agg.meta_list, optim_list=server)
        server.step()
        for col, proc in procs.items():
            out, _ = proc.communicate(timeout=120 * slow_factor)
            assert proc.returncode == 0, f"{col} failed:\n{out}"
    finally:
        agg.close()
    reports = {col: torch.load(tmp_path / f"{col}.pt") for col in WEIGHTS}
    assert sorted(senders) == sorted(WEIGHTS)

    # the same computation in this process, on the uploads as the collaborators saw them
    ref_sd = initial.state_dict(keep_vars=True)
    data_list = [
        {ref_sd[k]: {"param": v} for k, v in reports[s]["uploaded"].items()} for s in senders
    ]
    meta_list = [{"instances": WEIGHTS[s]} for s in senders]
    ref_server = _server(initial)
    ref_server.zero_grad()
    naive_aggregation(data_list, meta_list, optim_list=ref_server)
    ref_server.step()
    result, reference = model.state_dict(), initial.state_dict()
    for key, value in result.items():
        assert torch.equal(value, reference[key]), f"{name}: {key} differs from the reference"

    # what the reference means: weighted mean / max / unchanged
    start = build(name, "small", seed=0).state_dict()
    uploaded = {s: reports[s]["uploaded"] for s in senders}
    moved = averaged = 0
    for key, value in result.items():
        sent = [(uploaded[s][key], WEIGHTS[s]) for s in senders if key in uploaded[s]]
        if not sent:
            assert torch.equal(value, start[key]), f"{name}: {key} changed, nobody sent it"
        elif not value.is_floating_point():
            assert torch.equal(value, torch.maximum(sent[0][0], sent[1][0])), key
        else:
            mean = sum(t.double() * w for t, w in sent) / sum(w for _, w in sent)
            torch.testing.assert_close(value.double(), mean, rtol=1e-5, atol=1e-6, msg=key)
            averaged += 1
            moved += not torch.equal(value, start[key])
    assert moved >= 0.9 * averaged, f"{name}: only {moved} of {averaged} tensors moved"

    exchanged_sd, partial = exchanged(build(name, "small", seed=0), name)
    for col in WEIGHTS:
        assert reports[col]["downloaded"] == sorted(exchanged_sd)
    if name == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # still tied
        for col in WEIGHTS:
            assert reports[col]["tied_on_arrival"] == ["lm_head.weight"]
            unique = {id(t): t for t in exchanged_sd.values()}
            nbytes = sum(t.numel() * t.element_size() for t in unique.values())
            assert reports[col]["bytes_out"] == nbytes  # the embedding once
    if name == "llama-lora":
        assert partial and all("lora_" in k for k in exchanged_sd)
        assert len(exchanged_sd) < len(result) / 3
    if name == "resnet50":
        assert len(result) == 320
        counters = [k for k, v in result.items() if not v.is_floating_point()]
        assert len(counters) == 53 and all(k.endswith("num_batches_tracked") for k in counters)
