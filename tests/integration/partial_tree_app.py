"""An app for the partial-hierarchy test: a frozen backbone and a trainable head.

Every node builds the same model; collaborators (the leaves and the edge,
toward the root) exchange only the head (``App(partial=True)``). Each leaf
moves the head by one SGD step on data of its own.
"""

from __future__ import annotations

from typing import Any

import torch

from zmqfed.app import App, NodeContext
from zmqfed.meta import Meta

__all__ = ["factory", "model"]


def model() -> torch.nn.Module:
    """The shared architecture and initial values; the first layer is frozen."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    for p in net[0].parameters():
        p.requires_grad_(False)
    return net


def factory(ctx: NodeContext) -> App:
    net = model()
    app = App(model=net, rounds=ctx.rounds or 2, partial=True, reduce_keys=("loss",))
    if ctx.collaborator:
        g = torch.Generator().manual_seed(sum(map(ord, ctx.name)))
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        sgd = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)

        def train(meta: Meta) -> dict[str, Any]:
            loss = torch.nn.functional.cross_entropy(net(x), y)
            sgd.zero_grad()
            loss.backward()
            sgd.step()
            return {"instances": 16, "loss": float(loss.detach())}

        app.train = train
    return app
