"""Launch a simulated federation: one process per node, like ``torch.distributed.launch``.

OpenFed's launcher contract, unchanged::

    python -m zmqfed.tools.simulator --nproc 6 [--tcp] [--logdir DIR] run.py [script args]

1. :func:`build_centralized_topology` makes a star of ``nproc`` nodes: one
   ``aggregator`` at ``zmqfed.default_file_address`` (an ipc socket file in
   the temp directory), or at ``zmqfed.default_tcp_address`` with ``--tcp``,
   and ``collaborator-1`` ... ``collaborator-{nproc-1}``. It writes each
   node's props (``FederatedProperties.save``: a JSON list with one entry)
   to ``<temp dir>/<node name>.json``, where OpenFed's scripts look for
   them (``/tmp/aggregator.json``, ``/tmp/collaborator-1.json``, ... unless
   ``$TMPDIR`` moves the temp directory).
2. It starts ``python -u script [script args] --props=<that file>`` once per
   node, the aggregator first. The script reads its group with
   ``zmqfed.federated.FederatedProperties.load(args.props)``.
3. Every node writes to this terminal; with ``--logdir DIR`` only the
   aggregator does, and each collaborator's stdout and stderr go to
   ``DIR/zmqfed_node_<name>_stdout`` and ``..._stderr``.
4. When a node fails, the others are stopped and the launcher exits with
   that node's exit code (128 + N for a node killed by signal N). Ctrl-C or
   SIGTERM stops every node; the launcher then exits 130 or 143. It exits 0
   when every node exited 0.

Two launchers on one machine need different addresses: set
``$ZMQFED_DEFAULT_TCP`` (with ``--tcp``) or ``$ZMQFED_DEFAULT_FILE`` (a
``file://`` URL), or ``$TMPDIR``, which moves the props files and the
default socket file together.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from zmqfed.address import default_file_address, default_tcp_address, empty_address
from zmqfed.errors import ConfigError
from zmqfed.names import name_path
from zmqfed.props import FederatedProperties
from zmqfed.topo import Node, Topology, analysis

__all__ = ["build_centralized_topology", "main", "node_names", "props_path"]

AGGREGATOR_NAME = "aggregator"
NODE_STDOUT = "zmqfed_node_{}_stdout"
NODE_STDERR = "zmqfed_node_{}_stderr"
# Seconds a stopped node gets to exit after SIGTERM before it is killed.
_GRACE = 5.0
_POLL = 0.1


def node_names(nproc: int) -> list[str]:
    """``['aggregator', 'collaborator-1', ..., f'collaborator-{nproc - 1}']``."""
    return [AGGREGATOR_NAME] + [f"collaborator-{i}" for i in range(1, nproc)]


def props_path(name: str, props_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the props file of node ``name`` goes: ``<props_dir or temp dir>/<name>.json``."""
    return name_path(props_dir if props_dir is not None else tempfile.gettempdir(), name, ".json")


def build_centralized_topology(
    nproc: int, tcp: bool = False, props_dir: str | os.PathLike[str] | None = None
) -> Topology:
    """Build the star of ``nproc`` nodes and write every node's props file.

    Parameters
    ----------
    nproc:
        Nodes in all: one aggregator and ``nproc - 1`` collaborators (at least 2).
    tcp:
        Serve on ``zmqfed.default_tcp_address`` instead of the default file
        (ipc) address.
    props_dir:
        Where to write ``<node name>.json``; the temp directory by default
        (``/tmp`` on most systems), as OpenFed did.

    Returns
    -------
    Topology
        The star (OpenFed's function returned nothing).
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 2:
        raise ConfigError(
            f"nproc must be an integer >= 2 (an aggregator and a collaborator), got {nproc!r}"
        )
    names = node_names(nproc)
    aggregator = Node(AGGREGATOR_NAME, default_tcp_address if tcp else default_file_address)
    topology = Topology([Node(name, empty_address) for name in names[1:]])
    topology.add_node(aggregator)
    for name in names[1:]:
        topology.add_edge(name, aggregator)
    for name in names:
        FederatedProperties.save(analysis(topology, name), props_path(name, props_dir))
    return topology


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m zmqfed.tools.simulator",
        description="zmqfed federated simulation launcher: start one process per node of "
        "a star (one aggregator, nproc - 1 collaborators) running the same script, each "
        "with --props=<its props file>.",
    )
    parser.add_argument(
        "--nproc", type=int, default=2, help="number of nodes (processes) in all (default: 2)"
    )
    parser.add_argument(
        "--tcp",
        action="store_true",
        help="serve on zmqfed.default_tcp_address instead of the default ipc (file) address",
    )
    parser.add_argument(
        "--logdir",
        default=None,
        help="write each collaborator's stdout and stderr to "
        f"{NODE_STDOUT.format('<name>')} / {NODE_STDERR.format('<name>')} in this directory "
        "(created if needed; existing logs are overwritten); the aggregator still prints here",
    )
    parser.add_argument("training_script", help="the script every node runs")
    parser.add_argument(
        "training_script_args", nargs=argparse.REMAINDER, help="arguments for the script"
    )
    return parser.parse_args(argv)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(processes: Sequence[subprocess.Popen[Any]]) -> None:
    """SIGTERM every running node, then SIGKILL whatever is left after the grace period."""
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + _GRACE
    for proc in processes:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _remove_stale_socket(tcp: bool) -> None:
    """Remove a socket file a previous run left at the default file address (OpenFed did too)."""
    endpoint = default_file_address.endpoint
    if tcp or endpoint is None or not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://") :]
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher; return its exit code (see the module docstring)."""
    args = _parse_args(argv)
    try:
        build_centralized_topology(args.nproc, args.tcp)
    except ConfigError as exc:
        print(f"zmqfed.tools.simulator: error: {exc}", file=sys.stderr)
        return 2
    _remove_stale_socket(args.tcp)
    logdir = None
    if args.logdir:
        logdir = Path(args.logdir).absolute()
        if logdir.exists() and not logdir.is_dir():
            print(
                f"zmqfed.tools.simulator: error: --logdir {logdir} is not a directory",
                file=sys.stderr,
            )
            return 2
        logdir.mkdir(parents=True, exist_ok=True)

    processes: list[subprocess.Popen[Any]] = []
    handles: list[IO[str]] = []

    def on_signal(signum: int, _frame: Any) -> None:
        raise _Stopped(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name in node_names(args.nproc):
            cmd = [sys.executable, "-u", args.training_script, *args.training_script_args]
            cmd.append(f"--props={props_path(name)}")
            stdout: IO[str] | None = None
            stderr: IO[str] | None = None
            if logdir is not None and name != AGGREGATOR_NAME:
                stdout = open(logdir / NODE_STDOUT.format(name), "w")  # noqa: SIM115
                stderr = open(logdir / NODE_STDERR.format(name), "w")  # noqa: SIM115
                handles += [stdout, stderr]
                print(
                    f"Note: stdout and stderr for {name} will be written to "
                    f"{stdout.name}, {stderr.name} respectively.",
                    flush=True,
                )
            processes.append(subprocess.Popen(cmd, stdout=stdout, stderr=stderr))
        running = list(processes)
        while running:
            for proc in list(running):
                code = proc.poll()
                if code is None:
                    continue
                running.remove(proc)
                if code != 0:
                    index = processes.index(proc)
                    name = node_names(args.nproc)[index]
                    print(
                        f"zmqfed.tools.simulator: {name} (pid {proc.pid}) exited with code "
                        f"{code}; stopping the other nodes",
                        file=sys.stderr,
                        flush=True,
                    )
                    _stop(processes)
                    return _exit_code(code)
            time.sleep(_POLL)
        return 0
    except _Stopped as stopped:
        print(
            f"zmqfed.tools.simulator: {signal.Signals(stopped.signum).name} received; "
            "stopping every node",
            file=sys.stderr,
            flush=True,
        )
        _stop(processes)
        return 128 + stopped.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for handle in handles:
            handle.close()


if __name__ == "__main__":
    sys.exit(main())
