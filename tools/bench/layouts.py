"""Transfers of real layouts: real architectures and a layout whose largest tensor is half the model.

The synthetic ``transfer`` family's tensors are at most 16 MiB; real models
are not shaped like that (GPT-2's token embedding is 147 MiB). Each case here
runs an aggregator and a collaborator in their own processes and times:

- **download in place**: ``step(upload=False)`` of a collaborator with
  ``download_in_place=True``, until it returns with the values in the
  model's own tensors (``unpackage`` then copies nothing; its time is added);
- **download + unpackage**: the default collaborator, ``step(upload=False)``
  then ``unpackage()`` into the model;
- **upload**: ``step(download=False)`` until the aggregator's ACK, sent after
  it received the upload into fresh tensors and checked it;

each against the raw-socket limit (``sendall`` into ``recv_into`` one
preallocated buffer) measured on the same bytes in the same run, with the
peak RSS each end added during the timed steps (VmHWM, reset after warm-up).
Layouts: ``halves`` (tensors of 1/2, 1/4, 1/8, ... of the model) at 128 MiB,
512 MiB and 2 GiB, and ResNet-50, BERT-base and GPT-2 small at full size
(:mod:`tools.bench.models`; GPT-2's tied head counted once). The LoRA case
reports the bytes one collaborator exchanges against the whole model.
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
    median,
    peak_rss_reset,
    row,
    rss_status,
    run_procs,
    star_props,
)

GiB = 1024 * MiB


def build_state(spec: str, *, fill: bool) -> dict[str, Any]:
    """The state dict of ``spec``: ``halves:BYTES`` or ``model:NAME`` (full size)."""
    import torch

    kind, _, arg = spec.partition(":")
    if kind == "halves":
        total = int(arg)
        sd: dict[str, Any] = {}
        size, i = total // 2, 0
        while size >= 4096:
            sd[f"layer{i}.weight"] = torch.empty(size // 4)
            size //= 2
            i += 1
        rest = (total - sum(t.numel() * 4 for t in sd.values())) // 4
        sd["rest.bias"] = torch.empty(max(rest, 1))
        for j, t in enumerate(sd.values()):
            t.fill_(float(j + 1) if fill else 0.0)  # faults every page in
        return sd
    from tools.bench.models import build

    model = build(arg, "full", seed=0)
    out = model.state_dict(keep_vars=True)
    if not fill:
        with torch.no_grad():
            for t in {id(t): t for t in out.values()}.values():
                t.zero_()
    return out


def unique_bytes(sd: dict[str, Any]) -> int:
    """Bytes of the distinct tensors (tied names once)."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in sd.values()}.values())


def _stream(quick: bool) -> Any:
    from zmqfed.wire import StreamConfig

    return StreamConfig(threshold=4 * MiB, chunk_bytes=MiB) if quick else StreamConfig()


def _aggregator(
    endpoint: str, spec: str, reps: int, quick: bool, phases: Any, done: Any
) -> dict[str, Any]:
    child_setup()
    from zmqfed.core import Maintainer

    sd = build_state(spec, fill=True)
    m = Maintainer(
        star_props(endpoint, ["c0"], "aggregator"), sd, stream=_stream(quick), idle_interval=0.05
    )
    out: dict[str, Any] = {}
    counts = {"served": 0, "handled": 0}

    def after_serve(m: Any, flag: Any) -> None:
        counts["served"] += 1
        if counts["served"] == 1:  # the warm-up is done: the timed downloads start
            out["down_base"] = rss_status()[0]
            peak_rss_reset()

    def after_upload(m: Any, flag: Any) -> None:
        counts["handled"] += 1
        m.data_list.clear()  # uploads are not kept: memory stays flat
        m.meta_list.clear()
        m.data = {}
        m.update_version()  # a member's update counts once per version: move on
        if counts["handled"] == 1:
            out["up_base"] = rss_status()[0]
            peak_rss_reset()

    phase = {"event": phases[0]}

    def until_phase_done(ctx: Any) -> None:
        # the step runs until the collaborator says its phase is over, so a
        # slow streamed download is never cut short by the end of a step
        if phase["event"].is_set():
            ctx.maintainer.manual_stop()

    try:
        m.register_step_hook(0, after_serve, "after_upload")
        m.register_step_hook(0, after_upload, "after_download")
        m.on("after_peer", until_phase_done)
        m.step(timeout=1800)
        out["down_peak"] = rss_status()[1] - out.get("down_base", 0)
        phase["event"] = phases[1]
        m.step(timeout=1800)
        out["up_peak"] = rss_status()[1] - out.get("up_base", 0)
        done.wait(600)
    finally:
        m.close()
    return out


def _timed(fn: Any, reps: int) -> tuple[list[float], int]:
    """Seconds of ``reps`` calls after one warm-up, and the peak RSS added meanwhile."""
    fn()
    base = rss_status()[0]
    peak_rss_reset()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, rss_status()[1] - base


def _collaborator(
    endpoint: str, spec: str, reps: int, quick: bool, phases: Any, done: Any
) -> dict[str, Any]:
    child_setup()
    from zmqfed.core import Maintainer

    sd = build_state(spec, fill=False)
    props = star_props(endpoint, ["c0"], "c0")
    out: dict[str, Any] = {}
    try:
        inplace = Maintainer(props, sd, stream=_stream(quick), download_in_place=True)

        def down_in_place() -> None:
            inplace.step(upload=False, timeout=1200)
            inplace.unpackage()

        out["inplace"], out["inplace_peak"] = _timed(down_in_place, reps)
        probe = next(iter(sd.values()))
        out["inplace_ok"] = bool(probe.detach().any())  # the collaborator started at zeros
        inplace.close()
        m = Maintainer(props, sd, stream=_stream(quick))

        def down_unpackage() -> None:
            m.step(upload=False, timeout=1200)
            m.unpackage()

        out["copy"], out["copy_peak"] = _timed(down_unpackage, reps)
        phases[0].set()
        m.package()
        out["up"], out["up_peak"] = _timed(lambda: m.step(download=False, timeout=1200), reps)
        phases[1].set()
        m.close()
    finally:
        phases[0].set()
        phases[1].set()
        done.set()
    return out


def layout_transfer(spec: str, reps: int, quick: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(aggregator, collaborator) reports of the downloads and uploads of ``spec``."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"

    def make(ctx: Any) -> list[Proc]:
        done, phases = ctx.Event(), (ctx.Event(), ctx.Event())
        return [
            Proc(_aggregator, (endpoint, spec, reps, quick, phases, done)),
            Proc(_collaborator, (endpoint, spec, reps, quick, phases, done)),
        ]

    agg, col = run_procs(make, timeout=3600)
    return agg, col


def _cases(quick: bool) -> list[tuple[str, str]]:
    if quick:
        return [("halves, 8 MiB", f"halves:{8 * MiB}")]
    return [
        ("halves, 128 MiB", f"halves:{128 * MiB}"),
        ("halves, 512 MiB", f"halves:{512 * MiB}"),
        ("halves, 2 GiB", f"halves:{2 * GiB}"),
        ("ResNet-50", "model:resnet50"),
        ("BERT-base", "model:bert"),
        ("GPT-2 small", "model:gpt2"),
    ]


def run(quick: bool = False, log: Any = print) -> list[dict[str, Any]]:
    """Rows of the layouts family (``quick``: one 8 MiB halves layout, streamed in 1 MiB chunks)."""
    rows: list[dict[str, Any]] = []
    for label, spec in _cases(quick):
        if spec.startswith("model:"):
            from tools.bench.models import available

            if not available():
                rows.append(
                    row(f"layouts, {label}", float("nan"), "GB/s", note="needs zmqfed[models]")
                )
                continue
        sd = build_state(spec, fill=False)
        nbytes, ntensors, largest = (
            unique_bytes(sd),
            len(sd),
            max(t.numel() * t.element_size() for t in sd.values()),
        )
        del sd
        big = nbytes > GiB
        reps = 2 if quick or big else 4
        log(f"layouts {label}: raw socket")
        raw_runs = [median(raw_socket(nbytes, reps + 1)[1:])]
        log(f"layouts {label}: zmqfed")
        agg, col = layout_transfer(spec, reps, quick)
        log(f"layouts {label}: raw socket again")
        raw_runs.append(median(raw_socket(nbytes, reps + 1)[1:]))
        raw = min(raw_runs)
        shape = f"{ntensors} tensors, largest {largest / MiB:.0f} MiB"
        for what, key, receiver_peak, sender_peak in (
            ("download in place", "inplace", col["inplace_peak"], agg["down_peak"]),
            ("download + unpackage", "copy", col["copy_peak"], agg["down_peak"]),
            ("upload", "up", agg["up_peak"], col["up_peak"]),
        ):
            t = median(col[key])
            ok = col["inplace_ok"] or key != "inplace"
            rows.append(
                row(
                    f"{label}: {what} vs raw socket",
                    gbps(nbytes, t),
                    "GB/s",
                    baseline=gbps(nbytes, raw),
                    baseline_name="raw socket",
                    ratio=raw / t,
                    target=">=1x" if key != "copy" else None,
                    met=(raw / t >= 1.0) if key != "copy" else None,
                    note=f"{shape}; peak RSS added: receiver {receiver_peak / MiB:.0f} MiB, "
                    f"sender {sender_peak / MiB:.0f} MiB" + ("" if ok else "; VALUES NOT LANDED"),
                )
            )
    rows.extend(_lora_rows(quick))
    return rows


def _lora_rows(quick: bool) -> list[dict[str, Any]]:
    """Bytes a LoRA collaborator exchanges per round, against the whole model."""
    from tools.bench.models import available, build, exchanged

    if not available():
        return []
    model = build("llama-lora", "small" if quick else "full", seed=0)
    adapters, _ = exchanged(model, "llama-lora")
    full = unique_bytes(model.state_dict(keep_vars=True))
    part = unique_bytes(adapters)
    return [
        row(
            f"LLaMA {'small' if quick else '1B-class'} with LoRA r=8 (q, v): bytes a collaborator uploads per round",
            part / MiB,
            "MiB",
            baseline=full / MiB,
            baseline_name="whole model",
            ratio=part / full,
            note=f"{len(adapters)} of {len(model.state_dict())} tensors (partial=True); "
            "the download is the same subset",
        )
    ]
