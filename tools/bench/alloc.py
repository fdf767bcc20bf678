"""Fresh receive memory: filling a fresh tensor, a huge-page mapping and a warm buffer.

A receiver that lands data in fresh tensors (an aggregator receiving uploads)
pays for faulting their pages in. This family fills 256 MiB by copying into
a fresh ``torch.empty``, into ``zmqfed.federated.chunked.fresh_tensor`` (an
anonymous mapping advised to use transparent huge pages) and into a buffer
already faulted in, and reports each against the warm copy (median of 5).
"""

from __future__ import annotations

import gc
import time
from typing import Any

from tools.bench.common import MiB, median, row


def run(quick: bool = False, log: Any = print) -> list[dict[str, Any]]:
    """Rows of the alloc family."""
    import torch

    from zmqfed.federated.chunked import fresh_tensor

    n = (16 if quick else 256) * MiB
    src = torch.ones(n, dtype=torch.uint8)
    warm = torch.empty(n, dtype=torch.uint8)
    warm.copy_(src)
    makers = {
        "warm buffer": lambda: warm,
        "fresh torch.empty": lambda: torch.empty(n, dtype=torch.uint8),
        "fresh_tensor (huge pages)": lambda: fresh_tensor((n,), torch.uint8),
    }
    speeds: dict[str, list[float]] = {name: [] for name in makers}
    log(f"alloc: filling {n // MiB} MiB five times each way")
    for _ in range(5):
        for name, make in makers.items():
            t0 = time.perf_counter()
            t = make()
            t.copy_(src)
            speeds[name].append(n / (time.perf_counter() - t0) / 1e9)
            del t
            gc.collect()
    base = median(speeds["warm buffer"])
    rows = [
        row(f"fill {n // MiB} MiB, warm buffer", base, "GB/s", note="memcpy into faulted pages")
    ]
    for name in ("fresh torch.empty", "fresh_tensor (huge pages)"):
        value = median(speeds[name])
        rows.append(
            row(
                f"fill {n // MiB} MiB, {name}",
                value,
                "GB/s",
                baseline=base,
                baseline_name="warm buffer",
                ratio=value / base,
                note="runs: " + ", ".join(f"{x:.2f}" for x in speeds[name]),
            )
        )
    return rows
