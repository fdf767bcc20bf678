"""``Simulation``: a whole topology on one machine, one process per node.

Each node runs ``zmqfed-node run`` in its own process over real sockets;
its output goes to ``LOGDIR/NAME.log``. The first node to fail stops the
rest and its last lines are shown; nothing is left running on return, on
an exception or on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zmqfed.errors import ConfigError, PipeError
from zmqfed.names import name_path
from zmqfed.topo import Topology, star

__all__ = ["NodeFailed", "Simulation", "star_topology"]

log = logging.getLogger(__name__)


class NodeFailed(PipeError):
    """A node of the simulation exited with an error."""

    def __init__(self, name: str, code: int, tail: str) -> None:
        self.name, self.code, self.tail = name, code, tail
        super().__init__(f"node {name!r} exited with code {code}; its last lines:\n{tail}")


def star_topology(n: int, workdir: Path, transport: str = "ipc") -> Topology:
    """A star of ``n`` collaborators with an endpoint private to this run."""
    if transport == "ipc":
        endpoint = f"ipc://{workdir / 'aggregator.ipc'}"
        if len(endpoint) > 100:  # sun_path limit
            endpoint = f"ipc://{tempfile.mkdtemp(prefix='zmqfed-sim-', dir='/tmp')}/agg.ipc"
    elif transport == "tcp":
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    else:
        raise ConfigError(f"transport must be 'ipc' or 'tcp', got {transport!r}")
    return star(n, endpoint)


#: How a node process starts: the working directory (where ``--app`` modules
#: usually live) goes to the *end* of ``sys.path``, so a file there named like
#: an installed module (``lz4.py``, ``json.py``) is never imported instead of
#: it; ``python -m`` and ``PYTHONPATH`` would put it first (docs/security.md).
NODE_BOOTSTRAP = (
    "import os, sys; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]; "
    "sys.path.append(os.getcwd()); from zmqfed.cli.node import console_main; console_main()"
)


@dataclass
class _Node:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path


class Simulation:
    """Start, watch and stop every node of ``topology`` as a separate process.

    Parameters
    ----------
    topology:
        The federation.
    app:
        ``MODULE:FACTORY`` passed to every node.
    logdir:
        Per-node logs, checkpoints and status files.
    rounds, options:
        Passed to every node (``--rounds``, ``--set KEY=VALUE``).
    """

    def __init__(
        self,
        topology: Topology,
        app: str,
        logdir: str | os.PathLike[str],
        *,
        rounds: int | None = None,
        options: Sequence[str] = (),
        log_level: str = "INFO",
    ) -> None:
        topology.validate(acyclic=True)  # zmqfed-node steps a hierarchy bottom-up
        self.topology = topology
        self.app = app
        self.logdir = Path(logdir)
        self.rounds = rounds
        self.options = list(options)
        self.log_level = log_level
        self.nodes: list[_Node] = []
        self.topology_path = self.logdir / "topology.json"

    def node_names(self) -> list[str]:
        """Collaborators first (they wait for their aggregator), aggregators last."""
        aggregators = {n.nick_name for n in self.topology.aggregators}
        names = [n.nick_name for n in self.topology.nodes]
        return sorted(names, key=lambda n: (n in aggregators, n))

    def start(self) -> None:
        """Write the topology and start one ``zmqfed-node run`` per node."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.topology.save(self.topology_path)
        env = dict(
            os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1"
        )
        cwd = os.getcwd()
        for name in self.node_names():
            cmd = [
                sys.executable,
                "-c",
                NODE_BOOTSTRAP,
                "run",
                "--topology",
                str(self.topology_path),
                "--node",
                name,
                "--app",
                self.app,
                "--state-dir",
                str(self.logdir),
                "--no-progress",
                "--log-level",
                self.log_level,
            ]
            if self.rounds is not None:
                cmd += ["--rounds", str(self.rounds)]
            for option in self.options:
                cmd += ["--set", option]
            log_path = name_path(self.logdir, name, ".log")
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                )
            self.nodes.append(_Node(name, proc, log_path))
            log.debug("started %s (pid %d)", name, proc.pid)

    def check(self) -> bool:
        """True once every node exited 0; raises ``NodeFailed`` (stopping the rest) on a failure."""
        running = 0
        for node in self.nodes:
            code = node.proc.poll()
            if code is None:
                running += 1
            elif code != 0:
                self.stop()
                raise NodeFailed(node.name, code, self.tail(node.name))
        return running == 0

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> None:
        """Block until every node exited 0; raise ``NodeFailed`` at the first failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.check():
                return
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                raise ConfigError(
                    f"simulation did not finish within {timeout:.0f} s (logs in {self.logdir})"
                )
            time.sleep(poll)

    def tail(self, name: str, lines: int = 20) -> str:
        """The last ``lines`` lines of a node's log."""
        path = name_path(self.logdir, name, ".log")
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every node still running (they stop cleanly), SIGKILL after ``grace``."""
        for node in self.nodes:
            if node.proc.poll() is None:
                _signal_group(node.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for node in self.nodes:
            try:
                node.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(node.proc, signal.SIGKILL)
                node.proc.wait()

    def __enter__(self) -> Simulation:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
