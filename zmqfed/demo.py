"""``python -m zmqfed.demo``: the seed's aggregator and two collaborators, end to end.

Starts the three scripts of ``examples/seed`` as separate processes (the
collaborators first, to show that start order does not matter), waits for
them, and prints what each did. Exit status 0 means the federation worked.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]

SEED = Path(__file__).resolve().parent.parent / "examples" / "seed"

_REPORT = """
import runpy, sys
g = runpy.run_path(sys.argv[1], run_name="__main__")
m = g["maintainer"]
if m.aggregator:
    print(f"aggregator: received {len(m.meta_list)} uploads from {[p.nick_name for p in m.all_pipes()]}")
else:
    w = m.data["weight"]["param"].flatten()[:3].tolist()
    print(f"{m.nick_name}: downloaded the aggregator's weights (first values {w}) and uploaded its own")
"""


def main(argv: list[str] | None = None) -> int:
    """Run the seed federation; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m zmqfed.demo", description=__doc__)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")
    args = parser.parse_args(argv)
    if not SEED.is_dir():
        print(
            f"error: {SEED} not found; run from a clone of the zmqfed repository", file=sys.stderr
        )
        return 2
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(SEED.parent.parent), env.get("PYTHONPATH")])
    )
    tic = time.perf_counter()
    procs = {}
    for name in ("alpha", "beta", "aggregator"):
        print(f"starting {name} ({SEED / (name + '.py')})")
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", _REPORT, str(SEED / f"{name}.py")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    failed = False
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            print(f"{name}: timed out after {args.timeout:.0f} s", file=sys.stderr)
        print(out.rstrip())
        failed |= proc.returncode != 0
    status = "FAILED" if failed else "done"
    print(f"{status}: 3 nodes over tcp://127.0.0.1:1994 in {time.perf_counter() - tic:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
