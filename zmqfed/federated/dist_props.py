"""``DistributedProperties``: what OpenFed's process-group context is on ZeroMQ -- a lock.

OpenFed ran every federated group as a ``torch.distributed`` process group
and swapped ``torch.distributed``'s globals in and out around each use
(``with pipe.dist_props:``), under one process-wide lock. zmqfed's groups are
sockets and need no globals swapped, so the context only holds its lock:
code written for OpenFed keeps working, and threads that enter the same
lock take turns with a group's sockets, which belong to one thread at a
time (docs/zeromq.md §22).
"""

from __future__ import annotations

import threading
from types import TracebackType

__all__ = ["DistributedProperties", "zmqfed_lock"]

#: The process-wide lock of OpenFed's pipes (OpenFed's ``openfed_lock``).
zmqfed_lock = threading.Lock()


class DistributedProperties:
    """A context that holds ``lock`` while its block runs (OpenFed's name).

    Parameters
    ----------
    lock : threading.Lock, optional
        The lock to hold; a new one if omitted. Pipes share :data:`zmqfed_lock`.

    Examples
    --------
    >>> dist_props = DistributedProperties()
    >>> with dist_props:
    ...     dist_props.lock.locked()
    True
    >>> dist_props.lock.locked()
    False
    """

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self.lock = lock if lock is not None else threading.Lock()

    def __enter__(self) -> DistributedProperties:
        self.lock.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.lock.release()

    def __repr__(self) -> str:
        state = "held" if self.lock.locked() else "free"
        return f"<DistributedProperties lock {state}>"
