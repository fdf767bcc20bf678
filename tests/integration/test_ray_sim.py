"""``zmqfed-sim --ray``: the nodes of a federation as Ray actors, talking over zmqfed's sockets.

The test starts a Ray cluster on this machine's loopback (``zmqfed-sim
--ray`` without an address does) and runs a star of two collaborators with
the deterministic toy app, so the final model has a closed form. Skipped
only where the ``ray`` extra is not installed (``make test`` installs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.toy_app import expected_weight
from zmqfed.checkpoint import load_checkpoint

pytest.importorskip("ray", reason="the zmqfed[ray] extra is not installed")

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_zmqfed_sim_runs_a_federation_on_a_local_ray_cluster(run_python, tmp_path, slow_factor):
    logdir = tmp_path / "logs"
    proc = run_python(
        module="zmqfed.cli.sim",
        args=[
            "--star", "2",
            "--app", "tests.integration.toy_app:factory",
            "--rounds", "3",
            "--ray",
            "--logdir", str(logdir),
            "--timeout", str(300 * slow_factor),
        ],
        cwd=REPO_ROOT,
    )  # fmt: skip
    out, err = proc.communicate(timeout=400 * slow_factor)
    assert proc.returncode == 0, (out, err)
    assert "nodes as Ray actors on a local Ray cluster" in out
    # the aggregator's actor chose the endpoint on its host: loopback here
    topology = json.loads((logdir / "topology.json").read_text())
    hub = next(n for n in topology["nodes"] if n["nick_name"] == "aggregator")
    assert hub["address"].startswith("tcp://127.0.0.1:"), hub
    records = [
        json.loads(line) for line in (logdir / "aggregator.rounds.jsonl").read_text().splitlines()
    ]
    assert [r["participants"] for r in records] == [2, 2, 2]
    state = load_checkpoint(logdir / "aggregator.ckpt")
    assert state is not None
    assert torch.allclose(
        state["model"]["weight"], torch.full((1, 4), expected_weight(2, 3)), atol=1e-6
    )
    for name in ("aggregator", "client0", "client1"):  # every node ran to its end in its actor
        status = json.loads((logdir / f"{name}.status.json").read_text())
        assert status["state"] == "finished", status
    assert (logdir / "aggregator.log").stat().st_size > 0


def test_ray_sim_says_how_to_install_ray_when_it_is_missing(monkeypatch):
    import sys

    from zmqfed.errors import ConfigError
    from zmqfed.ray_sim import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    with pytest.raises(ConfigError, match=r"zmqfed\[ray\]"):
        import_ray()
