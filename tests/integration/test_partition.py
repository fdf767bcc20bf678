"""A real network between the nodes: partitions and a lossy link, in network namespaces.

Each test builds its own lab: a "switch" namespace holding a bridge, and one
namespace per host (the aggregator at 10.77.0.1, the collaborators at
10.77.0.2 and 10.77.0.3), each host wired to the bridge by a veth pair whose
switch-side end is the host's port. Nothing is created in the root
namespace, names carry the test process's pid and a random tag, and the lab
is torn down (processes killed first, then every namespace deleted) even when
the test fails. The nodes are real ``zmqfed-node run`` daemons.

Cutting a port (``ip link set PORT down`` in the switch) is a partition: TCP
neither resets nor delivers. A cut shorter than the ZMTP heartbeat timeout
(2 s interval, 10 s timeout) is bridged by TCP retransmission; a longer one
makes both ends drop the connection, and the collaborator must reconnect,
say HELLO again and resend its pending request, which the aggregator counts
once (idempotent uploads). Either way every round must have both updates,
exactly once: the final weights are the closed form of ``toy_app``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, SLOW
from tests.integration.toy_app import expected_weight
from zmqfed.topo import star

pytestmark = [pytest.mark.netns, pytest.mark.slow]

APP = "tests.integration.toy_app:factory"
ROUNDS = 8
PORT = 5770
SUBNET = "10.77.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _namespaces() -> set[str]:
    out = _ip("netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


class Lab:
    """A bridge in a switch namespace and one namespace per host, addresses 10.77.0.N/24."""

    def __init__(self, hosts: list[str]) -> None:
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.switch = f"zfsw-{tag}"
        self.ns = {host: f"zf{host}-{tag}" for host in hosts}
        self.addr = {host: f"{SUBNET}.{i + 1}" for i, host in enumerate(hosts)}
        self.port = {host: f"p{i}" for i, host in enumerate(hosts)}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.created: list[str] = []

    def up(self) -> None:
        _ip("netns", "add", self.switch)
        self.created.append(self.switch)
        sw = ("-n", self.switch)
        _ip(*sw, "link", "add", "br0", "type", "bridge")
        _ip(*sw, "link", "set", "br0", "up")
        for host, ns in self.ns.items():
            _ip("netns", "add", ns)
            self.created.append(ns)
            port = self.port[host]
            # Created in the switch namespace, the host end moved straight into its own.
            _ip(*sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip(*sw, "link", "set", port, "master", "br0")
            _ip(*sw, "link", "set", port, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[host]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def down(self) -> None:
        """Kill every process started here, then delete every namespace created."""
        for proc in self.procs:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5 * SLOW)
                    break
                except subprocess.TimeoutExpired:
                    continue
            proc.wait(timeout=10 * SLOW)
        for ns in reversed(self.created):
            _ip("netns", "del", ns, check=False)

    def run(self, host: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host``'s namespace, output to ``log``."""
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns[host], *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=log.parent,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def in_switch(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.switch, *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=30,
        )


@contextmanager
def lab(hosts: list[str]) -> Iterator[Lab]:
    net = Lab(hosts)
    try:
        net.up()
        yield net
    finally:
        net.down()


def _status(state: Path) -> dict:
    try:
        return json.loads((state / "aggregator.status.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_for(predicate, timeout: float, what: str, procs, logs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        dead = [(p, log) for p, log in zip(procs, logs, strict=True) if p.poll() not in (None, 0)]
        if dead:
            raise AssertionError(f"a node failed while waiting for {what}:\n{_tail(dead[0][1])}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _federation(net: Lab, tmp_path: Path, rounds: int):
    """Start the aggregator and both collaborators; returns (procs, logs, state dir)."""
    endpoint = f"tcp://{net.addr['agg']}:{PORT}"
    topology = tmp_path / "topology.json"
    star(2, endpoint).save(topology)
    state = tmp_path / "aggregator"
    procs, logs = [], []
    for host, node, node_state in (
        ("agg", "aggregator", state),
        ("c0", "client0", tmp_path / "c0"),
        ("c1", "client1", tmp_path / "c1"),
    ):
        log = tmp_path / f"{node}.log"
        argv = [
            sys.executable,
            "-m",
            "zmqfed.cli.node",
            "run",
            "--topology",
            str(topology),
            "--node",
            node,
            "--app",
            APP,
            "--state-dir",
            str(node_state),
            "--rounds",
            str(rounds),
            "--set",
            "delay=0.5",
            "--no-progress",
            "--insecure",  # plaintext between namespaces: the point is the network
        ]
        procs.append(net.run(host, argv, log))
        logs.append(log)
    return procs, logs, state


def _check_result(procs, logs, state: Path, rounds: int, timeout: float) -> list[dict]:
    for proc, log in zip(procs, logs, strict=True):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{log.stem} did not finish:\n{_tail(log)}") from None
        assert proc.returncode == 0, f"{log.stem} exited {proc.returncode}:\n{_tail(log)}"
    records = [json.loads(x) for x in (state / "aggregator.rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(rounds))
    assert all(r["participants"] == 2 for r in records), [r["participants"] for r in records]
    weight = torch.load(state / "aggregator.ckpt", weights_only=True)["model"]["weight"]
    # Every update counted exactly once: a lost or doubled one moves the average.
    assert torch.allclose(weight, torch.full((1, 4), expected_weight(2, rounds)), atol=1e-6)
    return records


@pytest.mark.parametrize(
    "cut", [5.0, 15.0], ids=["5s-under-heartbeat-timeout", "15s-over-heartbeat-timeout"]
)
def test_partitioned_collaborator_rejoins_and_counts_once(tmp_path, cut):
    with lab(["agg", "c0", "c1"]) as net:
        names = {net.switch, *net.ns.values()}
        procs, logs, state = _federation(net, tmp_path, ROUNDS)
        _wait_for(lambda: _status(state).get("round", 0) >= 2, 90 * SLOW, "round 2", procs, logs)
        cut_at = _status(state)["round"]
        net.in_switch("ip", "link", "set", net.port["c1"], "down")
        try:
            time.sleep(cut)
            during = _status(state).get("round", 0)
        finally:
            net.in_switch("ip", "link", "set", net.port["c1"], "up")
        records = _check_result(procs, logs, state, ROUNDS, 120 * SLOW)
        agg_log = logs[0].read_text(errors="replace")
        c1_log = logs[2].read_text(errors="replace")
    assert not names & _namespaces(), "namespaces left behind"
    # Rounds need both updates: none closed during the cut beyond the one in flight.
    assert during <= cut_at + 1, (cut_at, during)
    assert cut_at + 1 < ROUNDS, "the cut came too late to matter"
    slowest = max(r["seconds"] for r in records)
    assert slowest >= cut * 0.8, f"no round waited for the partitioned collaborator ({slowest} s)"
    if cut > 12:  # past heartbeat timeout + interval: the connection was dropped and redone
        assert "lost the connection" in c1_log, c1_log[-3000:]
    assert "Traceback" not in agg_log


def test_lossy_delayed_link_for_the_whole_run(tmp_path):
    with lab(["agg", "c0", "c1"]) as net:
        names = {net.switch, *net.ns.values()}
        for where in (("ip", "netns", "exec", net.switch), ("ip", "netns", "exec", net.ns["c1"])):
            dev = net.port["c1"] if where[-1] == net.switch else "eth0"
            netem = [
                "tc",
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "netem",
                "delay",
                "50ms",
                "loss",
                "5%",
            ]
            done = subprocess.run(
                [*where, *netem],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.returncode != 0:
                err = done.stderr.strip()
                unsupported = (
                    "Operation not supported",
                    "qdisc kind is unknown",
                    "No such file or directory",
                    "module",
                )
                if any(s in err for s in unsupported):
                    pytest.skip(f"tc netem unavailable on this kernel: {err}")
                raise AssertionError(f"tc netem failed: {err}")
        procs, logs, state = _federation(net, tmp_path, ROUNDS)
        _check_result(procs, logs, state, ROUNDS, 180 * SLOW)
    assert not names & _namespaces(), "namespaces left behind"
