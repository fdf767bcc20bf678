"""A deterministic app for daemon and simulator tests (importable by child processes).

Every collaborator moves each weight toward ``index + 1`` by a fixed step;
FedAvg of equal-sized parts is therefore a closed form, and a run that is
interrupted and resumed must end with exactly the weights of one that was not.
Options (``--set``): ``delay`` seconds of "training" per round (for
``delay_node`` only, if given), ``fail_node`` and ``fail_round`` to make one
collaborator crash, ``marker_dir`` to leave a file ``NAME.trained.ROUND``
there after each round's training (tests time kills by it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zmqfed.app import App, NodeContext
from zmqfed.meta import Meta

__all__ = ["expected_weight", "factory"]

STEP = 0.25


def expected_weight(collaborators: int, rounds: int) -> float:
    """The closed form: w <- w + STEP * (mean_target - w), from w = 0."""
    target = sum(range(1, collaborators + 1)) / collaborators
    w = 0.0
    for _ in range(rounds):
        w = w + STEP * (target - w)
    return w


def factory(ctx: NodeContext) -> App:
    """Build the toy app for ``ctx``."""
    model = nn.Linear(4, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    app = App(model=model, rounds=ctx.rounds or 3, reduce_keys=("loss",))
    delay = float(ctx.options.get("delay", "0"))
    if ctx.options.get("delay_node", ctx.name) != ctx.name:
        delay = 0.0
    marker_dir = ctx.options.get("marker_dir")
    fail_node = ctx.options.get("fail_node")
    fail_round = int(ctx.options.get("fail_round", "0"))
    if "min_clients" in ctx.options:
        app.min_clients = int(ctx.options["min_clients"])
        app.round_timeout = float(ctx.options.get("round_timeout", "2"))
    target = float(ctx.index + 1)

    def train(meta: Meta) -> dict[str, Any]:
        if ctx.name == fail_node and meta.get("round") == fail_round:
            raise RuntimeError(f"{ctx.name} fails on purpose in round {fail_round}")
        time.sleep(delay)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(STEP * (target - p))
        if marker_dir is not None:
            Path(marker_dir, f"{ctx.name}.trained.{meta.get('round')}").touch()
        return {"instances": 10, "loss": float(abs(target - model.bias.item()))}

    if ctx.collaborator:
        app.train = train
    return app
