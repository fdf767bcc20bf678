"""Learning quality over real sockets: digits, 8 collaborator processes, Dirichlet(0.5) label skew.

One aggregator and eight collaborators of ``examples/digits/app.py``, each its
own process, on a free TCP port. FedAvg must reach 90 % held-out accuracy in
20 rounds with every round fully attended; FedProx and SCAFFOLD must finish
and learn (10 rounds each, to keep the three runs under ~2 minutes on 2 cores:
9 processes importing torch dominate the time, the rounds themselves are
fast). See docs/accuracy.md for the measured numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

CLIENTS = 8
FINAL = re.compile(r"^FINAL accuracy=([0-9.]+)", re.MULTILINE)

pytestmark = pytest.mark.slow


def _federation(
    run_python, tmp_path: Path, slow_factor: float, endpoint: str, algo: str, rounds: int
) -> tuple[float, list[dict], str]:
    """Run the federation; return (final accuracy, round records, aggregator stdout)."""
    records = tmp_path / f"{algo}.jsonl"
    common = (
        f"--endpoint {endpoint} --clients {CLIENTS} --rounds {rounds} --algo {algo} "
        f"--alpha 0.5 --seed 0 --timeout {150 * slow_factor}"
    ).split()
    agg_args = ["--role", "aggregator", "--name", "aggregator", "--records", str(records), *common]
    procs = {"aggregator": run_python(module="examples.digits.app", args=agg_args)}
    for i in range(CLIENTS):
        procs[f"client{i}"] = run_python(
            module="examples.digits.app",
            args=["--role", "collaborator", "--name", f"client{i}", *common],
        )
    outputs = {name: proc.communicate(timeout=200 * slow_factor) for name, proc in procs.items()}
    failed = [name for name, proc in procs.items() if proc.returncode != 0]
    assert not failed, "\n".join(
        f"--- {name} (exit {procs[name].returncode})\n{out}\n{err[-4000:]}"
        for name, (out, err) in outputs.items()
        if name in failed or name == "aggregator"
    )
    out = outputs["aggregator"][0]
    match = FINAL.search(out)
    assert match, f"no FINAL line in the aggregator's output:\n{out}"
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    return float(match.group(1)), rows, out


def test_fedavg_reaches_90_percent(run_python, tmp_path, slow_factor, free_tcp_endpoint):
    accuracy, rows, out = _federation(
        run_python, tmp_path, slow_factor, free_tcp_endpoint, "fedavg", rounds=20
    )
    assert [r["round"] for r in rows] == list(range(20))
    assert all(r["mode"] == "train" for r in rows)
    assert [r["participants"] for r in rows] == [CLIENTS] * 20, out
    assert all("loss" in r["metrics"] for r in rows)
    assert accuracy >= 0.90, out


@pytest.mark.parametrize("algo", ["fedprox", "scaffold"])
def test_fedprox_and_scaffold_learn(run_python, tmp_path, slow_factor, free_tcp_endpoint, algo):
    accuracy, rows, out = _federation(
        run_python, tmp_path, slow_factor, free_tcp_endpoint, algo, rounds=10
    )
    assert [r["participants"] for r in rows] == [CLIENTS] * 10, out
    assert accuracy >= 0.85, out
