"""DP-SGD with Opacus on collaborators, reported and budgeted by the aggregator (in-memory network)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("opacus")  # the `dp` extra; `make test` installs it

from torch.utils.data import DataLoader, TensorDataset

import zmqfed.topo as topo
from zmqfed.api import API, run_collaborator
from zmqfed.core import Maintainer
from zmqfed.errors import ConfigError
from zmqfed.federated import MemoryNetwork
from zmqfed.functional import count_step, dp_sgd, naive_aggregation
from zmqfed.optim import FederatedOptimizer

TIMEOUT = 60.0


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def data(i: int) -> TensorDataset:
    g = torch.Generator().manual_seed(i)
    return TensorDataset(
        torch.randn(64 + 32 * i, 8, generator=g), torch.randint(0, 3, (64 + 32 * i,), generator=g)
    )


def test_epsilon_is_reported_per_round_and_training_stops_at_the_budget():
    n, z = 2, 1.2
    network = MemoryNetwork()
    star = topo.star(n, "ipc:///memory/dpsgd")
    model = net()
    agg = Maintainer(
        topo.analysis(star, "aggregator")[0], model.state_dict(keep_vars=True), network=network
    )
    with agg:
        count_step(n)
        report = dp_sgd(noise_multiplier=z, max_grad_norm=1.0, target_epsilon=5.0)
    privates: list[Any] = []
    errors: list[BaseException] = []
    threads = []
    for i in range(n):
        local = net()
        col = Maintainer(
            topo.analysis(star, f"client{i}")[0], local.state_dict(keep_vars=True), network=network
        )
        loader = DataLoader(data(i), batch_size=16)
        with col:
            private = dp_sgd(
                local,
                torch.optim.SGD(local.parameters(), lr=0.1),
                loader,
                noise_multiplier=z,
                max_grad_norm=1.0,
            )
        privates.append(private)

        def train(meta: Any, private: Any = private) -> dict[str, Any]:
            for x, y in private.data_loader:
                private.optimizer.zero_grad()
                if len(y):
                    F.cross_entropy(private.module(x), y).backward()
                private.optimizer.step()
            return {"instances": 1}

        def work(col: Maintainer = col, train: Any = train) -> None:
            try:
                run_collaborator(col, train, timeout=TIMEOUT)
            except BaseException as exc:
                errors.append(exc)
            finally:
                col.close()

        threads.append(threading.Thread(target=work, daemon=True))
    for t in threads:
        t.start()
    optim = FederatedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), "aggregator")
    api = API(agg, optim, 50, naive_aggregation, progress=False, step_timeout=TIMEOUT)
    try:
        api.run()
    finally:
        agg.close(final=True)
        for t in threads:
            t.join(TIMEOUT)
    assert not errors
    rounds = len(api.records)
    assert 2 <= rounds < 50 and "record-level epsilon" in (api.ended_early or "")
    # the federation's epsilon is the largest collaborator's, as Opacus's own accountant says
    opacus_eps = [p.engine.get_epsilon(1e-5) for p in privates]
    assert api.records[-1].metrics["epsilon"] == pytest.approx(max(opacus_eps), rel=1e-6)
    assert max(opacus_eps) <= 5.0
    assert report.history == [r.metrics["epsilon"] for r in api.records]
    # the smaller dataset samples each record more often: it spends more
    assert opacus_eps[0] > opacus_eps[1]


def test_collaborator_needs_its_training_objects():
    star = topo.star(1, "ipc:///memory/dpsgd-args")
    col = Maintainer(
        topo.analysis(star, "client0")[0], net().state_dict(keep_vars=True), network=MemoryNetwork()
    )
    with col, pytest.raises(ConfigError, match="needs module, optimizer and data_loader"):
        dp_sgd(noise_multiplier=1.0, max_grad_norm=1.0)
    with col, pytest.raises(ConfigError, match="max_grad_norm"):
        dp_sgd(noise_multiplier=1.0, max_grad_norm=0.0)
    col.close()
