"""zmqfed-node and zmqfed-sim as real processes: clean stops, crash recovery, failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.integration.toy_app import expected_weight
from zmqfed.topo import star

APP = "tests.integration.toy_app:factory"


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _status(state: Path, node: str) -> dict:
    path = state / f"{node}.status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _weight(state: Path) -> torch.Tensor:
    ckpt = torch.load(state / "aggregator.ckpt", weights_only=True)
    return ckpt["model"]["weight"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def federation(tmp_path, free_tcp_endpoint, run_python):
    """Start daemons of a star topology: node(name, state_dir, *extra args) -> Popen."""
    topology = tmp_path / "topology.json"

    def start(n: int):
        star(n, free_tcp_endpoint).save(topology)

        def node(name: str, state: Path, *extra: str):
            args = [
                "run",
                "--topology",
                str(topology),
                "--node",
                name,
                "--app",
                APP,
                "--state-dir",
                str(state),
                "--no-progress",
                *extra,
            ]
            return run_python(module="zmqfed.cli.node", args=args)

        return node

    return start


def _sim(run_python, logdir: Path, *args: str):
    """``zmqfed-sim ARGS --logdir LOGDIR`` as a child process."""
    return run_python(module="zmqfed.cli.sim", args=[*args, "--logdir", str(logdir)])


def test_sim_runs_a_star_to_the_closed_form(run_python, tmp_path, slow_factor):
    logdir = tmp_path / "sim"
    proc = _sim(
        run_python, logdir, "--star", "3", "--app", APP, "--rounds", "4", "--timeout", "120"
    )
    out, err = proc.communicate(timeout=150 * slow_factor)
    assert proc.returncode == 0, out + err
    records = [json.loads(x) for x in (logdir / "aggregator.rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["participants"] == 3 for r in records)
    assert torch.allclose(_weight(logdir), torch.full((1, 4), expected_weight(3, 4)), atol=1e-6)
    for name in ("aggregator", "client0", "client1", "client2"):
        assert _status(logdir, name)["state"] == "finished"


def test_sim_stops_everything_when_a_node_fails(run_python, tmp_path, slow_factor):
    logdir = tmp_path / "sim"
    proc = _sim(
        run_python,
        logdir,
        "--star",
        "3",
        "--app",
        APP,
        "--rounds",
        "5",
        "--set",
        "fail_node=client1",
        "--set",
        "fail_round=1",
        "--set",
        "delay=0.2",
    )
    out, err = proc.communicate(timeout=150 * slow_factor)
    assert proc.returncode == 1, out + err
    assert "client1" in err and "fails on purpose in round 1" in err
    for name in ("aggregator", "client0", "client1", "client2"):
        status = _status(logdir, name)
        if status:
            assert not _alive(status["pid"]), f"{name} still running"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_aggregator_stopped_and_restarted_resumes_exactly(federation, tmp_path, slow_factor, sig):
    node = federation(2)
    state = tmp_path / "state"
    rounds = ["--rounds", "6", "--set", "delay=0.4"]
    clients = [node(f"client{i}", tmp_path / f"c{i}", *rounds) for i in range(2)]
    agg = node("aggregator", state, *rounds)
    _wait_for(
        lambda: _status(state, "aggregator").get("round", 0) >= 2, 90 * slow_factor, "two rounds"
    )
    agg.send_signal(sig)
    agg.wait(timeout=15 * slow_factor)
    if sig == signal.SIGTERM:
        assert agg.returncode == 0  # a clean stop on request
        assert _status(state, "aggregator")["state"] == "stopped"
    saved = torch.load(state / "aggregator.ckpt", weights_only=True)["round"]
    assert 2 <= saved < 6
    time.sleep(1.0)  # the collaborators notice and keep retrying
    again = node("aggregator", state, *rounds)
    _, err = again.communicate(timeout=120 * slow_factor)
    assert again.returncode == 0, err
    assert f"resumed from {state / 'aggregator.ckpt'} at round {saved}" in err
    for c in clients:
        _, c_err = c.communicate(timeout=60 * slow_factor)
        assert c.returncode == 0, c_err
    # The collaborators never restarted, and the result is that of an uninterrupted run.
    assert torch.allclose(_weight(state), torch.full((1, 4), expected_weight(2, 6)), atol=1e-6)
    records = [json.loads(x) for x in (state / "aggregator.rounds.jsonl").read_text().splitlines()]
    assert sorted({r["round"] for r in records}) == list(range(6))


def test_killed_collaborator_does_not_stall_rounds(federation, tmp_path, slow_factor):
    node = federation(3)
    state = tmp_path / "state"
    extra = [
        "--rounds",
        "6",
        "--set",
        "delay=0.3",
        "--set",
        "min_clients=2",
        "--set",
        "round_timeout=1.5",
    ]
    clients = [node(f"client{i}", tmp_path / f"c{i}", *extra) for i in range(3)]
    agg = node("aggregator", state, *extra)
    _wait_for(
        lambda: _status(state, "aggregator").get("round", 0) >= 1,
        90 * slow_factor,
        "the first round",
    )
    clients[2].send_signal(signal.SIGKILL)
    _, err = agg.communicate(timeout=120 * slow_factor)
    assert agg.returncode == 0, err
    records = [json.loads(x) for x in (state / "aggregator.rounds.jsonl").read_text().splitlines()]
    assert len(records) == 6
    assert records[-1]["participants"] == 2  # the round closed at its deadline without client2
    for c in clients[:2]:
        c.communicate(timeout=60 * slow_factor)
        assert c.returncode == 0


def test_collaborator_killed_after_its_upload_and_restarted_is_counted_once(
    federation, tmp_path, slow_factor
):
    """Killed just after uploading while the other trains, restarted in the open round."""
    node = federation(2)
    markers = tmp_path / "markers"
    markers.mkdir()
    opts = ["--set", "delay=2", "--set", "delay_node=client1", "--set", f"marker_dir={markers}"]
    rounds = ["--rounds", "3"]
    state = {n: tmp_path / n for n in ("aggregator", "client0", "client1")}
    agg = node("aggregator", state["aggregator"], *rounds, *opts)
    slow = node("client1", state["client1"], *rounds, *opts)
    fast = node("client0", state["client0"], *rounds, *opts)
    _wait_for(lambda: (markers / "client0.trained.1").exists(), 60 * slow_factor, "round 1")
    time.sleep(0.3)  # the upload is on its way; client1 still trains for ~2 s
    os.kill(fast.pid, signal.SIGKILL)
    fast.wait(10)
    fast = node("client0", state["client0"], *rounds, *opts)  # restarted in the open round
    for proc in (agg, slow, fast):
        out, err = proc.communicate(timeout=120 * slow_factor)
        assert proc.returncode == 0, out + err
    records = [
        json.loads(x)
        for x in (state["aggregator"] / "aggregator.rounds.jsonl").read_text().splitlines()
    ]
    assert [r["participants"] for r in records] == [2, 2, 2]
    assert torch.allclose(_weight(state["aggregator"]), torch.full((1, 4), expected_weight(2, 3)))


def test_sim_runs_a_three_level_hierarchy(run_python, tmp_path, slow_factor):
    """root <- edge0, edge1 <- two leaves each: edges relay, the root gets the closed form."""
    from zmqfed.topo import tree

    ipc_dir = Path(tempfile.mkdtemp(prefix="zf-h-", dir="/tmp"))  # short ipc paths
    topology = tmp_path / "tree.json"
    tree(2, 2, transport="ipc", ipc_dir=str(ipc_dir)).save(topology)
    logdir = tmp_path / "sim"
    proc = _sim(
        run_python,
        logdir,
        "--topology",
        str(topology),
        "--app",
        APP,
        "--rounds",
        "3",
        "--timeout",
        "120",
    )
    out, err = proc.communicate(timeout=150 * slow_factor)
    shutil.rmtree(ipc_dir, ignore_errors=True)
    assert proc.returncode == 0, out + err
    # Leaves of each edge have targets 1 and 2 (their index + 1): every level averages to 1.5.
    model = torch.load(logdir / "root.ckpt", weights_only=True)["model"]
    assert torch.allclose(model["weight"], torch.full((1, 4), expected_weight(2, 3)), atol=1e-6)
    for name in ("edge0", "edge1", "leaf0", "leaf3"):
        assert _status(logdir, name)["state"] == "finished"
        assert _status(logdir, name)["round"] == 3


def test_systemd_unit_runs_a_valid_zmqfed_node_command():
    """The sample unit's ExecStart parses with zmqfed-node's own parser and names a real app."""
    import shlex

    from zmqfed.app import load_factory
    from zmqfed.cli.node import build_parser

    unit = (
        Path(__file__).resolve().parents[2] / "examples/daemon/zmqfed-node@.service"
    ).read_text()
    exec_start = unit.split("ExecStart=", 1)[1].split("\n\n")[0].split("\nStateDirectory")[0]
    argv = shlex.split(exec_start.replace("\\\n", " ").replace("%i", "client0"))
    assert argv[0].endswith("/zmqfed-node")
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.node, args.log_json) == ("run", "client0", True)
    assert (args.metrics, args.dashboard) == ("0.0.0.0:9470", "127.0.0.1:8080")
    docs = (Path(__file__).resolve().parents[2] / "docs/operations.md").read_text()
    assert unit in docs  # docs/operations.md shows this very unit
    assert callable(load_factory(args.app))
    assert "KillSignal=SIGTERM" in unit  # zmqfed-node stops cleanly on SIGTERM


def test_sim_runs_secure_aggregation_to_the_closed_form(run_python, tmp_path, slow_factor):
    """zmqfed-sim with App(configure=secure_aggregation): every round one secure mean."""
    logdir = tmp_path / "sim"
    app = "tests.integration.secagg_app:factory"
    proc = _sim(
        run_python, logdir, "--star", "3", "--app", app, "--rounds", "4", "--timeout", "120"
    )
    out, err = proc.communicate(timeout=150 * slow_factor)
    assert proc.returncode == 0, out + err
    records = [json.loads(x) for x in (logdir / "aggregator.rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["participants"] == 1 for r in records)  # one aggregate, never an upload
    assert "secure aggregation of 3 clients (0 dropped)" in (logdir / "aggregator.log").read_text()
    # within the quantization error of the closed form (steps of 2 * 8 / 2**22)
    assert torch.allclose(_weight(logdir), torch.full((1, 4), expected_weight(3, 4)), atol=1e-4)
