"""``zmqfed-keys``: make CurveZMQ key pairs for nodes.

::

    zmqfed-keys --dir keys/ aggregator client0 client1

writes ``keys/NAME.key`` (public: copy it to every node's key directory) and
``keys/NAME.key_secret`` (mode 0600: keep it on NAME's machine only). A node
runs with ``zmqfed-node run --keys keys/ ...``; an aggregator admits exactly
the public keys of its group's collaborators.
"""

from __future__ import annotations

import argparse
import sys

from zmqfed.cli.exitcodes import OK, run

__all__ = ["main"]

PROG = "zmqfed-keys"


def _make(args: argparse.Namespace) -> int:
    from zmqfed.federated.security import create_keys

    for name in args.names:
        public, secret = create_keys(args.dir, name)
        print(f"{name}: public {public}, secret {secret} (mode 600)")
    return OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zmqfed-keys``."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="key directory (created if missing)")
    parser.add_argument("names", nargs="+", help="node nick names")
    args = parser.parse_args(argv)
    return run(PROG, lambda: _make(args))


if __name__ == "__main__":
    sys.exit(main())
