"""zmqfed: federated-learning middleware on a ZeroMQ message bus.

Each node keeps its data and trains locally; zmqfed moves the model between
them. ``zmqfed.topo`` turns a graph of nodes into ROUTER/DEALER sockets,
``zmqfed.core.Maintainer`` exchanges a model's state with the group, and
``zmqfed.functional`` holds the hooks, step policies and aggregation rules.
"""

from __future__ import annotations

from zmqfed import core, data, federated, functional, optim, topo, wire
from zmqfed.address import Address, default_ipc_address, default_tcp_address, empty_address
from zmqfed.api import API
from zmqfed.errors import (
    AggregatorRewound,
    ConfigError,
    PeerOffline,
    PeerTimeout,
    PipeError,
    ProtocolError,
    RemoteError,
    SecurityError,
    TopologyError,
    ZmqfedError,
)
from zmqfed.meta import Meta

__version__ = "0.1.0"

__all__ = [
    "API",
    "Address",
    "AggregatorRewound",
    "ConfigError",
    "Meta",
    "PeerOffline",
    "PeerTimeout",
    "PipeError",
    "ProtocolError",
    "RemoteError",
    "SecurityError",
    "TopologyError",
    "ZmqfedError",
    "__version__",
    "core",
    "data",
    "default_ipc_address",
    "default_tcp_address",
    "empty_address",
    "federated",
    "functional",
    "optim",
    "topo",
    "wire",
]
