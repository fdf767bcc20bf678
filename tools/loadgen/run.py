"""One aggregator and N collaborators on this machine: time, CPU, memory and descriptors.

Usage::

    python tools/loadgen/run.py                         # N = 10, 100, 1000, 10000 x 4 KiB, 1 MiB
    python tools/loadgen/run.py --peers 10,1000 --models 4096 --rounds 3
    python tools/loadgen/run.py --quick --no-write      # tiny, for smoke tests

The aggregator is a real ``Maintainer`` in its own process running
``API(..., fold_uploads=True)`` with ``count_step(N)``: every round serves
the model to all N collaborators and folds their N uploads.  The
collaborators are :class:`zmqfed.loadgen.Crowd` processes (up to
``--per-crowd`` each), every collaborator its own DEALER on tcp 127.0.0.1.
Round 0 includes the connect storm (all N connect at once); the figures per
round are the medians of the later rounds.  Results go to
``docs/bench/scale.jsonl`` and the "Cross-device scale" section of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _names(n: int) -> list[str]:
    width = len(str(n - 1))
    return [f"client{i:0{width}d}" for i in range(n)]


def _model(nbytes: int) -> dict[str, Any]:
    import torch

    n = max(2, nbytes // 4)
    return {"w": torch.full((n - 1,), 0.5), "b": torch.zeros(1)}


# ------------------------------------------------------------------- the roles


def aggregator(args: argparse.Namespace) -> None:
    """Serve ``rounds`` rounds to ``peers`` collaborators; print one JSON line."""
    import torch

    from zmqfed.address import Address
    from zmqfed.api import API
    from zmqfed.core import Maintainer
    from zmqfed.federated import SocketOptions
    from zmqfed.functional import count_step, naive_aggregation
    from zmqfed.loadgen import process_usage
    from zmqfed.optim import FederatedOptimizer
    from zmqfed.props import AGGREGATOR, FederatedProperties

    torch.set_num_threads(1)
    roster = tuple(_names(args.peers))
    props = FederatedProperties(
        AGGREGATOR, "aggregator", Address(args.endpoint), "aggregator", roster
    )
    model = {k: v.requires_grad_() for k, v in _model(args.model_bytes).items()}
    # the aggregator sends no heartbeats; it drops a peer after the TTL the
    # crowd's links announce (their heartbeat timeout), and gives handshakes
    # as long as they do
    options = SocketOptions(handshake_ivl_ms=30_000)
    m = Maintainer(props, model, timeout=args.timeout, socket_options=options)
    with m:
        count_step(args.peers)
    params = list(model.values())
    server = FederatedOptimizer(torch.optim.SGD(params, lr=1.0), AGGREGATOR)
    rounds: list[dict[str, Any]] = []
    mark = {"cpu": time.process_time()}

    def on_round(record: Any) -> None:
        usage = process_usage()
        rounds.append(
            {
                "round": record.round,
                "seconds": record.seconds,
                "participants": record.participants,
                "cpu_s": usage["cpu_s"] - mark["cpu"],
                "rss_mib": usage.get("rss_mib"),
                "fds": usage.get("fds"),
            }
        )
        mark["cpu"] = usage["cpu_s"]

    print(json.dumps({"ready": True, "usage": process_usage()}), flush=True)
    api = API(
        m,
        server,
        args.rounds,
        naive_aggregation,
        progress=False,
        on_round=on_round,
        fold_uploads=True,
    )
    api.run()
    usage = process_usage()
    stats = m.stats
    m.close(final=True)
    expected = 0.5 + 0.0  # every upload is the model itself: the mean is the model
    exact = bool(torch.allclose(params[0], torch.full_like(params[0], expected)))
    print(
        json.dumps(
            {
                "rounds": rounds,
                "usage": usage,
                "encodes": stats["encodes"],
                "messages_in": stats["messages_in"],
                "errors": stats["errors"],
                "model_exact": exact,
            }
        ),
        flush=True,
    )


def crowd(args: argparse.Namespace) -> None:
    """Run collaborators ``first`` .. ``first + count - 1``; print one JSON line."""
    import torch

    from zmqfed.loadgen import Crowd, process_usage

    torch.set_num_threads(1)
    roster = _names(args.peers)
    names = roster[args.first : args.first + args.count]
    c = Crowd(
        args.endpoint,
        names,
        roster,
        _model(args.model_bytes),
        rounds=args.rounds,
        timeout=args.timeout,
        inflight=args.inflight or None,
    )
    before = process_usage()
    c.connect()
    connected = process_usage()
    report = c.run(timeout=args.timeout)
    c.close()
    out = report.to_dict()
    out["before"] = before
    out["connected"] = connected
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------ the bench


def _free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def _spawn(role: str, **kw: Any) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(Path(__file__)), role]
    for key, value in kw.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise RuntimeError(f"no result line in:\n{text[-2000:]}")


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if s else float("nan")


def measure(
    peers: int,
    model_bytes: int,
    rounds: int,
    per_crowd: int,
    timeout: float,
    inflight: int = 0,
) -> dict[str, Any]:
    """One aggregator process and the crowds for ``peers``; the figures of the run."""
    endpoint = _free_endpoint()
    agg = _spawn(
        "aggregator",
        endpoint=endpoint,
        peers=peers,
        model_bytes=model_bytes,
        rounds=rounds,
        timeout=timeout,
    )
    assert agg.stdout is not None
    ready = json.loads(agg.stdout.readline())
    crowds = []
    tic = time.perf_counter()
    for first in range(0, peers, per_crowd):
        crowds.append(
            _spawn(
                "crowd",
                endpoint=endpoint,
                peers=peers,
                first=first,
                count=min(per_crowd, peers - first),
                model_bytes=model_bytes,
                rounds=rounds,
                timeout=timeout,
                inflight=inflight,
            )
        )
    try:
        agg_out, agg_err = agg.communicate(timeout=timeout * (rounds + 1))
        outs = [c.communicate(timeout=timeout) for c in crowds]
    finally:
        for p in [agg, *crowds]:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.perf_counter() - tic
    if agg.returncode != 0:
        raise RuntimeError(f"aggregator failed ({agg.returncode}):\n{agg_err[-3000:]}")
    a = _last_json(agg_out)
    cs = [_last_json(out) for out, _ in outs]
    steady = a["rounds"][1:] or a["rounds"]
    crowd_rss = [c["usage"]["peak_rss_mib"] - c["before"]["rss_mib"] for c in cs]
    crowd_fds = [c["connected"]["fds"] - c["before"]["fds"] for c in cs]
    return {
        "peers": peers,
        "model_bytes": model_bytes,
        "rounds": rounds,
        "crowds": len(cs),
        "round_s": _median([r["seconds"] for r in steady]),
        "first_round_s": a["rounds"][0]["seconds"],
        "agg_cpu_s_per_round": _median([r["cpu_s"] for r in steady]),
        "agg_rss_mib": max(r["rss_mib"] for r in a["rounds"]),
        "agg_peak_rss_mib": a["usage"]["peak_rss_mib"],
        "agg_idle_rss_mib": ready["usage"]["rss_mib"],
        "agg_fds": max(r["fds"] for r in a["rounds"]),
        "agg_idle_fds": ready["usage"]["fds"],
        "participants": [r["participants"] for r in a["rounds"]],
        "encodes": a["encodes"],
        "model_exact": a["model_exact"],
        "errors": a["errors"],
        "crowd_failed": sum(c["failed"] for c in cs),
        "crowd_errors": [e for c in cs for e in c["errors"]][:3],
        "join_s": max(c["first_download"] for c in cs),
        "crowd_peak_rss_mib_per_collaborator": sum(crowd_rss) / peers,
        "crowd_fds_per_collaborator": sum(crowd_fds) / peers,
        "crowd_resumes_per_collaborator_round": sum(c["resumes"] for c in cs) / (peers * rounds),
        "wall_s": wall,
        "inflight": inflight,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role")
    for role in ("aggregator", "crowd"):
        p = sub.add_parser(role)
        p.add_argument("--endpoint", required=True)
        p.add_argument("--peers", type=int, required=True)
        p.add_argument("--model-bytes", type=int, required=True)
        p.add_argument("--rounds", type=int, required=True)
        p.add_argument("--timeout", type=float, default=600.0)
        if role == "crowd":
            p.add_argument("--first", type=int, required=True)
            p.add_argument("--count", type=int, required=True)
            p.add_argument("--inflight", type=int, default=0)
    parser.add_argument("--peers", default="10,100,1000,10000")
    parser.add_argument("--models", default="4096,1048576", help="model sizes in bytes")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-crowd", type=int, default=2500)
    parser.add_argument(
        "--inflight",
        type=int,
        default=128,
        help="transfers each crowd keeps in flight per direction (0: no bound)",
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--quick", action="store_true", help="10 and 50 peers, 4 KiB, 2 rounds")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--rows",
        help="also append each run's figures to this JSON-lines file; with --report, "
        "write the docs from the runs it holds instead of measuring",
    )
    parser.add_argument("--report", action="store_true", help="see --rows")
    parser.add_argument("--out", default=str(REPO / "docs"))
    args = parser.parse_args(argv)
    if args.role == "aggregator":
        aggregator(args)
        return 0
    if args.role == "crowd":
        crowd(args)
        return 0
    peers = [int(x) for x in args.peers.split(",")]
    models = [int(x) for x in args.models.split(",")]
    rounds = args.rounds
    if args.quick:
        peers, models, rounds = [10, 50], [4096], 2
    given = argv if argv is not None else sys.argv[1:]
    command = "python tools/loadgen/run.py" + (" " + shlex.join(given) if given else "")
    tic = time.perf_counter()
    rows = []
    if args.report:
        if not args.rows:
            parser.error("--report needs --rows FILE")
        runs = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line]
        latest = {(r["peers"], r["model_bytes"]): r for r in runs}  # a re-run replaces a run
        rows = sorted(latest.values(), key=lambda r: (r["model_bytes"], r["peers"]))
        models = []
        runs_of = (r.pop("command", "?").replace(args.rows, "RUNS.jsonl") for r in rows)
        command = "`, `".join(dict.fromkeys(runs_of))
    for model in models:
        for n in peers:
            print(f"[{time.strftime('%H:%M:%S')}] {n} peers, {model} B model", flush=True)
            r = measure(n, model, rounds, args.per_crowd, args.timeout, args.inflight)
            print("   " + json.dumps(r), flush=True)
            rows.append(r)
            if args.rows:
                with open(args.rows, "a") as f:
                    f.write(json.dumps({**r, "command": command}) + "\n")
    if not args.no_write:
        from tools.loadgen.report import write

        minutes = sum(r["wall_s"] for r in rows) / 60 if args.report else None
        write(Path(args.out), rows, command, minutes or (time.perf_counter() - tic) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
