"""``FederatedProperties``: what a node needs to know about one federated group.

Pure data, no sockets: produced by ``zmqfed.topo.analysis`` and consumed by the
federated layer. Re-exported as ``zmqfed.federated.FederatedProperties``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from zmqfed.address import Address
from zmqfed.errors import ConfigError

__all__ = ["AGGREGATOR", "COLLABORATOR", "FederatedProperties"]

AGGREGATOR = "aggregator"
COLLABORATOR = "collaborator"


def group_fingerprint(
    aggregator_name: str, endpoint: str | None, collaborators: Iterable[str]
) -> str:
    """A short hash both ends of a group compute from the same topology."""
    canon = json.dumps([aggregator_name, endpoint, sorted(collaborators)], separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FederatedProperties:
    """One node's view of one federated group.

    Parameters
    ----------
    role:
        ``'aggregator'`` (binds a ROUTER) or ``'collaborator'`` (connects a DEALER).
    nick_name:
        This node's name; a collaborator's ZeroMQ routing id.
    address:
        The group's endpoint (the aggregator's address), with ``world_size``.
    aggregator_name:
        The nick name of the group's aggregator.
    collaborators:
        Sorted nick names of the group's collaborators.
    settings:
        Optional per-node settings from the topology (codec, timeouts, keys).
    """

    role: str
    nick_name: str
    address: Address
    aggregator_name: str
    collaborators: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.role not in (AGGREGATOR, COLLABORATOR):
            raise ConfigError(f"role must be {AGGREGATOR!r} or {COLLABORATOR!r}, got {self.role!r}")
        if self.address.empty:
            raise ConfigError(
                f"group of aggregator {self.aggregator_name!r} has no endpoint to bind or connect to"
            )
        object.__setattr__(self, "collaborators", tuple(sorted(self.collaborators)))
        if self.address.world_size is None:
            object.__setattr__(self, "address", self.address.with_world_size(self.world_size))
        if self.role == AGGREGATOR and self.nick_name != self.aggregator_name:
            raise ConfigError(
                f"node {self.nick_name!r} has role aggregator in the group of {self.aggregator_name!r}"
            )
        if self.role == COLLABORATOR and self.nick_name not in self.collaborators:
            raise ConfigError(
                f"node {self.nick_name!r} is not a collaborator of the group of {self.aggregator_name!r}"
            )

    @property
    def aggregator(self) -> bool:
        """True when this node aggregates the group."""
        return self.role == AGGREGATOR

    @property
    def collaborator(self) -> bool:
        """True when this node is one of the group's collaborators."""
        return self.role == COLLABORATOR

    @property
    def peers(self) -> tuple[str, ...]:
        """The nodes this node talks to in the group, sorted."""
        return self.collaborators if self.aggregator else (self.aggregator_name,)

    @property
    def world_size(self) -> int:
        """Members of the group: the aggregator plus its collaborators."""
        return 1 + len(self.collaborators)

    @property
    def group_name(self) -> str:
        """The group is named after its aggregator."""
        return self.aggregator_name

    @property
    def fingerprint(self) -> str:
        """Hash of (aggregator, endpoint, collaborators); both ends must agree."""
        return group_fingerprint(self.aggregator_name, self.address.endpoint, self.collaborators)

    def serialize(self) -> dict[str, Any]:
        """A JSON-safe dict (see :meth:`unserialize`)."""
        return {
            "role": self.role,
            "nick_name": self.nick_name,
            "address": self.address.serialize(),
            "aggregator_name": self.aggregator_name,
            "collaborators": list(self.collaborators),
            "settings": dict(self.settings),
        }

    @classmethod
    def unserialize(cls, data: dict[str, Any]) -> FederatedProperties:
        """Inverse of :meth:`serialize`; names the missing field on bad input."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"federated properties must be a JSON object, got {type(data).__name__}"
            )
        try:
            return cls(
                role=data["role"],
                nick_name=data["nick_name"],
                address=Address.unserialize(data["address"]),
                aggregator_name=data["aggregator_name"],
                collaborators=tuple(data["collaborators"]),
                settings=dict(data.get("settings") or {}),
            )
        except KeyError as exc:
            raise ConfigError(f"federated properties lack the field {exc.args[0]!r}") from None

    @staticmethod
    def save(
        props: FederatedProperties | list[FederatedProperties], path: str | os.PathLike[str]
    ) -> None:
        """Write one or several properties as a JSON list."""
        items = [props] if isinstance(props, FederatedProperties) else list(props)
        with open(path, "w", encoding="utf-8") as f:
            json.dump([p.serialize() for p in items], f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> list[FederatedProperties]:
        """Read a JSON list written by :meth:`save` (a single object is accepted too)."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{os.fspath(path)}: not valid JSON ({exc})") from exc
        if isinstance(data, dict):
            data = [data]
        return [cls.unserialize(d) for d in data]

    def __repr__(self) -> str:
        return (
            f"FederatedProperties(role={self.role!r}, nick_name={self.nick_name!r}, "
            f"address={str(self.address)!r}, aggregator={self.aggregator_name!r}, "
            f"collaborators={list(self.collaborators)!r})"
        )
