"""Nodes and edges of a topology, and the rules for nick names.

Re-exported by ``zmqfed.topo.graph`` and ``zmqfed.topo``; import from there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from zmqfed.address import Address, empty_address
from zmqfed.errors import ConfigError, TopologyError
from zmqfed.meta import check_json_safe
from zmqfed.names import check_name

__all__ = ["Edge", "Node", "NodeLike", "check_nick_name", "name_of"]


def check_nick_name(name: object) -> str:
    """Return ``name`` if it is a valid nick name, else raise ``TopologyError`` saying why.

    A nick name is 1 to 255 UTF-8 bytes of letters and digits (any script),
    ``_``, ``-`` and ``.``, starting with a letter, a digit or ``_``, in
    Unicode normal form C (:mod:`zmqfed.names`): it is a ZeroMQ routing id
    and the stem of the node's files, so it holds no path syntax.
    """
    return check_name(name, TopologyError)


class Node:
    """A process in the federation, identified by its nick name.

    Parameters
    ----------
    nick_name:
        Unique name; a collaborator's ZeroMQ routing id (see :func:`check_nick_name`).
    address:
        Where the node binds when it aggregates: an :class:`Address`, an
        endpoint string, or ``None``/``empty_address`` for a pure collaborator.
    settings:
        JSON-safe per-node settings handed to ``FederatedProperties.settings``.

    Nodes compare and hash by nick name only.
    """

    __slots__ = ("_address", "_nick_name", "_settings")

    def __init__(
        self,
        nick_name: str,
        address: Address | str | None = empty_address,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self._nick_name = check_nick_name(nick_name)
        self._address = _to_address(address, nick_name)
        self._settings = _to_settings(settings, nick_name)

    @property
    def nick_name(self) -> str:
        """The node's unique name."""
        return self._nick_name

    @property
    def address(self) -> Address:
        """The address the node binds when it aggregates (may be empty)."""
        return self._address

    @property
    def settings(self) -> dict[str, Any]:
        """Per-node settings (a plain dict)."""
        return self._settings

    def same_definition(self, other: Node) -> bool:
        """True when ``other`` has the same nick name, address and settings."""
        return (
            self._nick_name == other._nick_name
            and self._address == other._address
            and self._settings == other._settings
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Node):
            return self._nick_name == other._nick_name
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._nick_name)

    def serialize(self) -> dict[str, Any]:
        """A JSON-safe dict: ``nick_name``, ``address`` (endpoint or address dict), ``settings``."""
        address = self._address
        return {
            "nick_name": self._nick_name,
            "address": address.endpoint if address.is_plain_endpoint else address.serialize(),
            "settings": json.loads(json.dumps(self._settings)),
        }

    @classmethod
    def unserialize(cls, data: Mapping[str, Any]) -> Node:
        """Inverse of :meth:`serialize`; also reads OpenFed's ``{nick_name, address}`` dict."""
        if not isinstance(data, Mapping) or "nick_name" not in data:
            raise TopologyError(f"a node must be an object with a 'nick_name', got {data!r}")
        try:
            address = Address.unserialize(data.get("address"))
        except ConfigError as exc:
            raise TopologyError(f"node {data['nick_name']!r}: {exc}") from exc
        return cls(data["nick_name"], address, data.get("settings"))

    def __repr__(self) -> str:
        if self._address.empty:
            return f"Node({self._nick_name!r})"
        return f"Node({self._nick_name!r}, {self._address.endpoint!r})"


def _to_address(address: object, name: str) -> Address:
    """Turn an Address, endpoint string or None into an Address for node ``name``."""
    if address is None:
        return empty_address
    if isinstance(address, Address):
        return address
    if isinstance(address, str):
        try:
            return Address(address)
        except ConfigError as exc:
            raise TopologyError(f"node {name!r}: {exc}") from exc
    raise TopologyError(
        f"node {name!r}: address must be an Address, an endpoint string or None, "
        f"got {type(address).__name__}"
    )


def _to_settings(settings: object, name: str) -> dict[str, Any]:
    """Copy and check the settings of node ``name``."""
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise TopologyError(
            f"node {name!r}: settings must be a mapping, got {type(settings).__name__}"
        )
    result = dict(settings)
    try:
        check_json_safe(result, f"node {name!r} settings")
    except ConfigError as exc:
        raise TopologyError(str(exc)) from exc
    return result


@dataclass(frozen=True)
class Edge:
    """A collaborator (``start``) reporting to an aggregator (``end``).

    Parameters
    ----------
    start:
        The collaborator.
    end:
        The aggregator.
    """

    start: Node
    end: Node

    def __post_init__(self) -> None:
        for which in ("start", "end"):
            value = getattr(self, which)
            if not isinstance(value, Node):
                raise TopologyError(f"edge {which} must be a Node, got {type(value).__name__}")
        if self.start == self.end:
            raise TopologyError(
                f"self edge {self.start.nick_name!r} -> {self.end.nick_name!r}: "
                "a node cannot collaborate in its own group"
            )

    @property
    def names(self) -> tuple[str, str]:
        """``(start nick name, end nick name)``."""
        return (self.start.nick_name, self.end.nick_name)

    def in_edge(self, node: NodeLike) -> bool:
        """True when ``node`` (a Node or nick name) is the start or the end."""
        return self.is_start(node) or self.is_end(node)

    def is_start(self, node: NodeLike) -> bool:
        """True when ``node`` is the collaborator of this edge."""
        return name_of(node) == self.start.nick_name

    def is_end(self, node: NodeLike) -> bool:
        """True when ``node`` is the aggregator of this edge."""
        return name_of(node) == self.end.nick_name

    def serialize(self) -> dict[str, Any]:
        """``{'start': node dict, 'end': node dict}`` (OpenFed's shape)."""
        return {"start": self.start.serialize(), "end": self.end.serialize()}

    @classmethod
    def unserialize(cls, data: Mapping[str, Any]) -> Edge:
        """Inverse of :meth:`serialize`."""
        if not isinstance(data, Mapping) or "start" not in data or "end" not in data:
            raise TopologyError(f"an edge must be an object with 'start' and 'end', got {data!r}")
        return cls(Node.unserialize(data["start"]), Node.unserialize(data["end"]))

    def __repr__(self) -> str:
        return f"Edge({self.start.nick_name!r} -> {self.end.nick_name!r})"


NodeLike: TypeAlias = Node | str
"""A node given as a :class:`Node` or by its nick name."""


def name_of(node: object) -> str:
    """The nick name of a Node or a name."""
    if isinstance(node, Node):
        return node.nick_name
    if isinstance(node, str):
        return node
    raise TopologyError(f"expected a Node or a nick name, got {type(node).__name__} {node!r}")
