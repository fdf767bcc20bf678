"""The one place where zmqfed creates ZeroMQ sockets and sets their options.

Every option is applied *before* ``bind``/``connect``: libzmq silently ignores
most options set afterwards (heartbeats and MAXMSGSIZE among them). The values
and the reasons behind them are in docs/zeromq.md §1.
"""

from __future__ import annotations

import atexit
import errno
import ipaddress
import logging
import multiprocessing.util
import os
import random
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import zmq

from zmqfed.errors import ConfigError
from zmqfed.wire import DEFAULT_LIMITS, Limits

__all__ = [
    "SocketOptions",
    "beyond_loopback",
    "close_at_exit",
    "context",
    "copy_frame_into",
    "make_dealer",
    "make_router",
    "peer_capacity",
    "raise_fd_limit",
    "recv_into",
    "shutdown",
    "tune_malloc",
]

log = logging.getLogger(__name__)

_ctx_lock = threading.Lock()
_ctx: zmq.Context | None = None
_ctx_pid: int | None = None
_closables: weakref.WeakSet[Any] = weakref.WeakSet()


@dataclass(frozen=True, kw_only=True)
class SocketOptions:
    """Transport settings of one node.

    Parameters
    ----------
    heartbeat_ivl_ms, heartbeat_timeout_ms:
        ZMTP heartbeats: a vanished host or a partition is found within about
        ``timeout + ivl``; any traffic counts, so long transfers never time out.
    handshake_ivl_ms:
        Bound on a stalled ZMTP handshake (libzmq's default is 30 s).
    reconnect_ivl_ms:
        Base reconnect interval; ``None`` picks a random base per process in
        [200, 1000) ms so restarted aggregators are not hit in lock-step.
    reconnect_ivl_max_ms:
        Cap of libzmq's exponential reconnect backoff. 8 s rather than a common 30 s
        (docs/zeromq.md §11): collaborators usually start before a slow-starting
        aggregator (torch imports take seconds), and with doubling intervals a
        30 s cap left them idle for up to half a minute after it came up; the
        random base still spreads reconnects after an aggregator restart.
    linger_ms:
        How long closing waits for unsent messages (bounded: shutdown never hangs).
    backlog:
        Pending TCP connections an aggregator accepts (burst joins; the
        kernel caps it at ``net.core.somaxconn``).
    sndhwm, rcvhwm:
        Queue limits in messages (collaborators; the aggregator's sends).
    probe_silence_ms:
        A collaborator waiting for an answer PINGs an aggregator silent this
        long, and connects anew after twice as long without a word (its
        connection may be alive but no longer routed: another process took
        its name over). An aggregator busy between steps answers later;
        the new connection costs a HELLO.
    max_peers:
        The most collaborators an aggregator holds online at once; ``None``:
        as many as its descriptor limit allows (``peer_capacity``).  A
        collaborator beyond it gets ERROR ``over-capacity``.
    peer_queue:
        The aggregator's RCVHWM: messages one peer can have queued there.
        With MAXMSGSIZE (from the model, ``Limits.for_model``) this bounds
        the memory a flooding peer can pin while the aggregator is busy
        between steps; an honest collaborator has a few messages in flight
        (a request, or a window of chunks), far below it.

    Notes
    -----
    Only collaborators send ZMTP heartbeats; the aggregator's ROUTER answers
    them and drops a peer whose traffic stops for ``heartbeat_timeout_ms``
    (the DEALER sets HEARTBEAT_TTL). The ROUTER sends none itself: in libzmq
    4.3.5 a heartbeat tick on a connection whose peer hung up while its
    receive queue was full aborts the whole process (``!_io_error`` in
    stream_engine_base.cpp, libzmq#4841), which a flooding peer can trigger
    at will.
    """

    heartbeat_ivl_ms: int = 2000
    heartbeat_timeout_ms: int = 10000
    handshake_ivl_ms: int = 10000
    reconnect_ivl_ms: int | None = None
    reconnect_ivl_max_ms: int = 8000
    linger_ms: int = 1000
    backlog: int = 4096
    sndhwm: int = 1000
    rcvhwm: int = 1000
    peer_queue: int = 64
    probe_silence_ms: int = 15000
    max_peers: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_ivl_ms",
            "heartbeat_timeout_ms",
            "handshake_ivl_ms",
            "reconnect_ivl_max_ms",
            "linger_ms",
            "backlog",
            "sndhwm",
            "rcvhwm",
            "peer_queue",
            "probe_silence_ms",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"SocketOptions.{name} must be a non-negative int, got {value!r}")
        if self.probe_silence_ms <= 0:
            raise ConfigError("SocketOptions.probe_silence_ms must be positive")
        if self.reconnect_ivl_ms is not None and self.reconnect_ivl_ms <= 0:
            raise ConfigError("SocketOptions.reconnect_ivl_ms must be positive")
        if self.max_peers is not None and (
            not isinstance(self.max_peers, int) or self.max_peers < 1
        ):
            raise ConfigError(
                f"SocketOptions.max_peers must be a positive int, got {self.max_peers!r}"
            )

    def reconnect_base(self) -> int:
        """The reconnect interval to use, random per call when not fixed."""
        return self.reconnect_ivl_ms or random.randint(200, 999)


#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2).
MALLOC_MMAP_THRESHOLD = 32 * 2**20
#: The largest trim threshold ``mallopt`` (a C int) can set.
MALLOC_TRIM_THRESHOLD = 2**31 - 1
_malloc_tuned: bool | None = None


def tune_malloc(
    mmap_threshold: int = MALLOC_MMAP_THRESHOLD, trim_threshold: int = MALLOC_TRIM_THRESHOLD
) -> bool:
    """Keep libzmq's receive buffers on an untrimmed heap (glibc only; once per process).

    libzmq mallocs one buffer per received frame. With glibc's defaults,
    frames of a few MiB and more are fresh ``mmap``s (or heap the allocator
    trimmed), so every 4 KiB page of every received tensor faults on first
    write: that halves receive throughput (docs/performance-notes.md). Raising the mmap
    threshold to 32 MiB and the trim threshold to 2 GiB lets frames up to
    32 MiB reuse heap pages already mapped by earlier messages; measured on
    a 128 MiB state dict, download went from ~0.4x to ~1x the raw-socket limit.
    The price: up to ``trim_threshold`` of freed heap stays mapped to the
    process instead of returning to the OS.

    :func:`context` calls this when it creates the process's Context. Opt out
    with ``ZMQFED_TUNE_MALLOC=0``; it is skipped as well when the malloc
    thresholds are already set through the environment (``GLIBC_TUNABLES``
    naming them, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``).

    Returns
    -------
    bool
        True if the thresholds were set (now or by an earlier call).
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    env = os.environ
    if env.get("ZMQFED_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    tunables = env.get("GLIBC_TUNABLES", "")
    if (
        "MALLOC_MMAP_THRESHOLD_" in env
        or "MALLOC_TRIM_THRESHOLD_" in env
        or "malloc.mmap_threshold" in tunables
        or "malloc.trim_threshold" in tunables
    ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, MALLOC_MMAP_THRESHOLD)) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, MALLOC_TRIM_THRESHOLD)) == 1 and ok
    _malloc_tuned = ok
    log.debug("glibc malloc thresholds %s", "raised" if ok else "not changed")
    return ok


#: The most sockets libzmq lets one Context hold (its socket limit, ZMQ_SOCKET_LIMIT).
MAX_SOCKETS_CEILING = 65535
_fd_limit: int | None = None


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now.

    Every TCP connection costs a descriptor, and every ZeroMQ socket one
    more (its mailbox's eventfd).  At the soft limit libzmq fails to accept
    and retries without a word, burning CPU (docs/zeromq.md §25), so a
    process that holds many peers needs the hard limit.  Logs a warning
    when the limit cannot be raised.  Once per process.
    """
    global _fd_limit
    if _fd_limit is not None:
        return _fd_limit
    try:
        import resource
    except ImportError:  # not POSIX: nothing to raise
        _fd_limit = 1024
        return _fd_limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
    _fd_limit = int(min(soft, 1 << 30))
    return _fd_limit


#: Descriptors an aggregator keeps free beyond its peers' (files, checkpoints, a
#: refused peer's connection until it hangs up).
FD_RESERVE = 64


def open_descriptors() -> int:
    """Descriptors this process has open now (0 where /proc cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def peer_capacity(reserve: int = FD_RESERVE) -> int:
    """How many more peers this process can accept: each TCP or ipc connection is a descriptor.

    The descriptor limit (raised first, :func:`raise_fd_limit`) less what
    is open now and ``reserve``.  Beyond it libzmq would fail to accept
    without telling anyone (docs/zeromq.md §25), so an aggregator refuses
    the peers above it with ERROR ``over-capacity`` instead.
    """
    return max(0, raise_fd_limit() - open_descriptors() - reserve)


def context() -> zmq.Context:
    """The process-wide Context, created on first use (after fork/spawn).

    Creating it also calls :func:`tune_malloc` (opt out: ``ZMQFED_TUNE_MALLOC=0``)
    and :func:`raise_fd_limit`, and lets the Context hold as many sockets as
    the descriptor limit allows (libzmq's default is 1,023; docs/zeromq.md §26).
    """
    global _ctx, _ctx_pid
    with _ctx_lock:
        if _ctx is None or _ctx_pid != os.getpid() or _ctx.closed:
            tune_malloc()
            limit = raise_fd_limit()
            ctx = zmq.Context()
            # before the first socket: libzmq sizes its socket table then
            ctx.set(zmq.MAX_SOCKETS, max(1023, min(limit, MAX_SOCKETS_CEILING)))
            _ctx = ctx
            _ctx_pid = os.getpid()
            # A multiprocessing child ends with os._exit, skipping atexit: shut down
            # from its exit finalizers too (docs/zeromq.md §24).
            multiprocessing.util.Finalize(None, _shutdown_after_threads, exitpriority=0)
        return _ctx


def close_at_exit(obj: Any) -> None:
    """Have :func:`shutdown` call ``obj.close()`` first (held weakly; for Maintainers, groups)."""
    _closables.add(obj)


def shutdown() -> None:
    """Close what is left open and terminate this process's Context.

    Everything registered with :func:`close_at_exit` is closed first (so
    final ACKs and BYEs are queued), then the context is destroyed: each
    socket's LINGER bounds the wait, so queued replies are flushed instead of
    dying with the process (libzmq only honours LINGER when the context is
    terminated; docs/zeromq.md §24).  Runs at interpreter exit (and when a
    multiprocessing child ends).
    """
    global _ctx
    for obj in list(_closables):
        try:
            obj.close()
        except Exception:  # best effort at interpreter exit
            log.debug("closing %r at exit failed", obj, exc_info=True)
    _closables.clear()
    with _ctx_lock:
        ctx, _ctx = _ctx, None
    if ctx is not None and _ctx_pid == os.getpid() and not ctx.closed:
        from zmqfed.federated.zap import stop_handlers

        stop_handlers()  # the ZAP handler's thread owns a socket of this context
        ctx.destroy()


atexit.register(shutdown)


#: ``Socket.recv_into`` exists from pyzmq 26.4; pyproject allows pyzmq >= 25.
_HAVE_RECV_INTO = hasattr(zmq.Socket, "recv_into")


def recv_into(sock: zmq.Socket, view: memoryview | bytearray) -> int:
    """Receive the next frame into ``view``; returns the frame's size in bytes.

    A return value larger than ``len(view)`` means the frame did not fit: only
    its first ``len(view)`` bytes were written and the rest is lost (callers
    treat that as a protocol error). Blocks like ``sock.recv()``; meant for the
    frames after the first of a multipart message, which libzmq delivers
    atomically with it.

    With pyzmq >= 26.4 this is ``sock.recv_into(view)``: libzmq's ``zmq_recv``
    copies the frame into ``view`` with the GIL released. Older pyzmq has no
    ``recv_into``; the frame is then received as a zero-copy ``zmq.Frame`` and
    its buffer copied into ``view``. That is the same single copy (libzmq's
    message buffer to ``view``), plus a Frame object per call and the copy made
    with the GIL held (docs/compatibility.md has the measured cost).
    """
    if _HAVE_RECV_INTO:
        return sock.recv_into(view)
    return copy_frame_into(sock.recv(copy=False), view)


def copy_frame_into(frame: zmq.Frame, view: memoryview | bytearray) -> int:
    """Copy a received ``frame`` into ``view`` as ``zmq_recv`` would; returns the frame's size.

    A frame larger than ``view`` is truncated to it (the caller sees the size).
    """
    data = frame.buffer
    target = memoryview(view).cast("B")
    size = len(data)
    fits = min(size, len(target))
    target[:fits] = data[:fits]
    return size


def _shutdown_after_threads() -> None:
    """:func:`shutdown` once the other non-daemon threads ended, as at interpreter exit.

    A multiprocessing child runs its exit finalizers before it joins its
    threads (an ``API`` started with ``start()`` may still be running rounds).
    """
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not me and not thread.daemon:
            thread.join()
    shutdown()


def beyond_loopback(endpoint: str) -> bool:
    """True when ``endpoint`` is a tcp endpoint other hosts may reach (not 127.0.0.0/8 or ::1).

    ``ipc://`` and ``inproc://`` endpoints stay on this host; ``tcp://*``,
    ``0.0.0.0``, interface names and every other address count as reachable.
    """
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return False
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface or a host name
        return True


def _common(sock: zmq.Socket, options: SocketOptions, limits: Limits) -> None:
    sock.setsockopt(zmq.LINGER, options.linger_ms)
    sock.setsockopt(zmq.HEARTBEAT_IVL, options.heartbeat_ivl_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, options.heartbeat_timeout_ms)
    sock.setsockopt(zmq.HANDSHAKE_IVL, options.handshake_ivl_ms)
    sock.setsockopt(zmq.SNDHWM, options.sndhwm)
    sock.setsockopt(zmq.RCVHWM, options.rcvhwm)
    # Per-frame backstop only (it fails silently); the decoder enforces totals.
    sock.setsockopt(zmq.MAXMSGSIZE, limits.socket_maxmsgsize())


def _apply(sock: zmq.Socket, extra: dict[int, Any] | None) -> None:
    for option, value in (extra or {}).items():
        sock.setsockopt(option, value)


_umask_lock = threading.Lock()


def _bind(sock: zmq.Socket, endpoint: str) -> None:
    """Bind; an ipc socket file is created owner-only, whatever the process umask.

    libzmq creates the file with the process umask, so under a permissive
    umask (000) any local user could connect. The umask is narrowed for the
    bind itself: a chmod afterwards would leave a window in which a
    connection made stays made (docs/security.md).
    """
    if not endpoint.startswith("ipc://"):
        sock.bind(endpoint)
        return
    with _umask_lock:
        old = os.umask(0o077)
        try:
            sock.bind(endpoint)
        finally:
            os.umask(old)


def make_router(
    endpoint: str,
    *,
    options: SocketOptions | None = None,
    limits: Limits = DEFAULT_LIMITS,
    ctx: zmq.Context | None = None,
    curve: dict[int, Any] | None = None,
) -> zmq.Socket:
    """An aggregator's ROUTER, fully configured, then bound to ``endpoint``."""
    options = options or SocketOptions()
    sock = (ctx or context()).socket(zmq.ROUTER)
    try:
        _common(sock, options, limits)
        sock.setsockopt(zmq.RCVHWM, options.peer_queue)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 0)  # see SocketOptions: peers' TTL instead
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # errors instead of silent drops
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer gets its id back
        sock.setsockopt(zmq.BACKLOG, options.backlog)
        _apply(sock, curve)  # CURVE keys and ZAP domain, before bind
        _bind(sock, endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"cannot bind {endpoint}: address already in use") from exc
        raise ConfigError(f"cannot bind {endpoint}: {exc}") from exc
    if curve is None and beyond_loopback(endpoint):
        log.warning(
            "%s is reachable from other hosts and has no CURVE keys: anyone who can connect "
            "can claim to be any member, read the model and send updates (docs/security.md)",
            endpoint,
        )
    log.debug("ROUTER bound to %s", endpoint)
    return sock


def make_dealer(
    endpoint: str,
    routing_id: str,
    *,
    options: SocketOptions | None = None,
    limits: Limits = DEFAULT_LIMITS,
    ctx: zmq.Context | None = None,
    curve: dict[int, Any] | None = None,
) -> zmq.Socket:
    """A collaborator's DEALER with routing id ``routing_id``, connected to ``endpoint``."""
    options = options or SocketOptions()
    rid = routing_id.encode("utf-8")
    if not 0 < len(rid) <= 255 or rid.startswith(b"\x00"):
        raise ConfigError(
            f"nick name {routing_id!r} cannot be a routing id (1-255 bytes, no leading NUL)"
        )
    sock = (ctx or context()).socket(zmq.DEALER)
    try:
        _common(sock, options, limits)
        sock.setsockopt(zmq.ROUTING_ID, rid)  # with CURVE, curve= replaces it by a random one
        # The aggregator drops this link when our traffic (heartbeats included)
        # stops for this long; libzmq sends the TTL in deciseconds, at most 6553.5 s.
        sock.setsockopt(zmq.HEARTBEAT_TTL, min(options.heartbeat_timeout_ms, 6_553_500))
        # IMMEDIATE stays 0 (docs/zeromq.md §5, docs/design-notes.md): with 1, libzmq
        # terminates the pipe without delay on a disconnect and discards replies
        # that arrived but were not read yet, so the final ACK of an aggregator
        # that answers and exits is lost. Messages queued toward an absent or
        # restarted aggregator are made harmless by the incarnation id in every
        # header and by idempotent, seq-numbered uploads instead.
        sock.setsockopt(zmq.IMMEDIATE, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, options.reconnect_base())
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, options.reconnect_ivl_max_ms)
        _apply(sock, curve)  # CURVE keys, before connect
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ConfigError(f"cannot connect to {endpoint}: {exc}") from exc
    log.debug("DEALER %s connecting to %s", routing_id, endpoint)
    return sock
