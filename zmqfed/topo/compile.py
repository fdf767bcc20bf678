"""Compile a topology into each node's federated groups and socket plans.

A node aggregates the group of all its in-edges and collaborates in one group
per out-edge. The plan for each group is data, not sockets: the aggregator
binds a ROUTER on the group's endpoint; each collaborator connects a DEALER
whose routing id is its nick name. Both ends compute the same group
fingerprint from the same topology, and compare it in the handshake.

Example
-------
>>> from zmqfed.topo import star, socket_plan
>>> [p.socket_type for p in socket_plan(star(2), "client0")]
['DEALER']
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from zmqfed.errors import TopologyError
from zmqfed.props import AGGREGATOR, COLLABORATOR, FederatedProperties
from zmqfed.topo.graph import Node, NodeLike, Topology

__all__ = [
    "BIND",
    "CONNECT",
    "DEALER",
    "ROUTER",
    "SocketPlan",
    "analysis",
    "compile_topology",
    "socket_plan",
]

ROUTER = "ROUTER"
DEALER = "DEALER"
BIND = "bind"
CONNECT = "connect"


def _resolve(topology: Topology, node: NodeLike) -> Node:
    """The topology's node for a Node or nick name."""
    name = node.nick_name if isinstance(node, Node) else node
    if not isinstance(name, str):
        raise TopologyError(f"expected a Node or a nick name, got {type(node).__name__}")
    found = topology.fetch_node_via_nick_name(name)
    if found is None:
        raise TopologyError(f"unknown node {name!r}: not in the topology")
    return found


def _analysis(topology: Topology, node: Node) -> list[FederatedProperties]:
    """``analysis`` without validating the topology first."""
    result = []
    collabs = topology.collaborators_of(node)
    if collabs:
        result.append(
            FederatedProperties(
                role=AGGREGATOR,
                nick_name=node.nick_name,
                address=node.address.with_world_size(1 + len(collabs)),
                aggregator_name=node.nick_name,
                collaborators=tuple(c.nick_name for c in collabs),
                settings=copy.deepcopy(node.settings),
            )
        )
    for agg in topology.aggregators_of(node):  # sorted by name
        peers = topology.collaborators_of(agg)
        result.append(
            FederatedProperties(
                role=COLLABORATOR,
                nick_name=node.nick_name,
                address=agg.address.with_world_size(1 + len(peers)),
                aggregator_name=agg.nick_name,
                collaborators=tuple(p.nick_name for p in peers),
                settings=copy.deepcopy(node.settings),
            )
        )
    if not result:
        raise TopologyError(
            f"node {node.nick_name!r} belongs to no federated group (it has no edges)"
        )
    return result


def analysis(topology: Topology, node: NodeLike) -> list[FederatedProperties]:
    """The federated groups ``node`` belongs to, as ``FederatedProperties``.

    Parameters
    ----------
    topology:
        The topology; it is validated first.
    node:
        A ``Node`` or nick name in the topology.

    Returns
    -------
    list of FederatedProperties
        The node's own group first when it has in-edges (role aggregator), then
        one collaborator entry per aggregator it reports to, sorted by the
        aggregator's name. Each carries the group's endpoint with its world
        size, the sorted collaborator names and the node's settings.

    Raises
    ------
    TopologyError
        If the topology is invalid, the node is unknown, or it has no edges.
    """
    topology.validate()
    return _analysis(topology, _resolve(topology, node))


@dataclass(frozen=True)
class SocketPlan:
    """The one socket a node opens for one federated group.

    Parameters
    ----------
    group:
        The group's name: its aggregator's nick name.
    socket_type:
        ``'ROUTER'`` on the aggregator, ``'DEALER'`` on a collaborator.
    action:
        ``'bind'`` (ROUTER) or ``'connect'`` (DEALER).
    endpoint:
        The group's endpoint.
    routing_id:
        ``None`` for a ROUTER; the collaborator's nick name for a DEALER.
    fingerprint:
        The group fingerprint both ends compare in the handshake.
    """

    group: str
    socket_type: str
    action: str
    endpoint: str
    routing_id: str | None
    fingerprint: str

    def __post_init__(self) -> None:
        expected = {ROUTER: BIND, DEALER: CONNECT}
        if self.socket_type not in expected:
            raise TopologyError(
                f"group {self.group!r}: socket type must be ROUTER or DEALER, got {self.socket_type!r}"
            )
        if self.action != expected[self.socket_type]:
            raise TopologyError(
                f"group {self.group!r}: a {self.socket_type} must "
                f"{expected[self.socket_type]}, not {self.action!r}"
            )
        if (self.routing_id is None) != (self.socket_type == ROUTER):
            raise TopologyError(
                f"group {self.group!r}: a DEALER needs a routing id and a ROUTER has none, "
                f"got {self.socket_type} with routing id {self.routing_id!r}"
            )

    @property
    def role(self) -> str:
        """``'aggregator'`` for a ROUTER plan, ``'collaborator'`` for a DEALER plan."""
        return AGGREGATOR if self.socket_type == ROUTER else COLLABORATOR

    @property
    def routing_id_bytes(self) -> bytes | None:
        """The routing id as the UTF-8 bytes ZeroMQ's ROUTING_ID option takes."""
        return None if self.routing_id is None else self.routing_id.encode("utf-8")

    @classmethod
    def from_props(cls, props: FederatedProperties) -> SocketPlan:
        """The plan for the group described by ``props``."""
        endpoint = props.address.endpoint
        if endpoint is None:  # FederatedProperties already refuses this; keeps mypy honest
            raise TopologyError(f"group {props.group_name!r} has no endpoint")
        if props.aggregator:
            return cls(props.group_name, ROUTER, BIND, endpoint, None, props.fingerprint)
        return cls(props.group_name, DEALER, CONNECT, endpoint, props.nick_name, props.fingerprint)


def socket_plan(topology: Topology, node: NodeLike) -> list[SocketPlan]:
    """The sockets ``node`` opens, one per group, in the order of :func:`analysis`."""
    return [SocketPlan.from_props(p) for p in analysis(topology, node)]


def compile_topology(topology: Topology) -> dict[str, list[SocketPlan]]:
    """Socket plans of every node, keyed by nick name in topology order.

    Raises
    ------
    TopologyError
        If the topology is invalid or a node belongs to no group.
    """
    topology.validate()
    return {
        node.nick_name: [SocketPlan.from_props(p) for p in _analysis(topology, node)]
        for node in topology.nodes
    }
