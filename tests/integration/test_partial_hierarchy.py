"""A partial federation through a hierarchy of zmqfed-node runners: root <- edge <- two leaves.

Leaves and the edge (toward the root) exchange only the trainable head of a
model whose backbone is frozen; the edge serves the head to its leaves,
averages theirs and uploads the average. After two rounds the root's head
has moved and its backbone is bit for bit what it was.
"""

from __future__ import annotations

import threading

import torch

import zmqfed.topo as topo
from tests.integration.partial_tree_app import factory, model
from zmqfed.node import NodeRunner


def test_partial_collaborators_through_a_hierarchy(tmp_path, slow_factor):
    topology = topo.Topology()
    root = topology.add_node(topo.Node("root", f"ipc://{tmp_path}/root.ipc"))
    edge = topology.add_edge(topo.Node("edge", f"ipc://{tmp_path}/edge.ipc"), root).start
    for leaf in ("leaf0", "leaf1"):
        topology.add_edge(topo.Node(leaf), edge)
    runners = {
        name: NodeRunner(topology, name, factory, rounds=2, progress=False)
        for name in ("root", "edge", "leaf0", "leaf1")
    }
    errors: list[BaseException] = []

    def run(runner: NodeRunner) -> None:
        try:
            runner.run()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in runners.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120 * slow_factor)
    assert not any(t.is_alive() for t in threads), "a node hangs"
    assert not errors, errors
    assert all(r.finished for r in runners.values())
    before, after = model(), runners["root"].app.model
    assert torch.equal(after[0].weight, before[0].weight)
    assert torch.equal(after[0].bias, before[0].bias)
    assert not torch.equal(after[2].weight, before[2].weight)
    records = list(runners["root"].records)
    assert [r["participants"] for r in records] == [1, 1]  # the edge, once per round
