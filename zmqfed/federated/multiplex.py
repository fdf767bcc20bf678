"""``Multiplexer``: thousands of collaborators' protocol cycles in one thread.

A collaborator's request (:meth:`CollaboratorTransport.request_cycle`) and
step (:meth:`Maintainer.step_cycle`) are generators that yield
:class:`~zmqfed.federated.collaborator_link.Wait` wherever the blocking
versions would wait on their port.  The multiplexer runs many such cycles,
each on its own ZeroMQ socket, from one selector: a cycle is resumed when its
socket has input (or room), when its wait times out, or at once when input
is already queued.  No thread per collaborator, and the protocol code is the
very code a blocking ``step()`` runs.

It watches each socket's ``ZMQ_FD`` with the OS selector (epoll on Linux)
instead of ``zmq.Poller``, whose every call walks all registered sockets:
the FD signals that the socket has news, ``ZMQ_EVENTS`` says which
(docs/zeromq.md §26).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from zmqfed.errors import ConfigError
from zmqfed.federated.collaborator_link import Cycle, PortSource, Wait, current_port
from zmqfed.federated.zmq_port import ZmqPort

__all__ = ["Gate", "Multiplexer", "sleep_cycle"]

log = logging.getLogger(__name__)

#: What a finished cycle reports: its result, or the exception that ended it.
Done = Callable[[Any, BaseException | None], None]


def sleep_cycle(seconds: float) -> Cycle[None]:
    """A cycle that waits ``seconds`` without watching its port (simulated work)."""
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        yield Wait(max(1, int(left * 1000) + 1), idle=True)


class Gate:
    """At most ``limit`` cycles of one Multiplexer past this point at once (a semaphore).

    ``yield from gate.acquire()`` waits, without being resumed in between,
    until a slot is free; ``gate.release()`` hands the slot to the next
    waiter.  A load generator bounds its transfers in flight this way.
    """

    def __init__(self, mux: Multiplexer, limit: int) -> None:
        if limit < 1:
            raise ConfigError(f"a Gate needs a positive limit, got {limit!r}")
        self.mux = mux
        self.limit = limit
        self.taken = 0
        self._waiting: deque[_Task] = deque()

    def acquire(self) -> Cycle[None]:
        """Take a slot, waiting for one if all are taken."""
        if self.taken < self.limit:
            self.taken += 1
            return
        yield Wait(24 * 3600 * 1000, gate=self)  # resumed by release(), not by time

    def _enqueue(self, task: _Task) -> None:
        self._waiting.append(task)

    def release(self) -> None:
        """Give the slot back, or straight to the next waiter."""
        while self._waiting:
            task = self._waiting.popleft()
            if task.gated is self:
                task.gated = None
                task.token += 1  # its timer is void
                self.mux._ready.append((task, True))
                return
        self.taken -= 1


class _Task:
    __slots__ = (
        "cycle",
        "done",
        "events",
        "fds",
        "gated",
        "monitor",
        "sock",
        "source",
        "started",
        "token",
    )

    def __init__(self, cycle: Cycle[Any], source: PortSource, done: Done | None) -> None:
        self.cycle = cycle
        self.source = source
        self.sock: zmq.Socket = None  # type: ignore[assignment]
        self.monitor: zmq.Socket | None = None
        self.refresh()
        self.done = done
        self.started = False
        self.token = 0  # bumped at every wait: stale timers are ignored
        self.events = 0  # what the current wait needs (0: a timer only)
        self.fds: list[int] = []  # registered with the selector now
        self.gated: Gate | None = None  # waiting for a slot of this gate

    def refresh(self) -> None:
        """Follow the source to its current port (a link may have rebuilt it)."""
        port = current_port(self.source)
        if not isinstance(port, ZmqPort):
            raise ConfigError(f"a Multiplexer runs cycles on ZeroMQ ports, not {port!r}")
        self.sock = port.sock
        self.monitor = port.monitor


class Multiplexer:
    """Runs cycles on ZeroMQ ports until each has finished.

    Parameters
    ----------
    max_wait_ms:
        Longest single wait of the selector (the loop also looks at its
        ``stop`` condition this often).

    Examples
    --------
    >>> mux = Multiplexer()  # doctest: +SKIP
    >>> for m in maintainers:  # doctest: +SKIP
    ...     mux.spawn(m.step_cycle(upload=False), m.port)
    >>> mux.run()  # doctest: +SKIP
    """

    def __init__(self, *, max_wait_ms: int = 1000) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, int, _Task]] = []
        self._ready: deque[tuple[_Task, bool]] = deque()
        self._order = itertools.count()
        self.max_wait_ms = max_wait_ms
        #: Cycles still running.
        self.running = 0
        #: Times a cycle was resumed (a cost measure).
        self.resumes = 0

    def spawn(self, cycle: Cycle[Any], port: PortSource, done: Done | None = None) -> None:
        """Start ``cycle``, which waits on ``port``; ``done(result, error)`` when it ends.

        ``port`` may be a callable returning the current port (a link that
        rebuilds its connection).  An exception that ends a cycle is given to
        ``done``; without ``done`` it is logged.
        """
        task = _Task(cycle, port, done)
        self.running += 1
        self._ready.append((task, False))

    def run(self, stop: Callable[[], bool] | None = None, timeout: float | None = None) -> bool:
        """Run until every cycle finished (True), ``stop()`` is true or ``timeout`` passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            if stop is not None and stop():
                return False
            while self._ready:
                task, ready = self._ready.popleft()
                self._resume(task, ready)
            if not self.running:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            wait = self.max_wait_ms / 1000
            if self._timers:
                wait = min(wait, max(0.0, self._timers[0][0] - now))
            if deadline is not None:
                wait = min(wait, deadline - now)
            for key, _ in self._selector.select(wait):
                self._check(key.data)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, token, _, task = heapq.heappop(self._timers)
                if token == task.token:
                    self._unwatch(task)
                    self._ready.append((task, False))
        return True

    # -- one cycle -------------------------------------------------------------
    def _resume(self, task: _Task, ready: bool) -> None:
        self.resumes += 1
        try:
            if task.started:
                wait = task.cycle.send(ready)
            else:
                task.started = True
                wait = next(task.cycle)
        except StopIteration as stop:
            self._finish(task, stop.value, None)
            return
        except Exception as exc:
            self._finish(task, None, exc)
            return
        if callable(task.source) and current_port(task.source).sock is not task.sock:  # type: ignore[attr-defined]
            self._unwatch(task)  # the registered descriptors belong to a closed socket
            task.refresh()
        task.token += 1
        when = time.monotonic() + wait.ms / 1000
        heapq.heappush(self._timers, (when, task.token, next(self._order), task))
        if wait.gate is not None:
            task.events = 0
            task.token += 1  # no timer: only the gate resumes it
            self._unwatch(task)
            task.gated = wait.gate
            wait.gate._enqueue(task)
            return
        if wait.idle:
            task.events = 0
            self._unwatch(task)
            return
        task.events = zmq.POLLOUT if wait.writable else zmq.POLLIN
        if self._has_news(task):
            task.token += 1  # the timer pushed above is void
            self._unwatch(task)
            self._ready.append((task, True))
        else:
            self._watch(task)

    def _has_news(self, task: _Task) -> bool:
        # Reading ZMQ_EVENTS also clears the socket's FD until the next news.
        if int(task.sock.get(zmq.EVENTS)) & task.events:
            return True
        return task.monitor is not None and bool(int(task.monitor.get(zmq.EVENTS)) & zmq.POLLIN)

    def _check(self, task: _Task) -> None:
        if task.events and self._has_news(task):
            task.token += 1
            task.events = 0
            self._unwatch(task)
            self._ready.append((task, True))

    def _watch(self, task: _Task) -> None:
        if task.fds:
            return
        socks = [task.sock] if task.monitor is None else [task.sock, task.monitor]
        for sock in socks:
            fd = int(sock.get(zmq.FD))
            self._selector.register(fd, selectors.EVENT_READ, task)
            task.fds.append(fd)

    def _unwatch(self, task: _Task) -> None:
        for fd in task.fds:
            self._selector.unregister(fd)
        task.fds.clear()

    def _finish(self, task: _Task, result: Any, error: BaseException | None) -> None:
        self._unwatch(task)
        task.gated = None
        task.token += 1
        task.events = 0
        self.running -= 1
        if task.done is not None:
            task.done(result, error)
        elif error is not None:
            log.error("a multiplexed cycle failed: %r", error)

    def close(self) -> None:
        """Forget every cycle still running (their sockets stay open) and free the selector."""
        for key in list(self._selector.get_map().values()):
            self._selector.unregister(key.fd)
        self._selector.close()
        self._ready.clear()
        self._timers.clear()
        self.running = 0
