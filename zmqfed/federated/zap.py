"""The ZAP handler (RFC 27): one allow-list per group, names resolved within it.

A CURVE server asks its Context's ZAP handler (``inproc://zeromq.zap.01``)
whether a client key may connect, naming the server socket's ZAP domain;
the handler answers with a status and a ``User-Id`` that every message
from that connection then carries (docs/zeromq.md §19-20).

zmqfed gives every aggregator socket a domain of its own (random, made by
:meth:`zmqfed.federated.security.Curve.server`), holds one table per domain
(public key -> member name) and resolves the ``User-Id`` in the table of the
domain asked about. Two federations in one process therefore never share a
table: neither one with the same aggregator name nor a key that has
different names in different groups can let a member of one group in as
somebody in the other. pyzmq's ``ThreadAuthenticator`` was replaced for this:
it maps keys to ``User-Id`` without the domain, and changing that means
overriding an internal coroutine of pyzmq's (docs/zeromq.md §19); this
handler is a REP socket and a thread.

Only CURVE is answered; any other mechanism, a malformed request or an
unknown domain is refused (status 400). Refusals are logged at most once
per 10 s, with the number suppressed.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass

import zmq
from zmq.utils import z85

from zmqfed.errors import SecurityError
from zmqfed.federated.events import RefusalLog

__all__ = ["ZAP_ENDPOINT", "ZapHandler", "stop_handlers", "zap_handler"]

log = logging.getLogger("zmqfed.security.zap")

#: Where libzmq sends ZAP requests, one handler per Context (RFC 27).
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_VERSION = b"1.0"


@dataclass(frozen=True)
class _Table:
    group: str  # the group's name, for logs
    names: dict[bytes, str]  # z85 public key -> member name


class ZapHandler:
    """Answers the ZAP requests of one Context from per-domain allow-lists.

    Parameters
    ----------
    ctx:
        The Context whose CURVE servers this handler guards; it must be
        started before any of them binds.
    """

    def __init__(self, ctx: zmq.Context) -> None:
        self.ctx = ctx
        self._tables: dict[str, _Table] = {}
        self._lock = threading.Lock()
        self._stop_endpoint = f"inproc://zmqfed-zap-stop-{uuid.uuid4().hex}"
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._refusals = RefusalLog(log, "ZAP")
        self._thread = threading.Thread(target=self._run, name="zmqfed-zap", daemon=True)

    # -- tables ----------------------------------------------------------------
    def allow(self, domain: str, group: str, keys: dict[str, bytes]) -> None:
        """Admit exactly ``keys`` (member name -> z85 public key) in ``domain``."""
        table = _Table(group, {_z85(key): name for name, key in keys.items()})
        with self._lock:
            self._tables[domain] = table

    def forget(self, domain: str) -> None:
        """Drop ``domain``'s table (its socket closed): its keys are refused from now on."""
        with self._lock:
            self._tables.pop(domain, None)

    def answer(self, request: list[bytes]) -> tuple[bytes, bytes, str]:
        """``(status, status text, user id)`` for one ZAP request's frames."""
        if len(request) < 6 or request[0] != _VERSION:
            return b"400", b"malformed ZAP request", ""
        domain, mechanism, credentials = request[2], request[5], request[6:]
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self._refusals("mechanism", "refused a client that does not use CURVE")
            return b"400", b"CURVE only", ""
        key = z85.encode(credentials[0])
        with self._lock:
            table = self._tables.get(domain.decode("utf-8", "replace"))
        if table is None:
            self._refusals("domain", "refused a CURVE client of a socket with no allow-list")
            return b"400", b"unknown domain", ""
        name = table.names.get(key)
        if name is None:
            self._refusals(
                "unknown-key",
                f"refused a CURVE client in group {table.group[:64]!r}: unknown key {key.decode()}",
            )
            return b"400", b"unknown key", ""
        log.debug("admitted %s in group %r", name, table.group)
        return b"200", b"OK", name

    # -- the thread ------------------------------------------------------------
    def start(self) -> None:
        """Bind the handler's socket and serve requests on a thread of its own."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise SecurityError(f"cannot start the ZAP handler: {self._error}") from self._error

    def _run(self) -> None:
        try:
            zap = self.ctx.socket(zmq.REP)
            stop = self.ctx.socket(zmq.PAIR)
            for sock in (zap, stop):
                sock.linger = 0
            zap.bind(ZAP_ENDPOINT)
            stop.bind(self._stop_endpoint)
        except zmq.ZMQError as exc:  # e.g. another ZAP handler already serves this Context
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        poller.register(stop, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if stop in events:
                    return
                if zap in events:
                    request = zap.recv_multipart()
                    status, text, user = self.answer(request)
                    rid = request[1] if len(request) > 1 else b""
                    zap.send_multipart([_VERSION, rid, status, text, user.encode(), b""])
        except zmq.ContextTerminated:  # pragma: no cover - stop() comes first
            return
        finally:
            zap.close()
            stop.close()

    def stop(self) -> None:
        """Stop the thread (before its Context is terminated: it owns a socket of it)."""
        if not self._thread.is_alive():
            return
        with self.ctx.socket(zmq.PAIR) as poke:
            poke.linger = 0
            poke.connect(self._stop_endpoint)
            poke.send(b"")
            self._thread.join(5.0)


def _z85(key: bytes | str) -> bytes:
    key = key.encode() if isinstance(key, str) else bytes(key)
    return z85.encode(key) if len(key) == 32 else key


_lock = threading.Lock()
_handlers: dict[int, ZapHandler] = {}


def zap_handler(ctx: zmq.Context, *, start: bool = True) -> ZapHandler | None:
    """The handler of ``ctx``, started on first use (``start=False``: None if there is none)."""
    with _lock:
        handler = _handlers.get(id(ctx))
        if handler is not None and handler.ctx is ctx:
            return handler
        if not start:
            return None
        handler = ZapHandler(ctx)
        handler.start()
        _handlers[id(ctx)] = handler
        return handler


def stop_handlers() -> None:
    """Stop every handler of this process (at shutdown, before Contexts are terminated)."""
    with _lock:
        handlers = list(_handlers.values())
        _handlers.clear()
    for handler in handlers:
        handler.stop()
