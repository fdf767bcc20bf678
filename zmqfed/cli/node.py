"""``zmqfed-node``: one long-running process per node of a topology.

::

    zmqfed-node run --topology FILE --node NAME --app MODULE:FACTORY [--state-dir DIR]
                    [--metrics ADDR:PORT] [--dashboard ADDR:PORT]
    zmqfed-node status --state-dir DIR [--node NAME] [--json]

``run`` builds the node's groups from the topology and runs the app round after
round; an aggregator checkpoints after every round into ``--state-dir`` and
resumes from there after a restart. An aggregator whose endpoint other hosts
can reach refuses to start without ``--keys`` (CURVE) unless ``--insecure``
says the network is trusted. SIGTERM and SIGINT stop it cleanly: the
current message is abandoned, peers get BYE, sockets close, and it exits with
0 (SIGTERM: stopped on request) or 130 (SIGINT). Other codes are those of
``zmqfed.cli.exitcodes`` (1 runtime failure, 2 usage, 3 invalid topology,
4 invalid configuration).

``--metrics`` serves Prometheus metrics and ``--dashboard`` a live web page
from the node's process (read-only, on 127.0.0.1 unless an address is given).
``status`` exits with the nodes' health, for monitoring checks: 0 running,
10 finished, 11 stopped, 12 failed, 13 stale heartbeat (the worst of several
nodes); see ``docs/operations.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from zmqfed.cli.exitcodes import OK, run

__all__ = ["main"]

PROG = "zmqfed-node"
log = logging.getLogger("zmqfed.node")


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM so every ``finally`` runs."""


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(level: str, as_json: bool, node: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {node} %(levelname)s %(name)s: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _raise_fd_limit() -> None:
    """At 1024 descriptors libzmq spins silently on failed accepts: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit above %d", soft)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _options(pairs: list[str]) -> dict[str, str]:
    from zmqfed.errors import ConfigError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _refuse_exposed_plaintext(topology: Any, node: str, insecure: bool) -> None:
    """Without keys, refuse to bind an endpoint other hosts can reach (unless ``--insecure``)."""
    from zmqfed.errors import ConfigError
    from zmqfed.federated.sockets import beyond_loopback
    from zmqfed.topo import analysis

    for props in analysis(topology, node):
        endpoint = props.address.endpoint or ""
        if not props.aggregator or not beyond_loopback(endpoint):
            continue
        if insecure:
            log.warning("%s binds %s without CURVE (--insecure)", node, endpoint)
            continue
        raise ConfigError(
            f"{node} would bind {endpoint}, which other hosts can reach, without CURVE: "
            "anyone who can connect could claim to be any member. Pass --keys DIR "
            "(keys from zmqfed-keys), or --insecure on a network you trust"
        )


def _run(args: argparse.Namespace) -> int:
    from zmqfed.app import load_factory
    from zmqfed.node import NodeRunner
    from zmqfed.ops import OpsOptions
    from zmqfed.topo import Topology

    _setup_logging(args.log_level, args.log_json, args.node)
    _raise_fd_limit()
    topology = Topology.load(args.topology)
    if args.keys is None:
        _refuse_exposed_plaintext(topology, args.node, args.insecure)
    factory = load_factory(args.app)
    runner = NodeRunner(
        topology,
        args.node,
        factory,
        state_dir=args.state_dir,
        rounds=args.rounds,
        options=_options(args.set),
        progress=not args.no_progress,
        keys_dir=args.keys,
        ops=OpsOptions(
            metrics=args.metrics,
            dashboard=args.dashboard,
            metrics_peers=args.metrics_peers,
            heartbeat=args.heartbeat,
        ),
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    tic = time.perf_counter()
    try:
        runner.run()
    except Terminated:
        log.info("stopped by SIGTERM at round %d", runner.round)
        return OK
    log.info("finished %d rounds in %.1f s", runner.round, time.perf_counter() - tic)
    return OK


def _status(args: argparse.Namespace) -> int:
    from zmqfed.errors import ConfigError
    from zmqfed.names import name_path
    from zmqfed.ops.status import health, read_status, to_json

    if args.stale_after is not None and args.stale_after <= 0:
        raise ConfigError(f"--stale-after must be positive seconds, got {args.stale_after!r}")
    state_dir = Path(args.state_dir)
    if args.node:
        path = name_path(state_dir, args.node, ".status.json")
        pattern, files = path.name, [path] if path.exists() else []
    else:
        pattern, files = "*.status.json", sorted(state_dir.glob("*.status.json"))
    if not files:
        raise ConfigError(f"no status file matching {pattern} in {state_dir}")
    docs = []
    for path in files:
        doc = read_status(path)
        doc["health"] = health(doc, stale_after=args.stale_after)
        docs.append(doc)
    if args.json:
        print(to_json(docs[0], indent=2) if args.node else to_json({"nodes": docs}, indent=2))
    else:
        for doc in docs:
            _print_status(doc)
    return max(doc["health"]["exit_code"] for doc in docs)


def _print_status(status: dict[str, Any]) -> None:
    verdict = status["health"]
    print(
        f"{status['node']}: {verdict['status']} ({status['state']}), "
        f"round {status['round']}/{status['rounds']}, version {status.get('version', '-')}, "
        f"pid {status.get('pid', '-')}, updated {verdict['heartbeat_age']:.0f} s ago"
    )
    if status.get("failure"):
        print(f"  failure: {status['failure']}")
    print(f"  online peers: {', '.join(status.get('online_peers', [])) or '-'}")
    if status.get("offline_peers"):
        print(f"  offline peers: {', '.join(status['offline_peers'])}")
    record = status.get("last_record")
    if record:
        print(
            f"  last round: {record['participants']} participants, {record['seconds']:.2f} s, "
            f"{record['metrics']}"
        )
    for name, url in sorted((status.get("endpoints") or {}).items()):
        print(f"  {name}: {url}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run one node until its rounds are done")
    p_run.add_argument("--topology", required=True, help="topology file (JSON or YAML)")
    p_run.add_argument("--node", required=True, help="this node's nick name")
    p_run.add_argument("--app", required=True, help="MODULE:FACTORY returning a zmqfed.app.App")
    p_run.add_argument("--state-dir", help="checkpoints and status go here")
    p_run.add_argument("--rounds", type=int, help="override the app's number of rounds")
    p_run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option passed to the app factory (repeatable)",
    )
    p_run.add_argument(
        "--keys",
        metavar="DIR",
        help="CurveZMQ key directory (zmqfed-keys): encrypt and authenticate",
    )
    p_run.add_argument(
        "--insecure",
        action="store_true",
        help="bind an endpoint other hosts can reach without --keys (a trusted network only)",
    )
    p_run.add_argument("--log-level", default="INFO")
    p_run.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    p_run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_run.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (needs zmqfed[metrics])",
    )
    p_run.add_argument(
        "--dashboard",
        metavar="ADDR:PORT",
        help="serve a live dashboard at http://ADDR:PORT/ (ADDR defaults to 127.0.0.1)",
    )
    p_run.add_argument(
        "--metrics-peers",
        type=int,
        default=0,
        metavar="N",
        help="per-peer metrics for the N busiest peers of each group (default 0: none)",
    )
    p_run.add_argument(
        "--heartbeat",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="rewrite the status file this often (default 5)",
    )
    p_status = sub.add_parser("status", help="show what running or stopped nodes report")
    p_status.add_argument("--state-dir", required=True)
    p_status.add_argument("--node", help="only this node")
    p_status.add_argument("--json", action="store_true", help="print the status documents as JSON")
    p_status.add_argument(
        "--stale-after",
        type=float,
        metavar="SECONDS",
        help="a running node whose heartbeat is older is stale (default 3 heartbeats, >= 30 s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zmqfed-node``."""
    args = build_parser().parse_args(argv)
    command = _run if args.command == "run" else _status
    return run(PROG, lambda: command(args))


def _exit_now(code: int) -> None:
    """Close sockets, flush, and leave without the interpreter's slow teardown.

    Finalizing a process that loaded torch and scikit-learn spends seconds
    (tens of seconds on a loaded host) collecting garbage; a daemon stopped by
    SIGTERM should be gone at once. Everything that matters is done first.
    """
    from zmqfed.federated.sockets import shutdown

    shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def console_main() -> None:
    """Console-script entry point: ``main`` followed by a fast, clean exit."""
    _exit_now(main())


if __name__ == "__main__":
    console_main()
