"""``python -m zmqfed.tools.topo_builder [FILE]``: OpenFed's topology builder, i.e. ``zmqfed-topo shell``.

``TopoBuilder`` is the interactive builder (:class:`zmqfed.cli._topo_shell.TopoShell`).
Unlike OpenFed's, its commands take their arguments on the command line
(``add_node agg tcp://127.0.0.1:1994``, ``add_edge alpha agg``, ``save
topo.json``) instead of prompting for them; ``help`` lists them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from zmqfed.cli._topo_shell import TopoShell, run_shell

__all__ = ["TopoBuilder", "main"]

TopoBuilder = TopoShell


def main(argv: list[str] | None = None) -> int:
    """Run the builder, starting from the topology file given as the only argument, if any."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m zmqfed.tools.topo_builder [FILE]", file=sys.stderr)
        return 2
    return run_shell(Path(args[0]) if args else None)


if __name__ == "__main__":
    sys.exit(main())
