"""The short examples of OpenFed's documentation, renamed to zmqfed, one test per page.

OpenFed's pages show interactive sessions; each test runs the session's
statements with ``openfed`` renamed to ``zmqfed`` and checks what the page
shows, by meaning: zmqfed prints its objects its own way (the migration
guide says where), except ``tablist``, whose tables are OpenFed's to the
character. The multi-process examples run as processes elsewhere:
core.md in tests/integration/test_seed.py, federated.md in
tests/integration/test_openfed_pipes.py, examples/run.py and tools.md in
tests/integration/test_openfed_simulator.py.
"""

from __future__ import annotations

import threading

import torch

import zmqfed
import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.federated import MemoryNetwork

TIMEOUT = 20.0


def test_common_md_meta_and_addresses() -> None:
    meta = zmqfed.Meta()
    assert dict(meta) == {"mode": "train", "version": -1}
    meta["timestamp"] = zmqfed.utils.time_string()
    assert list(meta) == ["mode", "version", "timestamp"] and len(meta.timestamp) == 19
    meta = zmqfed.Meta()
    meta.timestamp = zmqfed.utils.time_string()
    assert meta["timestamp"] == meta.timestamp

    tcp_address = zmqfed.Address("gloo", "tcp://localhost:1994")
    assert (tcp_address.backend, tcp_address.init_method) == ("gloo", "tcp://localhost:1994")
    assert tcp_address.endpoint == "tcp://localhost:1994"
    assert zmqfed.default_tcp_address.backend == "gloo"
    assert zmqfed.default_tcp_address.init_method.startswith("tcp://")
    file_address = zmqfed.Address("gloo", "file:///tmp/zmqfed.sharedfile")
    assert file_address.endpoint == "ipc:///tmp/zmqfed.sharedfile"  # a socket file here
    assert zmqfed.default_file_address.init_method.startswith("file://")
    empty = zmqfed.empty_address
    assert (empty.backend, empty.init_method, empty.rank) == ("null", "null", -1)


def test_utils_md_tablist_prints_openfeds_tables() -> None:
    from zmqfed.utils import tablist

    head = ["a", "b", "c", "d", "e", "f"]
    data = [1, 2, 3, 4, 5, 6]
    assert tablist(head, data, 3) == "\n".join(
        [
            "+---+---+---+",
            "| a | b | c |",
            "+---+---+---+",
            "| 1 | 2 | 3 |",
            "+---+---+---+",
            "+---+---+---+",
            "| d | e | f |",
            "+---+---+---+",
            "| 4 | 5 | 6 |",
            "+---+---+---+",
        ]
    )
    assert tablist(head, data, force_in_one_row=True) == "\n".join(
        [
            "+---+---+---+---+---+---+",
            "| a | b | c | d | e | f |",
            "+---+---+---+---+---+---+",
            "| 1 | 2 | 3 | 4 | 5 | 6 |",
            "+---+---+---+---+---+---+",
        ]
    )
    data = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert tablist(head, data, force_in_one_row=True) == "\n".join(
        [
            "+---+---+---+----+----+----+",
            "| a | b | c | d  | e  | f  |",
            "+---+---+---+----+----+----+",
            "| 1 | 2 | 3 | 4  | 5  | 6  |",
            "| 7 | 8 | 9 | 10 | 11 | 12 |",
            "+---+---+---+----+----+----+",
        ]
    )


def test_topo_md_nodes_edges_topology_and_groups() -> None:
    alpha = zmqfed.topo.Node("alpha node", zmqfed.default_tcp_address)
    beta = zmqfed.topo.Node("beta node", zmqfed.default_file_address)
    assert alpha.nick_name == "alpha node" and alpha.address == zmqfed.default_tcp_address
    assert beta.address.init_method.startswith("file://")
    edge = zmqfed.topo.Edge(alpha, beta)
    assert (edge.start, edge.end) == (alpha, beta) and repr(edge) == (
        "Edge('alpha node' -> 'beta node')"
    )

    alpha = zmqfed.topo.Node("alpha node", zmqfed.default_tcp_address)
    beta = zmqfed.topo.Node("beta node", zmqfed.empty_address)
    gamma = zmqfed.topo.Node("gamma node", zmqfed.empty_address)
    topology = zmqfed.topo.Topology()
    topology.add_node(alpha)
    topology.add_node(beta)
    topology.add_node(gamma)
    topology.add_edge(beta, alpha)
    topology.add_edge(gamma, alpha)
    # the adjacency table: '^' where a collaborator (row) reports to an aggregator (column)
    rows = repr(topology).splitlines()
    assert rows[0].split("|")[1].strip() == "alpha node"
    assert [r.split("|")[1].strip() for r in rows[2:]] == [".", "^", "^"]

    expected = {alpha: ("aggregator", 0), beta: ("collaborator", 1), gamma: ("collaborator", 2)}
    for node, (role, rank) in expected.items():
        federated_groups = zmqfed.topo.analysis(topology, node)
        assert len(federated_groups) == 1
        props = federated_groups[0]
        assert (props.role, props.nick_name) == (role, node.nick_name)
        assert props.address.backend == "gloo"
        assert props.address.init_method == zmqfed.default_tcp_address.init_method
        assert (props.address.world_size, props.address.rank) == (3, rank)


def test_data_md_partitioner_dataset() -> None:
    from zmqfed.data import IIDPartitioner, PartitionerDataset, digits_dataset

    # scikit-learn's digits in place of MNIST, which would be downloaded
    dataset = PartitionerDataset(
        digits_dataset(train=True), total_parts=10, partitioner=IIDPartitioner()
    )
    from zmqfed.data import samples_distribution

    per_part = [sum(classes) for classes in samples_distribution(dataset, False)]
    assert len(per_part) == 10 and max(per_part) - min(per_part) <= 1  # IID: equal parts
    assert sum(per_part) == len(digits_dataset(train=True))


def test_optim_md_federated_optimizer_roles() -> None:
    from zmqfed.optim import FederatedOptimizer

    network = torch.nn.Linear(2, 1)
    sgd = torch.optim.SGD(network.parameters(), lr=0.1)
    # OpenFed's page writes openfed.aggregator, a name OpenFed never had: the role
    # names live in zmqfed.federated, as they did in openfed.federated.
    fed_sgd = FederatedOptimizer(sgd, role=zmqfed.federated.aggregator)
    assert fed_sgd.aggregator and not fed_sgd.collaborator
    fed_sgd = FederatedOptimizer(sgd, role=zmqfed.federated.collaborator)
    assert fed_sgd.collaborator
    assert callable(fed_sgd.acg) and callable(fed_sgd.round)  # the page says "acg_step"


def test_federated_md_dist_props_context() -> None:
    dist_props = zmqfed.federated.DistributedProperties()
    with dist_props:
        ...
    assert not dist_props.lock.locked()


def test_api_md_start_and_join() -> None:
    """``api.start(); api.join()`` on the aggregator while a collaborator trains."""
    network = MemoryNetwork()
    star = topo.star(1, "ipc:///memory/api-md")
    model = torch.nn.Linear(3, 1)
    agg = Maintainer(topo.analysis(star, "aggregator")[0], model.state_dict(keep_vars=True),
                     network=network, timeout=TIMEOUT)  # fmt: skip
    local = torch.nn.Linear(3, 1)
    col = Maintainer(topo.analysis(star, "client0")[0], local.state_dict(keep_vars=True),
                     network=network, timeout=TIMEOUT)  # fmt: skip
    with agg:
        zmqfed.functional.count_step(1)
    fed_sgd = zmqfed.optim.FederatedOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), zmqfed.federated.aggregator
    )
    api = zmqfed.API(agg, fed_sgd, 2, zmqfed.functional.average_aggregation, progress=False)

    def train(meta: zmqfed.Meta) -> dict[str, int]:
        with torch.no_grad():
            for p in local.parameters():
                p.fill_(1.0)
        return {"instances": 1}

    answered: list[int] = []
    thread = threading.Thread(
        target=lambda: answered.append(zmqfed.api.run_collaborator(col, train, rounds=2)),
        daemon=True,
    )
    try:
        thread.start()
        api.start()
        api.join(TIMEOUT)
        thread.join(TIMEOUT)
        assert not api.is_alive() and api.error is None
        assert answered == [2] and len(api.records) == 2
        assert all(p.detach().eq(1.0).all() for p in model.parameters())  # the collaborator's
    finally:
        col.close()
        agg.close()
