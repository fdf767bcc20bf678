"""Time and bytes per round of zmqfed's privacy mechanisms, relative to plain FedAvg.

Mechanisms: ``plain`` (FedAvg, the baseline), ``central`` (``central_dp`` on
the aggregator), ``local`` (``local_dp`` on every node), ``he-all`` (CKKS,
every layer encrypted: ``ckks_package`` + ``ckks_aggregation``) and
``he-head`` (CKKS on the output layer only); models: the digits MLP
(64-64-10, 4,810 parameters) and a 10M-parameter MLP (1024-4096-1408-10,
9,981,066 parameters); 8 and 100 collaborators.

Every cost is measured on the real code path, one piece at a time, in this
process's CPU seconds (the machine is shared; SEAL and torch run on one
thread): the aggregator serving the model (package hooks + wire encoding),
a collaborator receiving it (wire decoding + unpackage hooks: CKKS
decryption), the collaborator's upload (package hooks: DP clipping and
noise, CKKS encryption + wire encoding), the aggregator taking one upload
(wire decoding + unpackage hooks + the ``upload_handled`` hooks: central
DP's clip) and the aggregation (rule + ``aggregated`` hooks: central DP's
noise), timed on a few uploads and fitted as ``a + b * uploads``. Bytes are
the encoded frames. A round's time is then what is on its critical path,
with collaborators working in parallel and the aggregator taking uploads
one by one as zmqfed's loop does::

    round = serve + collaborator download + collaborator upload
            + N * aggregator per upload + aggregation(N)

Training is left out (it is the same with or without the mechanism), and so
is the wire time (the bytes column says what the network must carry).
Results go to ``docs/bench/privacy.jsonl`` and a Markdown table to stdout
(the one in ``docs/privacy.md``)::

    .venv/bin/python tools/privacy_bench.py
    .venv/bin/python tools/privacy_bench.py --models digits --clients 8

``--end-to-end`` instead runs the digits federation itself (8 collaborators,
one process per node over real sockets, training included, like ``make
demo``) once per mechanism and reports the aggregator's measured round time
(wall clock, rounds after the first) and bytes (``RoundRecord``)::

    .venv/bin/python tools/privacy_bench.py --end-to-end --rounds 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MECHANISMS = ("plain", "central", "local", "he-all", "he-head")
HEAD = {"digits": "2.*", "10m": "4.*"}  # the output layer


def build(model: str) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if model == "digits":
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(
        nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1408), nn.ReLU(), nn.Linear(1408, 10)
    )


def cpu(fn: Callable[[], Any]) -> tuple[float, Any]:
    tic = time.process_time()
    out = fn()
    return time.process_time() - tic, out


def frames_bytes(frames: Sequence[Any]) -> int:
    return sum(memoryview(f).nbytes for f in frames)


def measure(mechanism: str, model_name: str, keys: Any, uploads: int) -> dict[str, Any]:
    """The per-piece costs of one mechanism on one model (see the module docstring)."""
    import torch

    import zmqfed.topo as topo
    from zmqfed.api import aggregate_and_step
    from zmqfed.core import Maintainer, step_points
    from zmqfed.federated import MemoryNetwork
    from zmqfed.functional import (
        central_dp,
        ckks_aggregation,
        ckks_package,
        local_dp,
        naive_aggregation,
    )
    from zmqfed.meta import Meta
    from zmqfed.optim import FederatedOptimizer
    from zmqfed.wire import Envelope, Limits, decode, encode

    server, client = build(model_name), build(model_name)
    star = topo.star(1, "ipc:///memory/privacy-bench")
    limits = Limits.for_model(server.state_dict(), headroom=10)  # ciphertexts: 8x the model
    agg = Maintainer(
        topo.analysis(star, "aggregator")[0],
        server.state_dict(keep_vars=True),
        network=MemoryNetwork(),
        limits=limits,
    )
    col = Maintainer(
        topo.analysis(star, "client0")[0],
        client.state_dict(keep_vars=True),
        network=MemoryNetwork(),
        limits=limits,
    )
    rule: Any = naive_aggregation
    kwargs: dict[str, Any] = {}
    public, secret = keys
    if mechanism == "central":
        with agg:
            central_dp(1.0, 1.0, seed=0)
    elif mechanism == "local":
        for m in (agg, col):
            with m:
                local_dp(1.0, 1.0, seed=0)
    elif mechanism.startswith("he"):
        layers = None if mechanism == "he-all" else HEAD[model_name]
        with col:
            ckks_package(secret, layers=layers)
        with agg:
            ckks_package(public)
        rule, kwargs = ckks_aggregation, {"keys": public}
    optim = FederatedOptimizer(torch.optim.SGD(server.parameters(), lr=1.0), "aggregator")
    gen = torch.Generator().manual_seed(1)

    def one_round(k: int) -> dict[str, float]:
        agg.meta["version"] = agg.version
        t_serve, frames = cpu(
            lambda: encode(
                Envelope("DATA", "aggregator", meta=dict(agg.meta), tensors=agg._served()),
                limits=limits,
            )
        )
        down = frames_bytes(frames)

        def receive() -> None:
            env = decode(frames, limits=limits)
            col.data = col.receive(env.tensors, "aggregator")
            col.unpackage()

        t_down, _ = cpu(receive)
        with torch.no_grad():  # "training": a small step away from the served model
            for p in client.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
        col.update_version(agg.version + 1)
        col.meta["instances"] = 100
        col.package()

        def upload() -> list[Any]:
            tensors = col.apply_hooks(col.packaged_data, unpackage=False)
            meta = Meta(col.meta).to_json_dict()
            return encode(Envelope("PUSH", "client0", meta=meta, tensors=tensors), limits=limits)

        t_up, up_frames = cpu(upload)
        up = frames_bytes(up_frames)

        def take() -> None:
            env = decode(up_frames, limits=limits)
            agg.record_upload(agg.receive(env.tensors, "client0"), Meta(env.meta), "client0")
            agg.run_step_point(step_points.upload_handled, None, True)

        agg.run_step_point(step_points.step_started, None)
        t_take = 0.0
        for _ in range(k):
            t, _ = cpu(take)
            t_take += t
        t_agg, _ = cpu(lambda: aggregate_and_step(agg, [optim], rule, **kwargs))
        agg.clear()
        agg.update_version()
        return {
            "serve": t_serve,
            "down": t_down,
            "up": t_up,
            "take": t_take / k,
            "agg": t_agg,
            "bytes_up": up,
            "bytes_down": down,
        }

    one_round(1)  # warm up; with CKKS the next download is the encrypted aggregate
    small, large = one_round(1), one_round(uploads)
    slope = max(0.0, (large["agg"] - small["agg"]) / (uploads - 1))
    base = max(0.0, small["agg"] - slope)
    agg.close()
    col.close()
    return {
        "mechanism": mechanism,
        "model": model_name,
        "params": sum(p.numel() for p in server.parameters()),
        "serve_s": large["serve"],
        "download_s": large["down"],
        "upload_s": large["up"],
        "take_s": (small["take"] + large["take"]) / 2,
        "aggregate_base_s": base,
        "aggregate_per_upload_s": slope,
        "bytes_up": large["bytes_up"],
        "bytes_down": large["bytes_down"],
    }


def per_round(row: dict[str, Any], clients: int) -> tuple[float, int]:
    seconds = (
        row["serve_s"]
        + row["download_s"]
        + row["upload_s"]
        + clients * row["take_s"]
        + row["aggregate_base_s"]
        + clients * row["aggregate_per_upload_s"]
    )
    return seconds, clients * (row["bytes_up"] + row["bytes_down"])


def table(rows: Sequence[dict[str, Any]], clients: Sequence[int]) -> str:
    out = [
        "| model | collaborators | mechanism | time per round | vs plain | bytes per round | vs plain | collaborator: down + up | aggregator per upload |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["mechanism"]: r for r in rows if r["model"] == model}
        plain = mine["plain"]
        for n in clients:
            t0, b0 = per_round(plain, n)
            for mech, r in mine.items():
                t, b = per_round(r, n)
                out.append(
                    f"| {model} ({r['params']:,}) | {n} | {mech} | {t:.3g} s | {t / t0:.2f}x | "
                    f"{b / 1e6:.4g} MB | {b / b0:.2f}x | {r['download_s'] + r['upload_s']:.3g} s | "
                    f"{r['take_s'] + r['aggregate_per_upload_s']:.3g} s |"
                )
    return "\n".join(out)


def end_to_end(mechanisms: Sequence[str], rounds: int) -> str:
    """The digits federation per mechanism over real sockets; a Markdown table."""
    import os
    import statistics
    import tempfile

    from zmqfed.functional import ckks_key_gen
    from zmqfed.sim import Simulation, star_topology

    os.chdir(REPO_ROOT)  # the app module lives in examples/
    options = {
        "plain": [],
        "central": ["dp=central", "noise=0.5"],
        "local": ["dp=local", "noise=0.1"],
        "he-all": ["he=all"],
        "he-head": ["he=head"],
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="zmqfed-privacy-") as tmp:
        public, secret = ckks_key_gen()
        public.save(f"{tmp}/public.ckks")
        secret.save(f"{tmp}/secret.ckks")
        for mech in ["plain", *[m for m in mechanisms if m != "plain"]]:
            nodes = Path(tmp) / mech
            nodes.mkdir()
            sim = Simulation(
                star_topology(8, nodes),
                "examples.digits.daemon:factory",
                nodes,
                rounds=rounds,
                options=["seed=0", f"he_keys={tmp}", *options[mech]],
            )
            with sim:
                sim.wait(900)
            lines = (nodes / "aggregator.rounds.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines if line.strip()][1:]
            seconds = statistics.median(r["seconds"] for r in records)
            nbytes = statistics.median(r["bytes_in"] + r["bytes_out"] for r in records)
            rows.append((mech, seconds, nbytes))
            print(f"end-to-end {mech}: {seconds:.3f} s, {nbytes / 1e6:.3f} MB", file=sys.stderr)
    t0, b0 = rows[0][1], rows[0][2]
    out = [
        "| digits, 8 collaborators, real sockets | round time (median) | vs plain | bytes per round | vs plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for mech, t, b in rows:
        out.append(f"| {mech} | {t:.3f} s | {t / t0:.2f}x | {b / 1e6:.3f} MB | {b / b0:.2f}x |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=("digits", "10m"), default=["digits", "10m"])
    parser.add_argument("--mechanisms", nargs="+", choices=MECHANISMS, default=list(MECHANISMS))
    parser.add_argument("--clients", nargs="+", type=int, default=[8, 100])
    parser.add_argument("--uploads", type=int, default=4, help="uploads timed per aggregation")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "bench" / "privacy.jsonl"))
    parser.add_argument("--end-to-end", action="store_true", help="digits over real sockets")
    parser.add_argument("--rounds", type=int, default=10, help="--end-to-end: rounds per run")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    if args.end_to_end:
        print(end_to_end(args.mechanisms, args.rounds))
        return 0
    import torch

    from zmqfed.functional import ckks_key_gen

    torch.set_num_threads(1)
    keys = ckks_key_gen(n_threads=1)
    rows = []
    for model in args.models:
        for mechanism in ["plain", *[m for m in args.mechanisms if m != "plain"]]:
            tic = time.perf_counter()
            row = measure(mechanism, model, keys, args.uploads)
            rows.append(row)
            print(
                f"{model} {mechanism}: {time.perf_counter() - tic:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    with open(args.out, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d")}) + "\n")
    print(table(rows, args.clients))
    return 0


if __name__ == "__main__":
    sys.exit(main())
