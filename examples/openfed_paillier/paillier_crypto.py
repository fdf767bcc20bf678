"""OpenFed's Paillier example (its docs/examples/paillier_crypto notebook), ported to zmqfed.

One aggregator and one collaborator, each a process started by the last
cell; the collaborator encrypts its updates with the public key, the
aggregator adds them up and decrypts the sum with the private key::

    python examples/openfed_paillier/paillier_crypto.py

The notebook's cells are OpenFed's, in order, with these changes:

* the package name;
* scikit-learn's handwritten digits (8x8 pixels, shipped with scikit-learn,
  ``zmqfed.data.digits_dataset``) in place of torchvision's MNIST, which
  would be downloaded: the network reads 64 inputs instead of 784;
* the key and loss files live in the temporary directory
  (``tempfile.gettempdir()``: ``/tmp`` unless ``$TMPDIR`` says otherwise);
* the last cell runs under ``if __name__ == "__main__":``, as a script
  starting processes must, and the notebook's plot of the losses is left out.
"""

import os
import tempfile

import torch

from zmqfed.functional import key_gen

TMP = tempfile.gettempdir()

# Public and Private Key
if not os.path.isfile(f"{TMP}/public.key") or not os.path.isfile(f"{TMP}/private.key"):
    public_key, private_key = key_gen()
    public_key.save(f"{TMP}/public.key")
    private_key.save(f"{TMP}/private.key")
    print("Generate new public and private key.")
else:
    print(f"Found public and private key under '{TMP}'")

# Network and Loss
import torch.nn as nn  # noqa: E402 - the notebook imports cell by cell


def build_network():
    network = nn.Linear(64, 10)
    loss_fn = nn.CrossEntropyLoss()
    return network, loss_fn


# Optimizer
import torch.optim as optim  # noqa: E402

from zmqfed.federated import is_aggregator  # noqa: E402
from zmqfed.optim import FederatedOptimizer  # noqa: E402


def build_optimizer(network, role):
    sgd = optim.SGD(network.parameters(), lr=1.0 if is_aggregator(role) else 0.1)
    fed_sgd = FederatedOptimizer(sgd, role=role)
    return fed_sgd


# Topology
import zmqfed  # noqa: E402
import zmqfed.topo as topo  # noqa: E402


def build_topology():
    aggregator_node = topo.Node("aggregator", address=zmqfed.default_tcp_address)
    collaborator_node = topo.Node("collaborator", address=zmqfed.empty_address)

    topology = topo.Topology()
    topology.add_edge(collaborator_node, aggregator_node)

    return topology


# Federated Group Properties
def build_props(topology, role):
    fed_props = topo.analysis(topology, "aggregator" if is_aggregator(role) else "collaborator")
    assert len(fed_props) == 1
    fed_prop = fed_props[0]

    return fed_prop


# Maintainer
from zmqfed.core import Maintainer  # noqa: E402


def build_maintainer(fed_prop, state_dict, role, part_per_round):
    maintainer = Maintainer(fed_prop, state_dict)

    with maintainer:
        zmqfed.functional.device_alignment()
        if is_aggregator(role):
            zmqfed.functional.count_step(part_per_round)
        else:
            public_key = zmqfed.functional.PublicKey.load(f"{TMP}/public.key")
            zmqfed.functional.paillier_package(public_key)
    return maintainer


# Dataset
from torch.utils.data import DataLoader  # noqa: E402

from zmqfed.data import IIDPartitioner, PartitionerDataset, digits_dataset  # noqa: E402


def build_dataset():
    # Dataset
    digits = digits_dataset(train=True)
    fed_digits = PartitionerDataset(digits, total_parts=10, partitioner=IIDPartitioner())

    # Dataloader
    dataloader = DataLoader(fed_digits, batch_size=10, shuffle=True, num_workers=0, drop_last=False)

    return dataloader


# API
def build_API(maintainer, fed_sgd, rounds):
    private_key = zmqfed.functional.PrivateKey.load(f"{TMP}/private.key")
    api = zmqfed.API(
        maintainer,
        fed_sgd,
        rounds,
        agg_func=zmqfed.functional.paillier_aggregation,
        agg_func_kwargs=dict(private_key=private_key),
    )
    return api


# Step
import random  # noqa: E402
import time  # noqa: E402


def step(mt, dataloader, network, loss_fn, fed_optim, rounds, part_per_round):
    version = 0
    outter_losses = []
    for _outter in range(rounds):
        outter_loss = []
        for _inner in range(part_per_round):
            mt.update_version(version)
            mt.step(upload=False)

            part_id = random.randint(0, 9)
            dataloader.dataset.set_part_id(part_id)

            network.train()
            losses = []
            tic = time.time()
            for data in dataloader:
                x, y = data
                output = network(x.view(-1, 64))
                loss = loss_fn(output, y)

                fed_optim.zero_grad()
                loss.backward()
                fed_optim.step()
                losses.append(loss.item())
            toc = time.time()
            loss = sum(losses) / len(losses)
            outter_loss.append(loss)
            duration = toc - tic  # noqa: F841 - as in the notebook

            fed_optim.round()

            mt.update_version(version + 1)
            mt.package(fed_optim)
            mt.step(download=False)
            fed_optim.clear_state_dict()
        version += 1  # noqa: SIM113 - kept as OpenFed wrote it
        outter_losses.append(sum(outter_loss) / len(outter_loss))
    torch.save(outter_losses, f"{TMP}/outter_losses")


# Main Function
def main_function(role, rounds, part_per_round):
    # Network
    network, loss_fn = build_network()

    if is_aggregator(role):
        print(network)
        print(loss_fn)

    # Optimizer
    fed_sgd = build_optimizer(network, role)

    if is_aggregator(role):
        print(fed_sgd)

    # Topology
    topology = build_topology()

    if is_aggregator(role):
        print(topology)

    # Federated Group Properties
    fed_prop = build_props(topology, role)

    print(fed_prop)

    # Maintainer
    maintainer = build_maintainer(
        fed_prop, network.state_dict(keep_vars=True), role, part_per_round
    )

    if is_aggregator(role):
        api = build_API(maintainer, fed_sgd, rounds)
        api.start()
    else:
        dataloader = build_dataset()
        step(maintainer, dataloader, network, loss_fn, fed_sgd, rounds, part_per_round)


# Enable colorize output
from zmqfed.utils.utils import FMT  # noqa: E402

FMT.color = True

# Run
from multiprocessing import Process  # noqa: E402

if __name__ == "__main__":
    rounds = 3
    part_per_round = 5

    aggregator_pc = Process(
        target=main_function, args=(zmqfed.federated.aggregator, rounds, part_per_round)
    )
    collaborator = Process(
        target=main_function, args=(zmqfed.federated.collaborator, rounds, part_per_round)
    )

    aggregator_pc.start()
    collaborator.start()

    aggregator_pc.join()
    collaborator.join()
