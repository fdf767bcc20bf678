"""zmqfed: federated-learning middleware on a ZeroMQ message bus.

Each node keeps its data and trains locally; zmqfed moves the model between
them. ``zmqfed.topo`` turns a graph of nodes into ROUTER/DEALER sockets,
``zmqfed.core.Maintainer`` exchanges a model's state with the group, and
``zmqfed.functional`` holds the hooks, step policies and aggregation rules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from zmqfed.address import (
    Address,
    default_file_address,
    default_ipc_address,
    default_tcp_address,
    empty_address,
)
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
from zmqfed.utils import FMT, seed_everything, tablist, time_string

if TYPE_CHECKING:
    from zmqfed import common, core, data, federated, functional, optim, tools, topo, utils, wire
    from zmqfed.api import API

# Subpackages load on first use (PEP 562): `zmqfed-topo` and other paths that
# never touch tensors do not pay for importing torch.
_SUBMODULES = frozenset(
    {"common", "core", "data", "federated", "functional", "optim", "tools", "topo", "utils", "wire"}
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"zmqfed.{name}")
    if name == "API":
        from zmqfed.api import API

        return API
    raise AttributeError(f"module 'zmqfed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "API",
    "FMT",
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
    "common",
    "core",
    "data",
    "default_file_address",
    "default_ipc_address",
    "default_tcp_address",
    "empty_address",
    "federated",
    "functional",
    "optim",
    "seed_everything",
    "tablist",
    "time_string",
    "tools",
    "topo",
    "utils",
    "wire",
]
