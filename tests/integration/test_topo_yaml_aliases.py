"""YAML anchors and aliases are refused in topology files: no alias bomb gets expanded."""

from __future__ import annotations

from pathlib import Path

import pytest

import zmqfed.topo as topo
from tests.integration.test_cli_topo import EXAMPLES, cli, write  # noqa: F401 - cli is a fixture
from zmqfed.errors import TopologyError


def alias_bomb(levels: int = 9) -> str:
    """A few hundred bytes whose aliases stand for 9**levels strings inside node settings."""
    lines = ['l0: &l0 ["ha","ha","ha","ha","ha","ha","ha","ha","ha"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]")
    body = "\n".join(f"      {line}" for line in lines)
    return (
        "nodes:\n"
        "  - nick_name: agg\n"
        "    address: tcp://127.0.0.1:1994\n"
        "    settings:\n"
        f"{body}\n"
        "  - nick_name: a\n"
        "edges:\n"
        "  - [a, agg]\n"
    )


def test_zmqfed_topo_check_refuses_an_alias_bomb_at_once(cli, tmp_path: Path) -> None:  # noqa: F811
    bomb = write(tmp_path / "bomb.yaml", alias_bomb())
    assert len(bomb.read_bytes()) < 1024
    result = cli("check", bomb)  # before: minutes of CPU (x9 per level), now refused while parsing
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"zmqfed-topo: error: {bomb}: "), result.stderr
    assert "YAML anchors and aliases are not allowed" in result.stderr
    assert "&l0 at line 5" in result.stderr


def test_a_lone_alias_or_merge_key_is_refused_too(tmp_path: Path) -> None:
    merge = write(
        tmp_path / "merge.yaml",
        "nodes:\n"
        "  - &base {nick_name: agg, address: 'tcp://127.0.0.1:1994'}\n"
        "  - {<<: *base, nick_name: b}\n",
    )
    with pytest.raises(TopologyError, match=r"merge\.yaml: YAML anchors and aliases .*&base"):
        topo.Topology.load(merge)


def test_ordinary_yaml_still_loads_and_saved_files_have_no_anchors(tmp_path: Path) -> None:
    for example in sorted(EXAMPLES.glob("*.yaml")):
        loaded = topo.Topology.load(example)
        assert loaded.nodes
    # one settings object shared by two nodes: a plain dumper would write &id001/*id001
    shared = {"codec": "lz4", "lr": [0.1, 0.2]}
    t = topo.Topology()
    agg = t.add_node(topo.Node("agg", "tcp://127.0.0.1:1994", shared))
    t.add_edge(topo.Node("a", settings=shared), agg)
    path = tmp_path / "shared.yaml"
    t.save(path)
    assert "&" not in path.read_text() and "*" not in path.read_text()
    assert topo.Topology.load(path).serialize() == t.serialize()
