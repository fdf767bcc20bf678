"""``zmqfed-topo``: check, compile, draw, generate and build topology files.

Subcommands
-----------
``check FILE``
    Load and validate a topology file (JSON, or YAML by suffix) and compile
    every node; errors name the node or edge and exit with 3.
``compile FILE [--node NAME] [--json]``
    Each node's federated groups and the socket it opens for each: ROUTER
    bind on the aggregator, DEALER connect with the routing id on a
    collaborator.
``visualize FILE [-o OUT] [--format F]``
    ASCII table (``txt``, the default, on stdout), Graphviz ``dot``, or a
    ``png``/``svg``/``pdf`` drawing (needs matplotlib: ``zmqfed[plot]``).
``star N`` / ``tree --branches B --leaves L``
    Generate common shapes, to ``-o FILE`` or as JSON on stdout.
``shell [FILE]``
    An interactive builder (``help`` lists its commands); reads commands from
    a pipe too.

Exit codes are those of :mod:`zmqfed.cli.exitcodes`. The file format is
described in ``docs/topology-format.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zmqfed.cli.exitcodes import OK, run
from zmqfed.errors import TopologyError
from zmqfed.topo import (
    SocketPlan,
    Topology,
    compile_topology,
    socket_plan,
    star,
    to_ascii,
    to_dot,
    to_image,
    tree,
)
from zmqfed.topo.render import role_of

__all__ = [
    "FORMATS",
    "PROG",
    "build_parser",
    "check",
    "compile_report",
    "format_compile",
    "format_of",
    "main",
    "render",
    "write_topology",
]

PROG = "zmqfed-topo"
#: Output formats of ``visualize`` and the shell's ``plot``; the first two need nothing extra.
FORMATS = ("txt", "dot", "png", "svg", "pdf")


# -- the operations the subcommands and the shell share -------------------------------


def check(topology: Topology) -> dict[str, list[SocketPlan]]:
    """Everything ``check`` enforces: a valid graph in which every node has a group."""
    if not topology.nodes:
        raise TopologyError("the topology has no nodes")
    return compile_topology(topology)


def compile_report(topology: Topology, name: str | None = None) -> dict[str, Any]:
    """Groups and sockets of one node, or of every node, as JSON (``compile --json``).

    ``groups`` describes each federated group once (aggregator, endpoint,
    world size, sorted collaborators, fingerprint); ``nodes`` lists each
    node's sockets, one per group it belongs to. Keeping the member lists out
    of the per-node entries keeps the output linear in the topology's size.
    """
    if name is None:
        plans = check(topology)  # validates once and compiles every node
    else:
        plans = {name: socket_plan(topology, name)}
    groups: dict[str, dict[str, Any]] = {}
    nodes = []
    for nick, node_plans in plans.items():
        node = topology.fetch_node_via_nick_name(nick)
        assert node is not None  # compiled above
        sockets = []
        for plan in node_plans:
            if plan.group not in groups:
                members = [c.nick_name for c in topology.collaborators_of(plan.group)]
                groups[plan.group] = {
                    "aggregator": plan.group,
                    "endpoint": plan.endpoint,
                    "world_size": 1 + len(members),
                    "collaborators": members,
                    "fingerprint": plan.fingerprint,
                }
            sockets.append(
                {
                    "group": plan.group,
                    "role": plan.role,
                    "type": plan.socket_type,
                    "action": plan.action,
                    "endpoint": plan.endpoint,
                    "routing_id": plan.routing_id,
                }
            )
        nodes.append(
            {
                "nick_name": nick,
                "role": role_of(topology, node),
                "settings": node.settings,
                "sockets": sockets,
            }
        )
    order = {n.nick_name: i for i, n in enumerate(topology.nodes)}
    return {"groups": dict(sorted(groups.items(), key=lambda g: order[g[0]])), "nodes": nodes}


def format_compile(report_data: dict[str, Any]) -> str:
    """The text form of :func:`compile_report`; names are quoted as Python strings."""
    lines = [
        f"group {name!r}: aggregator {g['aggregator']!r} at {g['endpoint']}, world size "
        f"{g['world_size']}, collaborators {g['collaborators']!r}, fingerprint {g['fingerprint']}"
        for name, g in report_data["groups"].items()
    ]
    for node in report_data["nodes"]:
        lines.append("")
        head = f"node {node['nick_name']!r} ({node['role']})"
        if node["settings"]:
            head += ", settings " + json.dumps(node["settings"], sort_keys=True)
        lines.append(head)
        for sock in node["sockets"]:
            line = (
                f"  group {sock['group']!r} as {sock['role']}: "
                f"{sock['type']} {sock['action']} {sock['endpoint']}"
            )
            if sock["routing_id"] is not None:
                line += f" routing_id={sock['routing_id']!r}"
            lines.append(line)
    return "\n".join(lines)


def render(topology: Topology, fmt: str, path: Path | None = None, *, dpi: int = 120) -> str:
    """Render ``txt``/``dot`` (returned, and written to ``path`` if given) or an image.

    Images need ``path``; the returned text is then empty.
    """
    if fmt in ("txt", "dot"):
        text = to_ascii(topology) + "\n" if fmt == "txt" else to_dot(topology)
        if path is not None:
            path.write_text(text, encoding="utf-8")
        return text
    if path is None:
        raise ValueError(f"format {fmt!r} needs an output file")
    to_image(topology, path, dpi=dpi)
    return ""


def format_of(path: Path) -> str | None:
    """The output format a file name asks for, or None."""
    suffix = path.suffix.lower().lstrip(".")
    return suffix if suffix in FORMATS else None


def write_topology(topology: Topology, output: Path | None) -> str:
    """Save to ``output`` (JSON, or YAML by suffix) and describe it, or return JSON."""
    if output is None:
        return json.dumps(topology.serialize(), indent=2, ensure_ascii=False)
    topology.save(output)
    return f"wrote {output}: {len(topology.nodes)} nodes, {len(topology.edges)} edges"


# -- subcommands -----------------------------------------------------------------------


def _in_file(path: Path, exc: TopologyError) -> TopologyError:
    """``exc`` prefixed with the file name, like the errors of ``Topology.load``."""
    return TopologyError(f"{path}: {exc}")


def _cmd_check(args: argparse.Namespace) -> int:
    topology = Topology.load(args.file)
    try:
        plans = check(topology)
    except TopologyError as exc:
        raise _in_file(args.file, exc) from exc
    groups = [n.nick_name for n in topology.aggregators]
    print(
        f"{args.file}: ok: {len(topology.nodes)} nodes, {len(topology.edges)} edges, "
        f"{len(groups)} group{'s' * (len(groups) != 1)} {groups!r}, "
        f"{sum(map(len, plans.values()))} sockets"
    )
    return OK


def _cmd_compile(args: argparse.Namespace) -> int:
    topology = Topology.load(args.file)
    try:
        data = compile_report(topology, args.node)
    except TopologyError as exc:
        raise _in_file(args.file, exc) from exc
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else format_compile(data))
    return OK


def _cmd_visualize(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    output: Path | None = args.output
    fmt = args.format or (format_of(output) if output is not None else "txt")
    if fmt is None:
        parser.error(
            f"cannot tell the format of {str(output)!r}: use a suffix {FORMATS} or --format"
        )
    if output is None and fmt not in ("txt", "dot"):
        parser.error(f"--format {fmt} needs -o FILE")
    if output is not None and format_of(output) not in (None, fmt):
        parser.error(f"--format {fmt} conflicts with the suffix of {str(output)!r}")
    if output is not None and fmt not in ("txt", "dot") and format_of(output) is None:
        parser.error(f"an image file must end in .{fmt}, got {str(output)!r}")
    text = render(Topology.load(args.file), fmt, output, dpi=args.dpi)
    if output is None:
        sys.stdout.write(text)
    else:
        print(f"wrote {output} ({fmt})")
    return OK


def _cmd_star(args: argparse.Namespace) -> int:
    topology = star(args.n, args.endpoint, aggregator=args.aggregator, prefix=args.prefix)
    print(write_topology(topology, args.output))
    return OK


def _cmd_tree(args: argparse.Namespace) -> int:
    topology = tree(
        args.branches,
        args.leaves,
        transport=args.transport,
        host=args.host,
        base_port=args.base_port,
        ipc_dir=args.ipc_dir,
        root=args.root,
        edge_prefix=args.edge_prefix,
        leaf_prefix=args.leaf_prefix,
    )
    print(write_topology(topology, args.output))
    return OK


def _cmd_shell(args: argparse.Namespace) -> int:
    from zmqfed.cli._topo_shell import run_shell  # the shell imports this module

    return run_shell(args.file)


# -- parsing ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``zmqfed-topo``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check, compile, draw, generate and build zmqfed topology files "
        "(JSON, or YAML for .yaml/.yml). See docs/topology-format.md.",
        epilog="exit codes: 0 ok, 1 runtime failure, 2 usage, 3 invalid topology, "
        "4 config error, 130 interrupted",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="validate a topology file")
    p.add_argument("file", type=Path, metavar="FILE")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("compile", help="show each node's groups and sockets")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--node", metavar="NAME", help="only this node")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("visualize", help="draw a topology (txt, dot, png, svg, pdf)")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("-o", "--output", type=Path, metavar="OUT", help="output file (default: stdout)")
    p.add_argument("--format", choices=FORMATS, help="output format (default: from OUT's suffix)")
    p.add_argument("--dpi", type=_positive_int, default=120, help="PNG resolution (default 120)")
    p.set_defaults(func=_cmd_visualize, parser=p)

    p = sub.add_parser("star", help="generate one aggregator with N collaborators")
    p.add_argument("n", type=_positive_int, metavar="N", help="number of collaborators")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:1994", help="aggregator endpoint")
    p.add_argument("--aggregator", default="aggregator", help="aggregator nick name")
    p.add_argument("--prefix", default="client", help="collaborator name prefix")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="default: JSON on stdout")
    p.set_defaults(func=_cmd_star)

    p = sub.add_parser("tree", help="generate root <- edge aggregators <- leaves")
    p.add_argument("--branches", type=_positive_int, default=2, help="edge aggregators")
    p.add_argument("--leaves", type=_positive_int, default=2, help="leaves per edge aggregator")
    p.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    p.add_argument("--host", default="127.0.0.1", help="tcp host of every aggregator")
    p.add_argument("--base-port", type=_positive_int, default=1994, help="root port; edges follow")
    p.add_argument("--ipc-dir", help="directory of ipc socket files")
    p.add_argument("--root", default="root", help="root nick name")
    p.add_argument("--edge-prefix", default="edge")
    p.add_argument("--leaf-prefix", default="leaf")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="default: JSON on stdout")
    p.set_defaults(func=_cmd_tree)

    p = sub.add_parser("shell", help="interactive topology builder (reads a pipe too)")
    p.add_argument("file", type=Path, nargs="?", metavar="FILE", help="topology to start from")
    p.set_defaults(func=_cmd_shell)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``zmqfed-topo``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format=f"{PROG}: %(name)s: %(message)s")
    return run(PROG, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
