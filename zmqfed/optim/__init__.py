"""Federated optimizers: role-aware wrappers around torch optimizers, plus FedYogi.

Server-side adaptive optimization needs no class of its own: wrap the torch
optimizer on the aggregator and step it on the pseudo-gradient, e.g.
``FederatedOptimizer(torch.optim.Adam(params, lr), role=AGGREGATOR)`` (FedAdam),
``Adagrad`` (FedAdagrad), ``SGD(momentum=0.9)`` (FedAvgM), :class:`FedYogi`.
"""

from __future__ import annotations

from zmqfed.optim.elastic import ElasticOptimizer
from zmqfed.optim.fed_optim import FederatedOptimizer
from zmqfed.optim.prox import ProxOptimizer
from zmqfed.optim.scaffold import ScaffoldOptimizer
from zmqfed.optim.yogi import FedYogi

__all__ = [
    "ElasticOptimizer",
    "FedYogi",
    "FederatedOptimizer",
    "ProxOptimizer",
    "ScaffoldOptimizer",
]
