"""Shared pytest fixtures for the zmqfed test suite.

Fixtures
--------
zmq_ctx
    A fresh ``zmq.Context`` per test, sockets default to ``linger=0``; destroyed
    (all its sockets closed, then terminated) in teardown.
free_tcp_endpoint
    ``tcp://127.0.0.1:PORT`` with a port the kernel just reported free.
ipc_endpoint
    ``ipc://PATH`` in a temporary directory, short enough for ``sun_path``.
slow_factor
    Multiplier for timeouts, from ``ZMQFED_TEST_SLOW`` (default 1.0).
run_python
    Start Python subprocesses (``-c`` code, a script or ``-m`` module) that are
    killed, with their whole process group, in teardown.

``zmq`` and ``torch`` are imported only inside the fixtures that need them, so a
pure unit test pays for neither.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import zmq

REPO_ROOT = Path(__file__).resolve().parent.parent

# Set before anything imports torch: torch sizes its intra-op pool from
# OMP_NUM_THREADS at import, so this covers code that imports torch lazily.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _read_slow_factor() -> float:
    raw = os.environ.get("ZMQFED_TEST_SLOW", "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        raise pytest.UsageError(f"ZMQFED_TEST_SLOW must be a number, got {raw!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise pytest.UsageError(f"ZMQFED_TEST_SLOW must be a finite number > 0, got {raw!r}")
    return value


#: Timeout multiplier for slow machines: ``ZMQFED_TEST_SLOW=3 make test``.
SLOW: float = _read_slow_factor()

# Linux sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``netns`` tests where network namespaces cannot be built."""
    reason = None
    if os.geteuid() != 0:
        reason = "netns tests need root"
    elif shutil.which("ip") is None:
        reason = "netns tests need iproute2 (`ip`)"
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- torch


@pytest.fixture(scope="session", autouse=True)
def _torch_single_thread() -> None:
    """Pin torch to one intra-op thread for the session (2-core CI machines).

    torch is not imported here, to keep pure tests light: if a collected test
    module imported it, it is set now; otherwise OMP_NUM_THREADS=1 (set above)
    is what a later import picks up.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


# ------------------------------------------------------------------------ timing


@pytest.fixture(scope="session")
def slow_factor() -> float:
    """Multiplier for timeouts and deadlines (``ZMQFED_TEST_SLOW``, default 1.0)."""
    return SLOW


# --------------------------------------------------------------------------- zmq


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A fresh context per test; its sockets default to ``linger=0``.

    Close the sockets you make (``with zmq_ctx.socket(...) as s:``): a socket
    garbage-collected while open raises pyzmq's ResourceWarning, which
    ``filterwarnings = error`` turns into a test error - a leak fails loudly.
    Teardown runs ``ctx.destroy(linger=0)`` in the test thread as the safety
    net: it closes every socket the context still tracks (e.g. ones a failing
    test's traceback keeps alive) and terminates it. Sockets used by other threads
    must be closed by those threads (and the threads joined) before the test
    ends; a socket the context does not track blocks ``term()``, and
    pytest-timeout then fails the test with every thread's stack.
    """
    import zmq

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.linger = 0  # default for every socket created by this context
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on *host* that the kernel just reported free.

    Racy by nature: the port is free when the probe socket closes, and another
    process may take it before the test binds it (rare: Linux hands out
    ephemeral ports at random). Where the test owns the binding socket,
    ``sock.bind_to_random_port("tcp://127.0.0.1")`` has no race.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def free_tcp_endpoint() -> str:
    """``tcp://127.0.0.1:PORT`` with a free ephemeral port (see `free_tcp_port`)."""
    return f"tcp://127.0.0.1:{free_tcp_port()}"


@pytest.fixture
def ipc_endpoint(tmp_path: Path) -> Iterator[str]:
    """``ipc://PATH`` for a socket file that does not exist yet.

    Placed in ``tmp_path`` when that is short enough for ``sun_path`` (107
    bytes), else in a fresh directory under /tmp that teardown removes.
    """
    path = tmp_path / "zmqfed.ipc"
    short_dir = None
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        short_dir = tempfile.mkdtemp(prefix="zmqfed-", dir="/tmp")
        path = Path(short_dir) / "s.ipc"
    try:
        yield f"ipc://{path}"
    finally:
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)


# --------------------------------------------------------------------- processes


def _python_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    pythonpath = [str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        pythonpath.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    if extra:
        env.update(extra)
    return env


def _kill_group(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after *grace* s, reap, close pipes."""
    # The group outlives its leader while any member (e.g. a grandchild) lives,
    # so signal it even when proc itself has exited.
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10 * SLOW)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    if proc.poll() is None:  # unkillable: say so rather than leak silently
        raise RuntimeError(f"child pid {proc.pid} survived SIGKILL")


@pytest.fixture
def run_python(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start Python subprocesses that cannot outlive the test.

    Call as ``run_python(code)`` (``python -c code``), ``run_python(script=path)``
    or ``run_python(module="zmqfed.cli.node")``, plus ``args=[...]``,
    ``env={...}`` (merged over ``os.environ``) and any ``subprocess.Popen``
    keyword. Returns the ``Popen``. Defaults: ``sys.executable``,
    OMP_NUM_THREADS=1, PYTHONUNBUFFERED=1, the repo root first on PYTHONPATH,
    cwd ``tmp_path``, stdin from /dev/null, stdout/stderr piped as text.

    Each child leads its own process group (``start_new_session``); teardown
    sends SIGTERM, then SIGKILL, to every group, so grandchildren go too, unless
    they start a session of their own. Read piped output with
    ``proc.communicate(timeout=...)``: a child that fills an unread pipe blocks.
    """
    procs: list[subprocess.Popen[str]] = []

    def start(
        code: str | None = None,
        *,
        script: str | os.PathLike[str] | None = None,
        module: str | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[str]:
        if sum(x is not None for x in (code, script, module)) != 1:
            raise TypeError("run_python: give exactly one of code, script=, module=")
        if code is not None:
            argv = [sys.executable, "-c", code]
        elif script is not None:
            argv = [sys.executable, os.fspath(script)]
        else:
            argv = [sys.executable, "-m", str(module)]
        argv.extend(args)
        kwargs: dict[str, Any] = {
            "cwd": tmp_path,
            "stdin": subprocess.DEVNULL,
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
            "text": True,
        }
        kwargs.update(popen_kwargs)
        kwargs["env"] = _python_env(env)
        kwargs["start_new_session"] = True  # own process group: killpg in teardown
        proc: subprocess.Popen[str] = subprocess.Popen(argv, **kwargs)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        errors = []
        for proc in procs:
            try:
                _kill_group(proc, grace=2.0 * SLOW)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
