"""Header cost per tensor: bytes, and the time to validate a header, for real layouts.

Every message lists its tensors in the header (docs/protocol.md §3); this
family measures what that costs per tensor, for the names of real models and
for 10,000 tensors with optimizer state, and checks that each fits the bound
``Limits.for_model`` derives from the model (no tensor count a user can hit).
"""

from __future__ import annotations

import time
from typing import Any

from tools.bench.common import row


def _layouts(quick: bool) -> list[tuple[str, dict[str, Any], tuple[str, ...]]]:
    import torch

    def zeros(names: list[str]) -> dict[str, Any]:
        return {n: torch.zeros(1) for n in names}

    seq = zeros([f"{i}.{w}" for i in range(400) for w in ("weight", "bias")])
    gpt2 = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(12):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            gpt2 += [f"transformer.h.{i}.{part}.weight", f"transformer.h.{i}.{part}.bias"]
    gpt2 += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    n = 1000 if quick else 10_000
    many = zeros([f"model.layers.{i // 10}.block.{i % 10}.weight" for i in range(n)])
    adam = ("param", "exp_avg", "exp_avg_sq")
    return [
        ("nn.Sequential of 400 Linear (800 tensors)", seq, ("param",)),
        ("GPT-2 small names (148 tensors)", zeros(gpt2), ("param",)),
        (f"{n:,} tensors with Adam state (3 fields each)", many, adam),
    ]


def run(quick: bool = False, log: Any = print) -> list[dict[str, Any]]:
    """Rows of the header family."""
    from zmqfed.wire import Envelope, Limits, encode
    from zmqfed.wire.header import parse_header

    rows: list[dict[str, Any]] = []
    for label, sd, fields in _layouts(quick):
        log(f"header: {label}")
        tensors = {k: {f: v for f in fields} for k, v in sd.items()}
        env = Envelope("PUSH", "collaborator", tensors=tensors)
        limits = Limits.for_model(sd)
        header = encode(env, limits=limits)[0]
        count = len(sd) * len(fields)
        reps = 3 if quick else 7
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            parse_header(header, limits)
            times.append(time.perf_counter() - t0)
        best = min(times)
        fits = len(header) <= limits.max_header_bytes
        rows.append(
            row(
                f"header bytes per tensor, {label}",
                len(header) / count,
                "B",
                baseline=limits.max_header_bytes / len(sd),
                baseline_name="Limits.for_model bound per tensor",
                ratio=len(header) / limits.max_header_bytes,
                target="<=1x (fits the bound)",
                met=fits,
                note=f"header {len(header):,} B for {count:,} descriptors; "
                f"bound {limits.max_header_bytes:,} B",
            )
        )
        rows.append(
            row(
                f"header validation per descriptor, {label}",
                best / count * 1e6,
                "us",
                note=f"parse_header: {best * 1e3:.1f} ms for {count:,} descriptors (best of {reps})",
            )
        )
    return rows
