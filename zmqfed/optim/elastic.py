"""``ElasticOptimizer``: parameter sensitivities for elastic aggregation (Chen et al., CVPR 2023)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zmqfed.errors import ConfigError
from zmqfed.optim.fed_optim import FederatedOptimizer, split_batch
from zmqfed.props import COLLABORATOR

__all__ = ["ElasticOptimizer"]

IMPORTANCE = "importance"


class ElasticOptimizer(FederatedOptimizer):
    r"""Collects each parameter's sensitivity in ``state[p]['importance']``.

    :meth:`acg` runs the model over a loader, backpropagates
    :math:`\mathrm{mse}(f(x), 0)` (the squared output norm) and keeps an
    exponential moving average of :math:`|\nabla_\theta|` per parameter::

        importance <- momentum * importance + (1 - momentum) * |grad|

    The key travels with ``package(fed_optim)`` and is consumed by
    :func:`~zmqfed.functional.agg_mean.elastic_aggregation`;
    :meth:`clear_state_dict` drops it after the upload, so each round starts
    from zero. Local steps are those of the wrapped optimizer.

    Parameters
    ----------
    momentum:
        EMA factor in ``[0, 1]`` (OpenFed's default 0.9).
    """

    upload_keys = (IMPORTANCE,)  # the clients' parameter sensitivities

    needs_acg = True

    def __init__(
        self,
        optim: Any,
        role: str = COLLABORATOR,
        momentum: float = 0.9,
        max_acg_step: int = -1,
        acg_loader: Iterable[Any] | None = None,
        acg_epoch: int = 1,
    ) -> None:
        if not 0.0 <= float(momentum) <= 1.0:
            raise ConfigError(f"momentum must be in [0, 1], got {momentum!r}")
        super().__init__(optim, role, max_acg_step, acg_loader, acg_epoch)
        self.momentum = float(momentum)

    def _acg_loss(self, model: nn.Module, batch: Any, device: torch.device) -> Tensor:
        x, _ = split_batch(batch, device)
        output = model(x)
        return F.mse_loss(output, torch.zeros_like(output))

    def _acg_step(self) -> None:
        for p, _ in self.params_with_grad():
            assert p.grad is not None
            state = self.state[p]
            importance = state.get(IMPORTANCE)
            if importance is None:
                importance = state[IMPORTANCE] = torch.zeros_like(p)
            importance.mul_(self.momentum).add_(p.grad.detach().abs(), alpha=1.0 - self.momentum)

    def clear_state_dict(self, keys: Iterable[str] | None = None) -> None:
        super().clear_state_dict([IMPORTANCE, *(keys or ())])
