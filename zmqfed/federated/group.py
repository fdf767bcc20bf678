"""Group bootstrap: build the pipes of one federated group from its properties."""

from __future__ import annotations

from zmqfed.federated.client import CollaboratorLink
from zmqfed.federated.pipe import AggregatorPipe, CollaboratorPipe, Pipe
from zmqfed.federated.server import AggregatorGroup
from zmqfed.federated.sockets import SocketOptions
from zmqfed.props import FederatedProperties
from zmqfed.wire import DEFAULT_LIMITS, Limits

__all__ = ["init_federated_group", "is_aggregator", "is_collaborator"]


def is_aggregator(role: str) -> bool:
    """True for the aggregator role name."""
    return role == "aggregator"


def is_collaborator(role: str) -> bool:
    """True for the collaborator role name."""
    return role == "collaborator"


def init_federated_group(
    fed_props: FederatedProperties,
    *,
    options: SocketOptions | None = None,
    limits: Limits = DEFAULT_LIMITS,
    codec: str = "raw",
) -> list[Pipe]:
    """The pipes of ``fed_props``'s group: the aggregator's roster, or a collaborator's one pipe.

    The aggregator's pipes share one bound ROUTER; a collaborator's pipe owns
    a DEALER connected to the aggregator. Most users get pipes through a
    ``Maintainer`` instead.
    """
    if fed_props.aggregator:
        group = AggregatorGroup(fed_props, options=options, limits=limits, codec=codec)
        pipes: list[AggregatorPipe] = list(group.roster.values())
        return list(pipes)
    link = CollaboratorLink(fed_props, options=options, limits=limits, codec=codec)
    return [CollaboratorPipe(link, fed_props.aggregator_name)]
