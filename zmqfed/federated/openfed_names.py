"""OpenFed's federated-layer names: role and state constants, and its ``torch.distributed`` calls.

OpenFed (zmqfed's predecessor) built each group as a ``torch.distributed``
process group with a key-value store. Its constants keep their meaning here
(role names, pipe states, ranks); the store's key names stay as strings for
code that names them. The calls that built process groups or used the store
directly have nothing to act on over ZeroMQ: they raise ``ConfigError``
saying what to use instead (docs/openfed-migration.md).
"""

from __future__ import annotations

from typing import Any, NoReturn

from zmqfed.errors import ConfigError, PeerOffline
from zmqfed.federated.dist_props import zmqfed_lock
from zmqfed.federated.pipe import OFFLINE, PULLING, PUSHING, ZOMBIE
from zmqfed.props import AGGREGATOR, COLLABORATOR

__all__ = [
    "DeviceOffline",
    "aggregator",
    "aggregator_rank",
    "build_point2point_group",
    "collaborator",
    "collaborator_rank",
    "get_store_value",
    "joint_federated_group",
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

#: The role names (``is_aggregator(aggregator)``; OpenFed's values had an ``openfed_`` prefix).
aggregator = AGGREGATOR
collaborator = COLLABORATOR

#: Pipe states, the values ``Pipe.state`` takes (``pipe.state == push``: an upload waits).
push = PUSHING
pull = PULLING
zombie = ZOMBIE
offline = OFFLINE

#: Keys of OpenFed's store; zmqfed has no store, the names remain for code that uses them.
zmqfed_identity = "zmqfed_identity"
zmqfed_status = "zmqfed_status"
zmqfed_meta = "zmqfed_meta"
#: The meta key of a node's name.
nick_name = "nick_name"

#: The ranks ``topo.analysis`` gives an aggregator and its first collaborator.
aggregator_rank = 0
collaborator_rank = 1

#: The error of a peer gone offline: OpenFed's ``DeviceOffline`` is zmqfed's ``PeerOffline``.
DeviceOffline = PeerOffline


def _no_process_groups(name: str, instead: str) -> NoReturn:
    raise ConfigError(
        f"{name}() built torch.distributed process groups in OpenFed; zmqfed's groups are "
        f"ZeroMQ sockets: {instead}"
    )


def build_point2point_group(rank: int = 0) -> NoReturn:
    """Raise ``ConfigError``: zmqfed builds no process groups (use ``init_federated_group``)."""
    _no_process_groups(
        "build_point2point_group",
        "zmqfed.federated.init_federated_group(props) returns one pipe per peer",
    )


def joint_federated_group(
    backend: Any, init_method: Any = None, world_size: int = -1, rank: int = -1
) -> NoReturn:
    """Raise ``ConfigError``: zmqfed joins no process groups (use a ``Maintainer``)."""
    _no_process_groups(
        "joint_federated_group",
        "analyse a topology (zmqfed.topo.analysis) and pass its props to "
        "zmqfed.core.Maintainer or zmqfed.federated.init_federated_group",
    )


def _no_store(name: str) -> NoReturn:
    raise ConfigError(
        f"{name}() used OpenFed's torch.distributed store; zmqfed has none: exchange values "
        "with Pipe.direct_set(key, value) / Pipe.direct_get(key), or send them in the meta"
    )


def set_store_value(store: Any, key: str, value: Any) -> NoReturn:
    """Raise ``ConfigError``: there is no store (use ``Pipe.direct_set``)."""
    _no_store("set_store_value")


def get_store_value(store: Any, key: str) -> NoReturn:
    """Raise ``ConfigError``: there is no store (use ``Pipe.direct_get``)."""
    _no_store("get_store_value")
