"""The ops layer's pure parts and its HTTP server: addresses, health, status files, SVG, routes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET

import pytest

import zmqfed.topo as topo
from zmqfed.errors import ConfigError
from zmqfed.ops import HEALTH_CODES, OpsServer, StatusFile, Telemetry, health, parse_listen
from zmqfed.ops.snapshot import Histogram, eta_seconds, numeric_metrics
from zmqfed.ops.status import read_status, to_json


def test_ops_all_is_pinned():
    import zmqfed.ops as ops

    assert sorted(ops.__all__) == [
        "HEALTH_CODES",
        "MetricsExporter",
        "NodeOps",
        "OpsOptions",
        "OpsServer",
        "Snapshot",
        "StatusFile",
        "Telemetry",
        "health",
        "parse_listen",
        "read_status",
    ]
    for name in ops.__all__:
        assert hasattr(ops, name), name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9100", ("127.0.0.1", 9100)),
        (":9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:8080", ("::1", 8080)),
    ],
)
def test_listen_addresses(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("host:", "port must be a number"),
        ("host:70000", "port must be a number"),
        ("host:-1", "port must be a number"),
        ("::1:80", "IPv6 address in brackets"),
        ("[::1]80", r"\[IPV6\]:PORT"),
        ("a/b:80", "not a host name"),
    ],
)
def test_bad_listen_addresses_name_the_option(text, match):
    with pytest.raises(ConfigError, match=f"--metrics: .*{match}|--metrics: {match}"):
        parse_listen(text, "--metrics")


def test_histogram_is_cumulative_and_ignores_nonsense():
    h = Histogram([1.0, 5.0])
    for value in (0.5, 1.0, 3.0, 7.0, math.nan, -1.0):
        h.observe(value)
    state = h.state()
    assert state.buckets == ((1.0, 2), (5.0, 3), (math.inf, 4))
    assert (state.count, state.sum) == (4, 11.5)
    with pytest.raises(ValueError, match="increase"):
        Histogram([2.0, 1.0])


def test_round_metrics_keep_finite_numbers_only():
    metrics = {"acc": 0.9, "n": 3, "flag": True, "name": "x", "bad": math.inf}
    assert numeric_metrics(metrics) == {"acc": 0.9, "n": 3.0}
    assert eta_seconds([], 5, 0.0) is None
    assert eta_seconds([2.0, 4.0], 3, 1.0) == pytest.approx(8.0)
    assert eta_seconds([2.0], 0, 0.0) == 0.0


def _doc(**fields):
    doc = {"node": "n", "state": "running", "round": 1, "rounds": 3, "updated": time.time()}
    doc.update(fields)
    return doc


def test_health_verdicts_and_their_exit_codes():
    now = time.time()
    assert health(_doc(), now=now)["status"] == "running"
    for state in ("finished", "stopped", "failed"):
        verdict = health(_doc(state=state, updated=now - 1e6), now=now)
        assert verdict == {"status": state, "exit_code": HEALTH_CODES[state], "heartbeat_age": 1e6}
    old = _doc(updated=now - 100, heartbeat_interval=5.0)
    assert health(old, now=now)["status"] == "stale"  # 100 s > max(30, 3 x 5)
    assert health(old, now=now, stale_after=200)["status"] == "running"
    assert health(_doc(updated=now - 20), now=now)["status"] == "running"
    assert HEALTH_CODES == {"running": 0, "finished": 10, "stopped": 11, "failed": 12, "stale": 13}


def test_a_running_node_whose_process_is_gone_is_stale_at_once():
    import socket

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    doc = _doc(pid=proc.pid, host=socket.gethostname())
    assert health(doc)["status"] == "stale"
    assert health(_doc(pid=proc.pid, host="elsewhere"))["status"] == "running"


def test_status_file_writes_atomically_and_never_goes_back(tmp_path):
    path = tmp_path / "n.status.json"
    status = StatusFile(path)
    assert status.write(_doc(round=2, loss=math.nan), seq=5)
    assert not status.write(_doc(round=1), seq=4)  # an older snapshot lost a race
    doc = read_status(path)
    assert doc["round"] == 2 and doc["loss"] is None  # NaN is not JSON
    assert [p.name for p in tmp_path.iterdir()] == ["n.status.json"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{", "invalid JSON"),
        ("[1]", "JSON object"),
        ('{"node": "n"}', "missing state, round, rounds, updated"),
        ('{"node": "n", "state": "x", "round": 0, "rounds": 1, "updated": "now"}', "updated"),
    ],
)
def test_a_file_that_is_no_status_is_named(tmp_path, content, match):
    path = tmp_path / "x.status.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match) as info:
        read_status(path)
    assert str(path) in str(info.value)


def test_to_json_is_strict_json():
    text = to_json({"a": math.nan, "b": [math.inf, 1.5], "c": object()})
    doc = json.loads(text)
    assert doc["a"] is None and doc["b"] == [None, 1.5] and doc["c"].startswith("<object")


def test_svg_draws_every_node_and_edge_with_its_state():
    t = topo.tree(2, 2)
    svg = topo.to_svg(t, {"leaf0": "online", "leaf1": "offline", "root": "self"}, title="t")
    root = ET.fromstring(svg)
    ns = {"s": "http://www.w3.org/2000/svg"}
    nodes = {g.get("data-node"): g for g in root.iterfind(".//s:g[@class='node']", ns)}
    assert set(nodes) == {n.nick_name for n in t.nodes}
    assert nodes["leaf0"].get("data-state") == "online"
    assert nodes["leaf1"].get("data-state") == "offline"
    assert nodes["edge0"].get("data-state") == "unknown"
    assert nodes["root"].find("s:rect", ns) is not None  # aggregators are boxes
    assert nodes["leaf0"].find("s:ellipse", ns) is not None
    edges = root.findall(".//s:line[@class='edge']", ns)
    assert sorted((e.get("data-from"), e.get("data-to")) for e in edges) == sorted(
        (e.start.nick_name, e.end.nick_name) for e in t.edges
    )
    assert "#93c47d" in svg and "#e06666" in svg  # the state colours are in the style sheet


def test_svg_is_well_formed_with_any_valid_name_and_escapes_titles():
    t = topo.Topology()
    agg = t.add_node(topo.Node("Zürich hub", "tcp://127.0.0.1:9"))
    t.add_edge(topo.Node("b-1.x", None), agg)
    svg = topo.to_svg(t, title='rounds <1 & "2">')
    root = ET.fromstring(svg)  # well-formed: names and the title are escaped
    ns = {"s": "http://www.w3.org/2000/svg"}
    names = [g.get("data-node") for g in root.iterfind(".//s:g[@class='node']", ns)]
    assert names == ["Zürich hub", "b-1.x"]
    assert root.find("s:title", ns).text == 'rounds <1 & "2">'


# -- the server ------------------------------------------------------------------------


@pytest.fixture
def telemetry():
    telemetry = Telemetry("agg", ["aggregator"], rounds=4)
    for r in range(3):
        telemetry.record(
            {"round": r, "mode": "train", "seconds": 0.1, "metrics": {"loss": 1 / (r + 1)}}
        )
    telemetry.publish(state="running", round=3, groups=[])
    return telemetry


@pytest.fixture
def served(telemetry):
    servers = []

    def start(**kwargs):
        server = OpsServer(telemetry, "127.0.0.1", 0, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _get(url, method="GET"):
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


def test_status_json_has_the_file_fields_and_a_live_health(served):
    server = served()
    code, headers, body = _get(server.url + "/status.json")
    doc = json.loads(body)
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert doc["health"] == {"status": "running", "exit_code": 0, "heartbeat_age": 0.0}
    assert (doc["node"], doc["round"], doc["rounds"]) == ("agg", 3, 4)
    assert doc["last_record"]["metrics"] == {"loss": 1 / 3}
    assert _get(server.url + "/")[2] == b"zmqfed: /metrics /status.json\n"
    assert _get(server.url + "/metrics")[0] == 404  # not asked for


def test_dashboard_routes_and_read_only(served):
    server = served(dashboard=True, topology_svg="<svg/>")
    code, headers, body = _get(server.url + "/")
    assert code == 200 and b"/static/dashboard.js" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for asset in ("dashboard.js", "dashboard.css"):
        assert _get(server.url + "/static/" + asset)[0] == 200
    code, _, body = _get(server.url + "/rounds.json?after=1")
    assert [r["round"] for r in json.loads(body)["records"]] == [1, 2]
    code, _, body = _get(server.url + "/rounds.json?after=x")
    assert code == 400 and "after must be an integer" in json.loads(body)["error"]
    assert _get(server.url + "/topology.svg")[2] == b"<svg/>"
    for path in ("/static/../node_ops.py", "/static/index.htm", "/nothing", "/metrics"):
        assert _get(server.url + path)[0] == 404, path
    for method in ("POST", "PUT", "DELETE"):
        code, headers, _ = _get(server.url + "/status.json", method)
        assert code == 405 and headers["Allow"] == "GET, HEAD"
    code, headers, body = _get(server.url + "/status.json", "HEAD")
    assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_metrics_route_speaks_the_prometheus_text_format(served, telemetry):
    parser = pytest.importorskip("prometheus_client.parser")
    from zmqfed.ops import MetricsExporter

    server = served(metrics=MetricsExporter(telemetry))
    code, headers, body = _get(server.url + "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in parser.text_string_to_metric_families(body.decode())}
    hist = {s.name: s for s in families["zmqfed_round_duration_seconds"].samples if not s.labels}
    assert hist["zmqfed_round_duration_seconds_count"].value == 3
    assert hist["zmqfed_round_duration_seconds_sum"].value == pytest.approx(0.3)
    state = {s.labels["state"]: s.value for s in families["zmqfed_state"].samples}
    assert state == {"starting": 0, "running": 1, "finished": 0, "stopped": 0, "failed": 0}
    assert _get(server.url + "/")[0] == 200 and _get(server.url + "/rounds.json")[0] == 404
