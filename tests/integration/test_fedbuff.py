"""FedBuff over real sockets: asynchronous server steps, staleness weights, exactly once.

Four collaborators (threads, each its own Maintainer and DEALER on tcp) run
the unchanged ``run_collaborator``; one is ten times slower than the rest.
Training adds ``i + 1`` to every downloaded weight, so collaborator ``i``'s
update is exactly ``i + 1`` whatever model it trained on, and the final
model is a closed form of the server steps' records: any update lost,
counted twice or weighted wrongly moves it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

import zmqfed.topo as topo
from zmqfed.api import run_collaborator
from zmqfed.core import Maintainer, step_points
from zmqfed.errors import ConfigError
from zmqfed.fedbuff import FedBuff, inverse_sqrt_staleness
from zmqfed.functional import central_dp, secure_aggregation
from zmqfed.optim import FederatedOptimizer

NAMES = [f"client{i}" for i in range(4)]


@pytest.mark.parametrize("budget_steps", [None, 5])
def test_fedbuff_steps_without_waiting_for_the_slowest(
    free_tcp_endpoint, slow_factor, budget_steps
):
    """``budget_steps``: an ``aggregated`` hook ends training after that many steps, as a
    spent privacy budget does (``Maintainer.end_training``), and reports a metric."""
    topology = topo.star(4, free_tcp_endpoint)
    net = nn.Linear(3, 1)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    agg = Maintainer(
        topo.analysis(topology, "aggregator")[0],
        net.state_dict(keep_vars=True),
        timeout=120 * slow_factor,
    )
    server = FederatedOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), "aggregator")
    fedbuff = FedBuff(agg, server, steps=8, buffer=2, max_staleness=3)
    # hooks on `aggregated` (local DP's accountant) see every server step and its updates
    aggregated: list[int] = []

    def on_aggregated(ctx: Any) -> None:
        aggregated.append(len(ctx.maintainer.meta_list))
        ctx.maintainer.round_metrics["epsilon"] = float(len(aggregated))
        if len(aggregated) == budget_steps:
            ctx.maintainer.end_training("budget spent")

    agg.on(step_points.aggregated, on_aggregated)
    steps = 8 if budget_steps is None else budget_steps
    errors: list[BaseException] = []
    trained: dict[str, int] = {name: 0 for name in NAMES}

    def collaborator(i: int) -> None:
        try:
            model = nn.Linear(3, 1)
            m = Maintainer(
                topo.analysis(topology, NAMES[i])[0],
                model.state_dict(keep_vars=True),
                timeout=120 * slow_factor,
            )

            def train(meta: Any) -> dict[str, Any]:
                time.sleep((1.0 if i == 3 else 0.1) * slow_factor)  # client3 is 10x slower
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(float(i + 1))
                trained[NAMES[i]] += 1
                return {"instances": 1}

            run_collaborator(m, train)
            m.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=collaborator, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    fedbuff.run()
    stats = agg.stats
    agg.close(final=True)
    for t in threads:
        t.join(60 * slow_factor)
    assert not errors, errors
    records = list(fedbuff.records)
    assert len(records) == steps
    assert aggregated == [2] * steps
    assert [r.metrics["epsilon"] for r in records] == [float(i + 1) for i in range(steps)]
    assert fedbuff.ended_early == (None if budget_steps is None else "budget spent")
    expected = 0.0
    for r in records:
        senders = [u[0] for u in r.updates]
        # a buffer of two distinct members: at most one update per member per version
        assert len(senders) == 2 and len(set(senders)) == 2, r
        for _sender, staleness, weight in r.updates:
            assert 0 <= staleness <= 3
            assert weight == pytest.approx(inverse_sqrt_staleness(staleness))
        expected += sum(w * (NAMES.index(s) + 1) for s, _, w in r.updates) / len(r.updates)
    for p in net.parameters():
        assert torch.allclose(p, torch.full_like(p, expected), atol=1e-5), (p, expected)
    # the fast collaborators made most server steps; the slow one's updates were stale
    counted = [u[0] for r in records for u in r.updates]
    assert counted.count("client3") < counted.count("client0")
    slow = [u[1] for r in records for u in r.updates if u[0] == "client3"]
    assert all(s >= 1 for s in slow), slow
    assert trained["client0"] > trained["client3"]
    assert set(stats["refused"]) <= {"discarded"}, stats["refused"]


def test_fedbuff_arguments_are_checked(free_tcp_endpoint):
    topology = topo.star(2, free_tcp_endpoint)
    agg = Maintainer(topo.analysis(topology, "aggregator")[0], {"w": torch.zeros(2)})
    server = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        with pytest.raises(ConfigError, match="buffer 3 is larger than the group"):
            FedBuff(agg, server, steps=1, buffer=3)
        with pytest.raises(ConfigError, match="positive"):
            FedBuff(agg, server, steps=0, buffer=1)
        with pytest.raises(ConfigError, match="max_staleness"):
            FedBuff(agg, server, steps=1, buffer=1, max_staleness=-1)
    finally:
        agg.close()


@pytest.mark.parametrize("feature", ["central_dp", "secure_aggregation"])
@pytest.mark.parametrize("fedbuff_first", [True, False])
def test_fedbuff_refuses_what_needs_synchronous_rounds(free_tcp_endpoint, feature, fedbuff_first):
    """Central DP and SecAgg+ work on one round's uploads; FedBuff takes them one by one.

    Combined, central DP's noise would replace FedBuff's staleness-weighted
    step, and SecAgg+'s masks would not cancel; both orders are refused.
    """
    topology = topo.star(4, free_tcp_endpoint)
    agg = Maintainer(topo.analysis(topology, "aggregator")[0], {"w": torch.zeros(2)})
    server = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)

    def install() -> None:
        with agg:
            if feature == "central_dp":
                central_dp(noise_multiplier=1.0, clip=1.0)
            else:
                secure_aggregation()

    try:
        if fedbuff_first:
            FedBuff(agg, server, steps=1, buffer=2)
            with pytest.raises(ConfigError, match=f"{feature} cannot run with fedbuff"):
                install()
        else:
            install()
            with pytest.raises(ConfigError, match=f"fedbuff cannot run with {feature}"):
                FedBuff(agg, server, steps=1, buffer=2)
    finally:
        agg.close()
