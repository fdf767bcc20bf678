"""Topology compiler: describe a federation as a graph and compile it.

A ``Topology`` holds ``Node``\\ s and ``Edge``\\ s; an edge points from a
collaborator to the aggregator it reports to. :func:`analysis` turns the graph
into each node's ``FederatedProperties`` (one per federated group), and
:func:`socket_plan` / :func:`compile_topology` into the sockets each node
opens (aggregator: ROUTER bind; collaborator: DEALER connect, routing id =
nick name). Pure Python: nothing here opens a socket.

Example
-------
>>> import zmqfed.topo as topo
>>> from zmqfed.address import default_tcp_address, empty_address
>>> topology = topo.Topology()
>>> aggregator = topology.add_node(topo.Node("aggregator", default_tcp_address))
>>> _ = topology.add_edge(topo.Node("alpha", empty_address), aggregator)
>>> [(p.role, p.peers) for p in topo.analysis(topology, "aggregator")]
[('aggregator', ('alpha',))]
"""

from __future__ import annotations

from zmqfed.topo.compile import (
    FederatedGroup,
    SocketPlan,
    analysis,
    compile_topology,
    federated_groups,
    socket_plan,
)
from zmqfed.topo.graph import Edge, Node, Topology
from zmqfed.topo.render import to_ascii, to_dot, to_image
from zmqfed.topo.shapes import star, tree
from zmqfed.topo.svg import to_svg

__all__ = [
    "Edge",
    "FederatedGroup",
    "Node",
    "SocketPlan",
    "Topology",
    "analysis",
    "compile_topology",
    "federated_groups",
    "socket_plan",
    "star",
    "to_ascii",
    "to_dot",
    "to_image",
    "to_svg",
    "tree",
]
