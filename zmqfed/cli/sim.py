"""``zmqfed-sim``: run a whole federation on this machine, one process per node.

::

    zmqfed-sim --star 8 --app examples.digits.daemon:factory --rounds 20
    zmqfed-sim --topology examples/topologies/hierarchy.yaml --app MODULE:FACTORY

Every node's output goes to ``LOGDIR/NAME.log`` (a temporary directory unless
``--logdir`` is given); the aggregators' round lines are echoed here. A node
that fails stops the others, its last lines are shown and the exit code is 1;
Ctrl-C stops every node (exit 130). Nothing is left running.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from zmqfed.cli.exitcodes import OK, run

__all__ = ["main"]

PROG = "zmqfed-sim"


def _simulate(args: argparse.Namespace) -> int:
    from zmqfed.sim import Simulation, star_topology
    from zmqfed.topo import Topology

    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="zmqfed-sim-"))
    if args.topology:
        topology = Topology.load(args.topology)
    else:
        topology = star_topology(args.star, logdir, args.transport)
    sim = Simulation(
        topology, args.app, logdir, rounds=args.rounds, options=args.set, log_level=args.log_level
    )
    print(f"{PROG}: {len(topology.nodes)} nodes, logs in {logdir}", flush=True)
    tic = time.perf_counter()
    with sim:
        sim.wait(timeout=args.timeout)
    for agg in topology.aggregators:
        if not topology.aggregators_of(agg):  # a root: show how it ended
            print(sim.tail(agg.nick_name, 3))
    print(f"{PROG}: done in {time.perf_counter() - tic:.1f} s", flush=True)
    return OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help="topology file (JSON or YAML)")
    where.add_argument("--star", type=int, metavar="N", help="an aggregator and N collaborators")
    parser.add_argument(
        "--transport",
        choices=("ipc", "tcp"),
        default="ipc",
        help="for --star: ipc (default) or tcp on 127.0.0.1",
    )
    parser.add_argument("--app", required=True, help="MODULE:FACTORY returning a zmqfed.app.App")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--logdir", help="per-node logs, checkpoints and status files")
    parser.add_argument("--timeout", type=float, help="give up after this many seconds")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zmqfed-sim``."""
    args = build_parser().parse_args(argv)
    if args.star is not None and args.star <= 0:
        build_parser().error("--star needs a positive number of collaborators")
    return run(PROG, lambda: _simulate(args))


if __name__ == "__main__":
    sys.exit(main())
