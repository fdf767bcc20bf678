"""Unit tests of topology serialization: dicts, JSON and YAML files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import zmqfed.topo as topo
from zmqfed.errors import TopologyError


def sample() -> topo.Topology:
    """A hierarchy with settings, an ipc endpoint and a non-ASCII name."""
    t = topo.Topology()
    root = t.add_node(topo.Node("root", "tcp://127.0.0.1:5000", {"rounds": 3, "codec": "raw"}))
    edge = t.add_node(topo.Node("edge", "ipc:///tmp/zmqfed-test-edge.ipc"))
    t.add_edge(edge, root)
    t.add_edge(topo.Node("caf\u00e9", settings={"lr": 0.1, "tags": ["a", None]}), edge)
    t.add_edge(topo.Node("leaf"), edge)
    return t


EXPECTED = {
    "nodes": [
        {
            "nick_name": "root",
            "address": "tcp://127.0.0.1:5000",
            "settings": {"rounds": 3, "codec": "raw"},
        },
        {"nick_name": "edge", "address": "ipc:///tmp/zmqfed-test-edge.ipc", "settings": {}},
        {"nick_name": "caf\u00e9", "address": None, "settings": {"lr": 0.1, "tags": ["a", None]}},
        {"nick_name": "leaf", "address": None, "settings": {}},
    ],
    "edges": [
        {"start": "edge", "end": "root"},
        {"start": "caf\u00e9", "end": "edge"},
        {"start": "leaf", "end": "edge"},
    ],
}


def test_serialize_is_the_documented_format() -> None:
    assert sample().serialize() == EXPECTED


def test_unserialize_round_trip_keeps_groups() -> None:
    t = topo.Topology.unserialize(sample().serialize())
    assert t.serialize() == EXPECTED
    assert topo.compile_topology(t) == topo.compile_topology(sample())
    assert topo.analysis(t, "root")[0].settings == {"rounds": 3, "codec": "raw"}


@pytest.mark.parametrize("name", ["topology.json", "topology.yaml", "topology.YML"])
def test_save_load_round_trip(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    sample().save(path)
    text = path.read_text(encoding="utf-8")
    if name.endswith(".json"):
        assert json.loads(text) == EXPECTED
    else:
        assert not text.lstrip().startswith("{")  # block-style YAML, not JSON
        assert yaml.safe_load(text) == EXPECTED
    loaded = topo.Topology.load(str(path))
    assert loaded.serialize() == EXPECTED
    assert [p.fingerprint for p in topo.analysis(loaded, "edge")] == [
        p.fingerprint for p in topo.analysis(sample(), "edge")
    ]
    assert os.listdir(tmp_path) == [name]  # no temporary file left behind


def test_hand_written_yaml_with_list_edges(tmp_path: Path) -> None:
    path = tmp_path / "t.yml"
    path.write_text(
        "nodes:\n"
        "  - nick_name: hub\n"
        "    address: tcp://127.0.0.1:5555\n"
        "  - {nick_name: a}\n"
        "  - {nick_name: b, address: null, settings: null}\n"
        "edges:\n"
        "  - [a, hub]\n"
        "  - {start: b, end: hub}\n",
        encoding="utf-8",
    )
    t = topo.Topology.load(path)
    assert [e.names for e in t.edges] == [("a", "hub"), ("b", "hub")]
    assert topo.analysis(t, "hub")[0].peers == ("a", "b")


def test_address_in_serialized_address_form_is_accepted() -> None:
    data = {
        "nodes": [
            {"nick_name": "hub", "address": {"endpoint": "tcp://127.0.0.1:1", "world_size": 9}},
            {"nick_name": "a"},
        ],
        "edges": [{"start": "a", "end": "hub"}],
    }
    t = topo.Topology.unserialize(data)
    assert topo.analysis(t, "a")[0].address.world_size == 2  # recomputed, not taken from the file


def test_empty_document_is_an_empty_topology() -> None:
    assert topo.Topology.unserialize({}).nodes == ()
    assert topo.Topology.unserialize({"nodes": None, "edges": []}).edges == ()


HUB = {"nick_name": "hub", "address": "tcp://127.0.0.1:5555"}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([HUB], r"must be an object with 'nodes' and 'edges', got list"),
        ({"nodes": [], "edge": []}, r"the topology has the unknown key 'edge'"),
        ({"nodes": {"hub": HUB}}, r"'nodes' must be a list, got dict"),
        ({"nodes": [HUB, "alpha"]}, r"nodes\[1\] must be an object, got str 'alpha'"),
        ({"nodes": [HUB, {"address": None}]}, r"nodes\[1\] has no 'nick_name'"),
        (
            {"nodes": [HUB, {"nick_name": "a", "adress": None}]},
            r"nodes\[1\] \('a'\) has the unknown key 'adress'",
        ),
        (
            {"nodes": [{"nick_name": "h", "address": 5555}]},
            r"nodes\[0\] \('h'\) address must be an endpoint string, an address object or null, got int",
        ),
        (
            {"nodes": [{"nick_name": "h", "settings": [1]}]},
            r"nodes\[0\] \('h'\) settings must be an object, got list",
        ),
        (
            {"nodes": [{"nick_name": "h", "address": "tcp://h"}]},
            r"nodes\[0\]: node 'h'.*needs host:port",
        ),
        ({"nodes": [{"nick_name": 42}]}, r"nodes\[0\]: nick name must be a string, got int 42"),
        ({"nodes": [{"nick_name": ""}]}, r"nodes\[0\]: nick name '' is empty"),
        (
            {"nodes": [HUB, {"nick_name": "a"}, {"nick_name": "hub"}]},
            r"nodes\[2\]: duplicate nick name 'hub'",
        ),
        (
            {
                "nodes": [HUB, {"nick_name": "a"}],
                "edges": [{"start": "a", "end": "hub"}, {"start": "a", "end": "x"}],
            },
            r"edges\[1\] references unknown node 'x'",
        ),
        (
            {"nodes": [HUB], "edges": [["ghost", "hub"]]},
            r"edges\[0\] references unknown node 'ghost'",
        ),
        ({"nodes": [HUB], "edges": [{"start": "hub"}]}, r"edges\[0\] has no 'end'"),
        (
            {"nodes": [HUB], "edges": [{"start": "a", "end": "hub", "weight": 1}]},
            r"edges\[0\] has the unknown key 'weight'",
        ),
        ({"nodes": [HUB], "edges": [["a", "b", "c"]]}, r"edges\[0\] must be .* or \[start, end\]"),
        (
            {"nodes": [HUB], "edges": [{"start": 1, "end": "hub"}]},
            r"edges\[0\] start must be a nick name string, got int 1",
        ),
        ({"nodes": [HUB], "edges": [["hub", "hub"]]}, r"edges\[0\]: self edge 'hub' -> 'hub'"),
        (
            {"nodes": [HUB, {"nick_name": "a"}], "edges": [["a", "hub"], ["a", "hub"]]},
            r"edges\[1\]: duplicate edge 'a' -> 'hub'",
        ),
        (
            {"nodes": [{"nick_name": "hub"}, {"nick_name": "a"}], "edges": [["a", "hub"]]},
            r"aggregator 'hub' has no address",
        ),
        (
            {
                "nodes": [HUB, {"nick_name": "a", "address": "tcp://127.0.0.1:5556"}],
                "edges": [["a", "hub"], ["hub", "a"]],
            },
            r"edges\[1\]: edge 'hub' -> 'a' is opposite to 'a' -> 'hub'",
        ),
    ],
)
def test_unserialize_errors_name_the_entry(data: Any, match: str) -> None:
    with pytest.raises(TopologyError, match=match):
        topo.Topology.unserialize(data)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"nodes": [', encoding="utf-8")
    with pytest.raises(TopologyError, match=r"bad\.json: not valid JSON"):
        topo.Topology.load(bad_json)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("nodes: [a, {", encoding="utf-8")
    with pytest.raises(TopologyError, match=r"bad\.yaml: not valid YAML"):
        topo.Topology.load(bad_yaml)
    with pytest.raises(TopologyError, match=r"missing\.json: cannot read the topology file"):
        topo.Topology.load(tmp_path / "missing.json")
    entry = tmp_path / "entry.json"
    entry.write_text(json.dumps({"nodes": [HUB], "edges": [["x", "hub"]]}), encoding="utf-8")
    with pytest.raises(TopologyError, match=r"entry\.json: edges\[0\] references unknown node 'x'"):
        topo.Topology.load(entry)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TopologyError, match=r"binary\.json: not UTF-8"):
        topo.Topology.load(binary)


def test_save_refuses_an_invalid_topology(tmp_path: Path) -> None:
    t = topo.Topology()
    t.add_edge(topo.Node("a"), topo.Node("hub"))
    with pytest.raises(TopologyError, match="aggregator 'hub' has no address"):
        t.save(tmp_path / "t.json")
    assert os.listdir(tmp_path) == []


def test_save_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text("old", encoding="utf-8")
    topo.star(2).save(path)
    assert [n["nick_name"] for n in json.loads(path.read_text())["nodes"]] == [
        "aggregator",
        "client0",
        "client1",
    ]
    assert path.stat().st_mode & 0o777 == 0o644


def test_yaml_without_pyyaml_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` fail
    with pytest.raises(ImportError, match="needs PyYAML: pip install pyyaml"):
        topo.star(1).save(tmp_path / "t.yaml")
    topo.star(1).save(tmp_path / "t.json")  # JSON needs nothing extra
    assert topo.Topology.load(tmp_path / "t.json").serialize() == topo.star(1).serialize()


def test_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.json"
    path.write_text("old", encoding="utf-8")

    def broken_replace(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        topo.star(1).save(path)
    assert os.listdir(tmp_path) == ["t.json"]
    assert path.read_text(encoding="utf-8") == "old"
