"""The toy app of the daemon tests with secure aggregation on every node (for child processes)."""

from __future__ import annotations

from tests.integration.toy_app import factory as toy_factory
from zmqfed.app import App, NodeContext
from zmqfed.functional import secure_aggregation

__all__ = ["MAX_WEIGHT", "factory"]

#: The toy app's weight is 10 instances; a small max_weight keeps the quantization fine.
MAX_WEIGHT = 100.0


def factory(ctx: NodeContext) -> App:
    """The toy app, configured for secure aggregation."""
    app = toy_factory(ctx)
    app.configure = lambda m: secure_aggregation(max_weight=MAX_WEIGHT)
    return app
