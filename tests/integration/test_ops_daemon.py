"""Metrics and machine-readable status of real ``zmqfed-node`` processes.

``/metrics`` is parsed with Prometheus' own text-format parser and checked
against the aggregator's ``rounds.jsonl``; ``zmqfed-node status --json`` is
checked against ``/status.json`` and its exit codes against what happened to
each node (running, finished, failed, stopped, killed).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zmqfed.topo import star

APP = "tests.integration.toy_app:factory"


def _status_file(state: Path, node: str) -> dict:
    path = state / f"{node}.status.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def _metrics(url: str) -> dict[str, list]:
    families = text_string_to_metric_families(_get(url).decode())
    return {f.name: f.samples for f in families}


def _value(samples: list, name: str | None = None, **labels: str) -> float:
    (match,) = [
        s
        for s in samples
        if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return match.value


def _node_status(state: Path, *args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "zmqfed.cli.node", "status", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def node(tmp_path, free_tcp_endpoint, run_python):
    topology = tmp_path / "topology.json"
    star(2, free_tcp_endpoint).save(topology)
    state = tmp_path / "state"

    def start(name: str, *extra: str):
        args = ["run", "--topology", str(topology), "--node", name, "--app", APP]
        args += ["--state-dir", str(state), "--no-progress", *extra]
        return run_python(module="zmqfed.cli.node", args=args)

    start.state = state  # type: ignore[attr-defined]
    return start


def test_metrics_and_status_follow_the_rounds_and_the_nodes_fate(node, slow_factor):
    state: Path = node.state
    # After client0 is killed, each round waits round_timeout for it: keep it short.
    # Enough rounds to still be running through the checks on a loaded machine.
    common = ["--rounds", "30", "--set", "delay=0.4", "--heartbeat", "0.5"]
    common += ["--set", "min_clients=1", "--set", "round_timeout=0.8"]
    clients = [node(f"client{i}", *common, "--metrics", "127.0.0.1:0") for i in range(2)]
    agg = node("aggregator", *common, "--metrics", "127.0.0.1:0")
    url = _wait_for(
        lambda: (_status_file(state, "aggregator").get("endpoints") or {}).get("metrics"),
        60 * slow_factor,
        "the aggregator's metrics endpoint",
    )
    _wait_for(
        lambda: _status_file(state, "aggregator").get("round", 0) >= 3,
        90 * slow_factor,
        "three rounds",
    )

    # status --json and /status.json carry the same fields; a running node exits 0
    code, out = _node_status(state, "--node", "aggregator", "--json")
    assert code == 0, out
    from_file = json.loads(out)
    live = json.loads(_get(url.replace("/metrics", "/status.json")))
    assert set(from_file) == set(live)
    assert from_file["health"]["status"] == live["health"]["status"] == "running"
    assert from_file["online_peers"] == ["client0", "client1"]
    assert from_file["endpoints"]["metrics"] == url

    metrics = _metrics(url)
    records = [json.loads(x) for x in (state / "aggregator.rounds.jsonl").read_text().splitlines()]
    done = int(_value(metrics["zmqfed_rounds_completed"]))
    assert 3 <= done <= len(records)  # a record is written before it is published
    records = records[:done]
    assert _value(metrics["zmqfed_round"]) == done
    assert _value(metrics["zmqfed_rounds_planned"]) == 30
    hist = metrics["zmqfed_round_duration_seconds"]
    assert _value(hist, "zmqfed_round_duration_seconds_count") == done
    assert _value(hist, "zmqfed_round_duration_seconds_sum") == pytest.approx(
        sum(r["seconds"] for r in records)
    )
    assert _value(hist, "zmqfed_round_duration_seconds_bucket", le="+Inf") == done
    aggregation = metrics["zmqfed_aggregation_duration_seconds"]
    assert _value(aggregation, "zmqfed_aggregation_duration_seconds_sum") == pytest.approx(
        sum(r["aggregate_seconds"] for r in records)
    )
    assert _value(metrics["zmqfed_round_participants"]) == records[-1]["participants"]
    assert _value(metrics["zmqfed_last_round_metric"], metric="loss") == pytest.approx(
        records[-1]["metrics"]["loss"]
    )
    accepted = _value(metrics["zmqfed_uploads_accepted"], group="aggregator")
    assert sum(r["participants"] for r in records) <= accepted <= 2 * (done + 1)
    assert _value(metrics["zmqfed_peers_online"], group="aggregator", role="aggregator") == 2
    assert _value(metrics["zmqfed_peers_quorum"], group="aggregator", role="aggregator") == 1
    pushes = _value(metrics["zmqfed_received_messages"], kind="PUSH")
    assert pushes >= accepted
    rss = _value(metrics["process_resident_memory_bytes"])
    vm_rss = next(
        int(line.split()[1]) * 1024
        for line in Path(f"/proc/{agg.pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    assert 0.5 < rss / vm_rss < 2.0

    col_url = _status_file(state, "client0")["endpoints"]["metrics"]
    col = _metrics(col_url)
    assert _value(col["zmqfed_sent_messages"], kind="PUSH", role="collaborator") >= done - 1
    assert _value(col["zmqfed_peers_online"], group="aggregator", role="collaborator") == 1
    assert "zmqfed_uploads_accepted" not in col  # an aggregator's counter

    # a collaborator killed outright: its status says running, its process is gone
    clients[0].send_signal(signal.SIGKILL)
    clients[0].wait(timeout=10 * slow_factor)
    code, out = _node_status(state, "--node", "client0", "--json")
    assert (code, json.loads(out)["health"]["status"]) == (13, "stale"), out
    _wait_for(
        lambda: "client0" in _status_file(state, "aggregator").get("offline_peers", []),
        30 * slow_factor,
        "the aggregator to see client0 leave",
    )
    _, err = agg.communicate(timeout=120 * slow_factor)
    assert agg.returncode == 0, err
    clients[1].communicate(timeout=60 * slow_factor)
    code, out = _node_status(state, "--node", "aggregator")
    assert code == 10 and out.startswith("aggregator: finished (finished), round 30/30"), out
    code, out = _node_status(state, "--json")  # every node: the worst verdict wins
    assert code == 13
    verdicts = {doc["node"]: doc["health"]["status"] for doc in json.loads(out)["nodes"]}
    assert verdicts == {"aggregator": "finished", "client0": "stale", "client1": "finished"}


def test_a_failed_node_says_why_and_the_rest_say_stopped(run_python, tmp_path, slow_factor):
    logdir = tmp_path / "sim"
    args = ["--star", "2", "--app", APP, "--rounds", "5", "--logdir", str(logdir)]
    args += ["--set", "fail_node=client1", "--set", "fail_round=1", "--set", "delay=0.2"]
    proc = run_python(module="zmqfed.cli.sim", args=args)
    out, err = proc.communicate(timeout=150 * slow_factor)
    assert proc.returncode == 1, out + err
    code, text = _node_status(logdir, "--node", "client1", "--json")
    doc = json.loads(text)
    assert code == 12 and doc["state"] == "failed"
    assert doc["failure"] == "RuntimeError: client1 fails on purpose in round 1"
    code, text = _node_status(logdir, "--node", "aggregator")
    assert code == 11 and text.startswith("aggregator: stopped (stopped)"), text
    code, text = _node_status(logdir)
    assert code == 12 and "failure: RuntimeError: client1 fails on purpose" in text
