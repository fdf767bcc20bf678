"""The digits federation as a ``zmqfed-node`` / ``zmqfed-sim`` app.

::

    zmqfed-sim --star 8 --app examples.digits.daemon:factory --rounds 20
    zmqfed-node run --topology examples/topologies/star3.yaml --node client0 \\
        --app examples.digits.daemon:factory --state-dir /var/lib/zmqfed

Options (``--set KEY=VALUE``): ``alpha`` (Dirichlet skew, 0.5), ``epochs``
(local epochs, 3), ``lr`` (local SGD rate, 0.2), ``algo`` (``fedavg``,
``fedprox`` or ``scaffold``), ``mu`` (FedProx, 0.01), ``seed`` (0);
``min_clients`` with ``round_timeout`` (seconds, 5) end a round at its
deadline once that many uploads arrived, so a lost collaborator cannot stall
the federation.
"""

from __future__ import annotations

from typing import Any

import torch

from examples.digits.app import (
    BATCH_SIZE,
    LOCAL_EPOCHS,
    LOCAL_LR,
    MU,
    build_model,
    client_part,
    evaluate,
    held_out_split,
    train_epochs,
)
from zmqfed.app import App, NodeContext
from zmqfed.errors import ConfigError
from zmqfed.meta import Meta
from zmqfed.optim import FederatedOptimizer, ProxOptimizer, ScaffoldOptimizer
from zmqfed.props import AGGREGATOR, COLLABORATOR

__all__ = ["factory"]


def factory(ctx: NodeContext) -> App:
    """Build the digits app for the node described by ``ctx``."""
    torch.set_num_threads(1)
    opt = dict(ctx.options)
    seed = int(opt.get("seed", 0))
    model = build_model(seed)
    app = App(model=model, rounds=ctx.rounds or 20)
    if "min_clients" in opt:
        app.min_clients = int(opt["min_clients"])
        app.round_timeout = float(opt.get("round_timeout", "5"))
    algo = opt.get("algo", "fedavg")
    if algo not in ("fedavg", "fedprox", "scaffold"):
        raise ConfigError(f"algo must be fedavg, fedprox or scaffold, got {algo!r}")
    if ctx.aggregator and not ctx.collaborator:
        if algo == "scaffold":  # the server keeps the global control variate c
            server_sgd = torch.optim.SGD(model.parameters(), lr=1.0)
            app.server_optim = ScaffoldOptimizer(server_sgd, role=AGGREGATOR)
        x_test, y_test = held_out_split(seed)

        def evaluate_global() -> dict[str, Any]:
            accuracy, loss = evaluate(model, x_test, y_test)
            return {"test_accuracy": accuracy, "test_loss": loss}

        app.evaluate = evaluate_global
    if ctx.collaborator:
        x, y = client_part(ctx.index, ctx.parts, float(opt.get("alpha", 0.5)), seed)
        lr = float(opt.get("lr", LOCAL_LR))
        epochs = int(opt.get("epochs", LOCAL_EPOCHS))
        sgd = torch.optim.SGD(model.parameters(), lr=lr)
        if algo == "fedprox":
            local: Any = ProxOptimizer(sgd, COLLABORATOR, mu=float(opt.get("mu", MU)))
        elif algo == "scaffold":
            local = ScaffoldOptimizer(sgd, role=COLLABORATOR)
        else:
            local = FederatedOptimizer(sgd, COLLABORATOR)
        generator = torch.Generator().manual_seed(seed + 1000 * (ctx.index + 1))

        def train(meta: Meta) -> dict[str, Any]:
            loss = train_epochs(model, local, x, y, epochs, BATCH_SIZE, generator)
            return {"instances": len(y), "loss": loss}

        app.train = train
        app.local_optim = local
    return app
