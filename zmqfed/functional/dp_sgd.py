"""Record-level DP on the collaborators: DP-SGD through Opacus, reported and budgeted by the aggregator.

DP-SGD (Abadi et al. 2016) clips every example's gradient and noises each
batch's sum, so a collaborator's uploads are DP with respect to each of its
records. Opacus does the training part (``pip install 'zmqfed[dp]'``);
this module wires it to a federation:

* on a **collaborator**, :func:`dp_sgd` wraps the model, optimizer and data
  loader with Opacus's ``PrivacyEngine`` (Poisson sampling, flat clipping)
  and returns them to train with; every upload then carries the
  collaborator's epsilon so far (``meta['dp_epsilon']``) and after one more
  round like the last (``meta['dp_epsilon_next']``), from the steps Opacus
  recorded, by zmqfed's RDP accountant (the same numbers as Opacus's).
* on the **aggregator**, :func:`dp_sgd` (without model) records the largest
  of the collaborators' epsilons as the round's ``epsilon`` and, with
  ``target_epsilon``, ends training before a round would take any
  collaborator past it.

Every record belongs to one collaborator, so the federation's record-level
epsilon is the largest collaborator's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from zmqfed.core import Maintainer, StepContext, current_maintainer, step_points
from zmqfed.errors import ConfigError
from zmqfed.functional.dp_accountant import RDPAccountant
from zmqfed.functional.dp_mechanism import check_positive

__all__ = ["DPSGD", "EPSILON", "EPSILON_NEXT", "dp_sgd"]

#: Meta keys of a collaborator's record-level epsilon, now and after one more round.
EPSILON = "dp_epsilon"
EPSILON_NEXT = "dp_epsilon_next"

# Opacus's hooks make torch warn on every backward through a first layer whose
# input needs no gradient; harmless (docs/privacy.md), and noisy under -W error.
_HOOK_WARNING = "Full backward hook is firing when gradients are computed"


@dataclass
class DPSGD:
    """What :func:`dp_sgd` returns: train with ``module``, ``optimizer``, ``data_loader``."""

    module: Any = None
    optimizer: Any = None
    data_loader: Any = None
    engine: Any = None
    delta: float = 1e-5
    #: Aggregator: the largest collaborator epsilon of each round.
    history: list[float] | None = None

    def accountant(self) -> RDPAccountant:
        """zmqfed's accountant fed with the steps Opacus recorded."""
        acc = RDPAccountant()
        for noise, rate, steps in self.engine.accountant.history:
            acc.step(noise, rate, steps)
        return acc

    @property
    def epsilon(self) -> float:
        """Record-level epsilon spent so far (a collaborator's own)."""
        return self.accountant().epsilon(self.delta)


def dp_sgd(
    module: Any = None,
    optimizer: Any = None,
    data_loader: Any = None,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float = 1e-5,
    target_epsilon: float | None = None,
    secure_mode: bool = False,
) -> DPSGD:
    """DP-SGD on a collaborator (with Opacus), or its reporting on the aggregator.

    Parameters
    ----------
    module, optimizer, data_loader:
        A collaborator's model, its ``torch.optim`` optimizer and a
        ``DataLoader`` of its data; omit them on the aggregator.
    noise_multiplier, max_grad_norm:
        DP-SGD's noise (std over the clip) and per-example gradient clip.
    delta:
        The delta epsilon is reported for.
    target_epsilon:
        Aggregator: end training before a round would take a collaborator past it.
    secure_mode:
        Opacus's cryptographically secure noise (needs ``torchcsprng``).
    """
    m = current_maintainer("dp_sgd()")
    check_positive(noise_multiplier, "noise_multiplier")
    check_positive(max_grad_norm, "max_grad_norm")
    if not 0 < float(delta) < 1:
        raise ConfigError(f"delta must lie in (0, 1), got {delta!r}")
    target = None if target_epsilon is None else check_positive(target_epsilon, "target_epsilon")
    if m.aggregator:
        result = DPSGD(delta=float(delta), history=[])
        m.on(step_points.aggregated, _Report(result, target), nice=0)
        return result
    if module is None or optimizer is None or data_loader is None:
        raise ConfigError("dp_sgd on a collaborator needs module, optimizer and data_loader")
    try:
        from opacus import PrivacyEngine
    except ImportError:
        raise ConfigError("DP-SGD needs Opacus: pip install 'zmqfed[dp]'") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp", secure_mode=secure_mode)
        private_module, private_optimizer, private_loader = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
        )
    warnings.filterwarnings("ignore", message=_HOOK_WARNING, category=UserWarning)
    result = DPSGD(private_module, private_optimizer, private_loader, engine, float(delta))
    _register_report(m, result)
    return result


def _register_report(m: Maintainer, result: DPSGD) -> None:
    """Put the epsilon so far, and after one more round like the last, into every upload's meta."""
    seen = {"steps": 0}

    def report(state: dict[str, Any], p: Any) -> dict[str, Any]:
        history = result.engine.accountant.history
        steps = sum(int(h[2]) for h in history)
        if steps != seen["steps"]:  # once per upload, not per tensor
            last = steps - seen["steps"]
            seen["steps"] = steps
            acc = result.accountant()
            eps = acc.epsilon(result.delta)
            nxt = acc.epsilon_after(result.delta, history[-1][0], history[-1][1], last)
            if math.isfinite(eps):
                m.meta[EPSILON] = eps
            if math.isfinite(nxt):
                m.meta[EPSILON_NEXT] = nxt
        return state

    m.register_package_hook(199, report)


class _Report:
    """The aggregator's part: the round's epsilon is the largest collaborator's."""

    def __init__(self, result: DPSGD, target: float | None) -> None:
        self.result, self.target = result, target

    def __call__(self, ctx: StepContext) -> None:
        m = ctx.maintainer
        now: list[float] = []
        nxt: list[float] = []
        for meta in m.meta_list:
            for key, out in ((EPSILON, now), (EPSILON_NEXT, nxt)):
                try:
                    value = float(meta.get(key, math.nan))
                except (TypeError, ValueError):
                    value = math.nan
                if math.isfinite(value) and value >= 0:
                    out.append(value)
        if not now:
            return
        eps = max(now)
        assert self.result.history is not None
        self.result.history.append(eps)
        m.round_metrics["epsilon"] = eps
        if self.target is not None and nxt and max(nxt) > self.target:
            m.end_training(
                f"privacy budget: record-level epsilon {eps:.4g} spent (delta "
                f"{self.result.delta:g}); another round would exceed target_epsilon {self.target:g}"
            )
