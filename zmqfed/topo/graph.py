"""The topology graph: ``Node``, ``Edge`` and ``Topology``.

An edge points from a collaborator (``start``) to the aggregator it reports to
(``end``). A node with in-edges aggregates the group of all its in-edges and
must have an address; a node with out-edges collaborates in one group per
out-edge; a node with both is an edge aggregator in a hierarchy, or a link in
a cycle of groups (a ring).

Duplicate nick names, self edges, duplicate edges and pairs of opposite edges
are rejected as they are added; :meth:`Topology.validate` checks the graph as
a whole (addresses, shared endpoints, and cycles when asked to).

File format
-----------
``Topology.save`` writes, and ``Topology.load`` reads, JSON or, when the file
name ends in ``.yaml``/``.yml``, YAML (needs PyYAML)::

    {
        "nodes": [
            {"nick_name": "aggregator", "address": "tcp://127.0.0.1:1994", "settings": {}},
            {"nick_name": "alpha", "address": null, "settings": {"codec": "raw"}},
        ],
        "edges": [{"start": "alpha", "end": "aggregator"}],
    }

``address`` is an endpoint string (``tcp://host:port`` or ``ipc://path``),
``null``, or an ``Address.serialize()`` object (``{"backend": "mpi",
"init_method": "file:///tmp/x", ...}``, written for addresses an endpoint
alone cannot describe); ``address`` and ``settings`` may be omitted. An edge
may also be written as a two-item list ``[start, end]``, or as OpenFed wrote
it, ``{"start": {node}, "end": {node}}``. Unknown keys are errors, and every
error names the entry, e.g. ``edges[3] references unknown node 'x'``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from zmqfed.address import Address
from zmqfed.errors import ConfigError, TopologyError
from zmqfed.topo import _fileio
from zmqfed.topo._node import Edge, Node, NodeLike, check_nick_name
from zmqfed.topo._node import name_of as _name_of

__all__ = ["Edge", "Node", "NodeLike", "Topology", "check_nick_name"]

logger = logging.getLogger(__name__)


class Topology:
    """A directed graph of nodes; an edge goes from collaborator to aggregator.

    Parameters
    ----------
    nodes:
        Nodes to add (``Node`` objects or nick names).
    edges:
        Edges to add: ``Edge`` objects or ``(start, end)`` pairs of nodes or names.
    """

    def __init__(
        self,
        nodes: Iterable[NodeLike] | None = None,
        edges: Iterable[Edge | tuple[NodeLike, NodeLike]] | None = None,
    ) -> None:
        self._nodes: dict[str, Node] = {}
        self._edges: dict[tuple[str, str], Edge] = {}
        self._in: dict[str, dict[str, None]] = {}  # aggregator -> its collaborators
        self._out: dict[str, dict[str, None]] = {}  # collaborator -> its aggregators
        self.add_node_list(nodes or ())
        for edge in edges or ():
            if isinstance(edge, Edge):
                self.add_edge(edge.start, edge.end)
            else:
                start, end = edge
                self.add_edge(start, end)

    # -- building ---------------------------------------------------------------

    def add_node(self, node: NodeLike, address: Address | str | None = None) -> Node:
        """Add a node and return it.

        ``add_node(Node(...))``, ``add_node(nick_name)`` for an address-less
        node, or OpenFed's ``add_node(nick_name, address)``.

        Raises
        ------
        TopologyError
            If a node with the same nick name is already in the topology.
        """
        if isinstance(node, str):
            node = Node(node, address)
        elif not isinstance(node, Node):
            raise TopologyError(f"expected a Node or a nick name, got {type(node).__name__}")
        elif address is not None:
            raise TopologyError(
                f"add_node({node!r}, {address!r}): give a Node, or a nick name and an address"
            )
        if node.nick_name in self._nodes:
            raise TopologyError(f"duplicate nick name {node.nick_name!r}: already in the topology")
        self._nodes[node.nick_name] = node
        self._in[node.nick_name] = {}
        self._out[node.nick_name] = {}
        return node

    def add_node_list(self, nodes: Iterable[NodeLike]) -> None:
        """Add several nodes in order (see :meth:`add_node`)."""
        for node in nodes:
            self.add_node(node)

    def add_edge(self, start: NodeLike | Edge, end: NodeLike | None = None) -> Edge:
        """Add the edge collaborator ``start`` -> aggregator ``end``; return it.

        ``add_edge(start, end)`` with Nodes or nick names, or
        ``add_edge(Edge(start, end))``. ``Node`` objects not yet in the
        topology are added; nick names must already be known. Raises
        ``TopologyError`` for unknown names, a node that conflicts with a
        different one of the same name, self edges, duplicate edges, and an
        edge opposite to an existing one (see :meth:`validate`). Nothing is
        changed when it raises.
        """
        if isinstance(start, Edge):
            if end is not None:
                raise TopologyError("add_edge(edge) takes one Edge, or a start and an end")
            given = start
            start, end = given.start, given.end
        elif end is None:
            raise TopologyError("add_edge needs a start and an end (or one Edge)")
        start_node, new_start = self._lookup(start, "start")
        end_node, new_end = self._lookup(end, "end")
        edge = Edge(start_node, end_node)
        if edge.names in self._edges:
            raise TopologyError(f"duplicate edge {edge.names[0]!r} -> {edge.names[1]!r}")
        if edge.names[::-1] in self._edges:
            a, b = edge.names
            raise TopologyError(
                f"edge {a!r} -> {b!r} is opposite to {b!r} -> {a!r} (a two-node cycle): one "
                "edge already moves models both ways (the collaborator downloads the "
                "aggregator's model and uploads its own), so keep only one of them"
            )
        if new_start:
            self.add_node(start_node)
        if new_end:
            self.add_node(end_node)
        self._edges[edge.names] = edge
        self._in[end_node.nick_name][start_node.nick_name] = None
        self._out[start_node.nick_name][end_node.nick_name] = None
        return edge

    def _lookup(self, node: object, which: str) -> tuple[Node, bool]:
        """The topology's node for ``node`` and whether it must be added first."""
        name = _name_of(node)
        known = self._nodes.get(name)
        if known is not None:
            if isinstance(node, Node) and node is not known and not known.same_definition(node):
                raise TopologyError(
                    f"edge {which} {node!r} conflicts with {known!r} already in the topology"
                )
            return known, False
        if isinstance(node, Node):
            return node, True
        raise TopologyError(f"edge {which} references unknown node {name!r}; add it first")

    def remove_node(self, node: NodeLike | int) -> Node:
        """Remove a node (a Node, nick name, or index in :attr:`nodes`) and all its edges."""
        name = self._nodes_by_index(node) if _is_index(node) else self._known(node)
        for agg in list(self._out[name]):
            self.remove_edge(name, agg)
        for collab in list(self._in[name]):
            self.remove_edge(collab, name)
        del self._in[name], self._out[name]
        return self._nodes.pop(name)

    def remove_edge(self, start: NodeLike | Edge | int, end: NodeLike | None = None) -> Edge:
        """Remove an edge and return it.

        ``remove_edge(start, end)``, ``remove_edge(edge)``, or OpenFed's
        ``remove_edge(index)`` with an index in :attr:`edges`.
        """
        if _is_index(start):
            if end is not None:
                raise TopologyError("remove_edge(index) takes one index")
            edges = list(self._edges)
            index = int(start)  # type: ignore[arg-type]
            if not -len(edges) <= index < len(edges):
                raise TopologyError(
                    f"edge index {index} out of range: the topology has {len(edges)} edges"
                )
            key = edges[index]
        elif isinstance(start, Edge):
            if end is not None:
                raise TopologyError("remove_edge(edge) takes one Edge")
            key = start.names
        else:
            if end is None:
                raise TopologyError("remove_edge needs a start and an end, an Edge or an index")
            key = (_name_of(start), _name_of(end))
        if key not in self._edges:
            raise TopologyError(f"no edge {key[0]!r} -> {key[1]!r} in the topology")
        del self._in[key[1]][key[0]], self._out[key[0]][key[1]]
        return self._edges.pop(key)

    def clear_useless_nodes(self) -> list[Node]:
        """Remove every node that is in no edge; return the removed nodes."""
        useless = [
            n for name, n in self._nodes.items() if not self._in[name] and not self._out[name]
        ]
        for node in useless:
            self.remove_node(node)
        return useless

    def _nodes_by_index(self, index: object) -> str:
        names = list(self._nodes)
        i = int(index)  # type: ignore[call-overload]
        if not -len(names) <= i < len(names):
            raise TopologyError(f"node index {i} out of range: the topology has {len(names)} nodes")
        return names[i]

    # -- queries ----------------------------------------------------------------

    def _known(self, node: object) -> str:
        """The nick name of ``node``, which must be in the topology."""
        name = _name_of(node)
        if name not in self._nodes:
            raise TopologyError(f"unknown node {name!r}: not in the topology")
        return name

    def is_edge(self, start: NodeLike, end: NodeLike) -> bool:
        """True when the edge ``start`` -> ``end`` is in the topology."""
        return (_name_of(start), _name_of(end)) in self._edges

    def fetch_node_via_nick_name(self, nick_name: str) -> Node | None:
        """The node called ``nick_name``, or ``None``."""
        return self._nodes.get(nick_name)

    def __contains__(self, node: object) -> bool:
        return isinstance(node, (Node, str)) and _name_of(node) in self._nodes

    @property
    def nodes(self) -> tuple[Node, ...]:
        """All nodes, in insertion order."""
        return tuple(self._nodes.values())

    @property
    def edges(self) -> tuple[Edge, ...]:
        """All edges, in insertion order."""
        return tuple(self._edges.values())

    @property
    def aggregators(self) -> tuple[Node, ...]:
        """Nodes with in-edges, in insertion order."""
        return tuple(n for name, n in self._nodes.items() if self._in[name])

    @property
    def collaborators(self) -> tuple[Node, ...]:
        """Nodes with out-edges, in insertion order."""
        return tuple(n for name, n in self._nodes.items() if self._out[name])

    def collaborators_of(self, node: NodeLike) -> tuple[Node, ...]:
        """The collaborators of ``node``'s group (its in-edge starts), sorted by name."""
        return tuple(self._nodes[n] for n in sorted(self._in[self._known(node)]))

    def aggregators_of(self, node: NodeLike) -> tuple[Node, ...]:
        """The aggregators ``node`` reports to (its out-edge ends), sorted by name."""
        return tuple(self._nodes[n] for n in sorted(self._out[self._known(node)]))

    # -- checks -----------------------------------------------------------------

    def validate(self, *, acyclic: bool = False) -> None:
        """Check the graph as a whole.

        A node may aggregate one group and collaborate in others, and groups
        may form cycles (a ring of nodes, each aggregating its predecessor):
        every group is still a star, one aggregator and its collaborators,
        and has its own socket. What cannot work is rejected as edges are
        added: a self edge (a node would wait for its own upload) and two
        opposite edges between the same two nodes (one edge already carries
        models both ways). ``acyclic=True`` also rejects cycles, for runners
        that step a hierarchy bottom-up (``zmqfed-node``, ``zmqfed-sim``:
        each node aggregates its group, then reports up, which never ends in
        a cycle).

        Raises
        ------
        TopologyError
            Naming the node, edge or cycle: an aggregator without an address or
            with a wildcard endpoint collaborators cannot connect to, two
            aggregators sharing an endpoint, or (``acyclic``) a cycle.
        """
        owners: dict[tuple[str, ...], str] = {}
        for node in self.aggregators:
            name, endpoint = node.nick_name, node.address.endpoint
            if endpoint is None:
                collabs = sorted(self._in[name])
                raise TopologyError(
                    f"aggregator {name!r} has no address, so its collaborators "
                    f"{collabs} have nowhere to connect"
                )
            key = _endpoint_key(endpoint)
            if "*" in key:
                raise TopologyError(
                    f"aggregator {name!r} has the wildcard endpoint {endpoint!r}, "
                    "which its collaborators cannot connect to"
                )
            if key in owners:
                raise TopologyError(
                    f"aggregators {owners[key]!r} and {name!r} share the endpoint {endpoint!r}"
                )
            owners[key] = name
        if acyclic:
            cycle = self.find_cycle()
            if cycle:
                raise TopologyError(
                    "cycle "
                    + " -> ".join(repr(n) for n in cycle)
                    + ": a runner that steps the hierarchy bottom-up needs a node never to "
                    "aggregate a group it reports to, directly or indirectly"
                )

    def find_cycle(self) -> list[str]:
        """A cycle of reporting edges as a closed path of names (first == last), or ``[]``."""
        return self._find_cycle()

    def _find_cycle(self) -> list[str]:
        """A cycle as a closed path of names (first == last), or ``[]``."""
        done: set[str] = set()
        for root in self._nodes:
            if root in done:
                continue
            path = [root]
            on_path = {root}
            stack = [iter(sorted(self._out[root]))]
            while stack:
                nxt = next(stack[-1], None)
                if nxt is None:
                    stack.pop()
                    done.add(path[-1])
                    on_path.discard(path.pop())
                elif nxt in on_path:
                    return [*path[path.index(nxt) :], nxt]
                elif nxt not in done:
                    path.append(nxt)
                    on_path.add(nxt)
                    stack.append(iter(sorted(self._out[nxt])))
        return []

    # -- files ------------------------------------------------------------------

    def serialize(self) -> dict[str, Any]:
        """A JSON-safe dict in the file format of the module docstring."""
        return {
            "nodes": [n.serialize() for n in self._nodes.values()],
            "edges": [{"start": s, "end": e} for s, e in self._edges],
        }

    @classmethod
    def unserialize(cls, data: object) -> Topology:
        """Build and validate a topology from :meth:`serialize` output.

        Raises
        ------
        TopologyError
            Naming the bad entry, e.g. ``edges[3] references unknown node 'x'``.
        """
        nodes, edges = _fileio.parse(data)
        topology = cls()
        for index, (name, address, settings) in enumerate(nodes):
            try:
                if isinstance(address, dict):
                    try:
                        address = Address.unserialize(address)
                    except ConfigError as exc:
                        raise TopologyError(f"node {name!r}: {exc}") from exc
                topology.add_node(Node(name, address, settings))
            except TopologyError as exc:
                raise TopologyError(f"nodes[{index}]: {exc}") from exc
        for index, (start, end) in enumerate(edges):
            for name in (start, end):
                if name not in topology:
                    raise TopologyError(f"edges[{index}] references unknown node {name!r}")
            try:
                topology.add_edge(start, end)
            except TopologyError as exc:
                raise TopologyError(f"edges[{index}]: {exc}") from exc
        topology.validate()
        return topology

    def save(self, path: str | os.PathLike[str]) -> None:
        """Validate and write the topology as JSON, or YAML for ``.yaml``/``.yml``."""
        self.validate()
        _fileio.write(path, self.serialize())
        logger.debug("saved topology of %d nodes to %s", len(self._nodes), os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Topology:
        """Read and validate a file written by :meth:`save` (or by hand).

        Raises
        ------
        TopologyError
            Prefixed with the path, naming the bad entry.
        """
        data = _fileio.read(path)
        try:
            topology = cls.unserialize(data)
        except TopologyError as exc:
            raise TopologyError(f"{os.fspath(path)}: {exc}") from exc
        logger.debug("loaded topology of %d nodes from %s", len(topology._nodes), os.fspath(path))
        return topology

    # -- display ----------------------------------------------------------------

    def adjacency_table(self) -> str:
        """ASCII table: one row per node (as collaborator), one column per aggregator.

        ``^`` marks an edge from the row's node up to the column's aggregator,
        ``.`` no edge. Names are shown ASCII-escaped.
        """
        if not self._nodes:
            return "Topology(empty)"
        rows = list(self._nodes)
        cols = [n.nick_name for n in self.aggregators]
        show = {n: n.encode("ascii", "backslashreplace").decode("ascii") for n in rows}
        head = ["CO\\AG"] + [show[c] for c in cols]
        body = [[show[r]] + ["^" if (r, c) in self._edges else "." for c in cols] for r in rows]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

        def line(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = [c.center(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
            return " | ".join([first, *rest]).rstrip()

        sep = "-+-".join("-" * w for w in widths)
        if not cols:
            head, sep = ["CO\\AG"], "-" * widths[0]
            return "\n".join([line(head) + " (no edges)", sep] + [line(row) for row in body])
        return "\n".join([line(head), sep] + [line(row) for row in body])

    def __repr__(self) -> str:
        return self.adjacency_table()


def _is_index(value: object) -> bool:
    """True for an int index (not a bool, not a name)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _endpoint_key(endpoint: str) -> tuple[str, ...]:
    """A comparable form of an endpoint, so 'localhost' and '127.0.0.1' collide."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.lower()
        if host == "localhost":
            host = "127.0.0.1"
        return (scheme, host, port)
    return (scheme, rest if rest == "*" else os.path.normpath(rest))
