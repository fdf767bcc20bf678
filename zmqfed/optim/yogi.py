"""``FedYogi``: the server optimizer of Reddi et al., "Adaptive Federated Optimization", ICLR 2021."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from zmqfed.errors import ConfigError

__all__ = ["FedYogi"]


class FedYogi(Optimizer):
    r"""Yogi on the pseudo-gradient, as in Algorithm 2 of Reddi et al. (2021).

    With the aggregated client update :math:`\Delta_t = \bar{x} - x_t`
    (``p.grad`` holds :math:`g = -\Delta_t`, set by an aggregation rule)::

        m_t = β1 m_{t-1} + (1 - β1) Δ_t
        v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)
        x_{t+1} = x_t + η m_t / (sqrt(v_t) + τ)

    No bias correction, as in the paper. Use it wrapped:
    ``FederatedOptimizer(FedYogi(net.parameters(), lr=1e-2), role=AGGREGATOR)``.

    Parameters
    ----------
    lr:
        Server learning rate η.
    betas:
        (β1, β2), paper defaults (0.9, 0.99).
    eps:
        τ, the adaptivity degree (paper default 1e-3).
    initial_accumulator_value:
        :math:`v_{-1}`; the paper asks for :math:`v_{-1} \ge τ^2`, the default.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
        initial_accumulator_value: float | None = None,
    ) -> None:
        if not lr > 0.0:
            raise ConfigError(f"FedYogi needs lr > 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"FedYogi needs betas in [0, 1), got {betas!r}")
        if not eps > 0.0:
            raise ConfigError(f"FedYogi needs eps (tau) > 0, got {eps!r}")
        v0 = eps * eps if initial_accumulator_value is None else float(initial_accumulator_value)
        if v0 < 0.0:
            raise ConfigError(
                f"initial_accumulator_value must be >= 0, got {initial_accumulator_value!r}"
            )
        defaults = dict(lr=lr, betas=betas, eps=eps, initial_accumulator_value=v0)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float | Tensor] | None = None) -> float | Tensor | None:  # type: ignore[override]
        """One server update from the pseudo-gradients in ``p.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ConfigError("FedYogi does not support sparse gradients")
                state = self.state[p]
                # keys checked one by one (not `len(state) == 0`): federated
                # state such as SCAFFOLD's 'c' may already live here
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "exp_avg_sq" not in state:
                    state["exp_avg_sq"] = torch.full_like(
                        p, group["initial_accumulator_value"], memory_format=torch.preserve_format
                    )
                if "step" not in state:  # a tensor, like torch's Adam, so it can be packaged
                    state["step"] = torch.zeros((), dtype=torch.float32)
                state["step"].add_(1)
                delta = -p.grad
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(delta, alpha=1.0 - beta1)
                delta_sq = delta * delta
                v.sub_(delta_sq * torch.sign(v - delta_sq), alpha=1.0 - beta2)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=group["lr"])
        return loss
