"""CKKS aggregation over real sockets: collaborators encrypt, a keyless aggregator adds, collaborators decrypt.

The aggregator runs in the test process with the public keys only; two
collaborators are processes of their own holding the secret key. Each
uploads known weights (seeded per rank and round), so the mean they decrypt
has a closed form. With ``layers="weight"`` only the weight is encrypted
and the bias travels (and is averaged) in the clear.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("tenseal")  # the `he` extra; `make test` installs it

import zmqfed
import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.functional import CKKSKeys, ckks_aggregation, ckks_key_gen
from zmqfed.functional.ckks import CKKSCiphertext
from zmqfed.optim import FederatedOptimizer

ROUNDS = 2
NAMES = ("alpha", "beta")

# argv: endpoint, rank, secret key file, layers ("" = all), rounds
COLLABORATOR = """
import faulthandler, json, sys
faulthandler.dump_traceback_later(240, exit=True)
import torch
from torch import nn
import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.functional import ckks_package

endpoint, rank, secret, layers, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
topology = topo.Topology()
aggregator = topology.add_node(topo.Node("aggregator", endpoint))
for name in ("alpha", "beta"):
    topology.add_edge(topo.Node(name), aggregator)
network = nn.Linear(20, 3)
m = Maintainer(topo.analysis(topology, ("alpha", "beta")[rank])[0], network.state_dict(keep_vars=True))
with m:
    ckks_package(secret, layers=layers or None)
for r in range(rounds):
    m.update_version(r)
    m.step(upload=False, timeout=120)
    m.unpackage()
    print("DOWNLOAD " + json.dumps({k: v.tolist() for k, v in network.state_dict().items()}), flush=True)
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
    network = nn.Linear(20, 3)
    g = torch.Generator().manual_seed(1000 * rank + r)
    return {
        name: torch.randn(p.shape, generator=g) for name, p in sorted(network.named_parameters())
    }


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    public, secret = ckks_key_gen()
    folder = tmp_path_factory.mktemp("ckks")
    public.save(folder / "public.ckks")
    secret.save(folder / "secret.ckks")
    return folder / "public.ckks", folder / "secret.ckks"


@pytest.mark.parametrize("layers", ["", "weight"])
def test_ckks_fedavg_over_sockets(
    layers: str, key_files: tuple[Path, Path], free_tcp_endpoint: str, run_python, slow_factor
) -> None:
    public, secret = key_files
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
    seen: list[dict[str, str]] = []
    contexts = []

    def inspect(m: Maintainer, ok: bool) -> None:
        update = m.data_list[-1]
        seen.append(
            {
                f"{tuple(p.shape)}/{k}": type(v).__name__
                for p, s in update.items()
                for k, v in s.items()
            }
        )
        for state in update.values():
            for value in state.values():
                if isinstance(value, CKKSCiphertext):
                    contexts.append(value.keys.context)

    with maintainer:
        zmqfed.functional.count_step(2)
        maintainer.register_step_hook(50, inspect, zmqfed.functional.after_download)
    procs = [
        run_python(
            COLLABORATOR, args=[free_tcp_endpoint, str(rank), str(secret), layers, str(ROUNDS)]
        )
        for rank in range(2)
    ]
    fed_optim = FederatedOptimizer(torch.optim.SGD(network.parameters(), lr=1.0), "aggregator")
    api = zmqfed.API(
        maintainer,
        fed_optim,
        ROUNDS,
        ckks_aggregation,
        agg_func_kwargs=dict(keys=str(public)),
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

    # the aggregator held ciphertexts, placeholders and the public context only
    encrypted = "CKKSCiphertext"
    assert len(seen) == 2 * ROUNDS
    assert seen[0]["(3, 20)/param.ckks"] == encrypted
    assert ("(3,)/param.ckks" in seen[0]) == (layers == "")
    assert contexts and all(not c.has_secret_key() and not c.is_private() for c in contexts)
    assert not CKKSKeys.load(public).has_secret_key

    downloads = [
        [json.loads(line[9:]) for line in out.splitlines() if line.startswith("DOWNLOAD ")]
        for out, _ in outputs
    ]
    mean0 = {k: (uploaded(0, 0)[k] + uploaded(1, 0)[k]) / 2 for k in ("bias", "weight")}
    for rank in range(2):
        assert downloads[rank][0]["bias"] == [0.0, 0.0, 0.0]  # round 0: the initial model
        got = downloads[rank][1]  # round 1: the decrypted mean of round 0 (CKKS error ~1e-7)
        for k in ("bias", "weight"):
            torch.testing.assert_close(torch.tensor(got[k]), mean0[k], atol=1e-5, rtol=0)
    # the encrypted weight never moved on the aggregator: it cannot read it
    assert float(network.weight.detach().abs().max()) == 0.0
    mean1 = (uploaded(0, 1)["bias"] + uploaded(1, 1)["bias"]) / 2
    if layers:  # the clear bias was averaged and installed as FedAvg does
        torch.testing.assert_close(network.bias.detach(), mean1, atol=1e-6, rtol=0)
    else:
        assert float(network.bias.detach().abs().max()) == 0.0
