"""Floods against a running aggregator: the honest federation goes on, memory stays bounded.

Real processes over real TCP sockets (127.0.0.1, ephemeral port):

* the aggregator: a ``Maintainer`` for a star of ``alpha``, ``beta`` and
  ``mallory``; each step ends once the uploads it needs are in, then the
  script averages them (FedAvg) and spends a configured pause outside
  ``step()``: the time a real aggregator spends aggregating, when nobody reads
  its ROUTER;
* ``mallory``, a roster member gone rogue: HELLO, one genuine upload (so its
  later PUSHes are duplicates), then PING / PULL (served and parked) /
  duplicate PUSH as fast as its DEALER takes them, reading what comes back;
* ``intruder``, not a member: garbage multipart messages, non-blocking sends
  as fast as its DEALER takes them, then an abrupt hang-up (``linger=0``);
* ``alpha`` and ``beta``: honest collaborators whose "training" adds
  ``rank + 1`` to every weight, so FedAvg of each round has a closed form.

``test_flood_neither_starves_the_federation_nor_exhausts_memory`` floods with
both attackers during several rounds, samples the aggregator's RSS
(``/proc/PID/status``) and runs a final round after the flood.
``test_hit_and_run_flood_during_aggregation_does_not_kill_the_aggregator``
floods while the aggregator aggregates and hangs up before it reads again.
Numbers are printed (run with ``-s``) and recorded in docs/flood-notes.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from zmqfed.federated import SocketOptions
from zmqfed.wire import Limits

MiB = 2**20
GiB = 2**30

NAMES = ("alpha", "beta", "mallory")  # the roster; mallory is the flooding member
FLOOD_ROUNDS = 4  # honest rounds during the flood; one more follows after it
AGGREGATION_PAUSE = 0.5  # seconds the aggregator spends outside step() after each round
FRAME_BYTES = MiB  # the intruder's garbage frames ...
FRAMES_PER_MESSAGE = 2  # ... and how many make one message
MIN_FLOOD_SECONDS = 6.0  # the flood lasts at least this long, and through every flood round
#: What the aggregator's RSS may grow above its level before the flood.
RSS_BOUND = 256 * MiB
#: A flood smaller than this could not show unbounded queueing against RSS_BOUND.
MIN_FLOOD_BYTES = 8 * RSS_BOUND
#: Growth at which the flood is stopped at once (the test fails anyway): protects the host.
RSS_CEILING = 3 * GiB

_COMMON = f"""
import faulthandler, json, os, signal, sys, time
cfg = json.loads(sys.argv[1])
faulthandler.dump_traceback_later(cfg["hang"], exit=True)  # a hang shows every stack


def star(topo, endpoint):
    topology = topo.Topology()
    aggregator = topology.add_node(topo.Node("aggregator", endpoint))
    for name in {NAMES!r}:
        topology.add_edge(topo.Node(name), aggregator)
    return topology


def wait_for(path):
    deadline = time.monotonic() + cfg["hang"]
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{{path}} did not appear"
        time.sleep(0.005)


def touch(path):
    open(path, "w").close()
"""

# cfg: endpoint, rounds, pauses (one per round), warmup, hang
AGGREGATOR = (
    _COMMON
    + """
import torch
from torch import nn
import zmqfed.topo as topo
from zmqfed.core import Maintainer, steps
from zmqfed.functional import version_check

props = topo.analysis(star(topo, cfg["endpoint"]), "aggregator")[0]
network = nn.Linear(4, 1)
with torch.no_grad():
    for p in network.parameters():
        p.zero_()
m = Maintainer(props, network.state_dict(keep_vars=True), timeout=cfg["hang"] / 2)
need = [1]
senders = []
m.register_step_hook(50, version_check, steps.before_upload)
m.register_step_hook(50, lambda m: True, steps.before_download)
m.register_step_hook(
    50, lambda m, ok: senders.append(m.pipe.nick_name) if ok else None, steps.after_download
)
m.register_step_hook(
    60, lambda m: m.manual_stop() if len(m.meta_list) >= need[0] else None, steps.at_last
)
print("READY", flush=True)

if cfg["warmup"]:  # mallory's one genuine upload, so that the PUSHes it floods are duplicates
    m.package()
    m.step()
    assert senders == ["mallory"], senders
    m.clear()
    senders.clear()
touch("warm")

need[0] = 2
done = []
for r in range(cfg["rounds"]):
    m.package()
    tic = time.monotonic()
    m.step()
    done.append({"round": r, "seconds": round(time.monotonic() - tic, 3),
                 "ended": time.time(), "senders": sorted(senders)})
    with torch.no_grad():  # FedAvg of equal-sized parts
        for p in network.parameters():
            p.copy_(torch.stack([d[p]["param"] for d in m.data_list]).mean(0))
    m.clear()
    senders.clear()
    touch(f"aggregating-{r}")
    time.sleep(cfg["pauses"][r])  # "aggregating": nobody reads the ROUTER meanwhile
    m.update_version()
result = {
    "rounds": done,
    "weights": {k: v.tolist() for k, v in network.state_dict().items()},
    "stats": m.stats,
}
m.close(final=True)
print("RESULT " + json.dumps(result), flush=True)
"""
)

# cfg: endpoint, rank, rounds, wait_warm, gate_round (wait for "flood-stopped" first), hang
COLLABORATOR = (
    _COMMON
    + """
import torch
from torch import nn
import zmqfed.topo as topo
from zmqfed.core import Maintainer

rank = cfg["rank"]
props = topo.analysis(star(topo, cfg["endpoint"]), ("alpha", "beta")[rank])[0]
network = nn.Linear(4, 1)
if cfg["wait_warm"]:
    wait_for("warm")  # mallory's genuine upload is in: its flood is on
m = Maintainer(props, network.state_dict(keep_vars=True), timeout=cfg["hang"] / 2)
downloads = []
for r in range(cfg["rounds"]):
    if r == cfg["gate_round"]:
        wait_for("flood-stopped")
    m.update_version(r)
    m.step(upload=False)
    m.unpackage()
    downloads.append({k: v["param"].tolist() for k, v in m.data.items()})
    with torch.no_grad():  # "training": every weight moves by rank + 1
        for p in network.parameters():
            p.add_(rank + 1)
    m.update_version(r + 1)
    m.package()
    m.step(download=False)
m.close()
print("RESULT " + json.dumps({"downloads": downloads}), flush=True)
"""
)

_FLOODER = """
import zmq

stop = False


def on_term(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
"""

# cfg: endpoint, hang. A roster member gone rogue; floods until SIGTERM.
MALLORY = (
    _COMMON
    + _FLOODER
    + """
import uuid
import torch
import zmqfed.topo as topo
from zmqfed.wire import PROTOCOL_VERSION, Envelope, decode, encode

fingerprint = topo.analysis(star(topo, cfg["endpoint"]), "mallory")[0].fingerprint
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.ROUTING_ID, b"mallory")
sock.connect(cfg["endpoint"])


def ask(env):
    sock.send_multipart(encode(env))
    while True:
        assert sock.poll(int(cfg["hang"] * 1000)), f"no answer to {env.kind}"
        reply = decode(sock.recv_multipart())
        if reply.kind != "PING":
            return reply


hello = {"protocol": PROTOCOL_VERSION, "fingerprint": fingerprint, "session": uuid.uuid4().hex}
welcome = ask(Envelope(kind="HELLO", sender="mallory", seq=1, meta=hello))
assert welcome.kind == "WELCOME", welcome
inc = welcome.meta["incarnation"]
model = {"weight": {"param": torch.zeros(1, 4)}, "bias": {"param": torch.zeros(1)}}
push = Envelope(kind="PUSH", sender="mallory", seq=2, incarnation=inc, meta={"version": 1},
                tensors=model)
ack = ask(push)
assert ack.kind == "ACK" and not ack.meta.get("duplicate"), ack


def frames(kind, seq, **kw):
    env = Envelope(kind=kind, sender="mallory", seq=seq, incarnation=inc, **kw)
    return [bytes(memoryview(f)) for f in encode(env)]


cycle = [
    frames("PING", 3),
    frames("PULL", 4, meta={"version": 0}),  # served at once
    [bytes(memoryview(f)) for f in encode(push)],  # duplicate: (session, 2) counted already
    frames("PULL", 5, meta={"version": 10**9}),  # a version never reached: parked
]
sent = blocked = replies = 0
kinds = {}
print("FLOODING", flush=True)
while not stop:
    for msg in cycle:
        try:
            sock.send_multipart(msg, flags=zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            blocked += 1
    for _ in range(64):
        try:
            reply = sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            break
        replies += 1
        if replies % 97 == 1:  # sample the kinds: decoding every reply would slow the flood
            kind = decode(reply).kind
            kinds[kind] = kinds.get(kind, 0) + 1
sock.close(linger=0)
ctx.term()
print("FLOOD " + json.dumps({"sent": sent, "blocked": blocked, "replies": replies,
                             "sampled_kinds": kinds}), flush=True)
"""
)

# cfg: endpoint, frame_bytes, frames, start_after (a file, or ""), seconds (0: until
# SIGTERM), settle (s before hanging up), hang. Not on the roster; no zmqfed, no torch.
INTRUDER = (
    _COMMON
    + _FLOODER
    + """
if cfg["start_after"]:
    wait_for(cfg["start_after"])
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.ROUTING_ID, b"intruder")
sock.connect(cfg["endpoint"])
garbage = [os.urandom(cfg["frame_bytes"]) for _ in range(cfg["frames"])]
sent = blocked = replies = 0
tic = time.monotonic()
end = tic + cfg["seconds"] if cfg["seconds"] else float("inf")
print("FLOODING", flush=True)
while not stop and time.monotonic() < end:
    try:
        sock.send_multipart(garbage, flags=zmq.NOBLOCK, copy=False)  # zero-copy: cheap
        sent += 1
    except zmq.Again:
        blocked += 1
        sock.poll(1, zmq.POLLIN)
    while True:
        try:
            sock.recv_multipart(flags=zmq.NOBLOCK)
            replies += 1
        except zmq.Again:
            break
seconds = time.monotonic() - tic
time.sleep(cfg["settle"])
sock.close(linger=0)  # hang up abruptly, whatever is still queued
ctx.term()
print("FLOOD " + json.dumps({"sent": sent, "bytes": sent * cfg["frame_bytes"] * cfg["frames"],
                             "blocked": blocked, "replies": replies,
                             "seconds": round(seconds, 3)}), flush=True)
"""
)


# ------------------------------------------------------------------ helpers


def proc_status(pid: int) -> dict[str, int]:
    """The ``Vm*`` lines of /proc/PID/status, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every 5 ms; SIGTERMs ``flooders`` past ``baseline + ceiling``."""

    def __init__(self, pid: int, baseline: int, ceiling: int, flooders: list) -> None:
        super().__init__(daemon=True)
        self.pid, self.baseline, self.ceiling = pid, baseline, ceiling
        self.flooders = flooders
        self.peak_rss = baseline
        self.samples = 0
        self.hit_ceiling = False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                rss = proc_status(self.pid)["VmRSS"]
            except (OSError, KeyError):  # the process is gone
                return
            self.samples += 1
            self.peak_rss = max(self.peak_rss, rss)
            if rss - self.baseline > self.ceiling and not self.hit_ceiling:
                self.hit_ceiling = True
                for proc in self.flooders:
                    _signal_group(proc, signal.SIGTERM)
            time.sleep(0.005)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, sig)


def _log_tail(path: Path, lines: int = 12) -> str:
    """The end of the aggregator's stderr, its flood of identical warnings counted, not shown."""
    text = path.read_text(errors="replace").splitlines()
    dropped = sum("not a member of the group" in line for line in text)
    rest = [line for line in text if "not a member of the group" not in line]
    return f"[{dropped} 'not a member' warnings]\n" + "\n".join(rest[-lines:])


def _failed(name: str, proc: subprocess.Popen, log: Path | None) -> str:
    out, err = proc.communicate(timeout=10)
    err = err or ""
    if log is not None:  # the aggregator's stderr went to a file
        err = f"{err}{_log_tail(log)}"
    status = f"exit {proc.returncode}"
    if proc.returncode < 0:
        status += f", {signal.Signals(-proc.returncode).name}"
    return f"--- {name} ({status})\n{out}{err}"


def _wait_for(path: Path, seconds: float, procs: Mapping, log: Path) -> None:
    """Wait until ``path`` exists; fail at once, with its output, if any process exited."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        dead = [name for name, p in procs.items() if p.poll() is not None]
        assert not dead, f"waiting for {path.name}, exited early:\n" + "\n".join(
            _failed(name, procs[name], log if name == "aggregator" else None) for name in dead
        )
        assert time.monotonic() < deadline, f"{path.name} did not appear in {seconds:.0f} s"
        time.sleep(0.01)


def _finish(
    procs: Mapping, seconds: float, log: Path, *, strict: bool = True, context: str = ""
) -> dict[str, tuple[str, str]]:
    """Wait for every process to exit; return each one's (stdout, stderr).

    ``strict``: every exit must be 0, and the first failure fails the test at
    once. Otherwise a failed process fails the test only if the others are
    still running 5 s later (they wait for it in vain); the caller checks
    the exit codes. ``context`` is added to every failure message.
    """
    deadline = time.monotonic() + seconds
    first_failure = None

    def fail(names: list[str]) -> str:
        logs = {n: log if n == "aggregator" else None for n in names}
        return "\n".join(_failed(n, procs[n], logs[n]) for n in names) + context

    while any(p.poll() is None for p in procs.values()):
        bad = [n for n, p in procs.items() if p.returncode not in (None, 0)]
        if bad and first_failure is None:
            first_failure = time.monotonic()
        if bad and (strict or time.monotonic() > first_failure + 5):
            pytest.fail(fail(bad))
        running = [n for n, p in procs.items() if p.poll() is None]
        assert time.monotonic() < deadline, f"still running after {seconds:.0f} s: {running}"
        time.sleep(0.02)
    bad = [n for n, p in procs.items() if p.returncode != 0]
    if strict and bad:
        pytest.fail(fail(bad))
    return {name: proc.communicate(timeout=10) for name, proc in procs.items()}


def _result(out: str, tag: str = "RESULT") -> dict:
    lines = [line for line in out.splitlines() if line.startswith(tag + " ")]
    assert lines, f"no {tag} line in:\n{out}"
    return json.loads(lines[-1][len(tag) + 1 :])


def _wait_line(proc: subprocess.Popen, expected: str, seconds: float) -> None:
    """Read ``proc``'s stdout up to a line ``expected``, in a thread so the wait is bounded."""
    found = threading.Event()

    def reader() -> None:
        for line in proc.stdout:
            if line.strip() == expected:
                found.set()
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(seconds)
    assert found.is_set(), f"no {expected!r} from pid {proc.pid} within {seconds:.0f} s"


def _start_aggregator(run_python, tmp_path: Path, cfg: dict, seconds: float):
    log = tmp_path / "aggregator.log"  # one WARNING per refused message: never a pipe
    with open(log, "w") as stderr:
        agg = run_python(AGGREGATOR, args=[json.dumps(cfg)], stderr=stderr)
    _wait_line(agg, "READY", seconds)
    return agg, log


def _start_collaborators(run_python, endpoint: str, **cfg) -> dict:
    """alpha and beta, the honest collaborators, as processes."""
    return {
        name: run_python(
            COLLABORATOR, args=[json.dumps({"endpoint": endpoint, "rank": rank, **cfg})]
        )
        for rank, name in enumerate(("alpha", "beta"))
    }


def _check_rounds(agg_result: dict, outputs: Mapping, rounds: int) -> None:
    """Every round was FedAvg of exactly alpha's and beta's uploads, and served to both."""
    done = agg_result["rounds"]
    assert [r["round"] for r in done] == list(range(rounds)), done
    assert all(r["senders"] == ["alpha", "beta"] for r in done), done
    total = 1.5 * rounds  # each round adds mean(1, 2) to the zero init
    assert agg_result["weights"] == {"weight": [[total] * 4], "bias": [total]}, agg_result
    for name in ("alpha", "beta"):
        downloads = _result(outputs[name][0])["downloads"]
        assert downloads == [
            {"weight": [[1.5 * r] * 4], "bias": [1.5 * r]} for r in range(rounds)
        ], (name, downloads)


# -------------------------------------------------------------------- tests


def test_flood_neither_starves_the_federation_nor_exhausts_memory(
    free_tcp_endpoint, run_python, slow_factor, tmp_path
):
    endpoint = free_tcp_endpoint
    hang = 120 * slow_factor  # hang guard of every child; no timing assertion besides it
    rounds = FLOOD_ROUNDS + 1
    message_bytes = FRAME_BYTES * FRAMES_PER_MESSAGE
    # The socket takes every frame: Limits.for_model never bounds frames below 1 MiB.
    assert Limits.for_model({}).socket_maxmsgsize() > FRAME_BYTES
    # What sockets.py lets the intruder queue at the aggregator: peer_queue whole messages.
    per_peer_queue = SocketOptions().peer_queue * message_bytes

    agg, log = _start_aggregator(
        run_python,
        tmp_path,
        {
            "endpoint": endpoint,
            "rounds": rounds,
            "pauses": [AGGREGATION_PAUSE] * rounds,
            "warmup": True,
            "hang": hang,
        },
        60 * slow_factor,
    )
    before = proc_status(agg.pid)
    rss0 = before["VmRSS"]

    flooders = {
        "mallory": run_python(MALLORY, args=[json.dumps({"endpoint": endpoint, "hang": hang})]),
        "intruder": run_python(
            INTRUDER,
            args=[
                json.dumps(
                    {
                        "endpoint": endpoint,
                        "frame_bytes": FRAME_BYTES,
                        "frames": FRAMES_PER_MESSAGE,
                        "start_after": "",
                        "seconds": 0,
                        "settle": 0,
                        "hang": hang,
                    }
                )
            ],
        ),
    }
    sampler = RssSampler(agg.pid, rss0, RSS_CEILING, list(flooders.values()))
    sampler.start()
    collaborators = _start_collaborators(
        run_python, endpoint, rounds=rounds, wait_warm=True, gate_round=FLOOD_ROUNDS, hang=hang
    )
    everyone = {"aggregator": agg, **flooders, **collaborators}
    try:
        _wait_line(flooders["intruder"], "FLOODING", 60 * slow_factor)
        flood_start = time.monotonic()
        _wait_for(tmp_path / "warm", hang, everyone, log)
        _wait_for(tmp_path / f"aggregating-{FLOOD_ROUNDS - 1}", hang, everyone, log)
        while time.monotonic() < flood_start + MIN_FLOOD_SECONDS and not sampler.hit_ceiling:
            time.sleep(0.05)
        for proc in flooders.values():
            _signal_group(proc, signal.SIGTERM)
        flood_out = _finish(flooders, 30 * slow_factor, log)
        flood_seconds = time.monotonic() - flood_start
        after = proc_status(agg.pid) if agg.poll() is None else {}
    finally:
        sampler.done.set()
        sampler.join(5)
    floods = {name: _result(out, "FLOOD") for name, (out, _) in flood_out.items()}
    intruder, mallory = floods["intruder"], floods["mallory"]
    # VmHWM counts the start-up too: only a peak above the pre-flood one is the flood's.
    hwm = after.get("VmHWM", 0)
    peak = max(sampler.peak_rss, hwm if hwm > before["VmHWM"] else 0)
    growth = peak - rss0
    numbers = {
        "flood_seconds": round(flood_seconds, 1),
        "intruder_messages": intruder["sent"],
        "intruder_GiB": round(intruder["bytes"] / GiB, 2),
        "mallory_messages": mallory["sent"],
        "mallory_replies": mallory["replies"],
        "mallory_reply_kinds_sampled": mallory["sampled_kinds"],
        "rss_before_MiB": round(rss0 / MiB, 1),
        "rss_peak_MiB": round(peak / MiB, 1),
        "rss_growth_MiB": round(growth / MiB, 1),
        "rss_after_flood_MiB": round(after.get("VmRSS", 0) / MiB, 1),
        "rss_samples": sampler.samples,
        "bound_MiB": RSS_BOUND // MiB,
        "peer_queue_x_message_MiB": per_peer_queue // MiB,
    }

    stopped_at = time.time()
    (tmp_path / "flood-stopped").touch()  # alpha and beta run their final round
    outputs = _finish(
        {"aggregator": agg, **collaborators},
        hang,
        log,
        strict=False,
        context=f"\nflood: {json.dumps(numbers)}",
    )
    for name in ("alpha", "beta"):
        assert collaborators[name].returncode == 0, f"{name}: {outputs[name]}"
    crashed = ""
    if agg.returncode != 0:
        crashed = f"aggregator exit {agg.returncode}; its stderr ends:\n{_log_tail(log)}"
    assert "RESULT " in outputs["aggregator"][0], f"{crashed}\nflood: {json.dumps(numbers)}"
    agg_result = _result(outputs["aggregator"][0])
    done = agg_result["rounds"]
    numbers.update(
        aggregator_messages_in=agg_result["stats"]["messages_in"],
        aggregator_error_replies=agg_result["stats"]["errors"],
        aggregator_log_lines=log.read_text(errors="replace").count("\n"),
        flood_round_seconds=[r["seconds"] for r in done[:FLOOD_ROUNDS]],
        final_round_seconds_after_flood=round(done[-1]["ended"] - stopped_at, 3),
    )
    print("\nflood: " + json.dumps(numbers))

    # (a) + (c): every round, during the flood and after it, is FedAvg of exactly
    # alpha and beta, and both downloaded the expected model each round.
    _check_rounds(agg_result, outputs, rounds)
    # The flood was real: it reached the aggregator and was answered.
    assert mallory["replies"] > 0 and intruder["replies"] > 0, numbers
    assert intruder["bytes"] >= MIN_FLOOD_BYTES, f"flood too small to show anything: {numbers}"
    problems = []
    # (b): the aggregator did not queue the flood.
    if sampler.hit_ceiling or growth > RSS_BOUND:
        problems.append(
            f"aggregator RSS grew {growth / MiB:.0f} MiB (bound {RSS_BOUND // MiB} MiB) while "
            f"{intruder['bytes'] / GiB:.1f} GiB of {message_bytes // MiB} MiB messages flooded "
            f"it; peer_queue {SocketOptions().peer_queue} x message = {per_peer_queue // MiB} MiB"
        )
    # (c): it served the final round, and then it also exits cleanly.
    if crashed:
        problems.append(crashed)
    assert not problems, "\n".join(problems) + f"\nflood: {json.dumps(numbers)}"


def test_hit_and_run_flood_during_aggregation_does_not_kill_the_aggregator(
    free_tcp_endpoint, run_python, slow_factor, tmp_path
):
    """A non-member fills the ROUTER's queue while the aggregator aggregates, then hangs up.

    The pause outside ``step()`` spans a ZMTP heartbeat interval after the
    intruder connected, so the aggregator's heartbeat timer fires while the
    dead connection's queue is still full and unread.
    """
    endpoint = free_tcp_endpoint
    hang = 120 * slow_factor
    pause = 2 * max(SocketOptions().heartbeat_ivl_ms, 500) / 1000 + 0.5
    agg, log = _start_aggregator(
        run_python,
        tmp_path,
        {"endpoint": endpoint, "rounds": 2, "pauses": [pause, 0], "warmup": False, "hang": hang},
        60 * slow_factor,
    )
    intruder = run_python(
        INTRUDER,
        args=[
            json.dumps(
                {
                    "endpoint": endpoint,
                    "frame_bytes": 16,
                    "frames": 1,
                    "start_after": "aggregating-0",  # connect once round 0 is aggregated
                    "seconds": 0.3,
                    "settle": 0.2,
                    "hang": hang,
                }
            )
        ],
    )
    collaborators = _start_collaborators(
        run_python, endpoint, rounds=2, wait_warm=False, gate_round=-1, hang=hang
    )
    flood_out = _finish({"intruder": intruder}, hang, log)["intruder"][0]
    flood = _result(flood_out, "FLOOD")
    outputs = _finish(
        {"aggregator": agg, **collaborators},
        hang,
        log,
        context=f"\nintruder during the {pause} s aggregation pause, then hung up: {flood}",
    )
    agg_result = _result(outputs["aggregator"][0])
    print(f"\nhit-and-run: {flood}, aggregator pause {pause} s, rounds {agg_result['rounds']}")

    assert flood["sent"] > 2 * SocketOptions().peer_queue, flood  # the queue was full
    _check_rounds(agg_result, outputs, 2)


SMALL_FLOOD = """
import sys, time, zmq
endpoint, seconds = sys.argv[1], float(sys.argv[2])
ctx = zmq.Context()
socks = []
for i in range(32):  # many identities: each gets its own queue at the ROUTER
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"intruder-%d" % i)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    socks.append(sock)
print("FLOODING", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for sock in socks:
        for _ in range(100):
            try:
                sock.send(b"x" * 10, zmq.NOBLOCK)
            except zmq.Again:
                break
"""


def test_a_step_deadline_holds_while_a_flood_outpaces_the_loop(
    free_tcp_endpoint, run_python, slow_factor
):
    """The loop handles messages in batches, so its deadline and timers run during a flood.

    A non-member floods small messages for much longer than the step's
    timeout; ``step()`` must raise ``PeerTimeout`` while the flood is still
    going (it used to drain the socket until the flood ended).
    """
    import zmqfed.topo as topo
    from zmqfed.core import Maintainer
    from zmqfed.errors import PeerTimeout

    flood_seconds = 20 * slow_factor
    props = topo.analysis(topo.star(2, free_tcp_endpoint), "aggregator")[0]
    m = Maintainer(props, {"w": __import__("torch").zeros(4)}, idle_interval=0.05)
    flooder = run_python(SMALL_FLOOD, args=[free_tcp_endpoint, str(flood_seconds)])
    try:
        assert flooder.stdout is not None
        assert flooder.stdout.readline().strip() == "FLOODING"
        time.sleep(0.5)  # let the flood build up a backlog
        with pytest.raises(PeerTimeout):
            m.step(timeout=1.0)
        flooding = flooder.poll() is None
        refused = m.stats["errors"]
    finally:
        m.close()
        flooder.kill()
        flooder.communicate(timeout=30)
    assert flooding, "step() timed out only after the flood ended"
    assert refused > 1000, refused  # the flood did reach the loop
