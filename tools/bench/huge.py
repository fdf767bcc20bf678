"""Huge models: a 2 GiB state dict and a single 1.5 GiB tensor, streamed under credit.

Each case runs an aggregator and a collaborator in their own processes:

1. download: the aggregator serves its model; the collaborator receives it
   straight into its own tensors (``download_in_place``);
2. upload: the collaborator uploads the model; the aggregator receives it into
   fresh tensors (it must keep its own model to average into).

Each process reports its peak RSS (VmHWM, reset right before the step) above
its RSS at that moment, when its own model and the Maintainer already exist.
The bound is the window for a sender (chunks go out from the model's own
tensors) and for a receiver that lands the data in its own tensors, and
``model + window`` for one that must receive into fresh tensors (the
aggregator, which keeps its model to average into).  The values are checked
on arrival (every tensor holds a distinct constant).
"""

from __future__ import annotations

import time
from typing import Any

from tools.bench.baselines import raw_socket
from tools.bench.common import (
    MiB,
    Proc,
    child_setup,
    free_port,
    gbps,
    peak_rss_reset,
    row,
    rss_status,
    run_procs,
    star_props,
)

GiB = 1024 * MiB


def _layout(total: int, single: bool) -> list[tuple[str, int]]:
    """(name, float32 elements): one tensor, or 32 MiB blocks with small ones between."""
    if single:
        return [("w", total // 4)]
    out: list[tuple[str, int]] = []
    size, i = 0, 0
    while size < total:
        n = min(32 * MiB, total - size) // 4
        out.append((f"block{i}.weight", n))
        out.append((f"block{i}.bias", 1000 + i))
        size += n * 4 + (1000 + i) * 4
        i += 1
    return out


def _model(total: int, single: bool, *, fill: bool) -> dict[str, Any]:
    import torch

    sd = {}
    for i, (name, n) in enumerate(_layout(total, single)):
        t = torch.empty(n)
        t.fill_(float(i + 1) if fill else 0.0)  # touches every page
        sd[name] = t
    return sd


def _check(sd: dict[str, Any], single: bool, total: int) -> bool:
    return all(
        t[0].item() == float(i + 1) and t[-1].item() == float(i + 1)
        for i, t in enumerate(sd[name] for name, _ in _layout(total, single))
    )


def _peak_during(fn: Any) -> int:
    """Peak RSS while ``fn()`` runs, above the RSS just before it."""
    peak_rss_reset()
    before = rss_status()[0]
    fn()
    return rss_status()[1] - before


def _stream_config(window: int, quick: bool) -> Any:
    """The defaults; the smoke run streams its small model under a small threshold."""
    from zmqfed.wire import StreamConfig

    if quick:
        return StreamConfig(threshold=4 * MiB, chunk_bytes=2 * MiB, window_bytes=window)
    return StreamConfig(window_bytes=window)


def _aggregator(
    endpoint: str, total: int, single: bool, window: int, quick: bool, done: Any
) -> dict[str, Any]:
    child_setup()
    from zmqfed.core import Maintainer

    sd = _model(total, single, fill=True)
    m = Maintainer(
        star_props(endpoint, ["c0"], "aggregator"),
        sd,
        stream=_stream_config(window, quick),
        idle_interval=0.05,
    )
    out: dict[str, Any] = {}
    try:
        m.register_step_hook(0, lambda m, flag: m.manual_stop(), "after_upload")
        out["down_peak"] = _peak_during(lambda: m.step(timeout=600))  # serve one download
        m.register_step_hook(0, lambda m, flag: m.manual_stop(), "after_download")
        out["up_peak"] = _peak_during(lambda: m.step(timeout=600))  # receive one upload
        upload = m.data_list[0]
        out["up_ok"] = _check({n: upload[p]["param"] for n, p in sd.items()}, single, total)
        done.wait(600)
    finally:
        m.close()
    return out


def _collaborator(
    endpoint: str, total: int, single: bool, window: int, quick: bool, done: Any
) -> dict[str, Any]:
    child_setup()
    from zmqfed.core import Maintainer

    sd = _model(total, single, fill=False)
    m = Maintainer(
        star_props(endpoint, ["c0"], "c0"),
        sd,
        stream=_stream_config(window, quick),
        download_in_place=True,
    )
    out: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        out["down_peak"] = _peak_during(lambda: m.step(upload=False, timeout=600))
        out["down_s"] = time.perf_counter() - t0
        out["down_ok"] = _check(sd, single, total)
        m.package()
        t0 = time.perf_counter()
        out["up_peak"] = _peak_during(lambda: m.step(download=False, timeout=600))
        out["up_s"] = time.perf_counter() - t0
    finally:
        done.set()
        m.close()
    return out


def huge_transfer(
    total: int, single: bool, window: int, quick: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(aggregator, collaborator) reports of one download and one upload of ``total`` bytes."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"

    def make(ctx: Any) -> list[Proc]:
        done = ctx.Event()
        return [
            Proc(_aggregator, (endpoint, total, single, window, quick, done)),
            Proc(_collaborator, (endpoint, total, single, window, quick, done)),
        ]

    agg, col = run_procs(make, timeout=1200)
    return agg, col


def run(quick: bool = False, log: Any = print) -> list[dict[str, Any]]:
    """Rows of the huge-model family (``quick``: 48 MiB models, streamed all the same)."""
    from zmqfed.wire import DEFAULT_STREAM

    window = DEFAULT_STREAM.window_bytes
    cases = (
        [("state dict", 48 * MiB, False)]
        if quick
        else [("2 GiB state dict", 2 * GiB, False), ("single 1.5 GiB tensor", 3 * GiB // 2, True)]
    )
    rows: list[dict[str, Any]] = []
    for label, total, single in cases:
        if quick:  # small models stream only under a small threshold
            window = 8 * MiB
        log(f"huge {label}: raw socket")
        raw = min(raw_socket(total, 2))
        log(f"huge {label}: zmqfed download and upload")
        agg, col = huge_transfer(total, single, window, quick)
        for what, seconds, sender, receiver, ok in (
            ("download", col["down_s"], agg["down_peak"], col["down_peak"], col["down_ok"]),
            ("upload", col["up_s"], col["up_peak"], agg["up_peak"], agg["up_ok"]),
        ):
            rows.append(
                row(
                    f"huge {what}, {label}",
                    gbps(total, seconds),
                    "GB/s",
                    baseline=gbps(total, raw),
                    baseline_name="raw TCP sendall->recv_into",
                    ratio=raw / seconds,
                    note="values checked on arrival" if ok else "VALUES WRONG",
                    met=None if ok else False,
                )
            )
            for side, peak in (("sender", sender), ("receiver", receiver)):
                fresh = what == "upload" and side == "receiver"
                bound = total + window if fresh else window
                how = {
                    "sender": "chunks sent from the model's own tensors",
                    "receiver": "received into fresh tensors"
                    if fresh
                    else "received into the collaborator's own tensors",
                }[side]
                rows.append(
                    row(
                        f"huge {what}: {side}'s extra peak RSS, {label}",
                        peak / MiB,
                        "MiB",
                        baseline=bound / MiB,
                        baseline_name="model + window" if fresh else "window",
                        ratio=peak / bound,
                        target="<=1x",
                        met=peak <= bound,
                        note=f"{how}; window {window // MiB} MiB",
                    )
                )
    return rows
