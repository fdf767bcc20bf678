"""Byzantine-robust aggregation rules: coordinate-wise median, trimmed mean, (Multi-)Krum.

Same data format, return value and ``optim_list`` contract as the mean rules
(:mod:`zmqfed.functional.agg_mean`): pure without ``optim_list``, installed
into the model and the optimizers with it. These rules need every update at once, so
they read ``data_list``; updates are unweighted (a poisoner could lie about
``instances``), and ``meta_list`` is accepted but not used. Integer tensors
take the lower median of the updates (mean rules take the maximum); the
result keeps the integer dtype.

References
----------
Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (median, trimmed mean).
Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017 (Krum); El Mhamdi et al., ICML 2018 (Multi-Krum).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from zmqfed.errors import ConfigError
from zmqfed.functional.agg_common import (
    PARAM,
    ParamStates,
    Update,
    accumulate_dtype,
    add_pseudo_gradients,
    gather,
    install_if_given,
    is_integral,
    result_dtype,
)
from zmqfed.functional.running_mean import RunningFedAvg

__all__ = ["krum_aggregation", "krum_select", "median_aggregation", "trimmed_mean_aggregation"]

logger = logging.getLogger(__name__)

# reduces a (n, *shape) stack of one key's values along dim 0
_Reducer = Callable[[Tensor], Tensor]


def _lower_median(stacked: Tensor) -> Tensor:
    return stacked.sort(dim=0).values[(stacked.shape[0] - 1) // 2]


def _median(stacked: Tensor) -> Tensor:
    """Coordinate-wise median; the mean of the two middle values for even n (numpy's)."""
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if n % 2:
        return ordered[n // 2].to(accumulate_dtype(stacked.dtype))
    lo = ordered[n // 2 - 1].to(accumulate_dtype(stacked.dtype))
    return lo.add_(ordered[n // 2]).mul_(0.5)


def _trimmed_mean(beta: float) -> _Reducer:
    def reduce(stacked: Tensor) -> Tensor:
        n = stacked.shape[0]
        k = int(beta * n)
        kept = stacked.sort(dim=0).values[k : n - k]
        return kept.to(accumulate_dtype(stacked.dtype)).mean(dim=0)

    return reduce


def _coordinatewise(data_list: Sequence[Update], reduce: _Reducer) -> ParamStates:
    """Apply ``reduce`` to every (tensor, state key) over the updates carrying it."""
    param_states: ParamStates = {}
    with torch.no_grad():
        for key, slots in gather(data_list).items():
            device = key.device if isinstance(key, Tensor) else None
            state: dict[str, Tensor] = {}
            for name, values in slots.items():
                first = values[0][1]
                stacked = torch.stack([t.to(device or first.device) for _, t in values])
                if is_integral(first):
                    state[name] = _lower_median(stacked)
                else:
                    state[name] = reduce(stacked).to(result_dtype(key, name, first))
            param_states[key] = state
    return param_states


def _finish(param_states: ParamStates, optim_list: Any) -> ParamStates:
    return install_if_given(add_pseudo_gradients(param_states), optim_list)


def median_aggregation(
    data_list: Sequence[Update],
    meta_list: Sequence[Mapping[str, Any]] | None = None,
    optim_list: Any = None,
) -> ParamStates:
    """Coordinate-wise median of every state key (FedMedian).

    With an even number of updates the two middle values are averaged, as in
    ``numpy.median``. Tolerates fewer than half the updates being arbitrary.
    """
    del meta_list
    return _finish(_coordinatewise(data_list, _median), optim_list)


def trimmed_mean_aggregation(
    data_list: Sequence[Update],
    meta_list: Sequence[Mapping[str, Any]] | None = None,
    optim_list: Any = None,
    beta: float = 0.1,
) -> ParamStates:
    """Coordinate-wise trimmed mean: drop the ``floor(beta * n)`` largest and smallest values.

    Parameters
    ----------
    beta:
        Fraction trimmed from *each* end, ``0 <= beta < 0.5``. With n updates
        carrying a tensor, ``floor(beta * n)`` values per side are dropped
        (none when that is 0, e.g. beta=0.1 with fewer than 10 updates).
    """
    del meta_list
    if not 0.0 <= float(beta) < 0.5:
        raise ConfigError(f"trimmed mean needs 0 <= beta < 0.5, got {beta!r}")
    return _finish(_coordinatewise(data_list, _trimmed_mean(float(beta))), optim_list)


def _pairwise_sq_dist(data_list: Sequence[Update]) -> Tensor:
    """(n, n) float64 squared distances between updates over the floating 'param's all share."""
    n = len(data_list)
    grouped = gather(data_list)
    dist = torch.zeros(n, n, dtype=torch.float64)
    shared = 0
    for slots in grouped.values():
        values = slots.get(PARAM, [])
        if len(values) != n or is_integral(values[0][1]):
            continue
        shared += 1
        x = torch.stack(
            [t.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for _, t in values]
        )
        sq = (x * x).sum(dim=1)
        # |a-b|^2 = |a|^2 + |b|^2 - 2ab, in float64 (exact enough; clamp rounding below 0)
        dist += (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_(min=0.0)
    if shared == 0:
        raise ConfigError("Krum needs at least one floating 'param' tensor present in every update")
    dist.fill_diagonal_(0.0)
    return dist


def krum_select(data_list: Sequence[Update], f: int = 1, m: int = 1) -> list[int]:
    """Indices of the ``m`` updates with the lowest Krum score, best first.

    An update's score is the sum of squared distances to its ``n - f - 2``
    nearest other updates, measured over the floating-point ``'param'``
    tensors present in every update.
    """
    n = len(data_list)
    if f < 0:
        raise ConfigError(f"Krum needs f >= 0, got {f}")
    if not 1 <= m <= n:
        raise ConfigError(f"Multi-Krum needs 1 <= m <= n (n={n} updates), got m={m}")
    neighbours = n - f - 2
    if neighbours < 1:
        raise ConfigError(f"Krum needs n >= f + 3 updates to score them; got n={n}, f={f}")
    if n <= 2 * f + 2:
        logger.warning("Krum with n=%d updates and f=%d: its guarantee needs n > 2f + 2", n, f)
    dist = _pairwise_sq_dist(data_list)
    dist.fill_diagonal_(float("inf"))  # never count an update as its own neighbour
    scores = dist.sort(dim=1).values[:, :neighbours].sum(dim=1)
    order = torch.argsort(scores, stable=True)
    return [int(i) for i in order[:m]]


def krum_aggregation(
    data_list: Sequence[Update],
    meta_list: Sequence[Mapping[str, Any]] | None = None,
    optim_list: Any = None,
    f: int = 1,
    m: int = 1,
) -> ParamStates:
    """Krum (``m=1``) / Multi-Krum: the unweighted mean of the ``m`` best-scored updates.

    Parameters
    ----------
    f:
        Number of Byzantine updates to tolerate; scoring uses the ``n - f - 2``
        nearest neighbours (``ConfigError`` if that is < 1; a warning is logged
        when ``n <= 2f + 2``, below the paper's guarantee).
    m:
        How many of the best updates to average.

    Notes
    -----
    Selection is over the floating ``'param'`` tensors all updates carry; a
    tensor none of the selected updates carries is left out of the result
    (and so unchanged).
    """
    del meta_list
    if not data_list:
        return {}
    chosen = krum_select(data_list, f=f, m=m)
    acc = RunningFedAvg()
    for i in chosen:
        acc.add(data_list[i], 1.0)
    return _finish(acc.result(), optim_list)
