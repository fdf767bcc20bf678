"""Federated layer: pipes to peers, group bootstrap and the socket options.

Lower layers (``zmqfed.wire``) never import this package; ``zmqfed.core``
builds on it.
"""

from __future__ import annotations

from zmqfed.federated.client import CollaboratorLink
from zmqfed.federated.group import init_federated_group, is_aggregator, is_collaborator
from zmqfed.federated.pipe import (
    OFFLINE,
    PULLING,
    PUSHING,
    ZOMBIE,
    AggregatorPipe,
    CollaboratorPipe,
    Pipe,
)
from zmqfed.federated.security import Curve, create_keys
from zmqfed.federated.server import DRAINED, AggregatorGroup
from zmqfed.federated.sockets import SocketOptions, context, make_dealer, make_router
from zmqfed.props import AGGREGATOR, COLLABORATOR, FederatedProperties

__all__ = [
    "AGGREGATOR",
    "COLLABORATOR",
    "DRAINED",
    "OFFLINE",
    "PULLING",
    "PUSHING",
    "ZOMBIE",
    "AggregatorGroup",
    "AggregatorPipe",
    "CollaboratorLink",
    "CollaboratorPipe",
    "Curve",
    "FederatedProperties",
    "Pipe",
    "SocketOptions",
    "context",
    "create_keys",
    "init_federated_group",
    "is_aggregator",
    "is_collaborator",
    "make_dealer",
    "make_router",
]
