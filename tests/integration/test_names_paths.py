"""Nick names never become paths outside the directories made for them (docs/security.md).

Every tool that names a file after a node -- ``zmqfed-keys`` (key pairs),
``zmqfed-node`` (checkpoint, status, round log), ``Curve`` (loading keys),
props files -- gets a name with path syntax refused before it touches the
file system.  Before, ``/`` and ``..`` were accepted and those files were
read and written wherever the name pointed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zmqfed.address import Address
from zmqfed.errors import ConfigError, SecurityError
from zmqfed.federated import Curve, create_keys
from zmqfed.props import FederatedProperties
from zmqfed.tools.simulator import props_path

BIN = Path(sys.executable).parent


def _tool(name: str, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    exe = BIN / name
    assert exe.exists(), f"{exe} is missing: run `pip install -e .`"
    return subprocess.run(
        [str(exe), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


@pytest.mark.parametrize("name", ["../evil", "sub/evil", "..", ".evil"])
def test_zmqfed_keys_refuses_a_name_with_path_syntax(tmp_path, slow_factor, name):
    (tmp_path / "sub").mkdir()
    result = _tool("zmqfed-keys", "--dir", "keys", name, cwd=tmp_path, timeout=60 * slow_factor)
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"zmqfed-keys: error: nick name {name!r} may not ")
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [], written  # neither outside keys/ nor inside it


def test_zmqfed_node_status_reads_no_file_outside_the_state_dir(tmp_path, slow_factor):
    state = tmp_path / "state"
    state.mkdir()
    planted = {"node": "x", "state": "running", "round": 1, "rounds": 2, "version": 1, "pid": 1}
    (tmp_path / "secret.status.json").write_text(json.dumps({**planted, "updated": 0}))
    result = _tool(
        "zmqfed-node",
        *("status", "--state-dir", str(state), "--node", "../secret"),
        cwd=tmp_path,
        timeout=60 * slow_factor,
    )
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert "nick name '../secret' may not start with '.'" in result.stderr
    assert result.stdout == ""


def test_zmqfed_node_run_refuses_a_topology_naming_a_node_with_path_syntax(
    tmp_path, free_tcp_endpoint, slow_factor
):
    topology = tmp_path / "topology.json"
    topology.write_text(
        json.dumps(
            {
                "nodes": [
                    {"nick_name": "../agg", "address": free_tcp_endpoint},
                    {"nick_name": "a"},
                ],
                "edges": [["a", "../agg"]],
            }
        )
    )
    state = tmp_path / "state"
    args = ["run", "--topology", str(topology), "--node", "../agg", "--state-dir", str(state)]
    args += ["--app", "tests.integration.toy_app:factory", "--no-progress"]
    env_path = os.pathsep.join(
        filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")])
    )
    result = subprocess.run(
        [str(BIN / "zmqfed-node"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60 * slow_factor,
        stdin=subprocess.DEVNULL,
        check=False,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=env_path),
    )
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "nick name '../agg' may not start with '.'" in result.stderr
    assert not (tmp_path / "agg.status.json").exists()
    assert not (tmp_path / "agg.ckpt").exists()


def test_curve_loads_keys_only_by_valid_names(tmp_path):
    create_keys(tmp_path / "keys", "alpha")
    create_keys(tmp_path, "outside")  # a key pair next to the key directory
    curve = Curve(tmp_path / "keys")
    assert curve.public_key("alpha")
    for call in (curve.public_key, curve.key_pair):
        with pytest.raises(ConfigError, match=r"nick name '\.\./outside' may not start with '\.'"):
            call("../outside")
    with pytest.raises(ConfigError, match="may not contain '/'"):
        create_keys(tmp_path / "keys", "a/../../x")


def test_props_and_props_files_refuse_names_with_path_syntax(tmp_path):
    address = Address("tcp://127.0.0.1:1994")
    with pytest.raises(ConfigError, match=r"nick name '\.\./x' may not start with '\.'"):
        FederatedProperties("collaborator", "../x", address, "agg", ("../x",))
    with pytest.raises(ConfigError, match="may not contain '/'"):
        FederatedProperties("aggregator", "agg", address, "agg", ("a", "b/c"))
    good = FederatedProperties("aggregator", "agg", address, "agg", ("a",))
    path = tmp_path / "agg.json"
    FederatedProperties.save(good, path)
    doc = json.loads(path.read_text())
    doc[0]["nick_name"] = doc[0]["aggregator_name"] = "../agg"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"nick name '\.\./agg'"):
        FederatedProperties.load(path)
    with pytest.raises(ConfigError, match=r"nick name '\.\./x'"):
        props_path("../x", tmp_path)


def test_a_dangling_symlink_in_a_key_directory_is_never_written_through(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    target = tmp_path / "elsewhere" / "stolen"
    target.parent.mkdir()
    (keys / "alpha.key_secret").symlink_to(target)  # dangling: target does not exist
    with pytest.raises(SecurityError, match=r"alpha\.key_secret is a dangling symlink"):
        create_keys(keys, "alpha")
    assert not target.exists() and not (keys / "alpha.key").exists()
    with pytest.raises(SecurityError, match=r"alpha\.key_secret is a dangling symlink to .*stolen"):
        Curve(keys).key_pair("alpha")
