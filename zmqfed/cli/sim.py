"""``zmqfed-sim``: run a whole federation on this machine, one process per node.

::

    zmqfed-sim --star 8 --app examples.digits.daemon:factory --rounds 20
    zmqfed-sim --topology examples/topologies/hierarchy.yaml --app MODULE:FACTORY
    zmqfed-sim --star 100 --sample 10 --over-select 0.3 --app MODULE:FACTORY
    zmqfed-sim --star 8 --ray --app MODULE:FACTORY          # nodes as Ray actors
    zmqfed-sim --star 8 --ray auto --app MODULE:FACTORY     # ... on a running cluster

Every node's output goes to ``LOGDIR/NAME.log`` (a temporary directory unless
``--logdir`` is given); the aggregators' round lines are echoed here. A node
that fails stops the others, its last lines are shown and the exit code is 1;
Ctrl-C stops every node (exit 130). Nothing is left running.

``--sample K`` / ``--fraction F`` (with ``--sample-seed``, ``--over-select``)
make the aggregators train a seeded sample of their collaborators each round
(``zmqfed.functional.client_sampling``; passed to the nodes as ``--set``).
``--ray [ADDRESS]`` runs every node as a Ray actor (``zmqfed.ray_sim``, extra
``zmqfed[ray]``): on a Ray cluster started on this machine's loopback, or on
the cluster at ADDRESS; the nodes still talk over zmqfed's sockets.
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
#: ``--ray`` without an address: start a Ray cluster on this machine.
LOCAL_RAY = "local"


def _sampling_options(args: argparse.Namespace) -> list[str]:
    out = list(args.set)
    if args.sample is not None:
        out.append(f"sample={args.sample}")
    if args.fraction is not None:
        out.append(f"fraction={args.fraction}")
    if args.sample_seed is not None:
        out.append(f"sample_seed={args.sample_seed}")
    if args.over_select is not None:
        out.append(f"over_select={args.over_select}")
    return out


def _simulate_on_ray(args: argparse.Namespace, logdir: Path) -> int:
    from zmqfed.ray_sim import RaySimulation
    from zmqfed.topo import Topology

    topology = Topology.load(args.topology) if args.topology else None
    address = None if args.ray == LOCAL_RAY else args.ray
    sim = RaySimulation(
        topology,
        args.app,
        logdir,
        star_size=None if topology is not None else args.star,
        address=address,
        rounds=args.rounds,
        options=_sampling_options(args),
        log_level=args.log_level,
    )
    where = "a local Ray cluster" if address is None else f"the Ray cluster at {address}"
    print(f"{PROG}: nodes as Ray actors on {where}, logs in {logdir}", flush=True)
    tic = time.perf_counter()
    results = sim.run(timeout=args.timeout)
    for name, result in sorted(results.items()):
        if result.get("last_record"):
            print(f"{name}: {result['round']} rounds; last: {result['last_record']}")
    print(f"{PROG}: done in {time.perf_counter() - tic:.1f} s", flush=True)
    return OK


def _simulate(args: argparse.Namespace) -> int:
    from zmqfed.sim import Simulation, star_topology
    from zmqfed.topo import Topology

    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="zmqfed-sim-"))
    if args.ray is not None:
        return _simulate_on_ray(args, logdir)
    if args.topology:
        topology = Topology.load(args.topology)
    else:
        topology = star_topology(args.star, logdir, args.transport)
    sim = Simulation(
        topology,
        args.app,
        logdir,
        rounds=args.rounds,
        options=_sampling_options(args),
        log_level=args.log_level,
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
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument(
        "--sample", type=int, metavar="K", help="train K sampled clients per round"
    )
    sampling.add_argument("--fraction", type=float, metavar="F", help="... or a fraction F of them")
    parser.add_argument("--sample-seed", type=int, help="seed of the per-round draws")
    parser.add_argument("--over-select", type=float, help="invite K * (1 + this) per round")
    parser.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL_RAY,
        metavar="ADDRESS",
        help="run the nodes as Ray actors: on a local Ray cluster, or on the one at ADDRESS",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zmqfed-sim``."""
    args = build_parser().parse_args(argv)
    if args.star is not None and args.star <= 0:
        build_parser().error("--star needs a positive number of collaborators")
    return run(PROG, lambda: _simulate(args))


if __name__ == "__main__":
    sys.exit(main())
