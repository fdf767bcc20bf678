"""OpenFed's multi-round flow over real sockets: one aggregator, two collaborator processes.

The aggregator runs in the test process; each collaborator is its own
process. Training is deterministic (collaborator of rank k adds k + 1 to
every weight), so every round's model has a closed form. In rounds 0 and 1
beta uploads only once alpha's request for the next version was parked (the
aggregator's ``at_failed`` hook drops a marker file), so that request always
arrives while the aggregator is still at the old version: it must be parked
(answered WAIT) and served after ``update_version``, with the new model.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import zmqfed
import zmqfed.topo as topo
from zmqfed.core import Maintainer

ROUNDS = 3
NAMES = ("alpha", "beta")

# argv: endpoint, rank
COLLABORATOR = """
import faulthandler, json, os, sys, time
faulthandler.dump_traceback_later(60, exit=True)  # a hang shows every thread's stack
import torch
from torch import nn
import zmqfed.topo as topo
from zmqfed.core import Maintainer

endpoint, rank = sys.argv[1], int(sys.argv[2])
names = ("alpha", "beta")
topology = topo.Topology()
aggregator = topology.add_node(topo.Node("aggregator", endpoint))
for name in names:
    topology.add_edge(topo.Node(name), aggregator)
props = topo.analysis(topology, names[rank])
assert len(props) == 1 and props[0].collaborator

torch.manual_seed(100 + rank)  # an init that differs from the aggregator's
network = nn.Linear(4, 1)
maintainer = Maintainer(props[0], network.state_dict(keep_vars=True))
for r in range({rounds}):
    maintainer.update_version(r)
    maintainer.step(upload=False, timeout=30)
    maintainer.unpackage()
    got = {{k: v["param"].tolist() for k, v in maintainer.data.items()}}
    print("DOWNLOAD " + json.dumps({{"round": r, "version": maintainer.meta.get("version"),
                                    "data": got}}), flush=True)
    if rank == 1 and r + 1 < {rounds}:  # "train" until alpha's next PULL is parked
        deadline = time.monotonic() + 20
        while not os.path.exists(f"parked-{{r}}") and time.monotonic() < deadline:
            time.sleep(0.01)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(rank + 1)
    maintainer.update_version(r + 1)
    maintainer.meta["instances"] = 10
    maintainer.package()
    maintainer.step(download=False, timeout=30)
print("DONE", flush=True)
"""


def _star(endpoint: str) -> topo.Topology:
    topology = topo.Topology()
    aggregator = topology.add_node(topo.Node("aggregator", endpoint))
    for name in NAMES:
        topology.add_edge(topo.Node(name), aggregator)
    return topology


def _downloads(out: str) -> list[dict]:
    return [
        json.loads(line[len("DOWNLOAD ") :])
        for line in out.splitlines()
        if line.startswith("DOWNLOAD ")
    ]


@pytest.mark.parametrize("endpoint_fixture", ["free_tcp_endpoint", "ipc_endpoint"])
def test_three_rounds_closed_form(endpoint_fixture, request, run_python, slow_factor, tmp_path):
    endpoint = request.getfixturevalue(endpoint_fixture)
    props = topo.analysis(_star(endpoint), "aggregator")
    assert len(props) == 1 and props[0].aggregator

    network = nn.Linear(4, 1)
    with torch.no_grad():
        for p in network.parameters():
            p.zero_()
    maintainer = Maintainer(props[0], network.state_dict(keep_vars=True))
    try:
        with maintainer:
            zmqfed.functional.count_step(2)
        # run_python's cwd is tmp_path: tells beta that alpha's request was parked
        maintainer.register_step_hook(
            90, lambda m: (tmp_path / f"parked-{m.version}").touch(), zmqfed.functional.at_failed
        )
        procs = [
            run_python(COLLABORATOR.format(rounds=ROUNDS), args=[endpoint, str(rank)])
            for rank in range(len(NAMES))
        ]

        served: list[dict[str, list]] = []
        metas: list[list[dict]] = []
        for r in range(ROUNDS):
            served.append({k: v.tolist() for k, v in network.state_dict().items()})
            maintainer.package()
            maintainer.step(timeout=30 * slow_factor)
            assert len(maintainer.data_list) == 2, f"round {r}: {len(maintainer.data_list)} uploads"
            metas.append([dict(m) for m in maintainer.meta_list])
            with torch.no_grad():
                for p in network.parameters():
                    p.copy_(torch.stack([d[p]["param"] for d in maintainer.data_list]).mean(0))
            maintainer.clear()
            assert not maintainer.data_list and not maintainer.meta_list
            # Between steps nothing is served: a PULL for version r + 1 (alpha's was
            # already parked during the step) is answered only after update_version.
            time.sleep(0.5)
            maintainer.update_version()
            assert maintainer.version == r + 1

        outputs = [proc.communicate(timeout=60 * slow_factor) for proc in procs]
        stats = maintainer.stats
    finally:
        maintainer.close()
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"--- {NAMES[rank]} (exit {proc.returncode})\n{out}\n{err}"
        assert "DONE" in out

    # Closed form: each round adds the mean of (1, 2) = 1.5 to the zero init.
    for name, value in network.state_dict().items():
        assert torch.allclose(value, torch.full_like(value, 1.5 * ROUNDS)), (name, value)
    for r in range(ROUNDS):
        assert served[r]["weight"] == [[1.5 * r] * 4]
        assert served[r]["bias"] == [1.5 * r]

    # Each collaborator downloaded exactly what the aggregator had, every round.
    for rank, (out, _err) in enumerate(outputs):
        downloads = _downloads(out)
        assert [d["round"] for d in downloads] == list(range(ROUNDS)), out
        for d in downloads:
            assert d["data"] == served[d["round"]], (NAMES[rank], d)
            assert d["version"] == d["round"]

    # Every upload carried its meta and the version it was trained for.
    for r, round_metas in enumerate(metas):
        assert sorted(m["version"] for m in round_metas) == [r + 1, r + 1]
        assert all(m["instances"] == 10 for m in round_metas)

    # alpha's PULL for version r + 1 arrived during step r, in rounds 0 and 1
    # (and beta's only after the step, when it is served right away).
    assert stats["parked"] == ROUNDS - 1, stats
    # Something was served in each of the 3 steps; the model was encoded once
    # per step, not once per collaborator (that would be 6).
    assert stats["encodes"] == ROUNDS, stats
    assert stats["errors"] == 0, stats
    # 2 uploads and 2 downloads of the 5-float model per round, all counted.
    model_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    assert stats["bytes_in"] == stats["bytes_out"] == 2 * ROUNDS * model_bytes, stats
