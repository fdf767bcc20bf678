"""Group bootstrap: the transport and pipes of one federated group, from its properties."""

from __future__ import annotations

from zmqfed.federated.aggregator_transport import AggregatorTransport
from zmqfed.federated.collaborator_transport import CollaboratorTransport
from zmqfed.federated.pipe import Pipe
from zmqfed.federated.ports import Network
from zmqfed.federated.security import Curve
from zmqfed.federated.sockets import SocketOptions, close_at_exit
from zmqfed.federated.zmq_port import default_network
from zmqfed.props import FederatedProperties
from zmqfed.wire import DEFAULT_LIMITS, Limits

__all__ = ["init_federated_group"]

#: Transports made here: pipes are views, so the group keeps its transport alive
#: (and its ROUTER bound) until it is closed at exit.
_transports: list[AggregatorTransport | CollaboratorTransport] = []


def init_federated_group(
    fed_props: FederatedProperties,
    *,
    options: SocketOptions | None = None,
    limits: Limits = DEFAULT_LIMITS,
    codec: str = "raw",
    network: Network | None = None,
    curve: Curve | None = None,
) -> list[Pipe]:
    """The pipes of ``fed_props``'s group: the aggregator's roster, or a collaborator's one pipe.

    The aggregator's pipes share one bound ROUTER; a collaborator's pipe owns
    a DEALER connected to the aggregator.  The transport behind them is
    closed at interpreter exit (or by closing a collaborator's pipe).  Talk
    over them with OpenFed's pipe-level API (``direct_set``/``direct_get``,
    ``upload``/``download``); most users get pipes through a ``Maintainer``
    instead.  ``curve`` encrypts and authenticates the group (required for
    ``limits.allow_pickle``: the transports refuse it without).
    """
    network = network or default_network()
    if fed_props.aggregator:
        transport = AggregatorTransport(
            fed_props,
            network=network,
            served=dict,
            options=options,
            limits=limits,
            codec=codec,
            curve=curve,
        )
        _transports.append(transport)
        close_at_exit(transport)
        return list(transport.roster.values())
    link = CollaboratorTransport(
        fed_props, network=network, options=options, limits=limits, codec=codec, curve=curve
    )
    _transports.append(link)
    close_at_exit(link)
    return [link.pipe]
