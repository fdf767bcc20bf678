"""``examples.digits.daemon`` with ``algo=scaffold``, reporting its control variates per round.

SCAFFOLD with full participation keeps an invariant: the aggregator's
global control variate ``c`` is the mean of the collaborators' ``c_i``,
weighted as the aggregation weighs them (by ``instances``, the weights
``meta_reduce`` uses too). Each collaborator reports the sum of its ``c_i``
at the start of its local training (``control_sum``), and the aggregator
the sum of ``c`` after each aggregation (``global_control_sum``), so round
``r``'s reduced ``control_sum`` must equal round ``r - 1``'s
``global_control_sum``; a ``c`` lost by a resumed aggregator breaks it.
"""

from __future__ import annotations

from typing import Any

from examples.digits.daemon import factory as digits_factory
from zmqfed.app import App, NodeContext
from zmqfed.meta import Meta

__all__ = ["factory"]


def _sum(tensors: Any) -> float:
    return float(sum(float(t.double().sum()) for t in tensors))


def factory(ctx: NodeContext) -> App:
    """The digits app, with ``control_sum`` / ``global_control_sum`` metrics."""
    app = digits_factory(ctx)
    app.reduce_keys = (*app.reduce_keys, "control_sum")
    server, evaluate = app.server_optim, app.evaluate
    if server is not None and evaluate is not None:

        def evaluate_with_c() -> dict[str, Any]:
            return {**evaluate(), "global_control_sum": _sum(server.global_control.values())}

        app.evaluate = evaluate_with_c
    local, train = app.local_optim, app.train
    if local is not None and train is not None:

        def train_with_c(meta: Meta) -> dict[str, Any]:
            before = _sum(local.local_control.values())  # c_i as this round starts
            return {**train(meta), "control_sum": before}

        app.train = train_with_c
    return app
