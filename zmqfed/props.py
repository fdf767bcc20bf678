"""``FederatedProperties``: what a node needs to know about one federated group.

Pure data, no sockets: produced by ``zmqfed.topo.analysis`` and consumed by the
federated layer. Re-exported as ``zmqfed.federated.FederatedProperties``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from zmqfed.address import Address
from zmqfed.errors import ConfigError
from zmqfed.names import check_name

__all__ = [
    "AGGREGATOR",
    "COLLABORATOR",
    "FederatedProperties",
    "is_aggregator",
    "is_collaborator",
    "normalize_role",
]

AGGREGATOR = "aggregator"
COLLABORATOR = "collaborator"


def is_aggregator(role: str) -> bool:
    """True for the aggregator role name (OpenFed's helper)."""
    return role == AGGREGATOR


def is_collaborator(role: str) -> bool:
    """True for the collaborator role name (OpenFed's helper)."""
    return role == COLLABORATOR


# Role names of OpenFed's files, and what a textual openfed -> zmqfed rename makes of them.
_ROLE_ALIASES = {
    "openfed_aggregator": AGGREGATOR,
    "openfed_collaborator": COLLABORATOR,
    "zmqfed_aggregator": AGGREGATOR,
    "zmqfed_collaborator": COLLABORATOR,
}


def normalize_role(role: object) -> str:
    """``'aggregator'`` or ``'collaborator'`` for a role name (OpenFed's spelling too)."""
    if isinstance(role, str):
        role = _ROLE_ALIASES.get(role, role)
    if role not in (AGGREGATOR, COLLABORATOR):
        raise ConfigError(f"role must be {AGGREGATOR!r} or {COLLABORATOR!r}, got {role!r}")
    return role


def _is_sorted(names: tuple[str, ...]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(names))


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
        object.__setattr__(self, "role", normalize_role(self.role))
        for name in (self.nick_name, self.aggregator_name, *self.collaborators):
            check_name(name)  # props files are an entry point for names too
        if self.address.empty:
            raise ConfigError(
                f"group of aggregator {self.aggregator_name!r} has no endpoint to bind or connect to"
            )
        names = self.collaborators
        if not (isinstance(names, tuple) and _is_sorted(names)):
            # an already sorted tuple is shared, not copied: a process holding
            # thousands of collaborators' properties keeps one roster
            object.__setattr__(self, "collaborators", tuple(sorted(names)))
        if self.address.world_size is None or self.address.rank == -1:
            # OpenFed's ranks: the aggregator 0, collaborators 1.. in name order
            rank = -1
            if self.role == AGGREGATOR:
                rank = 0
            elif self.nick_name in self.collaborators:
                rank = 1 + self.collaborators.index(self.nick_name)
            object.__setattr__(self, "address", self.address.with_world_size(self.world_size, rank))
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
        return is_aggregator(self.role)

    @property
    def collaborator(self) -> bool:
        """True when this node is one of the group's collaborators."""
        return is_collaborator(self.role)

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

    @cached_property
    def fingerprint(self) -> str:
        """Hash of (aggregator, endpoint, collaborators); both ends must agree (computed once)."""
        return group_fingerprint(self.aggregator_name, self.address.endpoint, self.collaborators)

    def serialize(self) -> dict[str, Any]:
        """A JSON-safe dict (see :meth:`unserialize`).

        OpenFed's keys (``role``, ``nick_name``, ``address`` with ``backend``,
        ``init_method``, ``world_size``, ``rank``) plus what zmqfed needs to
        connect: the ``endpoint``, the group's ``aggregator_name`` and
        ``collaborators`` (both ends check the membership when they connect),
        and the node's ``settings``.
        """
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
            field_name = exc.args[0]
            if field_name in ("aggregator_name", "collaborators") and "role" in data:
                raise ConfigError(
                    f"federated properties lack the field {field_name!r}: OpenFed wrote only "
                    "role, nick_name and address, but zmqfed also needs the group's members "
                    "(both ends check them when they connect); make the file with "
                    "zmqfed.topo.analysis and FederatedProperties.save, or with "
                    "python -m zmqfed.tools.simulator"
                ) from None
            raise ConfigError(f"federated properties lack the field {field_name!r}") from None

    @staticmethod
    def save(
        props: FederatedProperties | list[FederatedProperties], path: str | os.PathLike[str]
    ) -> None:
        """Write one or several properties as a JSON list (what :meth:`load` reads).

        The list holds one :meth:`serialize` object per group, as OpenFed's
        simulator wrote its props files.
        """
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
