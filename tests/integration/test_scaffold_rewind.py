"""SCAFFOLD through ``run_collaborator`` when the aggregator restarts behind it.

The collaborator trains on version 1 and uploads; the aggregator dies before
it publishes version 2, and a new one serves version 1 again. The
collaborator is told (``AggregatorRewound``), redoes the round on version 1,
and its local control variate ``c_i`` must start from where it stood before
the first try, or the redone round advances it twice.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from torch import nn

import zmqfed.topo as topo
from zmqfed.api import run_collaborator
from zmqfed.core import Maintainer
from zmqfed.errors import ConfigError
from zmqfed.functional import count_step
from zmqfed.optim import ScaffoldOptimizer


def test_a_round_redone_after_an_aggregator_restart_advances_c_i_once(
    free_tcp_endpoint, slow_factor
):
    topology = topo.star(1, free_tcp_endpoint)
    timeout = 60 * slow_factor
    model = nn.Linear(2, 1)
    client = ScaffoldOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    starts: list[tuple[int, dict[str, torch.Tensor]]] = []
    errors: list[BaseException] = []

    def train(meta: Any) -> dict[str, Any]:
        starts.append(
            (int(meta["version"]), {id(p): c.clone() for p, c in client.local_control.items()})
        )
        for _ in range(3):
            client.zero_grad()
            x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
            loss = (model(x) - torch.tensor([[1.0], [0.0]])).pow(2).mean()
            loss.backward()
            client.step()
        return {"instances": 2}

    def collaborator() -> None:
        try:
            m = Maintainer(
                topo.analysis(topology, "client0")[0],
                model.state_dict(keep_vars=True),
                timeout=timeout,
            )
            run_collaborator(m, train, fed_optim=client, rounds=3)
            m.close()
        except BaseException as exc:
            errors.append(exc)

    def aggregator(version: int) -> Maintainer:
        served = nn.Linear(2, 1)
        with torch.no_grad():
            for p in served.parameters():
                p.fill_(0.5)
        agg = Maintainer(
            topo.analysis(topology, "aggregator")[0],
            served.state_dict(keep_vars=True),
            timeout=timeout,
            upload_fields=("c",),  # the collaborator's control-variate update
        )
        agg.update_version(version)
        with agg:
            count_step(1)
        return agg

    agg = aggregator(0)
    thread = threading.Thread(target=collaborator, daemon=True)
    thread.start()
    agg.step()  # serves version 0, takes the update on it
    agg.clear()
    agg.update_version(1)
    agg.step()  # serves version 1, takes the update on it
    agg.close(final=False)  # dies before version 2 is published
    deadline = time.monotonic() + timeout
    while True:  # restarted from a checkpoint of version 1, once libzmq released the port
        try:
            again = aggregator(1)
            break
        except ConfigError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    again.step()  # the collaborator asked for 2, is told 1, redoes that round
    again.close(final=True)
    thread.join(timeout)
    assert not errors, errors
    assert [version for version, _ in starts] == [0, 1, 1]
    first, redo = starts[1][1], starts[2][1]
    assert first and first.keys() == redo.keys()
    for key, c_i in first.items():
        torch.testing.assert_close(redo[key], c_i)
    # the first round on version 1 did move c_i: the equality above is not trivial
    assert any(
        not torch.equal(c, starts[0][1].get(k, torch.zeros_like(c))) for k, c in first.items()
    )
