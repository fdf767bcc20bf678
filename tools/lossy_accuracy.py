"""Bytes and accuracy of the lossy compression hooks on the digits FedAvg federation.

For each codec, runs the digits app (``examples/digits/daemon.py``: 8
collaborators with Dirichlet(0.5) parts, an MLP 64-64-10, FedAvg) as one
process per node over real sockets (``zmqfed.sim.Simulation``, like
``python -m zmqfed.demo``), with the codec registered on every node. Then
prints a Markdown table (the one in ``docs/compression.md``)::

    .venv/bin/python tools/lossy_accuracy.py                 # none fp16 bf16 int8 topk-10% topk-1%
    .venv/bin/python tools/lossy_accuracy.py --codecs none int8-affine topk-1%-noef --rounds 10

Bytes are tensor bytes as the aggregator counts them (``RoundRecord.bytes_in``
/ ``bytes_out``: every upload and every download of the round, message headers
excluded). Accuracy is the global model's on the held-out digits after the
last round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
APP = "tools.lossy_accuracy:factory"


def _codecs() -> dict[str, Callable[[], Any]]:
    import torch

    from zmqfed.functional import half_precision, int8_quantization, topk_sparsification

    return {
        "none": lambda: None,
        "fp16": lambda: half_precision(torch.float16),
        "bf16": lambda: half_precision(torch.bfloat16),
        "int8": lambda: int8_quantization(),
        "int8-affine": lambda: int8_quantization(symmetric=False),
        "topk-10%": lambda: topk_sparsification(0.1),
        "topk-1%": lambda: topk_sparsification(0.01),
        "topk-10%-noef": lambda: topk_sparsification(0.1, error_feedback=False),
        "topk-1%-noef": lambda: topk_sparsification(0.01, error_feedback=False),
    }


DEFAULT = ("none", "fp16", "bf16", "int8", "topk-10%", "topk-1%")
WHAT = {
    "none": "float32, as the model is",
    "fp16": "`half_precision(torch.float16)`, both ways",
    "bf16": "`half_precision(torch.bfloat16)`, both ways",
    "int8": "`int8_quantization()`, both ways",
    "int8-affine": "`int8_quantization(symmetric=False)`, both ways",
    "topk-10%": "`topk_sparsification(0.1)`, uploads, error feedback",
    "topk-1%": "`topk_sparsification(0.01)`, uploads, error feedback",
    "topk-10%-noef": "`topk_sparsification(0.1, error_feedback=False)`",
    "topk-1%-noef": "`topk_sparsification(0.01, error_feedback=False)`",
}
CODECS = tuple(WHAT)


# --------------------------------------------------------------------------- node side


def factory(ctx: Any) -> Any:
    """``examples.digits.daemon:factory`` with the codec ``--set compress=NAME`` on every maintainer."""
    from examples.digits.daemon import factory as digits_factory

    register = _codecs()[ctx.options.get("compress", "none")]
    app = digits_factory(ctx)
    app.configure = lambda m: register()
    return app


# --------------------------------------------------------------------------- driver


@dataclass
class Result:
    codec: str
    accuracy: float
    rounds: int
    upload_bytes: float  # per round, all collaborators
    download_bytes: float
    participants: list[int]
    seconds: float


def run_codec(
    codec: str,
    workdir: Path,
    *,
    clients: int,
    rounds: int,
    options: Sequence[str],
    transport: str,
    timeout: float,
) -> Result:
    """One federation with ``codec`` on every node; its round records summarised."""
    from zmqfed.sim import Simulation, star_topology

    nodes = workdir / codec.replace("%", "pct")
    nodes.mkdir(parents=True)
    topology = star_topology(clients, nodes, transport)
    sim = Simulation(topology, APP, nodes, rounds=rounds, options=[f"compress={codec}", *options])
    tic = time.perf_counter()
    with sim:
        sim.wait(timeout)
    seconds = time.perf_counter() - tic
    lines = (nodes / "aggregator.rounds.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    if len(records) != rounds:
        raise RuntimeError(f"{codec}: {len(records)} round records, expected {rounds} ({nodes})")
    return Result(
        codec=codec,
        accuracy=float(records[-1]["metrics"]["test_accuracy"]),
        rounds=len(records),
        upload_bytes=sum(r["bytes_in"] for r in records) / len(records),
        download_bytes=sum(r["bytes_out"] for r in records) / len(records),
        participants=[int(r["participants"]) for r in records],
        seconds=seconds,
    )


def raw_upload_bytes(seed: int, clients: int) -> int:
    """Tensor bytes of one round's uploads without compression."""
    from examples.digits.app import build_model

    model = build_model(seed)
    return clients * sum(t.numel() * t.element_size() for t in model.state_dict().values())


def table(results: Sequence[Result], raw: int) -> str:
    base = next((r for r in results if r.codec == "none"), None)
    rows = [
        "| codec | what | upload kB / round | vs raw | download kB / round "
        "| final accuracy | vs none | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = raw / r.upload_bytes
        saved = 1 - r.upload_bytes / raw
        delta = "-" if base is None or r is base else f"{r.accuracy - base.accuracy:+.4f}"
        rows.append(
            f"| {r.codec} | {WHAT[r.codec]} | {r.upload_bytes / 1e3:.1f} "
            f"| {ratio:.1f}x ({saved:.0%} saved) | {r.download_bytes / 1e3:.1f} "
            f"| {r.accuracy:.4f} | {delta} | {r.seconds:.0f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codecs", nargs="+", choices=CODECS, default=list(DEFAULT))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="local epochs (app default: 3)")
    p.add_argument("--transport", choices=("ipc", "tcp"), default="ipc")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per federation")
    p.add_argument("--out", default=None, help="keep the node logs here (default: a temp dir)")
    args = p.parse_args(argv)
    os.chdir(REPO_ROOT)  # the nodes import examples/ and tools/ from the working directory
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    options = [f"alpha={args.alpha}", f"seed={args.seed}"]
    if args.epochs is not None:
        options.append(f"epochs={args.epochs}")

    with tempfile.TemporaryDirectory(prefix="zmqfed-lossy-") as tmp:
        workdir = Path(args.out).resolve() if args.out else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = []
        for codec in args.codecs:
            r = run_codec(
                codec,
                workdir,
                clients=args.clients,
                rounds=args.rounds,
                options=options,
                transport=args.transport,
                timeout=args.timeout,
            )
            print(
                f"{codec}: accuracy {r.accuracy:.4f}, uploads {r.upload_bytes / 1e3:.1f} kB/round, "
                f"{r.seconds:.0f} s",
                flush=True,
            )
            results.append(r)
    raw = raw_upload_bytes(args.seed, args.clients)
    full = all(n == args.clients for r in results for n in r.participants)
    print(
        f"\ndigits FedAvg, {args.clients} clients, Dirichlet({args.alpha}), {args.rounds} rounds, "
        f"seed {args.seed}, {args.transport}; raw uploads {raw / 1e3:.1f} kB/round; "
        f"all clients in every round: {'yes' if full else 'no'}\n"
    )
    print(table(results, raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
