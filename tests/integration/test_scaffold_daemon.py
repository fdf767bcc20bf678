"""SCAFFOLD under ``zmqfed-node``: a killed and restarted aggregator keeps its control variate.

The digits app (``examples/digits/daemon.py``, ``--set algo=scaffold``) runs
as real daemons; the aggregator is SIGKILLed while the collaborators train
and started again from its checkpoint. ``scaffold_digits_app`` reports the
control variates each round, and SCAFFOLD's invariant (the global ``c`` is
the weighted mean of the collaborators' ``c_i``) must hold across the
restart. Before ``ScaffoldOptimizer.state_dict`` carried the published
``c``, the resumed aggregator started it again from zero.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch

from tests.integration.test_daemon import _status, _wait_for
from zmqfed.topo import star

APP = "tests.integration.scaffold_digits_app:factory"
ROUNDS = 5
# Long local training (about 1 s a round) keeps the kill inside a round's
# training, not between an aggregation and its checkpoint.
OPTIONS = ["--set", "algo=scaffold", "--set", "epochs=40", "--set", "lr=0.05"]


def _records(state: Path) -> dict[int, dict]:
    """The last record of each round (a crash may repeat the line of the round in flight)."""
    lines = (state / "aggregator.rounds.jsonl").read_text().splitlines()
    return {r["round"]: r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_scaffold_control_variate_survives_an_aggregator_restart(
    tmp_path, free_tcp_endpoint, run_python, slow_factor
):
    topology = tmp_path / "topology.json"
    star(2, free_tcp_endpoint).save(topology)

    def node(name: str, state: Path):
        args = ["run", "--topology", str(topology), "--node", name, "--app", APP]
        args += ["--state-dir", str(state), "--no-progress", "--rounds", str(ROUNDS), *OPTIONS]
        return run_python(module="zmqfed.cli.node", args=args)

    state = tmp_path / "state"
    clients = [node(f"client{i}", tmp_path / f"c{i}") for i in range(2)]
    agg = node("aggregator", state)
    _wait_for(
        lambda: _status(state, "aggregator").get("round", 0) >= 2, 120 * slow_factor, "two rounds"
    )
    agg.send_signal(signal.SIGKILL)
    agg.wait(timeout=15 * slow_factor)
    saved = torch.load(state / "aggregator.ckpt", weights_only=True)
    assert 2 <= saved["round"] < ROUNDS
    c_saved = [s["c"] for s in saved["server_optim"]["state"].values()]
    assert c_saved and all(float(c.abs().sum()) > 0 for c in c_saved)  # c moved off zero

    again = node("aggregator", state)
    _, err = again.communicate(timeout=180 * slow_factor)
    assert again.returncode == 0, err
    assert f"at round {saved['round']}" in err
    logs = []
    for c in clients:
        _, c_err = c.communicate(timeout=60 * slow_factor)
        assert c.returncode == 0, c_err
        logs.append(c_err)
    redone = any("redoing that round" in log for log in logs)

    records = _records(state)
    assert sorted(records) == list(range(ROUNDS))
    assert records[0]["metrics"]["control_sum"] == 0.0
    for r in range(1, ROUNDS):
        reported = records[r]["metrics"]["control_sum"]  # weighted mean of sum(c_i) at round r
        published = records[r - 1]["metrics"]["global_control_sum"]  # sum(c) after round r - 1
        assert math.isclose(reported, published, rel_tol=1e-4, abs_tol=1e-6), (
            f"round {r}: the collaborators' mean c_i sums to {reported}, the aggregator's c "
            f"to {published} (resumed at round {saved['round']}; a round redone: {redone})"
        )
