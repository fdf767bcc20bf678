"""OpenFed's ``examples/run.py``, ported to zmqfed by renaming ``openfed`` to ``zmqfed``.

Run it under the simulator launcher (1 aggregator and 5 collaborators)::

    python -m zmqfed.tools.simulator --nproc 6 examples/openfed_run/run.py

The program is OpenFed's, line for line, with two changes:

* the package name;
* scikit-learn's handwritten digits (8x8 pixels, shipped with scikit-learn,
  ``zmqfed.data.digits_dataset``) in place of torchvision's MNIST, which
  would be downloaded: the network reads 64 inputs instead of 784, and
  ``--download`` only checks that the data loads.

As in the original, collaborators train their own copy of the network and
never ``unpackage()`` the downloaded model; the aggregator averages the
uploads into its model every round.
"""

import argparse
import random

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import zmqfed
from zmqfed.data import IIDPartitioner, PartitionerDataset, digits_dataset

parser = argparse.ArgumentParser(description="Simulator")
parser.add_argument("--props", type=str, default="/tmp/aggregator.json")
parser.add_argument(
    "--download", action="store_true", default=False, help="Load the data, then exit."
)
args = parser.parse_args()


def simulate():
    props = zmqfed.federated.FederatedProperties.load(args.props)
    assert len(props) == 1
    props = props[0]

    network = nn.Linear(64, 10)
    loss_fn = nn.CrossEntropyLoss()

    sgd = torch.optim.SGD(network.parameters(), lr=1.0 if props.aggregator else 0.1)
    fed_sgd = zmqfed.optim.FederatedOptimizer(sgd, props.role)

    maintainer = zmqfed.core.Maintainer(props, network.state_dict(keep_vars=True))

    with maintainer:
        zmqfed.functional.device_alignment()
        if props.aggregator:
            zmqfed.functional.count_step(props.address.world_size - 1)

    rounds = 10
    if maintainer.aggregator:
        api = zmqfed.API(maintainer, fed_sgd, rounds, zmqfed.functional.average_aggregation)
        api.run()
    else:
        digits = digits_dataset(train=True)
        fed_digits = PartitionerDataset(digits, total_parts=100, partitioner=IIDPartitioner())

        dataloader = DataLoader(
            fed_digits, batch_size=10, shuffle=True, num_workers=0, drop_last=False
        )

        version = 0
        for _outter in range(rounds):
            maintainer.update_version(version)
            maintainer.step(upload=False)

            part_id = random.randint(0, 9)
            fed_digits.set_part_id(part_id)

            network.train()
            losses = []
            for data in dataloader:
                x, y = data
                output = network(x.view(-1, 64))
                loss = loss_fn(output, y)

                fed_sgd.zero_grad()
                loss.backward()
                fed_sgd.step()
                losses.append(loss.item())
            loss = sum(losses) / len(losses)

            fed_sgd.round()

            maintainer.update_version(version + 1)
            maintainer.package(fed_sgd)
            maintainer.step(download=False)
            fed_sgd.clear_state_dict()
            version += 1  # noqa: SIM113 - kept as OpenFed wrote it


if __name__ == "__main__":
    if args.download:
        digits_dataset(train=True)
    else:
        simulate()
