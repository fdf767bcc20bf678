"""Endpoints of federated groups: ``Address`` and the well-known defaults."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from typing import Any

from zmqfed.errors import ConfigError

__all__ = [
    "Address",
    "default_ipc_address",
    "default_tcp_address",
    "empty_address",
]

_SCHEMES = ("tcp", "ipc")


@dataclass(frozen=True)
class Address:
    """Where an aggregator binds and its collaborators connect.

    Parameters
    ----------
    endpoint:
        A ZeroMQ endpoint, ``tcp://host:port`` or ``ipc://path``; ``None`` for
        a node that binds nothing (a pure collaborator).
    world_size:
        Members of the group this address serves (set by ``topo.analysis``;
        ``None`` on addresses written by hand).
    """

    endpoint: str | None = None
    world_size: int | None = None

    def __post_init__(self) -> None:
        if self.endpoint is None:
            return
        if not isinstance(self.endpoint, str):
            raise ConfigError(f"address endpoint must be a string, got {self.endpoint!r}")
        scheme, sep, rest = self.endpoint.partition("://")
        if not sep or scheme not in _SCHEMES:
            raise ConfigError(
                f"address {self.endpoint!r}: endpoint must start with tcp:// or ipc://"
            )
        if not rest:
            raise ConfigError(f"address {self.endpoint!r}: missing host/path after {scheme}://")
        if scheme == "tcp":
            host, colon, port = rest.rpartition(":")
            if not colon or not host:
                raise ConfigError(f"address {self.endpoint!r}: tcp endpoint needs host:port")
            if port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
                raise ConfigError(f"address {self.endpoint!r}: invalid tcp port {port!r}")

    @property
    def empty(self) -> bool:
        """True for an address that binds nothing."""
        return self.endpoint is None

    @property
    def scheme(self) -> str | None:
        """``'tcp'``, ``'ipc'`` or ``None`` for the empty address."""
        return None if self.endpoint is None else self.endpoint.split("://", 1)[0]

    def with_world_size(self, world_size: int) -> Address:
        """A copy of this address carrying the size of the group it serves."""
        return replace(self, world_size=world_size)

    def serialize(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {"endpoint": self.endpoint, "world_size": self.world_size}

    @classmethod
    def unserialize(cls, data: dict[str, Any] | str | None) -> Address:
        """Inverse of :meth:`serialize`; also accepts a bare endpoint string."""
        if data is None or isinstance(data, str):
            return cls(data)
        if not isinstance(data, dict):
            raise ConfigError(f"cannot read an address from {data!r}")
        return cls(data.get("endpoint"), data.get("world_size"))

    def __str__(self) -> str:
        return self.endpoint or "<empty>"


#: ``tcp://127.0.0.1:1994``, or ``$ZMQFED_DEFAULT_TCP`` (e.g. to run two federations on one host).
default_tcp_address = Address(os.environ.get("ZMQFED_DEFAULT_TCP") or "tcp://127.0.0.1:1994")
#: An ipc endpoint in the temp directory, or ``$ZMQFED_DEFAULT_IPC``.
default_ipc_address = Address(
    os.environ.get("ZMQFED_DEFAULT_IPC")
    or "ipc://" + os.path.join(tempfile.gettempdir(), "zmqfed-1994.ipc")
)
empty_address = Address(None)
