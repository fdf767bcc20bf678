"""``API`` with elastic aggregation over real sockets, checked against an in-process computation.

One aggregator runs ``API(maintainer, fed_optim, rounds,
zmqfed.functional.elastic_aggregation, dict(quantile=Q))``; two collaborator
threads train with :class:`~zmqfed.optim.ElasticOptimizer` and upload their
model and its ``'importance'`` over TCP on 127.0.0.1. The aggregator records
every upload as it arrives. After each round its model (parameters and the
BatchNorm buffers) must equal what ``elastic_aggregation`` computes, in this
process and without any optimizer, from those same uploads with the same
quantile.

This is the contract between ``API`` and a rule whose third parameter is not
the optimizer list: ``API`` must pass the optimizers as ``optim_list`` and
``quantile`` must reach the rule.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

import zmqfed
import zmqfed.topo as topo
from zmqfed.api import API, RoundRecord, run_collaborator
from zmqfed.core import Maintainer, steps
from zmqfed.optim import ElasticOptimizer, FederatedOptimizer
from zmqfed.props import AGGREGATOR, COLLABORATOR

ROUNDS = 2
QUANTILE = 0.3
NAMES = ("client0", "client1")  # topo.star's names
INSTANCES = (10, 30)


def make_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.BatchNorm1d(3), nn.Linear(3, 1))


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in net.state_dict().items()}


def test_api_runs_elastic_aggregation_with_quantile(free_tcp_endpoint, slow_factor):
    timeout = 60 * slow_factor
    topology = topo.star(len(NAMES), free_tcp_endpoint)
    network = make_net(0)
    initial = snapshot(network)
    agg_sd = network.state_dict(keep_vars=True)
    name_of = {id(t): name for name, t in agg_sd.items()}
    maintainer = Maintainer(topo.analysis(topology, "aggregator")[0], agg_sd, timeout=timeout)
    with maintainer:
        zmqfed.functional.count_step(len(NAMES))

    # every upload as the aggregator received it, keyed by name, per round
    uploads: list[list[dict[str, dict[str, torch.Tensor]]]] = [[]]
    metas: list[list[dict[str, Any]]] = [[]]
    after_round: list[dict[str, torch.Tensor]] = []

    def record_upload(m: Maintainer, received: bool) -> None:
        if received and m.data_list:
            data = m.data_list[-1]
            uploads[-1].append(
                {
                    name_of[id(t)]: {k: v.detach().clone() for k, v in state.items()}
                    for t, state in data.items()
                }
            )
            metas[-1].append(dict(m.meta_list[-1]))

    def on_round(record: RoundRecord) -> None:
        after_round.append(snapshot(network))
        uploads.append([])
        metas.append([])

    maintainer.register_step_hook(50, record_upload, steps.after_download)

    errors: list[BaseException] = []

    def collaborator(rank: int) -> None:
        try:
            net = make_net(100 + rank)  # overwritten by the first download
            g = torch.Generator().manual_seed(rank)
            x = torch.randn(16, 4, generator=g) + rank
            y = torch.randn(16, 1, generator=g)
            loader = [(x[i : i + 8], y[i : i + 8]) for i in (0, 8)]
            fed = ElasticOptimizer(
                torch.optim.SGD(net.parameters(), lr=0.1), COLLABORATOR, acg_loader=loader
            )
            m = Maintainer(
                topo.analysis(topology, NAMES[rank])[0],
                net.state_dict(keep_vars=True),
                timeout=timeout,
            )

            def train(meta: Any) -> dict[str, Any]:
                fed.acg(net)  # parameter sensitivities -> state['importance']
                net.train()
                for xb, yb in loader:
                    fed.zero_grad()
                    nn.functional.mse_loss(net(xb), yb).backward()
                    fed.step()
                return {"instances": INSTANCES[rank]}

            try:
                run_collaborator(m, train, fed_optim=fed, timeout=timeout)
            finally:
                m.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=collaborator, args=(rank,), daemon=True)
        for rank in range(len(NAMES))
    ]
    server = FederatedOptimizer(torch.optim.SGD(network.parameters(), lr=1.0), AGGREGATOR)
    api = API(
        maintainer,
        server,
        ROUNDS,
        zmqfed.functional.elastic_aggregation,
        dict(quantile=QUANTILE),
        progress=False,
        step_timeout=timeout,
        on_round=on_round,
    )
    try:
        for t in threads:
            t.start()
        api.run()  # in this thread: an error is raised here, not logged
    finally:
        maintainer.close()
        for t in threads:  # after a failure, do not wait out the collaborators' timeout
            t.join(timeout if api.error is None else 5)
    assert not errors, errors
    assert [r.participants for r in api.records] == [len(NAMES)] * ROUNDS

    # The same computation in this process: elastic_aggregation on the same
    # uploads, without optimizers, then p - grad (the server's SGD(lr=1.0)) and
    # the aggregated buffers.
    reference = make_net(0)
    reference.load_state_dict(initial)
    ref_sd = reference.state_dict(keep_vars=True)
    for r in range(ROUNDS):
        assert len(uploads[r]) == len(NAMES)
        assert sorted(m["instances"] for m in metas[r]) == sorted(INSTANCES)
        for upload in uploads[r]:
            for name, t in ref_sd.items():
                if t.requires_grad:
                    assert "importance" in upload[name], (r, name)
        data_list = [{ref_sd[name]: state for name, state in u.items()} for u in uploads[r]]
        states = zmqfed.functional.elastic_aggregation(data_list, metas[r], quantile=QUANTILE)
        fedavg = zmqfed.functional.naive_aggregation(data_list, metas[r])
        with torch.no_grad():
            for name, t in ref_sd.items():
                if t.requires_grad:
                    # the elastic scale moved the model somewhere FedAvg would not go
                    assert not torch.allclose(states[t]["grad"], fedavg[t]["grad"]), (r, name)
                    t.sub_(states[t]["grad"])
                else:  # BatchNorm running stats and num_batches_tracked
                    t.copy_(states[t]["param"])
        for name, expected in snapshot(reference).items():
            torch.testing.assert_close(after_round[r][name], expected, msg=f"round {r}, {name}")
    for name, value in snapshot(network).items():
        assert not torch.equal(value, initial[name]), name  # every tensor, buffers too, moved
