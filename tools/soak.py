"""Soak benchmark: hundreds of rounds with collaborators killed and restarted at random.

Runs ``zmqfed-node`` daemons on 127.0.0.1 (a free port): one aggregator and
``--clients`` collaborators of ``tests/integration/toy_app.py`` (no training
delay), with the straggler policy (``min_clients`` = clients - 1, 1 s round
deadline) so a killed collaborator cannot stall a round. About every
``--restart-every`` rounds (seeded RNG) one collaborator is SIGKILLed and
started again. After every round the aggregator's RSS (``VmRSS`` of
``/proc/PID/status``) is sampled; samples go to ``--out`` as JSON lines, the
last line being the summary, which is also printed::

    .venv/bin/python tools/soak.py                       # 300 rounds, restart every ~20
    .venv/bin/python tools/soak.py --rounds 15 --restart-every 5 --out /tmp/soak.jsonl

This is a benchmark, not a test: it asserts nothing about the figures. It
exits non-zero if the federation does not complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
APP = "tests.integration.toy_app:factory"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def rss_kb(pid: int) -> int | None:
    """``VmRSS`` of ``pid`` in kB, None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def rounds_done(state: Path) -> int:
    """Rounds the aggregator finished, from its status file (0 before the first)."""
    try:
        return int(json.loads((state / "aggregator.status.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def slope_per_100(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of RSS (kB) over rounds, times 100; nan with < 2 rounds."""
    if len({r for r, _ in points}) < 2:
        return math.nan
    n = len(points)
    mx = sum(r for r, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((r - mx) ** 2 for r, _ in points)
    sxy = sum((r - mx) * (v - my) for r, v in points)
    return 100.0 * sxy / sxx


class Federation:
    """The daemons of one soak run; every child leads its own process group."""

    def __init__(
        self, workdir: Path, clients: int, rounds: int, round_timeout: float, log_level: str
    ) -> None:
        from zmqfed.topo import star

        self.workdir = workdir
        self.topology = workdir / "topology.json"
        star(clients, f"tcp://127.0.0.1:{free_tcp_port()}").save(self.topology)
        width = len(str(clients - 1))
        self.names = [f"client{i:0{width}d}" for i in range(clients)]
        self.state = workdir / "aggregator"
        self.common = [
            "--topology",
            str(self.topology),
            "--app",
            APP,
            "--rounds",
            str(rounds),
            "--no-progress",
            "--log-level",
            log_level,
            "--set",
            "delay=0",
            "--set",
            f"min_clients={max(1, clients - 1)}",
            "--set",
            f"round_timeout={round_timeout}",
        ]
        self.env = dict(os.environ)
        self.env["OMP_NUM_THREADS"] = "1"
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH")) if p
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.all_procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str) -> subprocess.Popen[bytes]:
        state = self.state if name == "aggregator" else self.workdir / name
        argv = [sys.executable, "-m", "zmqfed.cli.node", "run", "--node", name]
        argv += ["--state-dir", str(state), *self.common]
        with open(self.workdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.procs[name] = proc
        self.all_procs.append(proc)
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.all_procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.all_procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    fed = Federation(workdir, args.clients, args.rounds, args.round_timeout, args.log_level)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, Any]] = []
    restarts = 0
    tic = time.monotonic()
    deadline = tic + args.timeout

    def next_restart(after: int) -> int:
        spread = max(1, args.restart_every // 2)
        return after + rng.randint(args.restart_every - spread, args.restart_every + spread)

    try:
        for name in fed.names:
            fed.start(name)
        agg = fed.start("aggregator")
        restart_at = next_restart(0)
        seen = 0
        while agg.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {args.timeout} s at round {seen}")
            done = rounds_done(fed.state)
            if done > seen:
                rss = rss_kb(agg.pid)
                seen = done
                if rss is not None:
                    samples.append(
                        {
                            "round": done,
                            "rss_kb": rss,
                            "t": round(time.monotonic() - tic, 3),
                            "restarts": restarts,
                        }
                    )
                if done >= restart_at and done < args.rounds - 3:
                    victim = rng.choice(fed.names)
                    fed.kill(victim)
                    fed.start(victim)
                    restarts += 1
                    restart_at = next_restart(done)
            time.sleep(0.005)
        if agg.returncode != 0:
            raise RuntimeError(f"the aggregator exited {agg.returncode}; see {workdir}")
        # The collaborators leave on the aggregator's final BYE; one restarted
        # just before the end may never have joined: stop it.
        late = 0
        for name in fed.names:
            try:
                fed.procs[name].wait(timeout=15)
            except subprocess.TimeoutExpired:
                late += 1
    finally:
        fed.stop_all()
    records = [
        json.loads(x) for x in (fed.state / "aggregator.rounds.jsonl").read_text().splitlines()
    ]
    by_round = {s["round"]: s["rss_kb"] for s in samples}
    first = min((r for r in by_round if r >= 10), default=min(by_round, default=0))
    warm = [(r, v) for r, v in by_round.items() if r >= first]
    participants = [int(r["participants"]) for r in records]
    summary = {
        "summary": True,
        "rounds_completed": len(records),
        "rounds_requested": args.rounds,
        "restarts": restarts,
        "clients": args.clients,
        "seed": args.seed,
        "rss_kb_at_round": first,
        "rss_kb_start": by_round.get(first, math.nan),
        "rss_kb_end": samples[-1]["rss_kb"] if samples else math.nan,
        "rss_kb_max": max((s["rss_kb"] for s in samples), default=math.nan),
        "rss_kb_slope_per_100_rounds": round(slope_per_100(warm), 1),
        "rounds_short_of_clients": sum(p < args.clients for p in participants),
        "min_participants": min(participants, default=0),
        "collaborators_stopped_at_end": late,
        "seconds": round(time.monotonic() - tic, 1),
    }
    with open(out, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")
        f.write(json.dumps(summary) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--restart-every", type=int, default=20, help="mean rounds per restart")
    parser.add_argument("--round-timeout", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many s")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "bench" / "soak.jsonl"))
    parser.add_argument("--log-level", default="WARNING", help="of the daemons (their logs)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if args.clients < 2 or args.rounds < 1 or args.restart_every < 1:
        parser.error("need --clients >= 2, --rounds >= 1, --restart-every >= 1")
    sys.path.insert(0, str(REPO_ROOT))
    workdir = Path(tempfile.mkdtemp(prefix="zmqfed-soak-"))
    try:
        summary = soak(args, workdir)
    except RuntimeError as exc:
        print(f"soak: {exc} (logs in {workdir})", file=sys.stderr)
        return 1
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs in {workdir}")
    kb = 1024.0
    print(
        f"rounds completed: {summary['rounds_completed']}/{args.rounds} "
        f"in {summary['seconds']} s; collaborator restarts (SIGKILL + start): "
        f"{summary['restarts']}\n"
        f"aggregator RSS at round {summary['rss_kb_at_round']}: "
        f"{summary['rss_kb_start'] / kb:.1f} MiB, at the end: {summary['rss_kb_end'] / kb:.1f} MiB,"
        f" max {summary['rss_kb_max'] / kb:.1f} MiB; slope "
        f"{summary['rss_kb_slope_per_100_rounds']:+.1f} kB per 100 rounds\n"
        f"rounds with fewer than {args.clients} participants: "
        f"{summary['rounds_short_of_clients']} (min {summary['min_participants']})\n"
        f"samples and summary: {args.out}"
    )
    return 0 if summary["rounds_completed"] == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
