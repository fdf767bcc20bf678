# The seed document's alpha script, unchanged but for the package name.
# build a topology first
import zmqfed
import zmqfed.topo as topo

aggregator = topo.Node('aggregator', zmqfed.default_tcp_address)
alpha = topo.Node('alpha', zmqfed.empty_address)
beta = topo.Node('beta', zmqfed.empty_address)

topology = topo.Topology()
topology.add_node_list([aggregator, alpha, beta])
topology.add_edge(alpha, aggregator)
topology.add_edge(beta, aggregator)

# analysis topology to get federated group props
federated_group_props = topo.analysis(topology, alpha)
assert len(federated_group_props) == 1
federated_group_prop = federated_group_props[0]

# build network
import torch.nn as nn
network = nn.Linear(10, 1)

# build maintainer
from zmqfed.core import Maintainer
maintainer = Maintainer(federated_group_prop,
                        network.state_dict(keep_vars=True))

with maintainer:
    zmqfed.functional.device_alignment()

maintainer.step(upload=False)
maintainer.package()
maintainer.step(download=False)
