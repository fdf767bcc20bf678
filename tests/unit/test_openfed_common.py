"""OpenFed's address, topology, props and utils call shapes, with their zmqfed meaning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import zmqfed
import zmqfed.topo as topo
from zmqfed.address import Address
from zmqfed.errors import ConfigError, TopologyError
from zmqfed.props import FederatedProperties

# -- Address ----------------------------------------------------------------------


def test_openfed_constructor_shapes() -> None:
    a = Address("gloo", init_method="tcp://localhost:1994", rank=1, world_size=2)
    assert (a.backend, a.init_method, a.endpoint, a.world_size, a.rank) == (
        "gloo",
        "tcp://localhost:1994",
        "tcp://localhost:1994",
        2,
        1,
    )
    assert Address() == Address("gloo", "tcp://localhost:1994")
    empty = Address("null", "null")
    assert empty.empty and empty == zmqfed.empty_address and empty == Address(None)
    f = Address("mpi", "file:///tmp/zmqfed-test.sock")
    assert (f.endpoint, f.scheme, f.backend) == ("ipc:///tmp/zmqfed-test.sock", "ipc", "mpi")
    n = Address("nccl", "tcp://127.0.0.1:5000", store=object(), group_name="g")
    assert n.endpoint == "tcp://127.0.0.1:5000" and n.group_name == "g" and n.store is not None


def test_zmqfed_endpoint_shape_is_unchanged() -> None:
    a = Address("tcp://127.0.0.1:6100", 5)
    assert (a.endpoint, a.world_size, a.rank, a.backend) == ("tcp://127.0.0.1:6100", 5, -1, "gloo")
    assert Address(endpoint="ipc:///tmp/x.ipc").endpoint == "ipc:///tmp/x.ipc"
    assert repr(Address("tcp://h:1")) == "Address('tcp://h:1')"
    assert str(zmqfed.empty_address) == "<empty>"


def test_equality_ignores_world_size_rank_store_and_group_name() -> None:
    a = Address("gloo", "tcp://h:1", world_size=3, rank=2)
    assert a == Address("tcp://h:1") == Address("gloo", "tcp://h:1", group_name="x", store=1)
    assert hash(a) == hash(Address("tcp://h:1"))
    assert Address("gloo", "file:///tmp/s") == Address("ipc:///tmp/s")
    assert Address("mpi", "tcp://h:1") != Address("gloo", "tcp://h:1")
    assert Address("tcp://h:1") != Address("tcp://h:2")


def test_env_init_method_reads_master_addr_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    a = Address("gloo", "env://")
    assert (a.endpoint, a.init_method, a.world_size, a.rank) == (
        "tcp://127.0.0.1:29500",
        "env://",
        4,
        2,
    )
    data = a.serialize()
    monkeypatch.setenv("MASTER_PORT", "29501")  # a file means what it meant when written
    assert Address.unserialize(data).endpoint == "tcp://127.0.0.1:29500"
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(ConfigError, match=r"MASTER_ADDR and MASTER_PORT.*\$MASTER_PORT"):
        Address("gloo", "env://")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("tcp",), "backend must be one of"),
        (("gloo", "udp://x:1"), "must start with tcp:// or ipc://"),
        (("gloo", "tcp://nohost"), "host:port"),
        (("null", "tcp://h:1"), "empty address"),
        (("gloo", "file://"), "missing path"),
        (("gloo", "tcp://h:1", 0), "world_size"),
        (("gloo", "tcp://h:1", 2, 2), "rank 2 is not below world_size 2"),
        (("tcp://h:1", "tcp://h:2"), "second argument must be world_size"),
    ],
)
def test_bad_addresses(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Address(*args)  # type: ignore[arg-type]


def test_serialize_round_trips_both_shapes() -> None:
    for a in (
        Address("mpi", "file:///tmp/x", world_size=3, rank=1, group_name="g"),
        Address("tcp://h:1", 2),
        zmqfed.empty_address,
    ):
        b = Address.unserialize(json.loads(json.dumps(a.serialize())))
        assert (b, b.world_size, b.rank, b.init_method, b.group_name) == (
            a,
            a.world_size,
            a.rank,
            a.init_method,
            a.group_name,
        )
    # OpenFed's dict, and zmqfed's earlier one
    old = {"backend": "gloo", "init_method": "tcp://localhost:1994", "world_size": 2, "rank": -1}
    assert Address.unserialize(old).endpoint == "tcp://localhost:1994"
    assert Address.unserialize({"endpoint": "tcp://h:1", "world_size": 2}).world_size == 2
    with pytest.raises(ConfigError, match="endpoint says"):
        Address.unserialize(
            {"backend": "gloo", "init_method": "tcp://h:1", "endpoint": "tcp://h:2"}
        )
    with pytest.raises(ConfigError, match="unknown key 'port'"):
        Address.unserialize({"port": 1})
    with pytest.raises(AttributeError, match="immutable"):
        Address("tcp://h:1").rank = 3  # type: ignore[misc]


def test_default_addresses() -> None:
    assert zmqfed.default_file_address.init_method.startswith("file://")
    assert zmqfed.default_file_address.scheme == "ipc"
    assert zmqfed.common.default_file_address is zmqfed.default_file_address
    assert zmqfed.common.Address is Address and zmqfed.common.Meta is zmqfed.Meta


# -- topology -------------------------------------------------------------------------


def test_openfed_topology_calls() -> None:
    t = topo.Topology()
    t.add_node("alpha", zmqfed.empty_address)
    agg = t.add_node(topo.Node("aggregator", zmqfed.default_tcp_address))
    t.add_node("lonely")
    t.add_edge(topo.Edge(t.fetch_node_via_nick_name("alpha"), agg))  # type: ignore[arg-type]
    t.add_edge(topo.Node("beta"), "aggregator")
    assert t.is_edge("alpha", "aggregator") and not t.is_edge("aggregator", "alpha")
    assert [n.nick_name for n in t.clear_useless_nodes()] == ["lonely"]
    removed = t.remove_edge(0)
    assert removed.names == ("alpha", "aggregator")
    assert t.remove_node(0).nick_name == "alpha"
    assert [n.nick_name for n in t.nodes] == ["aggregator", "beta"]
    with pytest.raises(TopologyError, match="edge index 5 out of range"):
        t.remove_edge(5)
    with pytest.raises(TopologyError, match="node index 7 out of range"):
        t.remove_node(7)
    e = t.edges[0]
    assert e.in_edge("beta") and e.is_start("beta") and e.is_end(agg)


def test_openfed_topology_json_is_read() -> None:
    agg = {"nick_name": "agg", "address": Address("gloo", "tcp://127.0.0.1:1994").serialize()}
    col = {"nick_name": "col", "address": Address("null", "null").serialize()}
    t = topo.Topology.unserialize({"nodes": [agg, col], "edges": [{"start": col, "end": agg}]})
    assert t.is_edge("col", "agg")
    again = topo.Topology.unserialize(json.loads(json.dumps(t.serialize())))
    assert again.serialize() == t.serialize()
    mpi = topo.Topology()
    mpi.add_edge(topo.Node("c"), topo.Node("a", Address("mpi", "file:///tmp/a.sock")))
    back = topo.Topology.unserialize(mpi.serialize())
    address = back.fetch_node_via_nick_name("a").address  # type: ignore[union-attr]
    assert (address.backend, address.init_method) == ("mpi", "file:///tmp/a.sock")
    assert topo.Node.unserialize(topo.Node("n", "tcp://h:1").serialize()).address.endpoint == (
        "tcp://h:1"
    )
    assert topo.Edge.unserialize(t.edges[0].serialize()).names == ("col", "agg")


def test_federated_group_and_multi_group_analysis() -> None:
    t = topo.Topology()
    for i, name in enumerate(["top", "mid"]):
        t.add_node(topo.Node(name, f"tcp://127.0.0.1:{7300 + i}"))
    t.add_edge("mid", "top")
    t.add_edge(topo.Node("leaf"), "mid")
    t.add_edge(topo.Node("leaf2"), "mid")
    groups = topo.federated_groups(t, "mid")
    assert [(g.role, [o.nick_name for o in g.others]) for g in groups] == [
        ("aggregator", ["leaf", "leaf2"]),
        ("collaborator", ["top"]),
    ]
    props = topo.analysis(t, "mid")
    assert [g.federated_properties for g in groups] == props
    assert [(p.address.world_size, p.address.rank) for p in props] == [(3, 0), (2, 1)]
    assert topo.analysis(t, "leaf2")[0].address.rank == 2
    # built by hand, OpenFed style
    hand = topo.FederatedGroup("aggregator", t.fetch_node_via_nick_name("mid"))  # type: ignore[arg-type]
    for edge in t.edges:
        hand.add_to_group(edge)
    assert hand.federated_properties == props[0]
    lonely = topo.FederatedGroup("collaborator", t.fetch_node_via_nick_name("leaf"))  # type: ignore[arg-type]
    assert lonely.add_to_group(t.edges[1]) and not lonely.add_to_group(t.edges[0])
    with pytest.raises(TopologyError, match="fellow collaborators are unknown"):
        _ = lonely.federated_properties


# -- props ---------------------------------------------------------------------------------


def test_props_files_have_openfed_keys(tmp_path: Path) -> None:
    t = topo.Topology()
    t.add_edge(topo.Node("c"), topo.Node("a", "tcp://127.0.0.1:7400"))
    props = topo.analysis(t, "c")
    FederatedProperties.save(props, tmp_path / "c.json")
    raw = json.loads((tmp_path / "c.json").read_text())
    assert isinstance(raw, list) and raw[0]["role"] == "collaborator"
    assert set(raw[0]["address"]) >= {"backend", "init_method", "world_size", "rank"}
    assert FederatedProperties.load(tmp_path / "c.json") == props
    # OpenFed's role spelling is understood; a file without the members says what is missing
    alias = dict(raw[0], role="openfed_collaborator")
    assert FederatedProperties.unserialize(alias).role == "collaborator"
    openfed_only = {"role": "openfed_aggregator", "nick_name": "a", "address": raw[0]["address"]}
    with pytest.raises(ConfigError, match="OpenFed wrote only role, nick_name and address"):
        FederatedProperties.unserialize(openfed_only)


# -- utils ---------------------------------------------------------------------------------


def test_utils() -> None:
    from zmqfed.utils import FMT, seed_everything, string_trim, tablist, time_string

    assert zmqfed.tablist is tablist and zmqfed.FMT is FMT
    assert string_trim(15, 4) == "15" and string_trim(0.123) == "0.12"
    assert string_trim("this is a message from zmqfed", 15) == "this is... zmqfed"
    table = tablist(["a", "b", "c", "d", "e", "f"], [1, 2, 3, 4, 5, 6], 3)
    assert table.count("| a | b | c |") == 1 and table.count("| 4 | 5 | 6 |") == 1
    one = tablist(["a", "b"], list(range(5)), force_in_one_row=True)
    assert one.splitlines()[-2] == "| 4 |   |"
    assert len(time_string()) == 19
    import random

    import torch

    seed_everything(3)
    x = (random.random(), torch.rand(1).item())
    seed_everything(3)
    assert x == (random.random(), torch.rand(1).item())
    FMT.color = True
    try:
        assert "\033[" in FMT.zmqfed_class_fmt.format(class_name="X", description="d")
    finally:
        FMT.color = False
    assert FMT.zmqfed_title == "<zmqfed>"
