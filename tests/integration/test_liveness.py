"""A vanished collaborator is noticed within seconds, and taken back when it returns."""

from __future__ import annotations

import threading
import time

import torch

import zmqfed
from zmqfed.address import Address
from zmqfed.core import Maintainer, steps
from zmqfed.props import FederatedProperties

COLLABORATOR = """
import sys, time, torch
from zmqfed.address import Address
from zmqfed.core import Maintainer
from zmqfed.props import FederatedProperties
name, endpoint, mode = sys.argv[1:4]
props = FederatedProperties("collaborator", name, Address(endpoint), "aggregator", ("alpha", "beta"))
m = Maintainer(props, {"w": torch.zeros(2)}, timeout=60)
m.step(upload=False)
if mode == "hang":
    time.sleep(120)  # "long local training": killed during it
m.meta["instances"] = 1
m.package()
m.step(download=False)
"""


def test_killed_collaborator_goes_offline_and_rejoins(free_tcp_endpoint, run_python, slow_factor):
    props = FederatedProperties(
        "aggregator", "aggregator", Address(free_tcp_endpoint), "aggregator", ("alpha", "beta")
    )
    m = Maintainer(props, {"w": torch.ones(2)}, timeout=90 * slow_factor)
    with m:
        zmqfed.functional.count_step(2)
    events: list[tuple[str, str, float]] = []
    procs: dict[str, object] = {}

    def record(point: str):
        return lambda mm, *args: events.append((point, mm.pipe.nick_name, time.monotonic()))

    for point in (steps.before_destroy, steps.after_destroy, steps.after_upload):
        m.register_step_hook(60, record(point), point)

    def after_upload(mm: Maintainer, ok: bool) -> None:
        if mm.pipe.nick_name == "alpha" and "killed" not in procs:
            procs["killed"] = time.monotonic()
            # SIGKILL during its "training", from another thread so the loop keeps serving
            threading.Timer(0.3, procs["alpha"].kill).start()

    def after_destroy(mm: Maintainer, ok: bool) -> None:
        if mm.pipe.nick_name == "alpha" and "alpha2" not in procs:  # it comes back
            procs["alpha2"] = run_python(COLLABORATOR, args=["alpha", free_tcp_endpoint, "run"])

    m.register_step_hook(70, after_upload, steps.after_upload)
    m.register_step_hook(70, after_destroy, steps.after_destroy)
    procs["alpha"] = run_python(COLLABORATOR, args=["alpha", free_tcp_endpoint, "hang"])
    procs["beta"] = run_python(COLLABORATOR, args=["beta", free_tcp_endpoint, "run"])
    try:
        m.step()
    finally:
        m.close()
    destroyed = [e for e in events if e[0] == steps.before_destroy and e[1] == "alpha"]
    assert destroyed, events
    assert destroyed[0][2] - procs["killed"] < 5.0  # noticed within seconds of the kill
    # alpha's pipe was destroyed once (the kill); beta's only after its BYE, if at all
    assert [e[1] for e in events if e[0] == steps.after_destroy].count("alpha") == 1
    served = [e[1] for e in events if e[0] == steps.after_upload]
    assert served.count("alpha") == 2 and served.count("beta") == 1  # alpha was taken back
    assert len(m.meta_list) == 2
    for name in ("beta", "alpha2"):
        procs[name].communicate(timeout=30 * slow_factor)
        assert procs[name].returncode == 0


IDLE_COLLABORATOR = """
import sys, time, torch
from zmqfed.address import Address
from zmqfed.core import Maintainer
from zmqfed.federated import SocketOptions
from zmqfed.props import FederatedProperties
name, endpoint = sys.argv[1:3]
props = FederatedProperties("collaborator", name, Address(endpoint), "aggregator", ("alpha",))
opts = SocketOptions(heartbeat_ivl_ms=200, heartbeat_timeout_ms=1000)
m = Maintainer(props, {"w": torch.zeros(2)}, timeout=60, socket_options=opts)
m.step(upload=False)
time.sleep(6)  # "local training": 6 heartbeat timeouts without a single message
m.package()
m.step(download=False)
"""


def test_idle_link_survives_long_local_training(free_tcp_endpoint, run_python, slow_factor):
    """ZMTP heartbeats (answered by libzmq's I/O thread) keep an idle link up."""
    from zmqfed.federated import SocketOptions

    props = FederatedProperties(
        "aggregator", "aggregator", Address(free_tcp_endpoint), "aggregator", ("alpha",)
    )
    opts = SocketOptions(heartbeat_ivl_ms=200, heartbeat_timeout_ms=1000)
    m = Maintainer(props, {"w": torch.ones(2)}, timeout=60 * slow_factor, socket_options=opts)
    destroyed: list[str] = []
    m.register_step_hook(60, lambda mm: destroyed.append(mm.pipe.nick_name), steps.before_destroy)
    with m:
        zmqfed.functional.count_step(1)
    proc = run_python(IDLE_COLLABORATOR, args=["alpha", free_tcp_endpoint])
    try:
        m.step()
        joins = m.stats["messages_in"]
    finally:
        m.close()
    _, err = proc.communicate(timeout=30 * slow_factor)
    assert proc.returncode == 0, err
    assert destroyed == []  # never seen as gone during the 6 s of silence
    assert "lost the connection" not in err
    assert joins == 3  # HELLO, PULL, PUSH: no second HELLO after a reconnect
