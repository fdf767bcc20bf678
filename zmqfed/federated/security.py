"""CurveZMQ for zmqfed: node key pairs, the CURVE options of each end, the pickle gate.

Every node has a long-term key pair in a key directory: ``NAME.key`` (public,
shared with everybody) and ``NAME.key_secret`` (mode 0600, never shared). An
aggregator is a CURVE server with a ZAP domain of its own; the ZAP handler
(:mod:`zmqfed.federated.zap`) admits exactly the public keys of its group's
collaborators (ZAP_ENFORCE_DOMAIN=1: no handler, no entry) and reports the
member's name as each message's ``User-Id``. ZAP never sees routing ids
(docs/zeromq.md §20), so the aggregator's port names every message's sender
by its ``User-Id`` and routes replies by it: a peer holding alpha's key can
neither speak as beta nor take over beta's connection.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from zmqfed.errors import ConfigError, SecurityError
from zmqfed.names import name_path

__all__ = [
    "ClientSecurity",
    "Curve",
    "ServerSecurity",
    "create_keys",
    "require_curve_for_pickle",
]

log = logging.getLogger(__name__)


def require_curve_for_pickle(limits: Any, curve: Curve | None) -> None:
    """Refuse ``limits.allow_pickle`` without CURVE: unpickling runs the sender's code.

    Every transport calls this before it makes a socket (docs/security.md), so
    no way of building a group -- ``Maintainer``, ``init_federated_group`` or a
    transport made directly -- accepts pickles from unauthenticated peers.

    Raises
    ------
    ConfigError
        ``limits.allow_pickle`` is set and ``curve`` is None.
    """
    if getattr(limits, "allow_pickle", False) and curve is None:
        raise ConfigError(
            "allow_pickle lets peers run code on this node; it is only allowed behind CURVE "
            "(pass curve=Curve(keys_dir))"
        )


def create_keys(keys_dir: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) into ``keys_dir``.

    Refuses to overwrite an existing key pair.
    """
    directory = Path(keys_dir)
    public, secret = name_path(directory, name, ".key"), name_path(directory, name, ".key_secret")
    directory.mkdir(parents=True, exist_ok=True)
    for path in (public, secret):
        # lexists: pyzmq would write the key wherever a dangling symlink points
        if path.is_symlink() and not path.exists():
            raise SecurityError(
                f"cannot create a key pair for {name!r}: {path} is a dangling symlink"
            )
        if os.path.lexists(path):
            raise SecurityError(f"a key pair for {name!r} already exists in {directory}")
    old = os.umask(0o077)  # pyzmq writes the secret 0644 otherwise
    try:
        zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def _missing(path: Path) -> str:
    if path.is_symlink():
        return f"{path} is a dangling symlink to {os.readlink(path)}"
    return f"{path} is missing"


@dataclass(frozen=True)
class Curve:
    """CURVE settings of one node: a directory of public keys plus its own secret key."""

    keys_dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys_dir", Path(self.keys_dir))
        if not self.keys_dir.is_dir():
            raise SecurityError(f"key directory {self.keys_dir} does not exist")

    def public_key(self, name: str) -> bytes:
        """The z85 public key of node ``name``."""
        path = name_path(self.keys_dir, name, ".key")
        if not path.exists():
            raise SecurityError(f"no public key for node {name!r} ({_missing(path)})")
        public, _ = zmq.auth.load_certificate(path)
        return public

    def key_pair(self, name: str) -> tuple[bytes, bytes]:
        """This node's (public, secret) z85 keys; the secret file must be private."""
        path = name_path(self.keys_dir, name, ".key_secret")
        if not path.exists():
            raise SecurityError(f"no secret key for node {name!r} ({_missing(path)})")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise SecurityError(
                f"secret key {path} is readable by others (mode {mode:o}); chmod 600 it"
            )
        public, secret = zmq.auth.load_certificate(path)
        if secret is None:
            raise SecurityError(f"{path} holds no secret key")
        return public, secret

    def server(self, name: str, group: str, members: Iterable[str]) -> ServerSecurity:
        """What aggregator ``name`` needs to admit exactly ``members`` of ``group``.

        The ZAP domain is new for every call, so each aggregator socket has
        an allow-list of its own, even beside another group of the same name
        in the same process (:mod:`zmqfed.federated.zap`).
        """
        public, secret = self.key_pair(name)
        allowed = {member: self.public_key(member) for member in members}
        return ServerSecurity(
            public=public,
            secret=secret,
            domain=f"zmqfed-{uuid.uuid4().hex}",
            group=group,
            allowed=allowed,
        )

    def client(self, name: str, server: str) -> ClientSecurity:
        """What collaborator ``name`` needs to connect to aggregator ``server``."""
        public, secret = self.key_pair(name)
        return ClientSecurity(public=public, secret=secret, server_key=self.public_key(server))


@dataclass(frozen=True)
class ServerSecurity:
    """An aggregator's CURVE keys, its socket's ZAP domain and that domain's allow-list."""

    public: bytes
    secret: bytes
    domain: str
    group: str
    allowed: dict[str, bytes]

    def socket_options(self) -> dict[int, Any]:
        """CURVE server options, set before bind."""
        return {
            zmq.CURVE_SERVER: 1,
            zmq.CURVE_PUBLICKEY: self.public,
            zmq.CURVE_SECRETKEY: self.secret,
            zmq.ZAP_DOMAIN: self.domain.encode(),
            zmq.ZAP_ENFORCE_DOMAIN: 1,  # fail closed when no ZAP handler answers
        }


@dataclass(frozen=True)
class ClientSecurity:
    """A collaborator's CURVE keys and the public key of the aggregator it talks to."""

    public: bytes
    secret: bytes
    server_key: bytes

    def socket_options(self) -> dict[int, Any]:
        """CURVE client options, set before connect.

        The routing id is random (128 bits, hex) rather than the node's name:
        behind CURVE the aggregator knows its peers by key, and a routing id
        nobody else knows is one nobody else can take over with
        ROUTER_HANDOVER (docs/zeromq.md §3, §20). It travels only inside the
        encrypted handshake.
        """
        return {
            zmq.CURVE_SERVERKEY: self.server_key,
            zmq.CURVE_PUBLICKEY: self.public,
            zmq.CURVE_SECRETKEY: self.secret,
            zmq.ROUTING_ID: secrets.token_hex(16).encode(),
        }
