"""Thousands of collaborators in one process, on the product's protocol code.

``zmqfed.loadgen.Crowd`` runs every collaborator as a real Maintainer with its
own DEALER, stepped by one ``Multiplexer``; ``tools/loadgen/run.py`` puts an
aggregator and the crowd in separate processes on tcp 127.0.0.1.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.federated import Multiplexer
from zmqfed.federated.multiplex import Gate

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

pytestmark = pytest.mark.slow


def test_a_crowd_beyond_the_default_socket_limit_completes_its_rounds(slow_factor):
    """1,100 collaborators in one process: past libzmq's default of 1,023 sockets."""
    from tools.loadgen.run import measure

    r = measure(1100, 4096, rounds=2, per_crowd=1100, timeout=300 * slow_factor, inflight=64)
    assert r["participants"] == [1100, 1100]
    assert r["crowd_failed"] == 0, r["crowd_errors"]
    assert r["model_exact"]  # the folded FedAvg of 1,100 uploads of the model is the model
    assert r["encodes"] == 2  # the served model is encoded once per round
    # one socket per collaborator: its TCP connection and its mailbox's eventfd
    assert 1.9 <= r["crowd_fds_per_collaborator"] < 2.2, r
    assert r["agg_fds"] - r["agg_idle_fds"] <= 1100 + 16, r  # one descriptor per peer


def test_the_multiplexer_steps_many_maintainers_in_one_thread(free_tcp_endpoint, slow_factor):
    names = [f"c{i:02d}" for i in range(40)]
    topology = topo.Topology()
    hub = topology.add_node(topo.Node("aggregator", free_tcp_endpoint))
    for name in names:
        topology.add_edge(topo.Node(name), hub)
    agg = Maintainer(topo.analysis(topology, "aggregator")[0], {"w": torch.zeros(3)})
    with agg:
        from zmqfed.functional import count_step

        count_step(len(names))
    crowd = [
        Maintainer(
            topo.analysis(topology, name)[0],
            {"w": torch.full((3,), float(i))},
            link_monitor=False,
            timeout=60 * slow_factor,
        )
        for i, name in enumerate(names)
    ]
    results: list[object] = []
    errors: list[BaseException] = []

    def done(result: object, error: BaseException | None) -> None:
        (errors if error is not None else results).append(error or result)

    mux = Multiplexer()
    gate = Gate(mux, 3)
    busy = {"now": 0, "most": 0}

    def gated(m: Maintainer):  # type: ignore[no-untyped-def]
        yield from gate.acquire()
        busy["now"] += 1
        busy["most"] = max(busy["most"], busy["now"])
        try:
            return (yield from m.step_cycle(download=False))
        finally:
            busy["now"] -= 1
            gate.release()

    for m in crowd:
        m.package()
        mux.spawn(gated(m), m.port, done)
    worker = threading.Thread(target=agg.step, kwargs={"timeout": 60 * slow_factor})
    worker.start()
    assert mux.run(timeout=60 * slow_factor)
    worker.join(60 * slow_factor)
    try:
        assert not errors, errors
        assert len(results) == len(names) and all(r.uploads == 1 for r in results)  # type: ignore[attr-defined]
        assert sorted(agg.sender_list) == names
        assert busy["most"] == 3 and gate.taken == 0  # the gate held at most three at once
        # all in one thread: each collaborator was resumed a few times, not polled
        assert mux.resumes < 10 * len(names)
    finally:
        for m in crowd:
            m.close()
        agg.close()


AGGREGATOR = """
import sys, torch, zmqfed.topo as topo
from zmqfed.core import Maintainer
topology = topo.star(1, sys.argv[1])
m = Maintainer(topo.analysis(topology, "aggregator")[0], {"w": torch.zeros(2)})
print("READY", flush=True)
m.step()  # parks the collaborator's PULL for version 1 until killed
"""


def test_a_link_without_monitor_notices_a_vanished_aggregator_by_silence(
    free_tcp_endpoint, run_python, slow_factor
):
    """No monitor, no DISCONNECTED: the pending request is sent again after silence."""
    first = run_python(AGGREGATOR, args=[free_tcp_endpoint])
    assert first.stdout is not None and first.stdout.readline().strip() == "READY"
    topology = topo.star(1, free_tcp_endpoint)
    col = Maintainer(
        topo.analysis(topology, "client0")[0],
        {"w": torch.zeros(2)},
        link_monitor=False,
        timeout=60 * slow_factor,
    )
    col._side.transport.link.silence_resend = 2.0  # type: ignore[union-attr]
    col.update_version(1)
    got: list[object] = []
    worker = threading.Thread(target=lambda: got.append(col.step(upload=False)))
    worker.start()
    time.sleep(1.0 * slow_factor)  # the PULL is parked by the first aggregator
    first.send_signal(signal.SIGKILL)  # gone without a BYE; this link has no monitor
    first.wait(10 * slow_factor)
    second = Maintainer(topo.analysis(topology, "aggregator")[0], {"w": torch.ones(2)})
    second.update_version(1)
    with second:
        from zmqfed.functional import count_step

        count_step(1)
    second.on("download_served", lambda ctx: ctx.maintainer.manual_stop())
    try:
        second.step(timeout=60 * slow_factor)
        worker.join(30 * slow_factor)
        assert got, "the collaborator never got the model from the new aggregator"
        assert torch.equal(col.data["w"]["param"], torch.ones(2))
        assert col.stats["resends"] >= 1
    finally:
        col.close()
        second.close()
