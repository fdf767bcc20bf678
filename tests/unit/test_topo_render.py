"""Unit tests of topology rendering (table, DOT, images) and the shape generators."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

import zmqfed.topo as topo
from zmqfed.address import Address, default_ipc_address, default_tcp_address
from zmqfed.errors import ConfigError, TopologyError
from zmqfed.topo.render import layers, role_of

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def seed_topology() -> topo.Topology:
    t = topo.Topology()
    agg = t.add_node(topo.Node("aggregator", default_tcp_address))
    t.add_edge(topo.Node("alpha"), agg)
    t.add_edge(topo.Node("beta"), agg)
    return t


# -- ASCII ----------------------------------------------------------------------


def test_repr_is_the_adjacency_table() -> None:
    assert repr(seed_topology()) == (
        "CO\\AG      | aggregator\n"
        "-----------+-----------\n"
        "aggregator |     .\n"
        "alpha      |     ^\n"
        "beta       |     ^"
    )


def test_repr_of_a_hierarchy_has_one_column_per_aggregator() -> None:
    lines = repr(topo.tree(2, 1)).splitlines()
    assert lines[0] == "CO\\AG | root | edge0 | edge1"
    assert lines[2:] == [
        "root  |  .   |   .   |   .",
        "edge0 |  ^   |   .   |   .",
        "leaf0 |  .   |   ^   |   .",
        "edge1 |  ^   |   .   |   .",
        "leaf1 |  .   |   .   |   ^",
    ]


def test_repr_of_edge_less_and_empty_topologies() -> None:
    assert repr(topo.Topology()) == "Topology(empty)"
    assert repr(topo.Topology(["a", "bb"])).splitlines() == [
        "CO\\AG (no edges)",
        "-----",
        "a",
        "bb",
    ]


def test_repr_is_ascii_for_unicode_names() -> None:
    t = topo.star(1, aggregator="\u4e2d", prefix="caf\u00e9")
    text = repr(t)
    assert text.isascii()
    assert "\\u4e2d" in text and "caf\\xe90" in text
    assert str(t) == text


def test_to_ascii_lists_roles_addresses_and_aggregators() -> None:
    t = topo.tree(1, 1)
    t.add_node(topo.Node("spare"))
    table, roles = topo.to_ascii(t).split("\n\n")
    assert table == repr(t)
    rows = [line.split() for line in roles.splitlines()]
    assert rows == [
        ["node", "role", "address", "reports", "to"],
        ["root", "aggregator", "tcp://127.0.0.1:1994", "-"],
        ["edge0", "both", "tcp://127.0.0.1:1995", "root"],
        ["leaf0", "collaborator", "-", "edge0"],
        ["spare", "isolated", "-", "-"],
    ]


def test_role_of() -> None:
    t = topo.tree(1, 1)
    assert [role_of(t, n) for n in t.nodes] == ["aggregator", "both", "collaborator"]


# -- DOT ------------------------------------------------------------------------


def test_dot_has_nodes_edges_and_shapes() -> None:
    dot = topo.to_dot(topo.tree(2, 1))
    assert dot.startswith('digraph "topology" {\n') and dot.rstrip().endswith("}")
    assert "rankdir=BT;" in dot
    assert '"root" [label="root\\ntcp://127.0.0.1:1994", shape=box' in dot
    assert '"edge1" [label="edge1\\ntcp://127.0.0.1:1996", shape=box' in dot
    assert '"leaf0" [label="leaf0", shape=ellipse' in dot
    edges = [line.strip() for line in dot.splitlines() if "->" in line]
    assert edges == [
        '"edge0" -> "root";',
        '"leaf0" -> "edge0";',
        '"edge1" -> "root";',
        '"leaf1" -> "edge1";',
    ]


def test_dot_escapes_quotes_and_backslashes() -> None:
    # nick names cannot hold either (zmqfed.names); endpoints and the graph's name can
    t = topo.Topology()
    t.add_edge(topo.Node("a"), topo.Node("hub", 'ipc:///tmp/say "hi"\\x.ipc'))
    dot = topo.to_dot(t, name='my "graph"')
    assert 'digraph "my \\"graph\\""' in dot
    assert '[label="hub\\nipc:///tmp/say \\"hi\\"\\\\x.ipc", shape=box' in dot


def test_dot_works_on_an_invalid_topology() -> None:
    t = topo.Topology()
    t.add_edge(topo.Node("a"), topo.Node("hub"))  # hub has no address
    assert '"a" -> "hub";' in topo.to_dot(t)
    assert "hub" in topo.to_ascii(t)


# -- images ---------------------------------------------------------------------


def test_layers_put_roots_on_top_and_nodes_below_all_their_aggregators() -> None:
    t = topo.tree(2, 2)
    t.add_edge("leaf3", "root")  # leaf3 reports to root (depth 0) and edge1 (depth 1)
    t.add_node("spare")
    names = [[n.nick_name for n in layer] for layer in layers(t)]
    # leaf3's aggregators sit at positions 0 (root) and 1 (edge1): mean 0.5, before leaf2's 1
    assert names == [["root", "spare"], ["edge0", "edge1"], ["leaf0", "leaf1", "leaf3", "leaf2"]]


def test_layers_keep_subtrees_together() -> None:
    t = topo.Topology(
        [
            topo.Node("r", "tcp://127.0.0.1:1"),
            topo.Node("b", "tcp://127.0.0.1:2"),
            topo.Node("a", "tcp://127.0.0.1:3"),
        ]
    )
    t.add_edge(topo.Node("under-a"), "a")  # added before any child of b
    t.add_edge(topo.Node("under-b"), "b")
    t.add_edge("b", "r")
    t.add_edge("a", "r")
    names = [[n.nick_name for n in layer] for layer in layers(t)]
    assert names == [["r"], ["b", "a"], ["under-b", "under-a"]]


def test_png_image_is_valid(tmp_path: Path) -> None:
    import matplotlib.image

    path = topo.to_image(topo.tree(2, 3), tmp_path / "tree.png", title="tree")
    assert path == tmp_path / "tree.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels.std() > 0  # not a blank canvas


def test_svg_image_and_single_node(tmp_path: Path) -> None:
    t = topo.Topology(["alone"])
    path = topo.to_image(t, str(tmp_path / "t.svg"))
    text = path.read_text(encoding="utf-8")
    assert "<svg" in text and "</svg>" in text


def test_large_star_image_stays_bounded(tmp_path: Path) -> None:
    import matplotlib.image

    pixels = matplotlib.image.imread(topo.to_image(topo.star(200), tmp_path / "s.png", dpi=50))
    assert 0 < pixels.shape[1] <= 60 * 50  # capped near 40 inches
    assert pixels.shape[0] > 0


def test_image_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"t\.jpg: image must end in one of"):
        topo.to_image(topo.star(1), tmp_path / "t.jpg")
    t = topo.Topology([topo.Node("x", "tcp://127.0.0.1:1"), topo.Node("x2")])
    t.add_edge("x2", "x")
    t.add_edge(topo.Node("y"), topo.Node("z", "tcp://127.0.0.1:1"))
    with pytest.raises(TopologyError, match="share the endpoint"):
        topo.to_image(t, tmp_path / "t.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="to_image needs matplotlib"):
        topo.to_image(topo.star(1), tmp_path / "t.png")
    assert os.listdir(tmp_path) == []


# -- shapes ---------------------------------------------------------------------


def test_star() -> None:
    t = topo.star(3, endpoint="tcp://127.0.0.1:7100", aggregator="hub", prefix="c")
    assert [n.nick_name for n in t.nodes] == ["hub", "c0", "c1", "c2"]
    assert [e.names for e in t.edges] == [("c0", "hub"), ("c1", "hub"), ("c2", "hub")]
    assert t.fetch_node_via_nick_name("hub").address == Address("tcp://127.0.0.1:7100")  # type: ignore[union-attr]
    assert all(t.fetch_node_via_nick_name(f"c{i}").address.empty for i in range(3))  # type: ignore[union-attr]
    assert topo.star(1, endpoint=default_ipc_address).aggregators[0].address == default_ipc_address


def test_star_names_sort_in_numeric_order() -> None:
    names = [n.nick_name for n in topo.star(11).collaborators]
    assert names[:2] == ["client00", "client01"] and names[-1] == "client10"
    assert names == sorted(names)
    (agg,) = topo.analysis(topo.star(11), "aggregator")
    assert list(agg.collaborators) == names


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "3"])
def test_star_rejects_bad_counts(n: object) -> None:
    with pytest.raises(ConfigError, match="positive integer"):
        topo.star(n)  # type: ignore[arg-type]


def test_tree_tcp() -> None:
    t = topo.tree(2, 3, base_port=7200)
    assert len(t.nodes) == 1 + 2 * (1 + 3)
    assert [(n.nick_name, n.address.endpoint) for n in t.aggregators] == [
        ("root", "tcp://127.0.0.1:7200"),
        ("edge0", "tcp://127.0.0.1:7201"),
        ("edge1", "tcp://127.0.0.1:7202"),
    ]
    assert [n.nick_name for n in t.collaborators_of("edge1")] == ["leaf3", "leaf4", "leaf5"]
    assert [n.nick_name for n in t.collaborators_of("root")] == ["edge0", "edge1"]
    assert [p.role for p in topo.analysis(t, "edge0")] == ["aggregator", "collaborator"]


def test_tree_ipc(tmp_path: Path) -> None:
    t = topo.tree(1, 2, transport="ipc", ipc_dir=str(tmp_path), base_port=3000, root="top")
    endpoints = [n.address.endpoint for n in t.aggregators]
    assert endpoints == [f"ipc://{tmp_path}/zmqfed-3000.ipc", f"ipc://{tmp_path}/zmqfed-3001.ipc"]
    assert t.aggregators[0].nick_name == "top"


def test_tree_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="transport must be 'tcp' or 'ipc'"):
        topo.tree(transport="udp")
    with pytest.raises(ConfigError, match="port 65536 is out of range"):
        topo.tree(3, 1, base_port=65533)
    with pytest.raises(ConfigError, match="leaves must be a positive integer"):
        topo.tree(2, 0)
    with pytest.raises(ConfigError, match="longer than the 107 bytes"):
        topo.tree(transport="ipc", ipc_dir=str(tmp_path / ("d" * 120)))


def test_long_names_and_endpoints_are_shortened_in_images(tmp_path: Path) -> None:
    from zmqfed.topo.render import _short

    assert _short("abcdefghij", 5) == "ab\u2026ij"
    assert _short("abc", 5) == "abc"
    t = topo.Topology()
    hub = topo.Node("h" * 40, "ipc://" + str(tmp_path / ("long-directory-name" * 2) / "hub.ipc"))
    t.add_edge(topo.Node("c" * 40), hub)
    svg = topo.to_image(t, tmp_path / "t.svg").read_text(encoding="utf-8")
    # matplotlib's SVG keeps each drawn text in a comment beside its glyph paths
    texts = re.findall(r"<!-- (.*?) -->", svg)
    assert "h" * 7 + "\u2026" + "h" * 6 in texts and "c" * 7 + "\u2026" + "c" * 6 in texts
    assert not any("h" * 40 in text for text in texts)
    assert any(
        text.startswith("ipc:") and text.endswith("hub.ipc") and len(text) == 22 for text in texts
    )


def test_a_ring_of_groups_is_laid_out_and_drawn(tmp_path: Path) -> None:
    t = topo.Topology([topo.Node(n, f"tcp://127.0.0.1:{7200 + i}") for i, n in enumerate("abc")])
    t.add_edge("a", "b")
    t.add_edge("b", "c")
    t.add_edge("c", "a")
    t.add_edge(topo.Node("leaf"), "a")
    rows = layers(t)
    assert sorted(n.nick_name for row in rows for n in row) == ["a", "b", "c", "leaf"]
    assert [n.nick_name for n in rows[0]] == ["a"]  # the cycle is cut at its first node
    assert "a" in topo.to_dot(t) and "both" in topo.to_ascii(t)
    assert topo.to_image(t, tmp_path / "ring.png").stat().st_size > 0
