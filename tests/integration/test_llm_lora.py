"""The federated LoRA example (examples/llm_lora) under zmqfed-sim, briefly.

Four collaborators, one process each, fine-tune LoRA adapters of a small
causal LM on disjoint packages of Python's standard library for two short
rounds; the held-out perplexity must fall, and each collaborator must move
only the adapters (a small part of the model) over the wire.
"""

from __future__ import annotations

import json

import pytest

from tools.bench.models import available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="needs the models extra (transformers, peft)"),
]


def test_lora_federation_lowers_held_out_perplexity(run_python, tmp_path, slow_factor):
    logdir = tmp_path / "sim"
    args = ["--star", "4", "--app", "examples.llm_lora.app:factory", "--rounds", "2"]
    args += ["--set", "steps=12", "--set", "max_kb=80", "--timeout", str(int(400 * slow_factor))]
    proc = run_python(
        module="zmqfed.cli.sim",
        args=[*args, "--logdir", str(logdir)],
        env={"HF_HUB_OFFLINE": "1"},
    )
    out, err = proc.communicate(timeout=450 * slow_factor)
    assert proc.returncode == 0, out + err
    records = [json.loads(x) for x in (logdir / "aggregator.rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert all(r["participants"] == 4 for r in records)
    first, last = records[0]["metrics"], records[-1]["metrics"]
    assert last["perplexity"] < first["perplexity"] < first["initial_perplexity"]
    adapter_bytes = first["adapter_MB"] * 1e6
    assert first["adapter_MB"] < 0.25 * first["full_model_MB"]
    for r in records:  # 4 uploads of the adapters in, 4 downloads of them out (and headers)
        assert 4 * adapter_bytes <= r["bytes_in"] < 4.2 * adapter_bytes
        assert 4 * adapter_bytes <= r["bytes_out"] < 4.2 * adapter_bytes
