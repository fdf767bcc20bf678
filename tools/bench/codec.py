"""Compression: what ``auto`` picks, the lz4 ratio on a sparse delta, bytes saved.

Dense "trained" weights (normal, sigma 0.02) should go ``raw`` (lz4 gains
nothing there and is slower than loopback); a 90%-zero delta should go
``lz4``. Ratios are compressed/raw bytes; speeds are per core.
"""

from __future__ import annotations

import time
from typing import Any

from tools.bench.common import MiB, row


def _time(fn: Any, reps: int = 3) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(quick: bool = False, log: Any = print) -> list[dict[str, Any]]:
    import torch

    from zmqfed.wire import Envelope, decode, encode, encode_tensors

    size = 1 * MiB if quick else 32 * MiB
    gen = torch.Generator().manual_seed(0)
    n = size // 4
    dense = {f"w{i}": {"param": torch.randn(n // 8, generator=gen) * 0.02} for i in range(8)}
    delta = torch.randn(n, generator=gen) * 1e-3
    delta[torch.rand(n, generator=gen) < 0.9] = 0.0
    sparse = {"delta": {"param": delta}}
    rows = []

    log("codec: auto on dense weights")
    t_auto, enc = _time(lambda: encode_tensors(dense, codec="auto"))
    t_raw, _ = _time(lambda: encode_tensors(dense, codec="raw"))
    picked = sorted({d["codec"] for d in enc.descriptors})
    rows.append(
        row(
            "auto on dense fp32 weights: picks raw",
            float(picked == ["raw"]),
            "bool",
            target="raw",
            met=picked == ["raw"],
            note=f"picked {picked}; probe cost {(t_auto - t_raw) * 1e3:.2f} ms per {size // MiB} MiB",
        )
    )
    t_lz, enc_lz = _time(lambda: encode_tensors(dense, codec="lz4"), 1)
    rows.append(
        row(
            "lz4 forced on dense fp32 weights: size ratio",
            enc_lz.encoded_nbytes / enc_lz.nbytes,
            "compressed/raw",
            note=f"compress {enc_lz.nbytes / t_lz / 1e9:.2f} GB/s: why auto skips it",
        )
    )

    log("codec: auto on a 90%-sparse delta")
    t_c, enc_s = _time(lambda: encode_tensors(sparse, codec="auto"))
    picked_s = sorted({d["codec"] for d in enc_s.descriptors})
    ratio = enc_s.encoded_nbytes / enc_s.nbytes
    rows.append(
        row(
            "auto on 90%-sparse fp32 delta: lz4 size ratio",
            ratio,
            "compressed/raw",
            target="lz4 picked, <1",
            met=picked_s == ["lz4"] and ratio < 1.0,
            note=f"picked {picked_s}; compress {enc_s.nbytes / t_c / 1e9:.2f} GB/s",
        )
    )
    rows.append(
        row(
            "bytes saved on the sparse delta",
            float(enc_s.nbytes - enc_s.encoded_nbytes),
            "B",
            note=f"of {enc_s.nbytes} B ({100 * (1 - ratio):.1f}%)",
        )
    )
    frames = encode(Envelope(kind="PUSH", sender="c0"), encoded=enc_s)
    frames = [bytearray(f) if isinstance(f, bytes) else f for f in frames]
    t_d, env = _time(lambda: decode(frames))
    assert torch.equal(env.tensors["delta"]["param"], delta)
    rows.append(row("lz4 decode of the sparse delta", enc_s.nbytes / t_d / 1e9, "GB/s (raw bytes)"))
    return rows
