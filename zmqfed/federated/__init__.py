"""Federated layer: transports and pipes to peers, ports, the protocol, security.

Lower layers (``zmqfed.wire``) never import this package; ``zmqfed.core``
builds on it.  ``docs/architecture.md`` draws who owns what.
"""

from __future__ import annotations

from zmqfed.federated.aggregator_transport import AggregatorTransport
from zmqfed.federated.collaborator_transport import CollaboratorTransport
from zmqfed.federated.events import PeerEvent, PeerEventKind, TransportStats
from zmqfed.federated.group import init_federated_group
from zmqfed.federated.memory import MemoryNetwork
from zmqfed.federated.multiplex import Multiplexer
from zmqfed.federated.pipe import (
    OFFLINE,
    PULLING,
    PUSHING,
    ZOMBIE,
    AggregatorPipe,
    CollaboratorPipe,
    Pipe,
)
from zmqfed.federated.ports import Network, Port
from zmqfed.federated.protocol import ErrorCode, Kind
from zmqfed.federated.security import Curve, create_keys
from zmqfed.federated.sockets import SocketOptions, context, make_dealer, make_router
from zmqfed.federated.zmq_port import ZmqNetwork, default_network
from zmqfed.props import (
    AGGREGATOR,
    COLLABORATOR,
    FederatedProperties,
    is_aggregator,
    is_collaborator,
)

__all__ = [
    "AGGREGATOR",
    "COLLABORATOR",
    "OFFLINE",
    "PULLING",
    "PUSHING",
    "ZOMBIE",
    "AggregatorPipe",
    "AggregatorTransport",
    "CollaboratorPipe",
    "CollaboratorTransport",
    "Curve",
    "ErrorCode",
    "FederatedProperties",
    "Kind",
    "MemoryNetwork",
    "Multiplexer",
    "Network",
    "PeerEvent",
    "PeerEventKind",
    "Pipe",
    "Port",
    "SocketOptions",
    "TransportStats",
    "ZmqNetwork",
    "context",
    "create_keys",
    "default_network",
    "init_federated_group",
    "is_aggregator",
    "is_collaborator",
    "make_dealer",
    "make_router",
]
