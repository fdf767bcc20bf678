"""Endpoints of federated groups: ``Address`` and the well-known defaults.

An address says where a group's aggregator binds and its collaborators
connect. zmqfed speaks ZeroMQ only, so every address comes down to one ZeroMQ
endpoint (``tcp://host:port`` or ``ipc://path``); the constructor also takes
OpenFed's ``torch.distributed`` form and translates it:

=========================  ==================================================
``init_method``            endpoint
=========================  ==================================================
``tcp://host:port``        ``tcp://host:port``
``ipc://path``             ``ipc://path``
``file://path``            ``ipc://path`` (a socket file where OpenFed had a
                           shared file; ZeroMQ replaces a stale one on bind)
``env://``                 ``tcp://$MASTER_ADDR:$MASTER_PORT``, read when the
                           address is made, as ``torch.distributed`` does;
                           ``$WORLD_SIZE`` and ``$RANK`` fill ``world_size``
                           and ``rank`` when they are not given
``null``                   none: the empty address of a pure collaborator
=========================  ==================================================

The other ``torch.distributed`` arguments are accepted and kept, but cannot
change how zmqfed talks:

* ``backend`` (``gloo``, ``nccl``, ``mpi`` or ``null``): every backend sends
  over the same ZeroMQ sockets; tensors travel from CPU memory whatever the
  backend (OpenFed did the same: it moved tensors to the CPU before sending).
  ``null`` is the empty address. The backend is kept for files and equality.
* ``world_size`` and ``rank``: filled in by ``zmqfed.topo.analysis``
  (aggregator rank 0, collaborators 1.. in name order); informative only,
  zmqfed identifies peers by nick name.
* ``store``: a ``torch.distributed`` Store has nothing to rendezvous here
  (the aggregator's ROUTER is the meeting point); it is kept on the object,
  never written to files and never compared.
* ``group_name``: a label, kept and written to files; a zmqfed group is
  named after its aggregator (``FederatedProperties.group_name``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from zmqfed.errors import ConfigError

__all__ = [
    "BACKENDS",
    "Address",
    "default_file_address",
    "default_ipc_address",
    "default_tcp_address",
    "empty_address",
]

#: Backends ``Address`` accepts (OpenFed's); all of them mean "ZeroMQ" here.
BACKENDS = ("gloo", "nccl", "mpi", "null")
_DEFAULT_BACKEND = "gloo"
#: OpenFed's default ``init_method`` (``Address()`` with no arguments).
_DEFAULT_INIT_METHOD = "tcp://localhost:1994"
_NULL = "null"
_SERIAL_KEYS = frozenset({"backend", "init_method", "world_size", "rank", "endpoint", "group_name"})


def _check_endpoint(endpoint: str, given: str) -> str:
    """Validate a ZeroMQ endpoint; errors quote what the user wrote (``given``)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc"):
        raise ConfigError(
            f"address {given!r}: endpoint must start with tcp:// or ipc:// "
            "(or, as init_method, file://, env:// or null)"
        )
    if not rest:
        raise ConfigError(f"address {given!r}: missing host/path after {scheme}://")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host:
            raise ConfigError(f"address {given!r}: tcp endpoint needs host:port")
        if port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"address {given!r}: invalid tcp port {port!r}")
    return endpoint


def _from_environment(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(
            f"init_method 'env://' reads MASTER_ADDR and MASTER_PORT, as torch.distributed "
            f"does, but ${name} is not set"
        )
    return value


def _int_from_environment(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"init_method 'env://': ${name}={value!r} is not an integer") from None


def _endpoint_of(init_method: str) -> str | None:
    """The ZeroMQ endpoint an ``init_method`` stands for (``None`` for ``null``)."""
    if init_method == _NULL:
        return None
    scheme, sep, rest = init_method.partition("://")
    if sep and scheme == "file":
        if not rest:
            raise ConfigError(f"address {init_method!r}: missing path after file://")
        return "ipc://" + rest
    if sep and scheme == "env":
        if rest:
            raise ConfigError(
                f"address {init_method!r}: env:// takes nothing after it "
                "(it reads MASTER_ADDR and MASTER_PORT)"
            )
        host, port = _from_environment("MASTER_ADDR"), _from_environment("MASTER_PORT")
        return _check_endpoint(f"tcp://{host}:{port}", f"env:// (tcp://{host}:{port})")
    return _check_endpoint(init_method, init_method)


class Address:
    """Where an aggregator binds and its collaborators connect (immutable).

    Two call shapes:

    * zmqfed's: ``Address(endpoint)`` or ``Address(endpoint, world_size)``
      with a ZeroMQ endpoint ``tcp://host:port`` or ``ipc://path``, or
      ``Address(None)`` for the empty address;
    * OpenFed's: ``Address(backend='gloo', init_method='tcp://localhost:1994',
      world_size=None, rank=-1)``, e.g. ``Address('gloo', 'file:///tmp/x')``
      or ``Address('null', 'null')`` (see the module docstring for what each
      ``init_method`` and argument means here). ``Address()`` is OpenFed's
      default, ``gloo`` at ``tcp://localhost:1994``.

    Parameters
    ----------
    backend:
        ``gloo``, ``nccl``, ``mpi`` or ``null``; or, as the first positional
        argument, an endpoint.
    init_method:
        ``tcp://``, ``ipc://``, ``file://``, ``env://`` or ``null``.
    world_size:
        Members of the group (set by ``topo.analysis``; ``None`` when unknown).
    rank:
        This node's rank in the group (set by ``topo.analysis``; ``-1`` when unknown).
    store:
        Accepted for ``torch.distributed`` compatibility and kept; unused.
    group_name:
        A label, kept and serialized; unused by the transport.
    endpoint:
        Keyword form of the zmqfed call shape.

    Addresses are equal when their backend and endpoint are, as OpenFed
    compared backend and init method: ``world_size``, ``rank``, ``store``
    and ``group_name`` take no part.
    """

    __slots__ = ("backend", "endpoint", "group_name", "init_method", "rank", "store", "world_size")

    backend: str
    init_method: str
    endpoint: str | None
    world_size: int | None
    rank: int
    store: Any
    group_name: str

    def __init__(
        self,
        backend: str | None = _DEFAULT_BACKEND,
        init_method: str | int | None = None,
        world_size: int | None = None,
        rank: int = -1,
        store: Any = None,
        group_name: str = "",
        *,
        endpoint: str | None = None,
    ) -> None:
        if endpoint is not None:  # Address(endpoint=...)
            if backend not in (_DEFAULT_BACKEND, None) or isinstance(init_method, str):
                raise ConfigError(
                    f"address: give endpoint={endpoint!r} or backend/init_method, not both"
                )
            backend, init_method = _DEFAULT_BACKEND, endpoint
        elif backend is None:  # Address(None): the empty address
            backend, init_method = _NULL, _NULL
        elif not isinstance(backend, str):
            raise ConfigError(
                f"address endpoint must be a string, got {type(backend).__name__} {backend!r}"
            )
        elif "://" in backend:  # Address(endpoint) / Address(endpoint, world_size)
            if isinstance(init_method, int) and not isinstance(init_method, bool):
                if world_size is not None:
                    raise ConfigError("address: world_size given twice")
                world_size = init_method
            elif init_method is not None:
                raise ConfigError(
                    f"address: {backend!r} is an endpoint, so the second argument must be "
                    f"world_size, got {init_method!r}"
                )
            backend, init_method = _DEFAULT_BACKEND, backend
        if backend not in BACKENDS:
            raise ConfigError(
                f"address backend must be one of {list(BACKENDS)} (all of them use ZeroMQ "
                f"here) or the first argument an endpoint like tcp://host:port, got {backend!r}"
            )
        if init_method is None:
            init_method = _NULL if backend == _NULL else _DEFAULT_INIT_METHOD
        if not isinstance(init_method, str):
            raise ConfigError(f"address init_method must be a string, got {init_method!r}")
        if backend == _NULL and init_method != _NULL:
            raise ConfigError(
                f"address backend 'null' is the empty address; its init_method must be "
                f"'null', got {init_method!r}"
            )
        resolved = _endpoint_of(init_method)
        if init_method.startswith("env://"):
            if world_size is None:
                world_size = _int_from_environment("WORLD_SIZE")
            if rank == -1:
                rank = _int_from_environment("RANK") or -1
        if world_size is not None and (
            isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1
        ):
            raise ConfigError(f"address world_size must be an integer >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < -1:
            raise ConfigError(f"address rank must be an integer >= -1, got {rank!r}")
        if world_size is not None and rank >= world_size:
            raise ConfigError(f"address rank {rank} is not below world_size {world_size}")
        if not isinstance(group_name, str):
            raise ConfigError(f"address group_name must be a string, got {group_name!r}")
        for name, value in (
            ("backend", backend),
            ("init_method", init_method),
            ("endpoint", resolved),
            ("world_size", world_size),
            ("rank", rank),
            ("store", store),
            ("group_name", group_name),
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"Address is immutable; make a new one (or use with_world_size) to change {name!r}"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Address is immutable; cannot delete {name!r}")

    # -- views ---------------------------------------------------------------
    @property
    def empty(self) -> bool:
        """True for an address that binds nothing."""
        return self.endpoint is None

    @property
    def scheme(self) -> str | None:
        """``'tcp'``, ``'ipc'`` or ``None`` for the empty address."""
        return None if self.endpoint is None else self.endpoint.split("://", 1)[0]

    def _copy(self, **changes: Any) -> Address:
        fields = {
            "backend": self.backend,
            "init_method": self.init_method,
            "world_size": self.world_size,
            "rank": self.rank,
            "store": self.store,
            "group_name": self.group_name,
        }
        fields.update(changes)
        new = object.__new__(Address)
        for name, value in fields.items():
            object.__setattr__(new, name, value)
        object.__setattr__(new, "endpoint", self.endpoint)  # env:// is not read again
        if new.world_size is not None and new.rank >= new.world_size:
            raise ConfigError(f"address rank {new.rank} is not below world_size {new.world_size}")
        return new

    def with_world_size(self, world_size: int, rank: int | None = None) -> Address:
        """A copy carrying the size of the group it serves (and this node's rank)."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"address world_size must be an integer >= 1, got {world_size!r}")
        rank = self.rank if rank is None else rank
        if rank >= world_size:
            rank = -1  # a rank from another group size means nothing here
        return self._copy(world_size=world_size, rank=rank)

    # -- files ---------------------------------------------------------------
    @property
    def is_plain_endpoint(self) -> bool:
        """True when the endpoint alone says everything (``gloo``, no extras)."""
        return (
            self.backend == _DEFAULT_BACKEND
            and self.init_method == self.endpoint
            and not self.group_name
        ) or (self.endpoint is None and self.backend == _NULL)

    def serialize(self) -> dict[str, Any]:
        """A JSON-safe dict: OpenFed's four keys plus the resolved ``endpoint``.

        ``group_name`` is written when set; ``store`` never.
        """
        out: dict[str, Any] = {
            "backend": self.backend,
            "init_method": self.init_method,
            "world_size": self.world_size,
            "rank": self.rank,
            "endpoint": self.endpoint,
        }
        if self.group_name:
            out["group_name"] = self.group_name
        return out

    @classmethod
    def unserialize(cls, data: dict[str, Any] | str | None) -> Address:
        """Inverse of :meth:`serialize`; also reads OpenFed's dict and a bare endpoint.

        For ``env://`` the ``endpoint`` written with it is used, so a file
        means the same address wherever it is read; for the other init
        methods the two must agree.
        """
        if data is None or isinstance(data, str):
            return cls(data)
        if not isinstance(data, dict):
            raise ConfigError(f"cannot read an address from {data!r}")
        unknown = sorted(str(k) for k in data if k not in _SERIAL_KEYS)
        if unknown:
            raise ConfigError(
                f"address has the unknown key {unknown[0]!r} (expected {sorted(_SERIAL_KEYS)})"
            )
        world_size = data.get("world_size")
        rank = data.get("rank", -1)
        rank = -1 if rank is None else rank
        if "init_method" not in data and "backend" not in data:  # {"endpoint", "world_size"}
            return cls(data.get("endpoint"), world_size)
        init_method = data.get("init_method")
        endpoint = data.get("endpoint")
        if isinstance(init_method, str) and init_method.startswith("env://") and endpoint:
            address = cls(endpoint, world_size)._copy(
                init_method=init_method, rank=rank, group_name=data.get("group_name") or ""
            )
            object.__setattr__(address, "backend", data.get("backend") or _DEFAULT_BACKEND)
            if address.backend not in BACKENDS or address.backend == _NULL:
                raise ConfigError(f"address backend {address.backend!r} cannot use env://")
            return address
        address = cls(
            data.get("backend", _DEFAULT_BACKEND),
            init_method,
            world_size,
            rank,
            group_name=data.get("group_name") or "",
        )
        if "endpoint" in data and endpoint != address.endpoint:
            raise ConfigError(
                f"address: init_method {init_method!r} means {address.endpoint!r}, "
                f"but the endpoint says {endpoint!r}"
            )
        return address

    # -- comparison and display ----------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Address):
            return NotImplemented
        return self.backend == other.backend and self.endpoint == other.endpoint

    def __hash__(self) -> int:
        return hash((self.backend, self.endpoint))

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

    def __copy__(self) -> Address:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Address:
        return self

    def __repr__(self) -> str:
        if self.is_plain_endpoint:
            args = [repr(self.endpoint)]
        else:
            args = [repr(self.backend), repr(self.init_method)]
        if self.world_size is not None:
            args.append(f"world_size={self.world_size}")
        if self.rank != -1:
            args.append(f"rank={self.rank}")
        if self.group_name:
            args.append(f"group_name={self.group_name!r}")
        return f"Address({', '.join(args)})"

    def __str__(self) -> str:
        return self.endpoint or "<empty>"


#: ``tcp://127.0.0.1:1994``, or ``$ZMQFED_DEFAULT_TCP`` (e.g. to run two federations on one host).
default_tcp_address = Address(os.environ.get("ZMQFED_DEFAULT_TCP") or "tcp://127.0.0.1:1994")
#: An ipc endpoint in the temp directory, or ``$ZMQFED_DEFAULT_IPC``.
default_ipc_address = Address(
    os.environ.get("ZMQFED_DEFAULT_IPC")
    or "ipc://" + os.path.join(tempfile.gettempdir(), "zmqfed-1994.ipc")
)
#: OpenFed's shared-file address: ``file://<temp dir>/zmqfed.sharedfile`` (an ipc
#: socket file here), or ``$ZMQFED_DEFAULT_FILE`` (a ``file://`` URL).
default_file_address = Address(
    _DEFAULT_BACKEND,
    os.environ.get("ZMQFED_DEFAULT_FILE")
    or "file://" + os.path.join(tempfile.gettempdir(), "zmqfed.sharedfile"),
)
#: The address of a node that binds nothing (a pure collaborator).
empty_address = Address(_NULL, _NULL)
