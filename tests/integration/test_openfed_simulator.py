"""``python -m zmqfed.tools.simulator``: OpenFed's launcher contract, with real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SLOW, free_tcp_port

from zmqfed.errors import ConfigError
from zmqfed.props import FederatedProperties

RUN_PY = REPO_ROOT / "examples" / "openfed_run" / "run.py"

# A node script that needs no torch: prints its props file, then acts on $ACT.
NODE = """
import argparse, json, os, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--props")
parser.add_argument("--tag", default="")
args = parser.parse_args()
props = json.load(open(args.props))
line = " ".join(["NODE", args.tag, props[0]["nick_name"], props[0]["address"]["endpoint"]])
sys.stdout.write(line + "\\n")  # one write: the nodes share the pipe
sys.stdout.flush()
act = os.environ.get("ACT", "")
if act == "fail" and props[0]["nick_name"] == "collaborator-1":
    sys.exit(3)
if act in ("fail", "sleep"):
    time.sleep(600)
"""


@pytest.fixture
def short_tmp(tmp_path: Path) -> Iterator[Path]:
    """A temp dir short enough for the ipc socket file (sun_path is 107 bytes)."""
    if len(os.fsencode(tmp_path / "zmqfed.sharedfile")) <= 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="zmqfed-sim-", dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_build_centralized_topology_writes_every_props_file(tmp_path: Path) -> None:
    from zmqfed.tools import build_centralized_topology

    topology = build_centralized_topology(3, props_dir=tmp_path)
    assert [n.nick_name for n in topology.aggregators] == ["aggregator"]
    names = ["aggregator", "collaborator-1", "collaborator-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{n}.json" for n in names]
    agg = FederatedProperties.load(tmp_path / "aggregator.json")
    assert len(agg) == 1 and agg[0].aggregator and agg[0].address.world_size == 3
    assert agg[0].address.scheme == "ipc"  # the default file address
    c2 = FederatedProperties.load(tmp_path / "collaborator-2.json")[0]
    assert (c2.role, c2.address.rank, c2.fingerprint) == ("collaborator", 2, agg[0].fingerprint)
    tcp = build_centralized_topology(2, tcp=True, props_dir=tmp_path)
    assert tcp.fetch_node_via_nick_name("aggregator").address.scheme == "tcp"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="nproc must be an integer >= 2"):
        build_centralized_topology(1, props_dir=tmp_path)


@pytest.mark.slow
def test_openfed_run_py_trains_under_the_launcher(
    run_python, tmp_path: Path, short_tmp: Path
) -> None:
    proc = run_python(
        module="zmqfed.tools.simulator",
        args=["--nproc", "3", "--logdir", "logs", str(RUN_PY)],
        env={"TMPDIR": str(short_tmp)},
    )
    out, err = proc.communicate(timeout=240 * SLOW)
    assert proc.returncode == 0, out + err
    assert "10/10" in err  # the aggregator's progress bar is shown here
    assert "collaborator-2 will be written to" in out
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())  # relative to the cwd
    assert logs == [
        f"zmqfed_node_collaborator-{i}_{stream}" for i in (1, 2) for stream in ("stderr", "stdout")
    ]
    for name in ("aggregator", "collaborator-1", "collaborator-2"):
        data = json.loads((short_tmp / f"{name}.json").read_text())
        assert data[0]["nick_name"] == name


def test_props_flag_and_tcp(run_python, tmp_path: Path) -> None:
    script = tmp_path / "node.py"
    script.write_text(NODE)
    port = free_tcp_port()
    proc = run_python(
        module="zmqfed.tools.simulator",
        args=["--nproc", "3", "--tcp", str(script), "--tag", "x"],
        env={"TMPDIR": str(tmp_path), "ZMQFED_DEFAULT_TCP": f"tcp://127.0.0.1:{port}"},
    )
    out, err = proc.communicate(timeout=60 * SLOW)
    assert proc.returncode == 0, out + err
    lines = sorted(line for line in out.splitlines() if line.startswith("NODE"))
    assert lines == [
        f"NODE x {name} tcp://127.0.0.1:{port}"
        for name in ("aggregator", "collaborator-1", "collaborator-2")
    ]


def test_first_failure_stops_the_others_and_sets_the_exit_code(run_python, tmp_path: Path) -> None:
    script = tmp_path / "node.py"
    script.write_text(NODE)
    tic = time.monotonic()
    proc = run_python(
        module="zmqfed.tools.simulator",
        args=["--nproc", "3", str(script)],
        env={"TMPDIR": str(tmp_path), "ACT": "fail"},
    )
    out, err = proc.communicate(timeout=60 * SLOW)
    assert proc.returncode == 3, out + err
    assert "collaborator-1" in err and "exited with code 3" in err
    assert time.monotonic() - tic < 30 * SLOW  # the sleeping nodes did not hold it up


def test_sigint_stops_every_node(run_python, tmp_path: Path) -> None:
    script = tmp_path / "node.py"
    script.write_text(NODE)
    proc = run_python(
        module="zmqfed.tools.simulator",
        args=["--nproc", "2", str(script)],
        env={"TMPDIR": str(tmp_path), "ACT": "sleep"},
    )
    assert proc.stdout is not None
    seen = [proc.stdout.readline() for _ in range(2)]  # both nodes are up
    assert all(line.startswith("NODE") for line in seen), seen
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30 * SLOW)
    assert proc.returncode == 130, out + err
    assert "SIGINT received; stopping every node" in err


def test_topo_builder_runs_the_topology_shell(run_python, tmp_path: Path) -> None:
    proc = run_python(module="zmqfed.tools.topo_builder", stdin=subprocess.PIPE)
    script = "add_node agg tcp://127.0.0.1:7999\nadd_node a\nadd_edge a agg\nsave t.json\nquit\n"
    out, err = proc.communicate(script, timeout=60 * SLOW)
    assert proc.returncode == 0, out + err
    assert json.loads((tmp_path / "t.json").read_text())["edges"] == [{"start": "a", "end": "agg"}]
