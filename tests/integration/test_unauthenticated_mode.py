"""What an unauthenticated deployment is refused, told and left with (docs/security.md).

* ``zmqfed-node`` will not bind an endpoint other hosts can reach without
  CURVE unless ``--insecure``; the library warns; the systemd example uses keys.
* A HELLO from another topology learns the roster and endpoint only when
  CURVE authenticated it.
* Confirmed or ruled out, each with its test: idle connections and
  descriptors; wrong-shaped optimizer state planted in a download; ipc
  socket permissions under a permissive umask; ``zmqfed-sim`` and modules in
  the working directory. (Dangling symlinks in a key directory:
  ``test_names_paths.py``.)
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth
from torch import nn

import zmqfed.topo as topo
from tests.conftest import free_tcp_port
from tests.integration.test_pickle_gate import _CurveAggregator
from tests.integration.test_protocol_faults import _ask, _dealer, _star, aggregator  # noqa: F401
from tests.integration.test_security import _wait_listening
from zmqfed.core import Maintainer
from zmqfed.federated import create_keys
from zmqfed.functional import count_step
from zmqfed.optim import FederatedOptimizer
from zmqfed.wire import PROTOCOL_VERSION, Envelope, encode

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _node(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [str(BIN / "zmqfed-node"), *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


# -- binding beyond loopback ----------------------------------------------------------


def test_zmqfed_node_refuses_to_bind_beyond_loopback_without_keys(tmp_path, slow_factor):
    port = free_tcp_port()
    topology = tmp_path / "topology.json"
    star(1, f"tcp://0.0.0.0:{port}").save(topology)
    run = ["run", "--topology", str(topology), "--node", "aggregator", "--rounds", "1"]
    run += ["--app", "tests.integration.toy_app:factory", "--no-progress"]
    refused = _node(run, tmp_path)
    try:
        _, err = refused.communicate(timeout=60 * slow_factor)
    finally:
        if refused.poll() is None:
            os.killpg(refused.pid, signal.SIGKILL)
            refused.wait()
    assert refused.returncode == 4, err
    assert f"would bind tcp://0.0.0.0:{port}, which other hosts can reach, without CURVE" in err
    assert "--keys DIR" in err and "--insecure" in err

    allowed = _node([*run, "--insecure"], tmp_path)  # the operator's explicit choice
    try:
        _wait_listening(f"tcp://127.0.0.1:{port}", 60 * slow_factor)
    finally:
        os.killpg(allowed.pid, signal.SIGTERM)
        _, err = allowed.communicate(timeout=60 * slow_factor)
    assert allowed.returncode == 0, err
    assert f"binds tcp://0.0.0.0:{port} without CURVE (--insecure)" in err
    assert "is reachable from other hosts and has no CURVE keys" in err  # the library says so too


def star(n: int, endpoint: str) -> topo.Topology:
    return topo.star(n, endpoint)


def test_the_library_warns_when_an_aggregator_binds_beyond_loopback_in_plaintext(caplog):
    port = free_tcp_port()
    wide = topo.analysis(star(1, f"tcp://0.0.0.0:{port}"), "aggregator")[0]
    local = topo.analysis(star(1, f"tcp://127.0.0.1:{free_tcp_port()}"), "aggregator")[0]
    with caplog.at_level(logging.WARNING, logger="zmqfed.federated.sockets"):
        for props in (wide, local):
            Maintainer(props, {"w": torch.zeros(1)}).close()
    warnings = [r.getMessage() for r in caplog.records if "no CURVE keys" in r.getMessage()]
    assert len(warnings) == 1 and f"tcp://0.0.0.0:{port}" in warnings[0]


def test_the_systemd_example_runs_with_keys():
    from zmqfed.cli.node import build_parser

    unit = (REPO / "examples/daemon/zmqfed-node@.service").read_text()
    exec_start = unit.split("ExecStart=", 1)[1].split("\nStateDirectory")[0]
    argv = shlex.split(exec_start.replace("\\\n", " ").replace("%i", "client0"))
    args = build_parser().parse_args(argv[1:])
    assert args.keys == "/etc/zmqfed/keys" and not args.insecure


# -- what a refused HELLO tells ---------------------------------------------------------


def _hello_with(fingerprint: str, sender: str = "alpha") -> list:
    meta = {"protocol": PROTOCOL_VERSION, "fingerprint": fingerprint, "session": uuid.uuid4().hex}
    return encode(Envelope(kind="HELLO", sender=sender, seq=1, meta=meta))


def test_a_wrong_fingerprint_tells_an_unauthenticated_peer_no_roster(aggregator, zmq_ctx):  # noqa: F811
    with _dealer(zmq_ctx, aggregator.endpoint, "alpha") as sock:
        reply = _ask(sock, _hello_with("0" * 16))
    aggregator.finish()
    assert (reply.kind, reply.meta["code"]) == ("ERROR", "fingerprint")
    reason = reply.meta["reason"]
    assert "beta" not in reason and aggregator.endpoint not in reason
    assert "different topologies" in reason


def test_a_wrong_fingerprint_tells_an_authenticated_member_what_differs(
    tmp_path, free_tcp_endpoint, slow_factor
):
    keys = tmp_path / "keys"
    for name in ("aggregator", "alpha", "beta"):
        create_keys(keys, name)
    agg = _CurveAggregator(free_tcp_endpoint, keys)
    agg.start()
    assert agg.ready.wait(30 * slow_factor) and agg.error is None, agg.error
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.curve_serverkey = zmq.auth.load_certificate(keys / "aggregator.key")[0]
        sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(
            keys / "alpha.key_secret"
        )
        sock.connect(free_tcp_endpoint)
        reply = _ask(sock, _hello_with("0" * 16), timeout=30 * slow_factor)
    finally:
        sock.close(0)
        ctx.term()
        agg.stop.set()
        agg.join(30 * slow_factor)
    assert (reply.kind, reply.meta["code"]) == ("ERROR", "fingerprint")
    assert free_tcp_endpoint in reply.meta["reason"] and "['alpha', 'beta']" in reply.meta["reason"]


# -- idle connections and descriptors -----------------------------------------------------

IDLE_AGGREGATOR = """
import sys, torch
from zmqfed.address import Address
from zmqfed.core import Maintainer
from zmqfed.federated import Curve, SocketOptions
from zmqfed.functional import count_step
from zmqfed.props import FederatedProperties
endpoint, keys = sys.argv[1], sys.argv[2]
props = FederatedProperties("aggregator", "aggregator", Address(endpoint), "aggregator", ("alpha",))
m = Maintainer(props, {"w": torch.zeros(2)}, curve=Curve(keys) if keys else None,
               socket_options=SocketOptions(handshake_ivl_ms=1000))
with m:
    count_step(1)
print("READY", flush=True)
m.step(timeout=300)
"""


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settle(pid: int, want, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = _fds(pid)
        if want(n) or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("curve", [False, True], ids=["plaintext", "curve"])
def test_idle_connections_and_descriptors(
    tmp_path, free_tcp_endpoint, run_python, slow_factor, curve
):
    keys = tmp_path / "keys"
    if curve:
        for name in ("aggregator", "alpha"):
            create_keys(keys, name)
    agg = run_python(IDLE_AGGREGATOR, args=[free_tcp_endpoint, str(keys) if curve else ""])
    assert agg.stdout is not None and agg.stdout.readline().strip() == "READY"
    _wait_listening(free_tcp_endpoint, 60 * slow_factor)
    time.sleep(0.5)
    baseline = _fds(agg.pid)
    host, port = free_tcp_endpoint.removeprefix("tcp://").rsplit(":", 1)

    # 1. Silent TCP connections (no ZMTP greeting): dropped at HANDSHAKE_IVL, in any mode.
    silent = [socket.create_connection((host, int(port))) for _ in range(30)]
    try:
        assert _settle(agg.pid, lambda n: n >= baseline + 30, 10 * slow_factor) >= baseline + 30
        after = _settle(agg.pid, lambda n: n <= baseline + 2, 15 * slow_factor)
        assert after <= baseline + 2, f"{after - baseline} silent connections still held"
    finally:
        for s in silent:
            s.close()

    # 2. Peers that complete the handshake and then say nothing (no heartbeats either).
    ctx = zmq.Context()
    peers = []
    try:
        for _ in range(20):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.reconnect_ivl = 60_000  # a refused peer does not come back during the test
            if curve:  # keys of nobody in the group: ZAP refuses them
                sock.curve_serverkey = zmq.auth.load_certificate(keys / "aggregator.key")[0]
                sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.connect(free_tcp_endpoint)
            peers.append(sock)
        time.sleep(3 * slow_factor)  # three handshake intervals
        held = _fds(agg.pid) - baseline
        if curve:
            # Ruled out for outsiders: without a member's key nobody keeps a descriptor.
            assert held <= 2, f"{held} unauthenticated peers hold descriptors"
        else:
            # Confirmed without CURVE: an idle peer keeps its descriptor for as long as it
            # likes (the aggregator sends no heartbeats, docs/zeromq.md §10): descriptors
            # are bounded by RLIMIT_NOFILE only (docs/security.md).
            assert held >= 20, f"only {held} of 20 idle plaintext peers still connected"
    finally:
        for sock in peers:
            sock.close(0)
        ctx.term()


# -- optimizer state planted in a download -----------------------------------------------


def test_a_member_survives_a_download_with_wrong_shaped_optimizer_state(
    free_tcp_endpoint, slow_factor
):
    topology = _star(free_tcp_endpoint, ("alpha",))
    served = nn.Linear(4, 1)
    agg = Maintainer(
        topo.analysis(topology, "aggregator")[0],
        served.state_dict(keep_vars=True),
        timeout=30 * slow_factor,
    )
    with agg:
        count_step(1)
    # As if a member had planted it and the aggregator had passed it on.
    agg.package()
    agg.packaged_data["weight"]["exp_avg"] = torch.zeros(7, 7)
    agg.packaged_data["weight"]["momentum_buffer"] = torch.zeros(3)
    agg.packaged_data["bias"]["exp_avg_sq"] = torch.ones(1, dtype=torch.int64)
    outcome: dict = {}

    def member() -> None:
        network = nn.Linear(4, 1)
        m = Maintainer(topo.analysis(topology, "alpha")[0], network.state_dict(keep_vars=True))
        optim = FederatedOptimizer(torch.optim.Adam(network.parameters(), lr=0.1))
        optim.zero_grad()
        network(torch.ones(2, 4)).sum().backward()
        optim.step()  # an earlier round: Adam has its state, and uses what it finds there
        try:
            m.step(upload=False, timeout=30 * slow_factor)
            m.unpackage(optim)
            for _ in range(3):  # local training: Adam steps on its state
                optim.zero_grad()
                network(torch.ones(2, 4)).sum().backward()
                optim.step()
            outcome["exp_avg"] = list(optim.state[network.weight]["exp_avg"].shape)
            m.package(optim)
            m.step(download=False, timeout=30 * slow_factor)
            outcome["ok"] = True
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            m.close()

    thread = threading.Thread(target=member, daemon=True)
    thread.start()
    try:
        agg.step()
    finally:
        thread.join(30 * slow_factor)
        agg.close()
    assert outcome.get("ok"), outcome.get("error")
    assert outcome["exp_avg"] == [1, 4]  # Adam's own state, not the planted [7, 7]


# -- ipc permissions ---------------------------------------------------------------------

UMASK_AGGREGATOR = """
import os, sys, torch
os.umask(0)  # the most permissive umask a service manager could leave
from zmqfed.address import Address
from zmqfed.core import Maintainer
from zmqfed.props import FederatedProperties
props = FederatedProperties("aggregator", "aggregator", Address(sys.argv[1]), "aggregator", ("a",))
m = Maintainer(props, {"w": torch.zeros(1)})
print(oct(os.stat(sys.argv[1].removeprefix("ipc://")).st_mode & 0o777), oct(os.umask(0)), flush=True)
m.close()
"""


def test_an_ipc_endpoint_is_owner_only_under_a_permissive_umask(
    ipc_endpoint, run_python, slow_factor
):
    proc = run_python(UMASK_AGGREGATOR, args=[ipc_endpoint])
    out, err = proc.communicate(timeout=60 * slow_factor)
    assert proc.returncode == 0, err
    mode, umask = out.split()
    assert umask == "0o0"  # the process's umask is left as it was
    assert mode == "0o700", f"socket file mode {mode}: other local users could connect"


# -- zmqfed-sim and the working directory -----------------------------------------------

APP = """
from tests.integration.toy_app import factory
"""

SHADOW = """
from pathlib import Path
Path(__file__).with_name("shadowed").write_text("a module in the working directory ran")
raise ImportError("not the real lz4")
"""


def test_zmqfed_sim_never_imports_a_working_directory_module_over_an_installed_one(
    tmp_path, slow_factor
):
    (tmp_path / "myapp.py").write_text(APP)
    (tmp_path / "lz4.py").write_text(SHADOW)  # named like a module every node imports
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = ["--star", "1", "--app", "myapp:factory", "--rounds", "1", "--logdir", "sim"]
    result = subprocess.run(
        [str(BIN / "zmqfed-sim"), *args, "--timeout", str(120 * slow_factor)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180 * slow_factor,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert not (tmp_path / "shadowed").exists()
    assert result.returncode == 0, result.stdout + result.stderr
    records = (tmp_path / "sim" / "aggregator.rounds.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in records] == [0]  # the app from the cwd still ran
