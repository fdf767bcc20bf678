"""Shared helpers of the benchmark families: rows, state dicts, processes, timing.

Every family returns a list of rows ``{name, value, unit, baseline, ratio,
target, met}``: ``value`` is what zmqfed reached, ``baseline`` what the
reference reached *in the same run*, ``ratio`` is the figure the target is
about (always oriented so that bigger is better unless ``unit`` says
otherwise) and ``met`` is True/False, or None for rows that only inform.

The two ends of every transfer run in their own processes
(``multiprocessing`` spawn), so that neither end shares a GIL with the other
nor inherits the parent's heap.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import socket
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MiB = 2**20


# --------------------------------------------------------------------------- rows
def speed_row(
    name: str,
    nbytes: int,
    seconds: float,
    baseline_seconds: float,
    baseline_name: str,
    *,
    min_ratio: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """A GB/s row against a baseline timed on the same bytes (ratio = speed-up)."""
    ratio = baseline_seconds / seconds
    return row(
        name,
        nbytes / seconds / 1e9,
        "GB/s",
        baseline=nbytes / baseline_seconds / 1e9,
        baseline_name=baseline_name,
        ratio=ratio,
        target=None if min_ratio is None else f">={min_ratio:g}x",
        met=None if min_ratio is None else ratio >= min_ratio,
        note=note,
    )


def row(
    name: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    baseline_name: str | None = None,
    ratio: float | None = None,
    target: str | None = None,
    met: bool | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One result row (JSON-safe)."""
    out: dict[str, Any] = {
        "name": name,
        "value": _round(value),
        "unit": unit,
        "baseline": None if baseline is None else _round(baseline),
        "baseline_name": baseline_name,
        "ratio": None if ratio is None else _round(ratio),
        "target": target,
        "met": met,
    }
    if note:
        out["note"] = note
    return out


def _round(x: float) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    digits = max(0, 4 - math.floor(math.log10(abs(x))))
    return round(x, digits)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------ state dicts
# One "block" of a convnet/transformer-like model: a few large weights, medium
# ones, biases and norm statistics, and an int64 counter. Sizes in elements.
_BLOCK = (
    ("conv.weight", (1024, 1024, 4), "float32"),  # 16 MiB
    ("conv.bias", (1024,), "float32"),
    ("bn.weight", (1024,), "float32"),
    ("bn.bias", (1024,), "float32"),
    ("bn.running_mean", (1024,), "float32"),
    ("bn.running_var", (1024,), "float32"),
    ("bn.num_batches_tracked", (), "int64"),
    ("fc1.weight", (1024, 1024), "float32"),  # 4 MiB
    ("fc1.bias", (1024,), "float32"),
    ("fc2.weight", (512, 512), "float32"),  # 1 MiB
    ("fc2.bias", (512,), "float32"),
    ("proj.weight", (256, 256), "float32"),  # 256 KiB
    ("proj.bias", (256,), "float32"),
    ("emb.weight", (8192, 64), "float16"),  # 1 MiB half
    ("head.weight", (2048, 1024), "float32"),  # 8 MiB
    ("head.bias", (2048,), "float32"),
)


def layout(total_bytes: int) -> list[tuple[str, tuple[int, ...], str]]:
    """Names, shapes and dtypes of a mixed state dict of about ``total_bytes``."""
    import torch

    out: list[tuple[str, tuple[int, ...], str]] = []
    size = 0
    i = 0
    while size < total_bytes:
        for name, shape, dtype in _BLOCK:
            n = math.prod(shape) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            if size + n > total_bytes and n > 64 * 1024:
                # fill the rest with a smaller weight of the same kind
                rest = (total_bytes - size) // 4
                if rest >= 1024:
                    out.append((f"block{i}.tail.weight", (rest,), "float32"))
                    size += rest * 4
                continue
            out.append((f"block{i}.{name}", shape, dtype))
            size += n
        i += 1
        if total_bytes - size < 1024:
            break
    return out


def make_state_dict(total_bytes: int, *, fill: bool = True, seed: int = 0) -> dict[str, Any]:
    """A state dict of many mixed-size tensors totalling about ``total_bytes``.

    With ``fill`` the float tensors hold uniform noise (so compression cannot
    cheat); without it they are zeroed (pages faulted in, values irrelevant).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {}
    for name, shape, dtype in layout(total_bytes):
        t = torch.empty(shape, dtype=getattr(torch, dtype))
        if t.is_floating_point() and fill:
            t.uniform_(-1, 1, generator=gen)
        else:
            t.zero_()
        sd[name] = t
    return sd


def state_bytes(sd: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


# ----------------------------------------------------------------------- system
def tune_malloc() -> bool:
    """zmqfed's own ``tune_malloc`` (raise glibc's mmap and trim thresholds)."""
    from zmqfed.federated.sockets import tune_malloc as lib_tune

    return bool(lib_tune())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) so it can be read after a step."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_status() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    rss = hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


# -------------------------------------------------------------------- processes
@dataclass
class Proc:
    """One benchmark end: a function run in a spawned process."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


def _child(fn: Callable[..., Any], args: tuple[Any, ...], queue: Any, tag: int) -> None:
    try:
        queue.put((tag, "ok", fn(*args)))
    except BaseException:  # report, do not hang the parent
        queue.put((tag, "error", traceback.format_exc()))


def run_procs(make: Callable[[Any], list[Proc]], *, timeout: float = 300.0) -> list[Any]:
    """Start ``make(ctx)``'s processes (spawn) and return their results in order.

    ``make`` gets the spawn context so it can create Events/Barriers shared by
    the ends. Raises RuntimeError with the child's traceback if one fails.
    """
    ctx = mp.get_context("spawn")
    procs_spec = make(ctx)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(p.fn, p.args, queue, i), daemon=True)
        for i, p in enumerate(procs_spec)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < len(procs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"benchmark processes timed out after {timeout:.0f} s")
            try:
                tag, status, value = queue.get(timeout=min(left, 1.0))
            except Exception:
                dead = [
                    i
                    for i, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and i not in results
                ]
                if dead:
                    raise RuntimeError(
                        f"benchmark process {dead[0]} died (exit {procs[dead[0]].exitcode})"
                    ) from None
                continue
            if status == "error":
                raise RuntimeError(f"benchmark process {tag} failed:\n{value}")
            results[tag] = value
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        queue.close()
    return [results[i] for i in range(len(procs))]


def child_setup(threads: int = 1) -> None:
    """Call first in a benchmark child: one intra-op thread (2-core machines)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def star_props(endpoint: str, names: list[str], who: str) -> Any:
    """The FederatedProperties of ``who`` in a star: ``names`` -> 'aggregator'."""
    import zmqfed.topo as topo

    topology = topo.Topology()
    agg = topology.add_node(topo.Node("aggregator", endpoint))
    for name in names:
        topology.add_edge(topo.Node(name), agg)
    props = topo.analysis(topology, who)
    assert len(props) == 1
    return props[0]


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def time_rounds(threads: list[Any], start: Any, finished: Any, rounds: int) -> list[float]:
    """Start ``threads``; time each round from ``start`` set to ``finished`` set; join.

    ``start`` and ``finished`` are ``threading.Barrier``-like (``wait()``) objects
    that the worker threads also pass through once per round.
    """
    for t in threads:
        t.start()
    times = []
    for _ in range(rounds):
        start.wait()
        t0 = time.perf_counter()
        finished.wait()
        times.append(time.perf_counter() - t0)
    for t in threads:
        t.join()
    return times


def raw_listener(port: int, total: int, backlog: int = 1) -> tuple[Any, list[memoryview]]:
    """A listening TCP socket on 127.0.0.1:``port`` and a state dict's byte views to send."""
    import socket

    from zmqfed.wire.codec import tensor_bytes

    sd = make_state_dict(total)
    bufs = [memoryview(tensor_bytes(t)) for t in sd.values()]
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(backlog)
    return srv, bufs
