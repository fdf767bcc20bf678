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
from zmqfed.props import AGGREGATOR, COLLABORATOR, FederatedProperties, normalize_role
from zmqfed.topo.graph import Edge, Node, NodeLike, Topology

__all__ = [
    "BIND",
    "CONNECT",
    "DEALER",
    "ROUTER",
    "FederatedGroup",
    "SocketPlan",
    "analysis",
    "compile_topology",
    "federated_groups",
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


class FederatedGroup:
    """One node's view of one federated group: its role and the nodes around it.

    ``others`` are the group's collaborators when ``node`` aggregates it, or
    the one aggregator when ``node`` collaborates in it. Groups are built by
    :func:`federated_groups` (which :func:`analysis` uses), or by hand as in
    OpenFed with :meth:`add_to_group`.

    Parameters
    ----------
    role:
        ``'aggregator'`` or ``'collaborator'``.
    node:
        The node whose view this is.
    topology:
        The topology the group comes from; a collaborator's group needs it to
        know its fellow collaborators (the group fingerprint and world size
        cover all of them).
    """

    def __init__(self, role: str, node: Node, topology: Topology | None = None) -> None:
        role = normalize_role(role)
        if not isinstance(node, Node):
            raise TopologyError(f"a federated group needs a Node, got {type(node).__name__}")
        self.role = role
        self.node = node
        self.topology = topology
        self.others: list[Node] = []

    @property
    def aggregator(self) -> bool:
        """True when ``node`` aggregates this group."""
        return self.role == AGGREGATOR

    @property
    def collaborator(self) -> bool:
        """True when ``node`` collaborates in this group."""
        return self.role == COLLABORATOR

    def add_to_group(self, edge: Edge) -> bool:
        """Add the other end of ``edge`` if the edge belongs to this group; say whether it did.

        An aggregator's group takes every edge ending at ``node``; a
        collaborator's group takes one edge starting at ``node`` (a node
        reporting to two aggregators is in two groups).
        """
        if self.aggregator and edge.end == self.node:
            if edge.start not in self.others:
                self.others.append(edge.start)
            return True
        if self.collaborator and edge.start == self.node:
            if self.others:
                return self.others[0] == edge.end
            self.others.append(edge.end)
            return True
        return False

    @property
    def aggregator_node(self) -> Node:
        """The group's aggregator."""
        if self.aggregator:
            return self.node
        if not self.others:
            raise TopologyError(
                f"the group of collaborator {self.node.nick_name!r} has no edge yet"
            )
        return self.others[0]

    @property
    def collaborator_nodes(self) -> tuple[Node, ...]:
        """The group's collaborators, sorted by name."""
        if self.aggregator:
            return tuple(sorted(self.others, key=lambda n: n.nick_name))
        if self.topology is None:
            raise TopologyError(
                f"the group of {self.node.nick_name!r} as a collaborator was built without its "
                "topology, so its fellow collaborators are unknown; use "
                "zmqfed.topo.analysis(topology, node) or FederatedGroup(role, node, topology)"
            )
        return self.topology.collaborators_of(self.aggregator_node)

    @property
    def federated_properties(self) -> FederatedProperties:
        """This view as ``FederatedProperties`` (what a ``Maintainer`` takes)."""
        agg = self.aggregator_node
        collabs = [c.nick_name for c in self.collaborator_nodes]
        if not collabs:
            raise TopologyError(f"the group of {agg.nick_name!r} has no collaborators")
        world_size = 1 + len(collabs)
        rank = 0 if self.aggregator else 1 + collabs.index(self.node.nick_name)
        return FederatedProperties(
            role=self.role,
            nick_name=self.node.nick_name,
            address=agg.address.with_world_size(world_size, rank),
            aggregator_name=agg.nick_name,
            collaborators=tuple(collabs),
            settings=copy.deepcopy(self.node.settings),
        )

    def __repr__(self) -> str:
        others = ", ".join(repr(o.nick_name) for o in self.others)
        return f"FederatedGroup({self.role!r}, {self.node.nick_name!r}, others=[{others}])"


def federated_groups(topology: Topology, node: NodeLike) -> list[FederatedGroup]:
    """The groups ``node`` belongs to, in the order of :func:`analysis`."""
    found = _resolve(topology, node)
    groups = []
    collabs = topology.collaborators_of(found)
    if collabs:
        group = FederatedGroup(AGGREGATOR, found, topology)
        group.others.extend(collabs)
        groups.append(group)
    for agg in topology.aggregators_of(found):  # sorted by name
        group = FederatedGroup(COLLABORATOR, found, topology)
        group.others.append(agg)
        groups.append(group)
    return groups


def _analysis(topology: Topology, node: Node) -> list[FederatedProperties]:
    """``analysis`` without validating the topology first."""
    result = [g.federated_properties for g in federated_groups(topology, node)]
    if not result:
        raise TopologyError(
            f"node {node.nick_name!r} belongs to no federated group (it has no edges)"
        )
    return result


def analysis(topo: Topology, node: NodeLike) -> list[FederatedProperties]:
    """The federated groups ``node`` belongs to, as ``FederatedProperties``.

    Parameters
    ----------
    topo:
        The topology (OpenFed's parameter name); it is validated first.
    node:
        A ``Node`` or nick name in the topology.

    Returns
    -------
    list of FederatedProperties
        The node's own group first when it has in-edges (role aggregator), then
        one collaborator entry per aggregator it reports to, sorted by the
        aggregator's name: a node that aggregates one group and collaborates
        in another (a hierarchy, or a ring of groups) gets one entry per
        group. Each carries the group's endpoint with its world size and this
        node's rank in it (aggregator 0, collaborators 1.. in name order), the
        sorted collaborator names and the node's settings.

    Raises
    ------
    TopologyError
        If the topology is invalid, the node is unknown, or it has no edges.
    """
    topo.validate()
    return _analysis(topo, _resolve(topo, node))


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
