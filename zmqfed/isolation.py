"""Keep one bad update from failing a round: aggregation and reduction with offenders dropped.

Uploads are checked before they are acknowledged (names, shapes, dtypes,
accepted fields, ``instances``), but a member with valid keys can still send
what only the aggregation trips over: a NaN that poisons the mean, a metric
the reduction cannot average.  Here the round runner aggregates as usual and
checks the result; only when the rule raises or the result is not finite does
it look for the updates that cause it (each checked alone), drops them with a
warning naming the sender, and aggregates the rest.  The good path costs one
pass over the model (the finiteness of what was installed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from zmqfed.core import Maintainer
from zmqfed.core.contracts import contract_keys
from zmqfed.errors import ZmqfedError
from zmqfed.functional.agg_rule import AggregationRule, call_rule

__all__ = ["aggregate_isolated", "reduce_isolated", "update_is_finite"]

log = logging.getLogger(__name__)

#: What a rule or a reduction raises on data it cannot use.
_DATA_ERRORS = (ZmqfedError, ValueError, TypeError, ArithmeticError, RuntimeError, KeyError)


def _finite(t: Any) -> bool:
    if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
        return True
    wide = torch.complex128 if t.is_complex() else torch.float64  # no float16 overflow
    return bool(torch.isfinite(t.sum(dtype=wide)))  # one pass, nothing of the tensor's size


def update_is_finite(update: Mapping[Any, Mapping[str, Any]]) -> bool:
    """Every floating-point tensor of ``update`` is finite (one pass each)."""
    return all(_finite(v) for state in update.values() for v in state.values())


@torch.no_grad()
def aggregate_isolated(
    m: Maintainer,
    optims: Sequence[Any],
    rule: AggregationRule | Callable[..., Any],
    **kwargs: Any,
) -> list[int]:
    """Aggregate ``m.data_list`` into ``optims``; drop updates that break it.

    Returns the indices (into the lists as they were) of the updates dropped;
    ``m.data_list`` and ``m.meta_list`` keep only the aggregated ones.

    Raises
    ------
    ZmqfedError or the rule's error
        When the updates fail together but none fails alone (the rule itself
        is broken), or when every update was dropped.
    """
    saved = _Saved(m, optims)
    try:
        _install(m, optims, rule, kwargs)
        if _installed_finite(m, optims):
            return []
        problem: BaseException | None = None
    except _DATA_ERRORS as exc:
        problem = exc
    saved.restore()
    bad = [
        i
        for i, (update, meta) in enumerate(zip(m.data_list, m.meta_list, strict=True))
        if not _aggregates_alone(update, meta, rule, kwargs)
    ]
    if not bad:
        if problem is not None:
            raise problem
        raise ZmqfedError("the aggregate is not finite, but no single update makes it so")
    log.warning(
        "%s: dropped the updates of %s from the aggregation: they cannot be aggregated (%s)",
        m.nick_name,
        [m.sender_list[i] for i in bad],
        problem or "not finite",
    )
    keep = [i for i in range(len(m.data_list)) if i not in set(bad)]
    m.keep_uploads(keep)
    if not keep:
        raise ZmqfedError(f"{m.nick_name}: no update of this round can be aggregated")
    _install(m, optims, rule, kwargs)
    return bad


def _install(
    m: Maintainer, optims: Sequence[Any], rule: Callable[..., Any], kwargs: Mapping[str, Any]
) -> None:
    # A rule sets p.grad only for tensors some upload carries: without this, a
    # tensor missing from the uploads would be stepped with an old pseudo-gradient.
    for optim in optims:
        optim.zero_grad()
    call_rule(rule, m.data_list, m.meta_list, list(optims), **kwargs)


def _installed_finite(m: Maintainer, optims: Sequence[Any]) -> bool:
    """Grads, buffers and the optimizer state the aggregation installed are all finite."""
    params = [p for optim in optims for g in optim.param_groups for p in g["params"]]
    state = (
        optim.state.get(p, {}).get(key)
        for optim in optims
        for key in contract_keys(optim, "upload")
        for p in (q for g in optim.param_groups for q in g["params"])
    )
    return (
        all(_finite(p.grad) for p in params if p.grad is not None)
        and all(_finite(p) for p in m.state_dict.values() if not p.requires_grad)
        and all(_finite(v) for v in state)
    )


class _Saved:
    """What an aggregation may write besides gradients: buffers and installed optimizer state."""

    def __init__(self, m: Maintainer, optims: Sequence[Any]) -> None:
        self.m, self.optims = m, optims
        self.buffers = {
            n: p.detach().clone() for n, p in m.state_dict.items() if not p.requires_grad
        }
        self.state = [
            (optim, p, key, _clone(optim.state[p][key]) if key in optim.state.get(p, {}) else None)
            for optim in optims
            for key in contract_keys(optim, "upload")
            for g in optim.param_groups
            for p in g["params"]
        ]

    def restore(self) -> None:
        for name, saved in self.buffers.items():
            self.m.state_dict[name].copy_(saved)
        for optim, p, key, value in self.state:
            if value is None:
                optim.state.get(p, {}).pop(key, None)
            else:
                optim.state[p][key] = value
        for optim in self.optims:
            optim.zero_grad()


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else value


def _aggregates_alone(
    update: Mapping[Any, Any],
    meta: Mapping[str, Any],
    rule: Callable[..., Any],
    kwargs: Mapping[str, Any],
) -> bool:
    """Whether one update, alone, is finite and goes through the rule (computed, not installed)."""
    if not update_is_finite(update):
        return False
    try:
        result = call_rule(rule, [update], [meta], None, **kwargs)
    except _DATA_ERRORS:
        return False
    if isinstance(result, Mapping):
        return all(_finite(v) for state in result.values() for v in dict(state).values())
    return True


def reduce_isolated(m: Maintainer, reduce: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """``reduce(m.meta_list, **kwargs)``, leaving out the metas it cannot reduce (logged)."""
    meta_list = m.meta_list
    try:
        return dict(reduce(meta_list, **kwargs) or {})
    except _DATA_ERRORS as exc:
        problem = exc
    good = []
    for i, meta in enumerate(meta_list):
        try:
            reduce([meta], **kwargs)
        except _DATA_ERRORS:
            log.warning(
                "%s: left %s's metrics out of the round's record (%s)",
                m.nick_name,
                m.sender_list[i],
                problem,
            )
            continue
        good.append(meta)
    if len(good) == len(meta_list) or not good:
        raise problem
    return dict(reduce(good, **kwargs) or {})
