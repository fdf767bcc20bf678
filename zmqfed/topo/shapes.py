"""Generators for common topology shapes: a star and a two-level tree.

Generated names are zero-padded (``client00`` .. ``client11``) so that sorting
by name, which fixes the order of collaborators everywhere, matches the
numeric order.

Example
-------
>>> from zmqfed.topo import star, tree
>>> [n.nick_name for n in star(3).nodes]
['aggregator', 'client0', 'client1', 'client2']
>>> [n.nick_name for n in tree(2, 2).aggregators]
['root', 'edge0', 'edge1']
"""

from __future__ import annotations

import os
import tempfile

from zmqfed.address import Address, default_tcp_address
from zmqfed.errors import ConfigError
from zmqfed.topo.graph import Node, Topology

__all__ = ["star", "tree"]

# sockaddr_un.sun_path holds 108 bytes including the terminating NUL on Linux
_MAX_IPC_PATH = 107


def _count(value: object, what: str) -> int:
    """Check a positive integer argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def _names(prefix: str, count: int) -> list[str]:
    """``prefix`` + 0..count-1, zero-padded to equal width."""
    width = len(str(count - 1))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def star(
    n: int,
    endpoint: Address | str = default_tcp_address,
    aggregator: str = "aggregator",
    prefix: str = "client",
) -> Topology:
    """One aggregator and ``n`` collaborators reporting to it.

    Parameters
    ----------
    n:
        Number of collaborators, named ``prefix`` + index (zero-padded).
    endpoint:
        The aggregator's endpoint.
    aggregator:
        The aggregator's nick name.
    prefix:
        Prefix of the collaborators' nick names.

    Returns
    -------
    Topology
        A validated topology of ``n + 1`` nodes and ``n`` edges.
    """
    _count(n, "the number of collaborators")
    topology = Topology()
    hub = topology.add_node(Node(aggregator, endpoint))
    for name in _names(prefix, n):
        topology.add_edge(Node(name), hub)
    topology.validate()
    return topology


def _endpoint(transport: str, host: str, port: int, ipc_dir: str | None) -> str:
    """The endpoint for the node numbered ``port``."""
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is out of range; choose a smaller base_port")
    if transport == "tcp":
        return f"tcp://{host}:{port}"
    path = os.path.join(ipc_dir or tempfile.gettempdir(), f"zmqfed-{port}.ipc")
    if len(os.fsencode(path)) > _MAX_IPC_PATH:
        raise ConfigError(
            f"ipc path {path!r} is longer than the {_MAX_IPC_PATH} bytes a unix socket "
            "path may have; choose a shorter ipc_dir"
        )
    return "ipc://" + path


def tree(
    branches: int = 2,
    leaves: int = 2,
    *,
    transport: str = "tcp",
    host: str = "127.0.0.1",
    base_port: int = 1994,
    ipc_dir: str | None = None,
    root: str = "root",
    edge_prefix: str = "edge",
    leaf_prefix: str = "leaf",
) -> Topology:
    """A two-level hierarchy: ``root`` <- ``branches`` edge aggregators <- ``leaves`` each.

    Parameters
    ----------
    branches:
        Number of edge aggregators, named ``edge_prefix`` + index.
    leaves:
        Collaborators per edge aggregator, named ``leaf_prefix`` + a global
        index; edge ``i`` gets leaves ``i * leaves`` .. ``(i + 1) * leaves - 1``.
    transport:
        ``'tcp'`` or ``'ipc'``.
    host:
        TCP host of every aggregator.
    base_port:
        The root gets ``base_port``, edge ``i`` gets ``base_port + 1 + i``; with
        ``ipc`` the same numbers name the socket files ``zmqfed-<number>.ipc``.
    ipc_dir:
        Directory of the ipc socket files (default: the temporary directory).
    root, edge_prefix, leaf_prefix:
        Node names.

    Returns
    -------
    Topology
        A validated topology of ``1 + branches * (1 + leaves)`` nodes.
    """
    _count(branches, "branches")
    _count(leaves, "leaves")
    if transport not in ("tcp", "ipc"):
        raise ConfigError(f"transport must be 'tcp' or 'ipc', got {transport!r}")
    topology = Topology()
    top = topology.add_node(Node(root, _endpoint(transport, host, base_port, ipc_dir)))
    leaf_names = _names(leaf_prefix, branches * leaves)
    for i, name in enumerate(_names(edge_prefix, branches)):
        edge = Node(name, _endpoint(transport, host, base_port + 1 + i, ipc_dir))
        topology.add_edge(edge, top)
        for leaf in leaf_names[i * leaves : (i + 1) * leaves]:
            topology.add_edge(Node(leaf), edge)
    topology.validate()
    return topology
