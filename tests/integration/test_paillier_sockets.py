"""Encrypted aggregation over real sockets: collaborators encrypt, the aggregator adds, a key holder decrypts.

The aggregator runs in the test process, the two collaborators are processes
of their own. Each collaborator uploads known weights (seeded per rank and
round), so the mean the key holder decrypts has a closed form.

* blind: the aggregator has the public key only. It must hold nothing but
  ciphertexts and placeholders, leave its model alone, and serve the
  encrypted sum, which the collaborators (the key holders) decrypt.
* openfed: OpenFed's way, the aggregator holds the private key, decrypts
  the sum and serves the mean in the clear; ``API`` registers the hook
  that accepts encrypted uploads by itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import zmqfed
import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.functional import Ciphertext, key_gen, paillier_aggregation, paillier_package
from zmqfed.optim import FederatedOptimizer

ROUNDS = 2
NAMES = ("alpha", "beta")

# argv: endpoint, rank, public key file, private key file or "", rounds
COLLABORATOR = """
import faulthandler, json, sys
faulthandler.dump_traceback_later(240, exit=True)
import torch
from torch import nn
import zmqfed
import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.functional import paillier_package

endpoint, rank, pub, priv, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
topology = topo.Topology()
aggregator = topology.add_node(topo.Node("aggregator", endpoint))
for name in ("alpha", "beta"):
    topology.add_edge(topo.Node(name), aggregator)
network = nn.Linear(20, 3)
m = Maintainer(topo.analysis(topology, ("alpha", "beta")[rank])[0], network.state_dict(keep_vars=True))
with m:
    zmqfed.functional.device_alignment()
    paillier_package(pub, priv or None)
for r in range(rounds):
    m.update_version(r)
    m.step(upload=False, timeout=120)
    m.unpackage()
    got = {k: v.tolist() for k, v in network.state_dict().items()}
    print("DOWNLOAD " + json.dumps({"round": r, "data": got}), flush=True)
    g = torch.Generator().manual_seed(1000 * rank + r)
    with torch.no_grad():
        for _, p in sorted(network.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    m.update_version(r + 1)
    m.package()
    m.step(download=False, timeout=120)
print("DONE", flush=True)
"""


def uploaded(rank: int, r: int) -> dict[str, torch.Tensor]:
    """What collaborator ``rank`` uploads in round ``r`` (as the script makes it)."""
    network = nn.Linear(20, 3)
    g = torch.Generator().manual_seed(1000 * rank + r)
    return {
        name: torch.randn(p.shape, generator=g) for name, p in sorted(network.named_parameters())
    }


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # 1024-bit keys keep the test quick; the arithmetic is the same at 2048
    public, private = key_gen(1024)
    folder = tmp_path_factory.mktemp("keys")
    public.save(folder / "public.json")
    private.save(folder / "private.json")
    return folder / "public.json", folder / "private.json"


@pytest.mark.parametrize("mode", ["blind", "openfed"])
def test_encrypted_fedavg_over_sockets(
    mode: str, key_files: tuple[Path, Path], free_tcp_endpoint: str, run_python, slow_factor: float
) -> None:
    public, private = key_files
    topology = topo.Topology()
    aggregator = topology.add_node(topo.Node("aggregator", free_tcp_endpoint))
    for name in NAMES:
        topology.add_edge(topo.Node(name), aggregator)

    network = nn.Linear(20, 3)
    with torch.no_grad():
        for p in network.parameters():
            p.zero_()
    maintainer = Maintainer(
        topo.analysis(topology, "aggregator")[0], network.state_dict(keep_vars=True)
    )
    received: list[dict[str, str]] = []

    def inspect_upload(m: Maintainer, ok: bool) -> None:
        update = m.data_list[-1]
        received.append(
            {
                f"{tuple(p.shape)}/{k}": type(v).__name__
                for p, s in update.items()
                for k, v in s.items()
            }
        )
        for p, state in update.items():  # the placeholder takes no memory: nothing to read
            assert state["param"].shape == p.shape and state["param"].stride() == (0,) * p.dim()

    with maintainer:
        zmqfed.functional.device_alignment()
        zmqfed.functional.count_step(2)
        if mode == "blind":
            paillier_package(public)
        maintainer.register_step_hook(50, inspect_upload, zmqfed.functional.after_download)
    procs = [
        run_python(
            COLLABORATOR,
            args=[
                free_tcp_endpoint,
                str(rank),
                str(public),
                str(private) if mode == "blind" else "",
                str(ROUNDS),
            ],
        )
        for rank in range(2)
    ]
    kwargs = {"public_key": public} if mode == "blind" else {"private_key": str(private)}
    fed_optim = FederatedOptimizer(torch.optim.SGD(network.parameters(), lr=1.0), "aggregator")
    api = zmqfed.API(
        maintainer,
        fed_optim,
        ROUNDS,
        paillier_aggregation,
        agg_func_kwargs=kwargs,
        progress=False,
        step_timeout=180 * slow_factor,
    )
    try:
        api.run()
    finally:
        maintainer.close(final=True)
    outputs = [proc.communicate(timeout=120 * slow_factor) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out + err
        assert "DONE" in out

    # the aggregator saw only ciphertexts and placeholders
    assert len(received) == 2 * ROUNDS
    assert received[0] == {
        "(3,)/param": "Tensor",
        "(3,)/param.paillier": "Ciphertext",
        "(3, 20)/param": "Tensor",
        "(3, 20)/param.paillier": "Ciphertext",
    }

    downloads = [
        [json.loads(line[9:]) for line in out.splitlines() if line.startswith("DOWNLOAD ")]
        for out, _ in outputs
    ]
    mean0 = {k: (uploaded(0, 0)[k] + uploaded(1, 0)[k]) / 2 for k in ("bias", "weight")}
    for rank in range(2):
        assert downloads[rank][0]["data"]["bias"] == [0.0, 0.0, 0.0]  # round 0: the initial model
        got = downloads[rank][1]["data"]  # round 1: the decrypted mean of round 0
        for k in ("bias", "weight"):
            torch.testing.assert_close(torch.tensor(got[k]), mean0[k], atol=1e-6, rtol=0)
    if mode == "blind":
        assert all(
            float(p.detach().abs().max()) == 0.0 for p in network.parameters()
        )  # never decrypted
    else:
        mean1 = {k: (uploaded(0, 1)[k] + uploaded(1, 1)[k]) / 2 for k in ("bias", "weight")}
        torch.testing.assert_close(network.bias.detach(), mean1["bias"], atol=1e-6, rtol=0)
        torch.testing.assert_close(network.weight.detach(), mean1["weight"], atol=1e-6, rtol=0)
    assert isinstance(Ciphertext, type)
