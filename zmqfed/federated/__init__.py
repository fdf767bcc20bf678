"""Federated layer: transports and pipes to peers, ports, the protocol, security.

Lower layers (``zmqfed.wire``) never import this package; ``zmqfed.core``
builds on it.  ``docs/architecture.md`` draws who owns what.  OpenFed's
names of this layer are here too (``aggregator``, ``push``,
``DistributedProperties``, ...: :mod:`zmqfed.federated.openfed_names`).
"""

from __future__ import annotations

from zmqfed.federated.aggregator_transport import AggregatorTransport
from zmqfed.federated.collaborator_transport import CollaboratorTransport
from zmqfed.federated.dist_props import DistributedProperties, zmqfed_lock
from zmqfed.federated.events import PeerEvent, PeerEventKind, TransportStats
from zmqfed.federated.group import init_federated_group
from zmqfed.federated.memory import MemoryNetwork
from zmqfed.federated.multiplex import Multiplexer
from zmqfed.federated.openfed_names import (
    DeviceOffline,
    aggregator,
    aggregator_rank,
    build_point2point_group,
    collaborator,
    collaborator_rank,
    get_store_value,
    joint_federated_group,
    nick_name,
    offline,
    pull,
    push,
    set_store_value,
    zmqfed_identity,
    zmqfed_meta,
    zmqfed_status,
    zombie,
)
from zmqfed.federated.pipe import (
    ASKING,
    OFFLINE,
    PULLING,
    PUSHING,
    ZOMBIE,
    AggregatorPipe,
    CollaboratorPipe,
    Pipe,
)
from zmqfed.federated.pipe_channel import PipeChannel
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
    "ASKING",
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
    "DeviceOffline",
    "DistributedProperties",
    "ErrorCode",
    "FederatedProperties",
    "Kind",
    "MemoryNetwork",
    "Multiplexer",
    "Network",
    "PeerEvent",
    "PeerEventKind",
    "Pipe",
    "PipeChannel",
    "Port",
    "SocketOptions",
    "TransportStats",
    "ZmqNetwork",
    "aggregator",
    "aggregator_rank",
    "build_point2point_group",
    "collaborator",
    "collaborator_rank",
    "context",
    "create_keys",
    "default_network",
    "get_store_value",
    "init_federated_group",
    "is_aggregator",
    "is_collaborator",
    "joint_federated_group",
    "make_dealer",
    "make_router",
    "nick_name",
    "offline",
    "pull",
    "push",
    "set_store_value",
    "zmqfed_identity",
    "zmqfed_lock",
    "zmqfed_meta",
    "zmqfed_status",
    "zombie",
]
