"""Unit tests of zmqfed.topo: the graph, its validation and the compiler."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zmqfed.topo as topo
from zmqfed.address import Address, default_tcp_address, empty_address
from zmqfed.errors import TopologyError
from zmqfed.props import AGGREGATOR, COLLABORATOR, group_fingerprint
from zmqfed.topo import compile as topo_compile
from zmqfed.topo import shapes


def seed_topology() -> topo.Topology:
    """The seed doc's example, built exactly as it is written there."""
    aggregator = topo.Node("aggregator", default_tcp_address)
    alpha = topo.Node("alpha", empty_address)
    beta = topo.Node("beta", empty_address)
    topology = topo.Topology()
    topology.add_node_list([aggregator, alpha, beta])
    topology.add_edge(alpha, aggregator)
    topology.add_edge(beta, aggregator)
    return topology


def hierarchy() -> topo.Topology:
    """root <- e1, e2 <- two leaves each."""
    t = topo.Topology()
    root = t.add_node(topo.Node("root", "tcp://127.0.0.1:5000"))
    for i, edge in enumerate(("e1", "e2")):
        node = t.add_node(topo.Node(edge, f"tcp://127.0.0.1:{5001 + i}", {"codec": "raw"}))
        t.add_edge(node, root)
        for leaf in (f"{edge}a", f"{edge}b"):
            t.add_edge(topo.Node(leaf), node)
    return t


def test_all_is_pinned() -> None:
    assert sorted(topo.__all__) == sorted(
        [
            "Edge",
            "FederatedGroup",
            "Node",
            "SocketPlan",
            "Topology",
            "analysis",
            "compile_topology",
            "federated_groups",
            "socket_plan",
            "star",
            "to_ascii",
            "to_dot",
            "to_image",
            "to_svg",
            "tree",
        ]
    )
    for name in topo.__all__:
        assert getattr(topo, name) is not None


@pytest.mark.parametrize("module", [topo, topo_compile, shapes])
def test_docstring_examples_run(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0


# -- nodes ----------------------------------------------------------------------


def test_node_equality_and_hash_use_the_nick_name_only() -> None:
    a1 = topo.Node("a", "tcp://127.0.0.1:1")
    a2 = topo.Node("a", "tcp://127.0.0.1:2")
    assert a1 == a2 and hash(a1) == hash(a2)
    assert a1 != topo.Node("b")
    assert len({a1, a2, topo.Node("b")}) == 2
    assert not a1.same_definition(a2)


def test_node_takes_an_endpoint_string_or_none() -> None:
    node = topo.Node("a", "ipc:///tmp/x.ipc")
    assert node.address == Address("ipc:///tmp/x.ipc")
    assert topo.Node("b", None).address.empty
    assert topo.Node("c").address == empty_address


def test_node_with_a_bad_endpoint_is_named() -> None:
    with pytest.raises(TopologyError, match=r"node 'agg'.*udp://x:1"):
        topo.Node("agg", "udp://x:1")
    with pytest.raises(TopologyError, match=r"node 'agg'.*address must be"):
        topo.Node("agg", 1994)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "empty or whitespace"),
        (" \t ", "empty or whitespace"),
        ("\0peer", r"may not start with '\\x00'"),
        ("a" * 256, "256 bytes"),
        ("\u00e9" * 128, "256 bytes"),  # 128 characters, but 2 bytes each
        ("a\nb", r"may not contain '\\n'"),
        ("\ud800", "not valid UTF-8"),
        ("../etc/passwd", "may not start with '.'"),
        ("a/b", "may not contain '/'"),
        ("a\\b", r"may not contain '\\\\'"),
        ("..", "may not start with '.'"),
        (".hidden", "may not start with '.'"),
        ("-rf", "may not start with '-'"),
        ("node ", "may not end with a space"),
        ('say "hi"', "may not contain"),
        ("cafe\u0301", "normal form C; write it as 'caf\u00e9'"),
        (7, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_bad_nick_names_are_rejected(name: object, match: str) -> None:
    with pytest.raises(TopologyError, match=match):
        topo.Node(name)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "a" * 255,
        "\u00e9" * 127,
        "node_1",
        "client-0.eu",
        "_x",
        "7",
        "\u7bc0\u70b9",
        "caf\u00e9",
    ],
)
def test_good_nick_names_are_kept(name: str) -> None:
    assert topo.Node(name).nick_name == name


def test_node_settings_are_copied_and_must_be_json_safe() -> None:
    original = {"codec": "lz4"}
    node = topo.Node("a", settings=original)
    original["codec"] = "raw"
    assert node.settings == {"codec": "lz4"}
    with pytest.raises(TopologyError, match=r"node 'a' settings.*set"):
        topo.Node("a", settings={"bad": {1, 2}})
    with pytest.raises(TopologyError, match="node 'a': settings must be a mapping"):
        topo.Node("a", settings=[1])  # type: ignore[arg-type]


def test_edge_rejects_self_edges_and_non_nodes() -> None:
    a = topo.Node("a")
    with pytest.raises(TopologyError, match="self edge 'a' -> 'a'"):
        topo.Edge(a, topo.Node("a"))
    with pytest.raises(TopologyError, match="edge end must be a Node"):
        topo.Edge(a, "b")  # type: ignore[arg-type]
    assert topo.Edge(a, topo.Node("b")).names == ("a", "b")
    assert repr(topo.Edge(a, topo.Node("b"))) == "Edge('a' -> 'b')"


# -- building -------------------------------------------------------------------


def test_add_edge_adds_new_node_objects_and_resolves_names() -> None:
    t = topo.Topology()
    agg = topo.Node("agg", "tcp://127.0.0.1:7000")
    t.add_edge(topo.Node("c1"), agg)
    t.add_node("c2")
    edge = t.add_edge("c2", "agg")
    assert edge.end is agg  # the topology's own node, not a copy
    assert [n.nick_name for n in t.nodes] == ["c1", "agg", "c2"]  # start is added first
    assert [e.names for e in t.edges] == [("c1", "agg"), ("c2", "agg")]
    assert "c1" in t and topo.Node("c2") in t and "zz" not in t and 3 not in t
    assert t.fetch_node_via_nick_name("agg") is agg
    assert t.fetch_node_via_nick_name("zz") is None


def test_add_edge_with_unknown_name_is_named_and_changes_nothing() -> None:
    t = topo.Topology([topo.Node("agg", "tcp://127.0.0.1:7000")])
    with pytest.raises(TopologyError, match="edge start references unknown node 'x'"):
        t.add_edge("x", "agg")
    with pytest.raises(TopologyError, match="edge end references unknown node 'y'"):
        t.add_edge(topo.Node("new"), "y")
    assert [n.nick_name for n in t.nodes] == ["agg"]  # 'new' was not added
    assert t.edges == ()


def test_add_edge_rejects_a_conflicting_node_of_the_same_name() -> None:
    t = topo.Topology([topo.Node("agg", "tcp://127.0.0.1:7000"), topo.Node("c")])
    with pytest.raises(
        TopologyError, match=r"conflicts with Node\('agg', 'tcp://127\.0\.0\.1:7000'\)"
    ):
        t.add_edge(topo.Node("c"), topo.Node("agg", "tcp://127.0.0.1:7001"))
    # an equal definition is the same node
    t.add_edge(topo.Node("c"), topo.Node("agg", "tcp://127.0.0.1:7000"))
    assert len(t.edges) == 1


def test_duplicates_and_self_edges_are_rejected_when_added() -> None:
    t = topo.Topology([topo.Node("agg", "tcp://127.0.0.1:7000"), topo.Node("c")])
    with pytest.raises(TopologyError, match="duplicate nick name 'c'"):
        t.add_node(topo.Node("c", "tcp://127.0.0.1:1"))
    with pytest.raises(TopologyError, match="duplicate nick name 'x'"):
        topo.Topology(nodes=["x", "y", "x"])
    with pytest.raises(TopologyError, match="self edge 'agg' -> 'agg'"):
        t.add_edge("agg", "agg")
    t.add_edge("c", "agg")
    with pytest.raises(TopologyError, match="duplicate edge 'c' -> 'agg'"):
        t.add_edge("c", "agg")
    assert len(t.edges) == 1 and len(t.nodes) == 2


def test_constructor_takes_edges_and_pairs() -> None:
    a, b, c = topo.Node("a", "tcp://127.0.0.1:1"), topo.Node("b"), topo.Node("c")
    t = topo.Topology(nodes=[a], edges=[topo.Edge(b, a), (c, "a")])
    assert [e.names for e in t.edges] == [("b", "a"), ("c", "a")]


def test_remove_node_removes_its_edges() -> None:
    t = hierarchy()
    removed = t.remove_node("e1")
    assert removed.nick_name == "e1"
    assert "e1" not in t
    assert all("e1" not in e.names for e in t.edges)
    assert [n.nick_name for n in t.collaborators_of("root")] == ["e2"]
    assert t.aggregators_of("e1a") == ()
    with pytest.raises(TopologyError, match="unknown node 'e1'"):
        t.remove_node("e1")


def test_remove_edge() -> None:
    t = seed_topology()
    edge = t.remove_edge("alpha", topo.Node("aggregator"))
    assert edge.names == ("alpha", "aggregator")
    assert [e.names for e in t.edges] == [("beta", "aggregator")]
    assert "alpha" in t  # nodes stay
    with pytest.raises(TopologyError, match="no edge 'alpha' -> 'aggregator'"):
        t.remove_edge("alpha", "aggregator")


def test_queries() -> None:
    t = hierarchy()
    assert [n.nick_name for n in t.aggregators] == ["root", "e1", "e2"]
    assert [n.nick_name for n in t.collaborators] == ["e1", "e1a", "e1b", "e2", "e2a", "e2b"]
    assert [n.nick_name for n in t.collaborators_of("e1")] == ["e1a", "e1b"]
    assert [n.nick_name for n in t.aggregators_of(topo.Node("e2a"))] == ["e2"]
    assert t.collaborators_of("e1a") == ()
    with pytest.raises(TopologyError, match="unknown node 'nope'"):
        t.collaborators_of("nope")


# -- validation -----------------------------------------------------------------


def test_valid_topologies_pass() -> None:
    seed_topology().validate()
    hierarchy().validate()
    topo.Topology().validate()


def test_aggregator_without_address_is_named() -> None:
    t = topo.Topology()
    t.add_edge(topo.Node("alpha"), topo.Node("hub"))
    with pytest.raises(TopologyError, match=r"aggregator 'hub' has no address.*'alpha'"):
        t.validate()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("tcp://127.0.0.1:6000", "tcp://127.0.0.1:6000"),
        ("tcp://localhost:6000", "tcp://127.0.0.1:6000"),
        ("ipc:///tmp/x/../g.ipc", "ipc:///tmp/g.ipc"),
    ],
)
def test_aggregators_sharing_an_endpoint_are_named(first: str, second: str) -> None:
    t = topo.Topology()
    t.add_edge(topo.Node("c1"), topo.Node("g1", first))
    t.add_edge(topo.Node("c2"), topo.Node("g2", second))
    with pytest.raises(TopologyError, match="aggregators 'g1' and 'g2' share the endpoint"):
        t.validate()


def test_same_endpoint_on_a_pure_collaborator_is_not_a_conflict() -> None:
    t = topo.Topology()
    t.add_edge(topo.Node("c1", "tcp://127.0.0.1:6000"), topo.Node("g1", "tcp://127.0.0.1:6000"))
    t.validate()  # c1 never binds


@pytest.mark.parametrize("endpoint", ["tcp://*:6000", "tcp://127.0.0.1:*", "ipc://*"])
def test_wildcard_endpoint_is_rejected(endpoint: str) -> None:
    t = topo.Topology()
    t.add_edge(topo.Node("c"), topo.Node("g", endpoint))
    with pytest.raises(TopologyError, match="aggregator 'g' has the wildcard endpoint"):
        t.validate()


def test_cycle_of_groups_is_analysed_and_named_when_a_hierarchy_is_needed() -> None:
    t = topo.Topology(
        nodes=[topo.Node(n, f"tcp://127.0.0.1:{6000 + i}") for i, n in enumerate("abcd")]
    )
    t.add_edge("d", "a")  # a tail into the cycle
    t.add_edge("a", "b")
    t.add_edge("b", "c")
    t.add_edge("c", "a")
    t.validate()  # a ring of groups: every group is a star with its own socket
    assert t.find_cycle() == ["a", "b", "c", "a"]
    with pytest.raises(TopologyError, match="cycle 'a' -> 'b' -> 'c' -> 'a'"):
        t.validate(acyclic=True)
    # a aggregates c and d, and collaborates in b's group
    as_agg, as_collab = topo.analysis(t, "a")
    assert (as_agg.role, as_agg.collaborators, as_agg.address.rank) == (
        "aggregator",
        ("c", "d"),
        0,
    )
    assert (as_collab.role, as_collab.aggregator_name, as_collab.address.rank) == (
        "collaborator",
        "b",
        1,
    )
    assert [p.role for p in topo.analysis(t, "d")] == ["collaborator"]
    assert set(topo.compile_topology(t)) == set("abcd")


def test_opposite_edges_are_rejected() -> None:
    t = topo.Topology(
        nodes=[topo.Node("x", "tcp://127.0.0.1:1"), topo.Node("y", "tcp://127.0.0.1:2")]
    )
    t.add_edge("x", "y")
    with pytest.raises(TopologyError, match="edge 'y' -> 'x' is opposite to 'x' -> 'y'"):
        t.add_edge("y", "x")
    assert t.is_edge("x", "y") and not t.is_edge("y", "x")


def test_diamond_is_not_a_cycle() -> None:
    t = topo.Topology(
        nodes=[topo.Node(n, f"tcp://127.0.0.1:{6000 + i}") for i, n in enumerate("abc")]
    )
    t.add_edge(topo.Node("leaf"), "b")
    t.add_edge("leaf", "c")
    t.add_edge("b", "a")
    t.add_edge("c", "a")
    t.validate()


# -- analysis -------------------------------------------------------------------


def test_seed_usage() -> None:
    t = seed_topology()
    props = topo.analysis(t, t.fetch_node_via_nick_name("aggregator"))  # type: ignore[arg-type]
    assert len(props) == 1
    (p,) = props
    assert p.role == AGGREGATOR and p.aggregator
    assert p.peers == ("alpha", "beta")
    assert p.world_size == 3 and p.address.world_size == 3
    assert p.address.endpoint == default_tcp_address.endpoint
    (q,) = topo.analysis(t, "beta")
    assert q.role == COLLABORATOR and q.peers == ("aggregator",)
    assert q.collaborators == ("alpha", "beta") and q.world_size == 3
    assert (
        q.fingerprint
        == p.fingerprint
        == group_fingerprint("aggregator", default_tcp_address.endpoint, ["beta", "alpha"])
    )


def test_star_analysis() -> None:
    t = topo.star(4, endpoint="tcp://127.0.0.1:6100")
    (agg,) = topo.analysis(t, "aggregator")
    assert agg.collaborators == ("client0", "client1", "client2", "client3")
    assert agg.address == Address("tcp://127.0.0.1:6100", 5)
    for name in agg.collaborators:
        (p,) = topo.analysis(t, name)
        assert p.nick_name == name and p.aggregator_name == "aggregator"
        assert p.fingerprint == agg.fingerprint


def test_hierarchy_edge_node_is_aggregator_then_collaborator() -> None:
    t = hierarchy()
    as_agg, as_collab = topo.analysis(t, "e1")
    assert (as_agg.role, as_collab.role) == (AGGREGATOR, COLLABORATOR)
    assert as_agg.address == Address("tcp://127.0.0.1:5001", 3)
    assert as_agg.collaborators == ("e1a", "e1b")
    assert as_collab.address == Address("tcp://127.0.0.1:5000", 3)
    assert as_collab.aggregator_name == "root" and as_collab.collaborators == ("e1", "e2")
    assert as_agg.settings == {"codec": "raw"} == as_collab.settings
    # both ends of each group agree on the fingerprint
    (leaf,) = topo.analysis(t, "e1b")
    assert leaf.fingerprint == as_agg.fingerprint
    (root,) = topo.analysis(t, "root")
    assert root.fingerprint == as_collab.fingerprint
    assert root.fingerprint != as_agg.fingerprint
    assert topo.analysis(t, "e2")[0].fingerprint not in (as_agg.fingerprint, root.fingerprint)


def test_settings_are_copied_into_properties() -> None:
    t = hierarchy()
    props = topo.analysis(t, "e1")
    props[0].settings["codec"] = "changed"
    assert t.fetch_node_via_nick_name("e1").settings == {"codec": "raw"}  # type: ignore[union-attr]


def test_collaborator_of_several_groups_is_sorted_by_aggregator() -> None:
    t = topo.Topology()
    t.add_edge(topo.Node("c"), topo.Node("zeta", "tcp://127.0.0.1:1"))
    t.add_edge("c", topo.Node("alpha", "tcp://127.0.0.1:2"))
    t.add_edge(topo.Node("d"), "zeta")
    props = topo.analysis(t, "c")
    assert [p.aggregator_name for p in props] == ["alpha", "zeta"]
    assert [p.world_size for p in props] == [2, 3]
    assert all(p.role == COLLABORATOR for p in props)


def test_analysis_errors_name_the_node() -> None:
    t = seed_topology()
    t.add_node(topo.Node("lonely"))
    with pytest.raises(TopologyError, match="node 'lonely' belongs to no federated group"):
        topo.analysis(t, "lonely")
    with pytest.raises(TopologyError, match="unknown node 'ghost'"):
        topo.analysis(t, topo.Node("ghost"))
    t.add_edge(topo.Node("x"), topo.Node("hub"))  # hub has no address
    with pytest.raises(TopologyError, match="aggregator 'hub' has no address"):
        topo.analysis(t, "alpha")  # validated first, even for an unrelated node


# -- socket plans ---------------------------------------------------------------


def test_socket_plan_per_role() -> None:
    t = hierarchy()
    (root,) = topo.socket_plan(t, "root")
    assert root == topo.SocketPlan(
        group="root",
        socket_type="ROUTER",
        action="bind",
        endpoint="tcp://127.0.0.1:5000",
        routing_id=None,
        fingerprint=topo.analysis(t, "root")[0].fingerprint,
    )
    assert root.role == AGGREGATOR and root.routing_id_bytes is None
    (leaf,) = topo.socket_plan(t, "e2a")
    assert (leaf.group, leaf.socket_type, leaf.action) == ("e2", "DEALER", "connect")
    assert leaf.endpoint == "tcp://127.0.0.1:5002"
    assert leaf.routing_id == "e2a" and leaf.routing_id_bytes == b"e2a"
    assert leaf.role == COLLABORATOR
    both = topo.socket_plan(t, "e2")
    assert [(p.group, p.socket_type, p.action, p.routing_id) for p in both] == [
        ("e2", "ROUTER", "bind", None),
        ("root", "DEALER", "connect", "e2"),
    ]
    assert both[0].fingerprint == leaf.fingerprint
    assert both[1].fingerprint == root.fingerprint


def test_routing_id_bytes_are_utf8() -> None:
    t = topo.star(1, prefix="\u00e9")
    (plan,) = topo.socket_plan(t, "\u00e90")
    assert plan.routing_id_bytes == "\u00e90".encode()


def test_compile_topology_covers_every_node() -> None:
    t = hierarchy()
    plans = topo.compile_topology(t)
    assert list(plans) == [n.nick_name for n in t.nodes]
    assert plans["e1"] == topo.socket_plan(t, "e1")
    binds = [p.endpoint for ps in plans.values() for p in ps if p.action == "bind"]
    assert sorted(binds) == ["tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002"]
    assert sum(p.socket_type == "DEALER" for ps in plans.values() for p in ps) == len(t.edges)
    t.add_node("lonely")
    with pytest.raises(TopologyError, match="'lonely'"):
        topo.compile_topology(t)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"socket_type": "PUB", "action": "bind", "routing_id": None}, "ROUTER or DEALER"),
        ({"socket_type": "ROUTER", "action": "connect", "routing_id": None}, "ROUTER must bind"),
        ({"socket_type": "DEALER", "action": "bind", "routing_id": "a"}, "DEALER must connect"),
        ({"socket_type": "DEALER", "action": "connect", "routing_id": None}, "needs a routing id"),
        ({"socket_type": "ROUTER", "action": "bind", "routing_id": "a"}, "ROUTER has none"),
    ],
)
def test_socket_plan_rejects_inconsistent_fields(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(TopologyError, match=match):
        topo.SocketPlan(group="g", endpoint="tcp://127.0.0.1:1", fingerprint="f", **kwargs)  # type: ignore[arg-type]


# -- property: both ends of every group agree -----------------------------------


@st.composite
def dags(draw: st.DrawFn) -> topo.Topology:
    """Random DAGs: an edge always points from a higher to a lower index."""
    n = draw(st.integers(2, 9))
    pairs = draw(
        st.sets(
            st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] > p[1])
        )
    )
    t = topo.Topology([topo.Node(f"n{i}", f"tcp://127.0.0.1:{7000 + i}") for i in range(n)])
    for start, end in sorted(pairs):
        t.add_edge(f"n{start}", f"n{end}")
    return t


@settings(max_examples=60, derandomize=True, deadline=None, database=None)
@given(dags())
def test_every_group_agrees_on_both_ends(t: topo.Topology) -> None:
    plans = {node.nick_name: topo.analysis(t, node) for node in t.nodes if node not in _isolated(t)}
    for name, props in plans.items():
        expected = (1 if t.collaborators_of(name) else 0) + len(t.aggregators_of(name))
        assert len(props) == expected
        for p in props:
            if p.role == COLLABORATOR:
                own = plans[p.aggregator_name][0]
                assert own.role == AGGREGATOR
                assert name in own.collaborators
                assert (own.fingerprint, own.address) == (p.fingerprint, p.address)
    for name in _isolated(t):
        with pytest.raises(TopologyError, match=repr(name.nick_name)):
            topo.analysis(t, name)


def _isolated(t: topo.Topology) -> list[topo.Node]:
    return [n for n in t.nodes if not t.collaborators_of(n) and not t.aggregators_of(n)]


def test_node_repr_and_foreign_comparisons() -> None:
    assert repr(topo.Node("a")) == "Node('a')"
    assert repr(topo.Node("a", "tcp://127.0.0.1:1")) == "Node('a', 'tcp://127.0.0.1:1')"
    assert topo.Node("a") != "a"  # a nick name is not a Node


@pytest.mark.parametrize("bad", [3, None, b"a"])
def test_wrong_node_types_are_rejected(bad: object) -> None:
    t = seed_topology()
    with pytest.raises(TopologyError, match="expected a Node or a nick name"):
        t.add_node(bad)  # type: ignore[arg-type]
    with pytest.raises(TopologyError, match="expected a Node or a nick name"):
        t.add_edge(bad, "aggregator")  # type: ignore[arg-type]
    with pytest.raises(TopologyError, match="expected a Node or a nick name"):
        topo.analysis(t, bad)  # type: ignore[arg-type]


def test_topo_imports_no_transport_or_tensor_library() -> None:
    """The compiler stays pure: checked on the source, as zmqfed/__init__ imports everything."""
    import ast
    from pathlib import Path

    forbidden = ("zmq", "torch", "zmqfed.wire", "zmqfed.federated", "zmqfed.core")
    sources = sorted(Path(topo.__file__).parent.glob("*.py"))
    assert len(sources) >= 6
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), (
                    f"{source.name} imports {name}"
                )
