"""Differential privacy over real sockets, collaborators as processes.

* central: one collaborator tries to move the model by 1e6 per value; the
  aggregator's clip holds it to the bound, epsilon is recorded after every
  round (records and the JSON lines file), and the federation stops at the
  target epsilon with every collaborator ending cleanly.
* local: collaborators clip their own updates before they leave; what the
  aggregator receives is within the clip, and under adaptive clipping their
  noised bits arrive in meta and the served clip moves.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch
from torch import nn

import zmqfed
import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.functional import (
    AdaptiveClipping,
    RDPAccountant,
    central_dp,
    local_dp,
    naive_aggregation,
)
from zmqfed.optim import FederatedOptimizer

NAMES = ("alpha", "beta", "gamma")

# argv: endpoint, rank, step (added to every value per round), mode ("central" / "local")
COLLABORATOR = """
import faulthandler, sys
faulthandler.dump_traceback_later(240, exit=True)
import torch
from torch import nn
import zmqfed.topo as topo
from zmqfed.api import run_collaborator
from zmqfed.core import Maintainer
from zmqfed.functional import AdaptiveClipping, local_dp

endpoint, rank, step, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
topology = topo.Topology()
aggregator = topology.add_node(topo.Node("aggregator", endpoint))
for name in ("alpha", "beta", "gamma"):
    topology.add_edge(topo.Node(name), aggregator)
network = nn.Linear(20, 3)
m = Maintainer(topo.analysis(topology, ("alpha", "beta", "gamma")[rank])[0], network.state_dict(keep_vars=True))
if mode == "local":
    with m:
        local_dp(0.0, 0.5, adaptive=AdaptiveClipping(count_stddev=0.05), seed=rank)

def train(meta):
    with torch.no_grad():
        for p in network.parameters():
            p.add_(step)
    return {"instances": 10 ** (rank + 1)}

answered = run_collaborator(m, train, timeout=120)
m.close()
print("DONE", answered, flush=True)
"""


def federation(endpoint: str) -> tuple[Maintainer, nn.Module]:
    topology = topo.Topology()
    aggregator = topology.add_node(topo.Node("aggregator", endpoint))
    for name in NAMES:
        topology.add_edge(topo.Node(name), aggregator)
    network = nn.Linear(20, 3)
    m = Maintainer(topo.analysis(topology, "aggregator")[0], network.state_dict(keep_vars=True))
    return m, network


def flat(network: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in network.parameters()])


def test_central_dp_clips_an_attacker_and_stops_at_the_budget(
    free_tcp_endpoint: str, run_python, slow_factor: float, tmp_path: Path
) -> None:
    m, network = federation(free_tcp_endpoint)
    z, clip = 0.5, 1.0
    acc = RDPAccountant()
    acc.step(z, 1.0, steps=2)
    target = (acc.epsilon(1e-5) + acc.epsilon_after(1e-5, z, 1.0)) / 2  # 2 rounds fit, 3 do not
    with m:
        zmqfed.functional.count_step(3)
        mech = central_dp(z, clip, target_epsilon=target, seed=0)
    steps = ["0.01", "-0.02", "1e6"]  # gamma is the attacker
    procs = [
        run_python(COLLABORATOR, args=[free_tcp_endpoint, str(rank), steps[rank], "central"])
        for rank in range(3)
    ]
    models = [flat(network)]
    records = tmp_path / "rounds.jsonl"
    optim = FederatedOptimizer(torch.optim.SGD(network.parameters(), lr=1.0), "aggregator")
    api = zmqfed.API(
        m,
        optim,
        10,
        naive_aggregation,
        progress=False,
        record_path=records,
        step_timeout=60 * slow_factor,
        on_round=lambda record: models.append(flat(network)),
    )
    try:
        api.run()
    finally:
        m.close(final=True)
    for proc in procs:
        out, err = proc.communicate(timeout=120 * slow_factor)
        assert proc.returncode == 0, out + err
        assert "DONE 2" in out  # both rounds answered, then told the federation ended

    assert len(api.records) == 2 and "privacy budget" in (api.ended_early or "")
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    check = RDPAccountant()
    for line, record in zip(lines, api.records, strict=True):
        check.step(z, 1.0)
        assert line["metrics"]["epsilon"] == record.metrics["epsilon"]
        assert abs(record.metrics["epsilon"] - check.epsilon(1e-5)) < 1e-9
    assert mech.epsilon <= target
    # without the clip the attacker alone would move the model by 1e6 / 3 per value; with it
    # every round moves it by at most the clipped mean (norm <= 1) plus noise of std z/3 per value
    noise_bound = 6 * z * clip / 3 * math.sqrt(63)
    for before, after in itertools.pairwise(models):
        assert float((after - before).norm()) < 1.0 + noise_bound < 30


def test_local_dp_uploads_arrive_clipped_with_their_bits(
    free_tcp_endpoint: str, run_python, slow_factor: float
) -> None:
    m, network = federation(free_tcp_endpoint)
    norms: list[float] = []
    bits: list[float] = []

    def inspect(maintainer: Maintainer, ok: bool) -> None:
        upload = maintainer.data_list[-1]
        delta = [(s["param"] - p.detach()).reshape(-1) for p, s in upload.items()]
        norms.append(float(torch.cat(delta).norm()))
        bits.append(float(maintainer.meta_list[-1]["dp_clipped"]))

    with m:
        zmqfed.functional.count_step(3)
        local_dp(0.0, 0.5, adaptive=AdaptiveClipping(count_stddev=0.05))
        m.register_step_hook(50, inspect, zmqfed.functional.after_download)
    steps = ["0.001", "0.5", "-0.5"]  # norms 0.008 (within), 4 and 4 (clipped)
    procs = [
        run_python(COLLABORATOR, args=[free_tcp_endpoint, str(rank), steps[rank], "local"])
        for rank in range(3)
    ]
    optim = FederatedOptimizer(torch.optim.SGD(network.parameters(), lr=1.0), "aggregator")
    api = zmqfed.API(m, optim, 3, naive_aggregation, progress=False, step_timeout=60 * slow_factor)
    try:
        api.run()
    finally:
        m.close(final=True)
    for proc in procs:
        out, err = proc.communicate(timeout=120 * slow_factor)
        assert proc.returncode == 0, out + err
    assert len(norms) == 9
    clips = [r.metrics["dp_clip"] for r in api.records]
    # 1 of 3 within, fewer than the median (the target): the clip grows
    assert clips[0] == 0.5 and clips == sorted(clips) and clips[-1] > clips[0]
    for round_ in range(3):
        for norm in norms[3 * round_ : 3 * round_ + 3]:
            assert norm <= clips[round_] + 1e-5  # every upload within the clip in force
    within = sorted(bits)[-3:]  # alpha's bits (+1/2 plus a little noise)
    assert all(b > 0.2 for b in within) and sum(b > 0.2 for b in bits) == 3
