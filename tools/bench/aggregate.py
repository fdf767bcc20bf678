"""Aggregation: ``RunningFedAvg`` over N updates vs memory bandwidth and ``torch.stack().mean(0)``.

Throughput counts the bytes of the updates read (N x model). The reference is
the read bandwidth of those very updates measured right after the fold
(``torch.sum`` of every tensor once, all cores): the least any aggregation
must do, on the same pages. One big buffer's read and memcpy bandwidth are
reported beside it. Time is the steady state of an aggregator (the second
round: the running-sum buffers are reused, as ``reset()`` keeps them).
Memory is the peak extra resident memory (VmHWM after resetting it through
``/proc/self/clear_refs``) of a cold first round, including ``result()``,
in units of one model. The baseline is OpenFed's ``torch.stack(updates).mean(0)``
per tensor, timed and measured the same way.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from tools.bench.common import MiB, make_state_dict, peak_rss_reset, row, rss_status, state_bytes


def _best(fn: Any, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(nbytes: int = 512 * MiB, reps: int = 5) -> tuple[float, float]:
    """(read GB/s, memcpy GB/s counting bytes copied once) with all cores."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src).zero_()
    read = _best(src.sum, reps)
    copy = _best(lambda: dst.copy_(src), reps)
    return nbytes / read / 1e9, nbytes / copy / 1e9


def read_time(updates: list[Any], reps: int = 3) -> float:
    """Best time to read every tensor of every update once."""

    def read() -> None:
        for u in updates:
            for state in u.values():
                for t in state.values():
                    t.sum()

    return _best(read, reps)


def _updates(sd: dict[str, Any], n: int) -> list[dict[str, dict[str, Any]]]:
    out = []
    for i in range(n):
        out.append(
            {
                k: {"param": (v.clone().add_(i) if v.is_floating_point() else v.clone())}
                for k, v in sd.items()
            }
        )
    return out


def _measure(fn: Any) -> tuple[float, int]:
    """(seconds, peak extra bytes) of one call."""
    gc.collect()
    can = peak_rss_reset()
    rss0, _ = rss_status()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    _, hwm = rss_status()
    del out
    return dt, (hwm - rss0) if can else -1


def running_fedavg(sd: dict[str, Any], updates: list[Any]) -> tuple[float, float, int, int]:
    """Steady-state seconds of the fold and of fold+result, cold peak extra bytes of
    fold+result and of the fold alone."""
    from zmqfed.functional.running_mean import RunningFedAvg

    acc = RunningFedAvg(sd)

    def round_() -> Any:
        acc.reset()
        for i, u in enumerate(updates):
            acc.add(u, weight=1.0 + i % 3)
        return acc.result(in_place=True)  # the means in the sums' own buffers

    _, cold_mem = _measure(round_)  # cold: allocates the running sums
    fold_mem = acc.nbytes  # exactly what the running sums hold
    folds, totals = [], []
    for _ in range(6):  # best of 6 steady rounds: a 16 MiB round lasts ~10 ms
        acc.reset()
        t0 = time.perf_counter()
        for i, u in enumerate(updates):
            acc.add(u, weight=1.0 + i % 3)
        t1 = time.perf_counter()
        res = acc.result()
        t2 = time.perf_counter()
        del res
        folds.append(t1 - t0)
        totals.append(t2 - t0)
    acc.reset(keep_buffers=False)
    return min(folds), min(totals), cold_mem, fold_mem


def stack_mean(sd: dict[str, Any], updates: list[Any]) -> tuple[float, int]:
    import torch

    def agg() -> Any:
        out = {}
        for k in sd:
            xs = torch.stack([u[k]["param"] for u in updates])
            if not xs.is_floating_point():
                xs = xs.double()
            out[k] = xs.mean(0)
            del xs
        return out

    _, mem = _measure(agg)
    t = min(_measure(agg)[0] for _ in range(3))
    return t, mem


def run(quick: bool = False, log: Any = print) -> list[dict[str, Any]]:
    import torch

    threads = os.cpu_count() or 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(quick, threads, log)
    finally:
        torch.set_num_threads(before)


def _run(quick: bool, threads: int, log: Any) -> list[dict[str, Any]]:
    read_bw, copy_bw = memory_bandwidth(64 * MiB if quick else 512 * MiB)
    rows = [
        row(
            "memory read bandwidth (torch.sum, all cores)",
            read_bw,
            "GB/s",
            note=f"{threads} threads; reference of the aggregation rows",
        ),
        row("memcpy bandwidth (copy_ into preallocated)", copy_bw, "GB/s"),
    ]
    cases = [(1 * MiB, 4)] if quick else [(16 * MiB, 10), (16 * MiB, 50), (128 * MiB, 10)]
    for model, n in cases:
        sd = make_state_dict(model)
        mbytes = state_bytes(sd)
        updates = _updates(sd, n)
        label = f"N={n} x {model // MiB} MiB"
        log(f"aggregate {label}")
        fold, total, mem, fold_mem = running_fedavg(sd, updates)
        # the reference: reading the very same update bytes once (torch.sum per
        # tensor, same threads), the least any aggregation must do. It shares
        # the updates' pages (huge pages or not) and the per-tensor call
        # overhead, unlike one big buffer, and is taken right after the fold.
        case_bw = n * mbytes / read_time(updates) / 1e9
        tb, mem_b = stack_mean(sd, updates)
        inbytes = n * mbytes
        thr = inbytes / fold / 1e9
        rows.append(
            row(
                f"RunningFedAvg fold, {label}",
                thr,
                "GB/s",
                baseline=case_bw,
                baseline_name="read of the same updates (torch.sum)",
                ratio=thr / case_bw,
                target=">=0.5x",
                met=thr / case_bw >= 0.5,
                note=f"with result(): {inbytes / total / 1e9:.2f} GB/s",
            )
        )
        rows.append(
            row(
                f"RunningFedAvg peak extra memory, {label}",
                mem / mbytes,
                "models",
                target="<=2",
                met=(0 <= mem / mbytes <= 2.0) if mem >= 0 else None,
                note="fold + result(in_place=True), as apply() does; -1 = not measurable here",
            )
        )
        rows.append(
            row(
                f"RunningFedAvg running sums held, {label}",
                fold_mem / mbytes,
                "models",
                note="RunningFedAvg.nbytes: float32 sums, also for float16 tensors",
            )
        )
        rows.append(
            row(
                f"torch.stack().mean(0) (OpenFed) time, {label}",
                tb * 1e3,
                "ms",
                baseline=total * 1e3,
                baseline_name="RunningFedAvg fold+result",
                ratio=tb / total,
                note=f"{inbytes / tb / 1e9:.2f} GB/s; ratio = how many times slower",
            )
        )
        rows.append(
            row(
                f"torch.stack().mean(0) (OpenFed) peak extra memory, {label}",
                mem_b / mbytes,
                "models",
                note="stacked per tensor: N x the largest tensor + the means",
            )
        )
        del updates, sd
        gc.collect()
    return rows
