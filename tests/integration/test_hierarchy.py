"""Hierarchical FL over real sockets: root <- (e1 <- l1, l2), (e2 <- l3, l4).

Every node but the root (the test process) is its own process. An edge runs
two Maintainers over one network: a collaborator toward the root and the
aggregator of its two leaves. The leaves download the root's model through
their edge and upload constant tensors 1, 2, 3, 4; each edge uploads the mean
of its leaves (1.5 and 3.5) and the root averages those: 2.5 everywhere.
"""

from __future__ import annotations

import contextlib
import socket

import torch
from torch import nn

import zmqfed
import zmqfed.topo as topo
from tests.integration._helpers import node_results
from zmqfed.core import Maintainer

EDGES = {"e1": ("l1", "l2"), "e2": ("l3", "l4")}
LEAF_VALUE = {"l1": 1.0, "l2": 2.0, "l3": 3.0, "l4": 4.0}

# argv: topology file, node name
COMMON = """
import faulthandler, json, sys
faulthandler.dump_traceback_later(60, exit=True)  # a hang shows every thread's stack
import torch
from torch import nn
import zmqfed
import zmqfed.topo as topo
from tests.integration._helpers import node_results
from zmqfed.core import Maintainer

topology = topo.Topology.load(sys.argv[1])
name = sys.argv[2]
props = topo.analysis(topology, name)
torch.manual_seed(sum(map(ord, name)))  # every node starts from its own random init
network = nn.Linear(4, 1)
params = dict(network.named_parameters())

def as_lists(state):
    return {k: v.tolist() for k, v in state.items()}
"""

LEAF = (
    COMMON
    + """
assert [p.role for p in props] == ["collaborator"]
m = Maintainer(props[0], network.state_dict(keep_vars=True))
m.step(upload=False, timeout=30)
m.unpackage()
downloaded = as_lists({k: v["param"] for k, v in m.data.items()})
with torch.no_grad():
    for p in network.parameters():
        p.fill_(float(sys.argv[3]))
m.package()
m.step(download=False, timeout=30)
print("RESULT " + json.dumps({"downloaded": downloaded}), flush=True)
"""
)

EDGE = (
    COMMON
    + """
# analysis: the node's own group first (aggregator), then the group it reports to
assert [p.role for p in props] == ["aggregator", "collaborator"], props
below = Maintainer(props[0], network.state_dict(keep_vars=True))
above = Maintainer(props[1], network.state_dict(keep_vars=True))
with below:
    zmqfed.functional.count_step(2)
above.step(upload=False, timeout=30)  # the root's model ...
above.unpackage()
downloaded = as_lists({k: v["param"] for k, v in above.data.items()})
below.package()
below.step(timeout=30)  # ... served to the leaves, whose uploads come back
assert len(below.data_list) == 2
with torch.no_grad():
    for p in network.parameters():
        p.copy_(torch.stack([d[p]["param"] for d in below.data_list]).mean(0))
uploaded = as_lists(network.state_dict())
above.package()
above.step(download=False, timeout=30)
print("RESULT " + json.dumps({"downloaded": downloaded, "uploaded": uploaded,
                              "leaves": sorted(below.fed_props.collaborators),
                              "encodes": below.stats["encodes"]}), flush=True)
"""
)


def _free_tcp_endpoints(n: int) -> list[str]:
    """``n`` distinct free ports: the probes stay bound until all are picked."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(n)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [f"tcp://127.0.0.1:{probe.getsockname()[1]}" for probe in probes]


def _topology(endpoints: dict[str, str]) -> topo.Topology:
    topology = topo.Topology()
    root = topology.add_node(topo.Node("root", endpoints["root"]))
    for edge, leaves in EDGES.items():
        node = topology.add_edge(topo.Node(edge, endpoints[edge]), root).start
        for leaf in leaves:
            topology.add_edge(topo.Node(leaf), node)
    return topology


def test_three_level_hierarchy(tmp_path, run_python, slow_factor):
    endpoints = dict(zip(("root", "e1", "e2"), _free_tcp_endpoints(3), strict=True))
    topology = _topology(endpoints)
    path = tmp_path / "hierarchy.json"
    topology.save(path)

    props = topo.analysis(topology, "root")
    assert [(p.role, p.collaborators) for p in props] == [("aggregator", ("e1", "e2"))]
    network = nn.Linear(4, 1)
    with torch.no_grad():  # a known init, unlike any node's random one
        network.weight.copy_(torch.tensor([[-1.0, 0.5, 2.0, -3.0]]))
        network.bias.fill_(7.0)
    initial = {k: v.tolist() for k, v in network.state_dict().items()}
    root = Maintainer(props[0], network.state_dict(keep_vars=True))
    try:
        with root:
            zmqfed.functional.count_step(2)
        procs = {}
        # leaves first: they wait for their edge, the edges for the root
        for edge, leaves in EDGES.items():
            for leaf in leaves:
                procs[leaf] = run_python(LEAF, args=[str(path), leaf, str(LEAF_VALUE[leaf])])
            procs[edge] = run_python(EDGE, args=[str(path), edge])
        root.package()
        root.step(timeout=45 * slow_factor)
        assert len(root.data_list) == 2
        with torch.no_grad():
            for p in network.parameters():
                p.copy_(torch.stack([d[p]["param"] for d in root.data_list]).mean(0))
        results = node_results(procs, 60 * slow_factor)
    finally:
        root.close()

    # Every leaf got the root's initial model through its edge, unchanged.
    for edge, leaves in EDGES.items():
        assert results[edge]["downloaded"] == initial
        assert results[edge]["leaves"] == list(leaves)
        assert results[edge]["encodes"] == 1  # one encode served both leaves
        for leaf in leaves:
            assert results[leaf]["downloaded"] == initial, leaf
    # Edges averaged their leaves: (1 + 2) / 2 and (3 + 4) / 2.
    for edge, expected in (("e1", 1.5), ("e2", 3.5)):
        uploaded = results[edge]["uploaded"]
        assert uploaded["weight"] == [[expected] * 4], (edge, uploaded)
        assert uploaded["bias"] == [expected], (edge, uploaded)
    # The root averaged the edges: (1.5 + 3.5) / 2.
    for name, value in network.state_dict().items():
        assert torch.equal(value, torch.full_like(value, 2.5)), (name, value)
