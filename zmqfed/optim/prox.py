"""``ProxOptimizer``: FedProx's proximal term on the collaborators (Li et al., MLSys 2020)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from zmqfed.errors import ConfigError
from zmqfed.optim.fed_optim import FederatedOptimizer
from zmqfed.props import COLLABORATOR

__all__ = ["ProxOptimizer"]


class ProxOptimizer(FederatedOptimizer):
    r"""FedProx: local steps minimise :math:`F_k(w) + \frac{\mu}{2}\lVert w - w^t\rVert^2`.

    On a collaborator every step adds ``mu * (w - w_global)`` to the gradient,
    where ``w_global`` is the weights at the first step of the round (the
    downloaded global model, when training starts right after the download).
    The anchor is private to the wrapper, so it is never uploaded; it is reset
    by :meth:`round` and :meth:`clear_state_dict`. On the aggregator this is a
    plain :class:`FederatedOptimizer`.

    Parameters
    ----------
    mu:
        Proximal coefficient, ``>= 0`` (OpenFed's default 0.9 kept; the paper
        tunes it in {0.001, 0.01, 0.1, 1}).
    """

    def __init__(
        self,
        optim: Any,
        role: str = COLLABORATOR,
        mu: float = 0.9,
        max_acg_step: int = -1,
        acg_loader: Iterable[Any] | None = None,
        acg_epoch: int = 1,
    ) -> None:
        if not float(mu) >= 0.0:
            raise ConfigError(f"FedProx needs mu >= 0, got {mu!r}")
        super().__init__(optim, role, max_acg_step, acg_loader, acg_epoch)
        self.mu = float(mu)
        self._anchor: dict[Tensor, Tensor] = {}

    def _collaborator_step(self) -> None:
        for p, _ in self.params_with_grad():
            anchor = self._anchor.get(p)
            if anchor is None:
                anchor = self._anchor[p] = p.detach().clone()
            assert p.grad is not None
            p.grad.add_(p.detach() - anchor, alpha=self.mu)

    def _collaborator_round(self) -> None:
        self._anchor.clear()

    def clear_state_dict(self, keys: Iterable[str] | None = None) -> None:
        self._anchor.clear()
        super().clear_state_dict(keys)
