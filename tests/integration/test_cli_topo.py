"""The installed ``zmqfed-topo`` console script, run as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

import zmqfed.topo as topo

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "topologies"
TOPO = Path(sys.executable).parent / "zmqfed-topo"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

Run = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def cli(tmp_path: Path, slow_factor: float) -> Run:
    """Run ``zmqfed-topo ARGS`` in ``tmp_path``; returns the completed process."""
    assert TOPO.exists(), f"{TOPO} is missing: run `pip install -e .` to create the entry point"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(
        *args: str | os.PathLike[str], stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(TOPO), *map(str, args)],
            cwd=tmp_path,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=120 * slow_factor,
            check=False,
        )

    return run


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def compile_sections(text: str) -> tuple[list[str], dict[str, str]]:
    """``compile`` text output: the group lines, and one block per node."""
    groups, *nodes = text.strip().split("\n\n")
    blocks: dict[str, str] = {}
    for block in nodes:
        name = re.match(r"node '([^']*)' \(", block)
        assert name, block
        blocks[name.group(1)] = block
    return groups.splitlines(), blocks


# -- check ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["star3.yaml", "hierarchy.yaml"])
def test_check_accepts_the_examples(cli: Run, name: str) -> None:
    result = cli("check", EXAMPLES / name)
    assert result.returncode == 0, result.stderr
    assert " ok: " in result.stdout and result.stderr == ""


def test_examples_round_trip_through_save_and_load(tmp_path: Path) -> None:
    for example in sorted(EXAMPLES.glob("*.yaml")):
        loaded = topo.Topology.load(example)
        for suffix in (".json", ".yaml"):
            copy = tmp_path / (example.stem + suffix)
            loaded.save(copy)
            assert topo.Topology.load(copy).serialize() == loaded.serialize()


AGG = '{"nick_name": "agg", "address": "tcp://127.0.0.1:1994"}'
INVALID = {
    "no-address": (
        '{"nodes": [{"nick_name": "agg"}, {"nick_name": "a"}], "edges": [["a", "agg"]]}',
        ["aggregator 'agg' has no address"],
    ),
    "unknown-node": (
        f'{{"nodes": [{AGG}, {{"nick_name": "a"}}], "edges": [["a", "agg"], ["a", "ghost"]]}}',
        ["edges[1]", "'ghost'"],
    ),
    "isolated": (
        f'{{"nodes": [{AGG}, {{"nick_name": "a"}}, {{"nick_name": "lonely"}}], '
        '"edges": [["a", "agg"]]}',
        ["node 'lonely'", "no federated group"],
    ),
    "opposite-edges": (
        '{"nodes": [{"nick_name": "x", "address": "tcp://127.0.0.1:2001"}, '
        '{"nick_name": "y", "address": "tcp://127.0.0.1:2002"}], "edges": [["x", "y"], ["y", "x"]]}',
        ["edges[1]", "'y' -> 'x' is opposite to 'x' -> 'y'"],
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_check_rejects_invalid_files_naming_the_culprit(
    cli: Run, tmp_path: Path, case: str
) -> None:
    text, needles = INVALID[case]
    path = write(tmp_path / f"{case}.json", text)
    result = cli("check", path)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith(f"zmqfed-topo: error: {path}: "), result.stderr
    assert result.stderr.count("\n") == 1, "one line, no traceback"
    for needle in needles:
        assert needle in result.stderr


def test_check_usage_and_unreadable_files(cli: Run, tmp_path: Path) -> None:
    assert cli("check").returncode == 2
    missing = cli("check", "missing.yaml")
    assert missing.returncode == 3 and "missing.yaml" in missing.stderr
    broken = cli("check", write(tmp_path / "broken.yaml", "nodes: [\n"))
    assert broken.returncode == 3 and "not valid YAML" in broken.stderr


# -- compile -------------------------------------------------------------------------


def test_compile_shows_the_sockets_of_every_role(cli: Run) -> None:
    result = cli("compile", EXAMPLES / "hierarchy.yaml")
    assert result.returncode == 0, result.stderr
    groups, blocks = compile_sections(result.stdout)
    assert [g.split(":")[0] for g in groups] == ["group 'root'", "group 'edge0'", "group 'edge1'"]
    assert groups[0].startswith(
        "group 'root': aggregator 'root' at tcp://127.0.0.1:1994, world size 3, "
        "collaborators ['edge0', 'edge1'], fingerprint "
    )
    assert list(blocks) == ["root", "edge0", "edge1", "leaf0", "leaf1", "leaf2", "leaf3"]
    assert blocks["root"].splitlines() == [
        "node 'root' (aggregator)",
        "  group 'root' as aggregator: ROUTER bind tcp://127.0.0.1:1994",
    ]
    assert blocks["edge1"].splitlines() == [
        "node 'edge1' (both)",
        "  group 'edge1' as aggregator: ROUTER bind tcp://127.0.0.1:1996",
        "  group 'root' as collaborator: DEALER connect tcp://127.0.0.1:1994 routing_id='edge1'",
    ]
    assert blocks["leaf2"].splitlines() == [
        "node 'leaf2' (collaborator)",
        "  group 'edge1' as collaborator: DEALER connect tcp://127.0.0.1:1996 routing_id='leaf2'",
    ]


def test_compile_json_for_one_node_matches_the_library(cli: Run) -> None:
    path = EXAMPLES / "hierarchy.yaml"
    result = cli("compile", path, "--node", "edge0", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    (node,) = data["nodes"]
    assert (node["nick_name"], node["role"]) == ("edge0", "both")
    plans = topo.socket_plan(topo.Topology.load(path), "edge0")
    got = [
        (s["group"], s["type"], s["action"], s["endpoint"], s["routing_id"],
         data["groups"][s["group"]]["fingerprint"])
        for s in node["sockets"]
    ]  # fmt: skip
    assert got == [
        (p.group, p.socket_type, p.action, p.endpoint, p.routing_id, p.fingerprint) for p in plans
    ]
    assert {name: g["collaborators"] for name, g in data["groups"].items()} == {
        "root": ["edge0", "edge1"],
        "edge0": ["leaf0", "leaf1"],
    }


def test_compile_shows_settings_and_rejects_unknown_nodes(cli: Run) -> None:
    path = EXAMPLES / "star3.yaml"
    gamma = cli("compile", path, "--node", "gamma")
    assert gamma.returncode == 0, gamma.stderr
    assert """node 'gamma' (collaborator), settings {"codec": "lz4"}""" in gamma.stdout
    assert "DEALER connect tcp://127.0.0.1:1994 routing_id='gamma'" in gamma.stdout
    nobody = cli("compile", path, "--node", "nobody")
    assert nobody.returncode == 3 and "'nobody'" in nobody.stderr


# -- visualize -----------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (the first one, right after the magic)."""
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (kind, length) == (b"IHDR", 13)
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_visualize_png_has_the_size_the_library_draws(cli: Run, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = EXAMPLES / "hierarchy.yaml"
    result = cli("visualize", path, "-o", "h.png")
    assert result.returncode == 0, result.stderr
    width, height = png_size((tmp_path / "h.png").read_bytes())
    assert 0 < width < 10_000 and 0 < height < 10_000
    reference = topo.to_image(topo.Topology.load(path), tmp_path / "ref.png")
    assert (width, height) == png_size(reference.read_bytes())
    assert cli("visualize", path, "-o", "big.png", "--dpi", "240").returncode == 0
    big_w, big_h = png_size((tmp_path / "big.png").read_bytes())
    assert big_w == pytest.approx(2 * width, rel=0.05)
    assert big_h == pytest.approx(2 * height, rel=0.05)


def test_visualize_svg_is_an_svg_document(cli: Run, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = cli("visualize", EXAMPLES / "star3.yaml", "-o", "s.svg")
    assert result.returncode == 0, result.stderr
    root = ET.parse(tmp_path / "s.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert float(root.get("width", "0").rstrip("pt")) > 0


def check_dot(text: str, topology: topo.Topology) -> None:
    """Minimal DOT parse: a digraph, balanced braces, one line per node and per edge."""
    assert re.match(r'digraph "[^"]*" \{\n', text)
    depth = 0
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0
    assert depth == 0 and text.rstrip().endswith("}")
    edges = re.findall(r'^\s*"([^"]+)" -> "([^"]+)";$', text, flags=re.M)
    assert edges == [e.names for e in topology.edges]
    for node in topology.nodes:
        shape = "box" if topology.collaborators_of(node) else "ellipse"
        assert re.search(rf'^\s*"{node.nick_name}" \[.*shape={shape}', text, flags=re.M)


def test_visualize_dot_to_file_and_stdout(cli: Run, tmp_path: Path) -> None:
    path = EXAMPLES / "hierarchy.yaml"
    topology = topo.Topology.load(path)
    result = cli("visualize", path, "-o", "h.dot")
    assert result.returncode == 0, result.stderr
    check_dot((tmp_path / "h.dot").read_text(encoding="utf-8"), topology)
    stdout = cli("visualize", path, "--format", "dot")
    assert stdout.returncode == 0 and stdout.stdout == (tmp_path / "h.dot").read_text("utf-8")


def test_visualize_txt_shows_roles(cli: Run, tmp_path: Path) -> None:
    path = EXAMPLES / "hierarchy.yaml"
    result = cli("visualize", path, "-o", "h.txt")
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "h.txt").read_text(encoding="utf-8")
    assert re.search(r"^root\s+aggregator\s+tcp://127.0.0.1:1994\s+-$", text, flags=re.M)
    assert re.search(r"^edge0\s+both\s+tcp://127.0.0.1:1995\s+root$", text, flags=re.M)
    assert re.search(r"^leaf3\s+collaborator\s+-\s+edge1$", text, flags=re.M)
    assert cli("visualize", path).stdout == text  # txt on stdout is the default


def test_visualize_usage_errors(cli: Run) -> None:
    path = EXAMPLES / "star3.yaml"
    for args in (["-o", "x.gif"], ["--format", "png"], ["--format", "png", "-o", "x.svg"]):
        result = cli("visualize", path, *args)
        assert result.returncode == 2, (args, result.stderr)


# -- generators ----------------------------------------------------------------------


def test_star_writes_a_file_check_accepts(cli: Run, tmp_path: Path) -> None:
    result = cli("star", "3", "--endpoint", "tcp://127.0.0.1:2100", "-o", "star.yaml")
    assert result.returncode == 0, result.stderr
    assert cli("check", "star.yaml").returncode == 0
    loaded = topo.Topology.load(tmp_path / "star.yaml")
    assert loaded.serialize() == topo.star(3, "tcp://127.0.0.1:2100").serialize()


def test_tree_writes_a_file_check_accepts(cli: Run, tmp_path: Path) -> None:
    args = ["--branches", "3", "--leaves", "2", "--base-port", "2200", "-o", "tree.json"]
    result = cli("tree", *args)
    assert result.returncode == 0, result.stderr
    assert cli("check", "tree.json").returncode == 0
    loaded = topo.Topology.load(tmp_path / "tree.json")
    assert loaded.serialize() == topo.tree(3, 2, base_port=2200).serialize()


def test_generators_print_json_and_reject_bad_arguments(cli: Run) -> None:
    result = cli("star", "2")
    assert result.returncode == 0, result.stderr
    assert topo.Topology.unserialize(json.loads(result.stdout)).serialize() == (
        topo.star(2).serialize()
    )
    assert cli("tree", "--leaves", "0").returncode == 2
    bad = cli("star", "2", "--endpoint", "udp://host:1")
    assert bad.returncode == 3 and "'aggregator'" in bad.stderr


# -- shell ---------------------------------------------------------------------------

SCRIPT = """\
add_node agg tcp://127.0.0.1:2300 codec=lz4 timeout=30
add_node edge ipc://{tmp}/edge.ipc
add_node "leaf-a"
add_node tmp
add_edge edge agg
add_edge "leaf-a" edge
add_edge tmp edge
remove_edge tmp edge
remove_node tmp
# a comment, then an empty line

show
save built.yaml
plot built.dot
quit
"""


def test_shell_builds_and_saves_from_a_pipe(cli: Run, tmp_path: Path) -> None:
    result = cli("shell", stdin=SCRIPT.format(tmp=tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "(zmqfed-topo)" not in result.stdout  # no prompt in a pipe
    assert "saved built.yaml" in result.stdout
    loaded = topo.Topology.load(tmp_path / "built.yaml")
    assert [n.nick_name for n in loaded.nodes] == ["agg", "edge", "leaf-a"]
    assert [e.names for e in loaded.edges] == [("edge", "agg"), ("leaf-a", "edge")]
    assert loaded.nodes[0].settings == {"codec": "lz4", "timeout": 30}
    check_dot((tmp_path / "built.dot").read_text(encoding="utf-8"), loaded)
    again = cli("shell", "built.yaml", stdin="add_node extra\nadd_edge extra agg\nsave b2.json\n")
    assert again.returncode == 0, again.stderr
    assert len(topo.Topology.load(tmp_path / "b2.json").collaborators_of("agg")) == 2


def test_shell_script_stops_at_the_first_error(cli: Run, tmp_path: Path) -> None:
    result = cli("shell", stdin="add_node agg\nadd_edge ghost agg\nsave never.json\n")
    assert result.returncode == 3
    assert result.stderr == (
        "zmqfed-topo: error: line 2: edge start references unknown node 'ghost'; add it first\n"
    )
    assert not (tmp_path / "never.json").exists()
    unknown = cli("shell", stdin="frobnicate\n")
    assert unknown.returncode == 2 and "unknown command 'frobnicate'" in unknown.stderr
    invalid = cli("shell", stdin="add_node agg\nadd_node a\nadd_edge a agg\nsave x.json\n")
    assert invalid.returncode == 3 and "aggregator 'agg' has no address" in invalid.stderr


def test_shell_exits_130_on_sigint(
    run_python: Callable[..., subprocess.Popen[str]], slow_factor: float
) -> None:
    proc = run_python(script=TOPO, args=["shell"], stdin=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("add_node ready\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "added Node('ready')\n"  # the loop is running
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30 * slow_factor) == 130
