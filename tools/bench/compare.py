"""Run benchmark families on an earlier commit and on this tree, alternately, and compare.

Usage::

    python tools/bench/compare.py --base REV [--only transfer,overhead] [--repeat 2]

The earlier commit is checked out into a temporary git worktree and its own
``tools/bench/run.py`` runs there, so each side measures with the harness it
shipped with.  The two sides alternate (base, this tree, base, ...) so that
a noisy stretch of the machine falls on both; for every row both sides
report, the median over the repeats is printed, for rows with a baseline in
the same run (the raw socket) the ratio to it, else the value.  A ratio is
the figure to compare: absolute numbers drift between runs on a shared
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _run(tree: Path, families: str, out: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(tree / "tools/bench/run.py"), "--only", families, "--out", str(out)],
        cwd=tree,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wanted = set(families.split(","))
    rows = []
    for line in (out / "bench/results.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["family"] in wanted:
            rows.append(row)
    return rows


def _figure(row: dict[str, Any]) -> tuple[float, str]:
    if row.get("ratio") is not None:
        return float(row["ratio"]), f"x {row.get('baseline_name') or 'baseline'}"
    return float(row["value"]), str(row["unit"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--only", default="transfer,overhead", help="families, comma-separated")
    parser.add_argument("--repeat", type=int, default=2, help="runs per side")
    args = parser.parse_args(argv)
    runs: dict[str, list[list[dict[str, Any]]]] = {"base": [], "here": []}
    with tempfile.TemporaryDirectory(prefix="zmqfed-compare-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        try:
            for i in range(args.repeat):
                for side, tree in (("base", base), ("here", REPO)):
                    print(f"run {i + 1}/{args.repeat}: {side} ({args.only})", flush=True)
                    runs[side].append(_run(tree, args.only, Path(tmp) / f"{side}{i}"))
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False
            )
    print()
    print(f"| row | unit | {args.base[:10]} | this tree | this / base |")
    print("|---|---|---:|---:|---:|")
    names = [r["name"] for r in runs["here"][0]]
    for name in names:
        sides = {}
        for side in ("base", "here"):
            figures = [_figure(r) for run in runs[side] for r in run if r["name"] == name]
            if figures:
                sides[side] = (median(f for f, _ in figures), figures[0][1])
        if len(sides) < 2:
            continue
        (b, unit), (h, _) = sides["base"], sides["here"]
        print(f"| {name} | {unit} | {b:.3g} | {h:.3g} | {h / b:.2f} |" if b else f"| {name} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
