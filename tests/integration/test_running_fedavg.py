"""Running FedAvg on a live aggregator: uploads folded on arrival, never held as a list."""

from __future__ import annotations

import threading

import torch
from torch import nn

import zmqfed
import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.optim import FederatedOptimizer


def test_running_fedavg_holds_no_upload_list(free_tcp_endpoint, slow_factor):
    names = ("client0", "client1", "client2")  # topo.star's names
    topology = topo.star(3, free_tcp_endpoint)
    agg_net = nn.Linear(3, 2)
    with torch.no_grad():
        for p in agg_net.parameters():
            p.zero_()
    agg = Maintainer(
        topo.analysis(topology, "aggregator")[0],
        agg_net.state_dict(keep_vars=True),
        timeout=60 * slow_factor,
    )
    with agg:
        zmqfed.functional.count_step(3)
        acc = zmqfed.functional.running_fedavg()
    held: list[int] = []
    agg.register_step_hook(50, lambda m, ok: held.append(len(m.data_list)), "after_download")
    errors: list[BaseException] = []

    def collaborator(i: int) -> None:
        try:
            net = nn.Linear(3, 2)
            with torch.no_grad():
                for p in net.parameters():
                    p.fill_(float(i + 1))  # updates 1, 2, 3
            m = Maintainer(
                topo.analysis(topology, names[i])[0],
                net.state_dict(keep_vars=True),
                timeout=60 * slow_factor,
            )
            m.meta["instances"] = i + 1  # weights 1, 2, 3
            m.package()
            m.step(download=False)
            m.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=collaborator, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    agg.step()
    for t in threads:
        t.join(30)
    agg.close()
    assert not errors, errors
    assert held == [0, 0, 0] and agg.data_list == [] and len(agg.meta_list) == 3
    server = FederatedOptimizer(torch.optim.SGD(agg_net.parameters(), lr=1.0), "aggregator")
    server.zero_grad()
    acc.apply(server)
    server.step()
    expected = (1 * 1 + 2 * 2 + 3 * 3) / 6  # instance-weighted mean
    for p in agg_net.parameters():
        assert torch.allclose(p, torch.full_like(p, expected), atol=1e-6)
