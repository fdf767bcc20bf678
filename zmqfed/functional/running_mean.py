"""``RunningFedAvg``: a running weighted mean, folding updates in as they arrive.

The aggregator does not need to keep N uploads to compute FedAvg: each upload
is added into one accumulator per (tensor, state key) with
``acc.add_(update, alpha=weight)`` and can be dropped right away, so memory is
one model (plus one float per key), not N models, and every update is read
once. :meth:`RunningFedAvg.apply` then gives exactly what
:func:`~zmqfed.functional.agg_mean.naive_aggregation` gives for the same
updates and weights (the list-form rules are built on this class).

Example, in a maintainer's ``after_download`` hook::

    acc = RunningFedAvg(network.state_dict(keep_vars=True))
    ...
    acc.add(maintainer.data, weight=maintainer.pipe.meta["instances"])  # per upload
    ...
    fed_optim.zero_grad()
    acc.apply(fed_optim)  # p.grad = p - mean, buffers copied in
    fed_optim.step()
    acc.reset()

Named for what it computes, a running mean: "stream" in zmqfed means chunked
transfer of large messages (:mod:`zmqfed.wire.stream`). ``StreamingFedAvg``,
the class's earlier name, remains as an alias.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
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
    check_weight,
    describe,
    install_aggregate,
    is_integral,
    iter_update,
    result_dtype,
)

__all__ = ["RunningFedAvg", "StreamingFedAvg"]


class RunningFedAvg:
    """Weighted mean of updates, accumulated one update at a time.

    Parameters
    ----------
    state_dict:
        The aggregator's ``network.state_dict(keep_vars=True)``. Needed when
        updates are keyed by name (as they come off the wire) and
        :meth:`apply` must reach the tensors; optional when updates are keyed
        by the tensors themselves (OpenFed's ``data_list`` format).
    accumulate_dtype:
        dtype of the running sums; default float32 (float64 for float64
        tensors). float64 costs twice the memory and bandwidth.

    Notes
    -----
    Each (tensor, state key) is normalised by the total weight of the updates
    that carried *that key*, so an update missing a tensor or an optimizer
    state key does not pull the mean towards zero. Integer tensors
    (``num_batches_tracked``) keep a running elementwise maximum instead of a
    sum. Weights must be finite and >= 0; a key whose total weight is 0 cannot
    be averaged and raises ``ConfigError`` in :meth:`result`.
    """

    def __init__(
        self,
        state_dict: Mapping[str, Tensor] | None = None,
        *,
        accumulate_dtype: torch.dtype | None = None,
    ) -> None:
        self._by_name: dict[str, Tensor] = dict(state_dict) if state_dict is not None else {}
        self._acc_dtype = accumulate_dtype
        self._sums: dict[Hashable, dict[str, Tensor]] = {}
        # float sum buffers of earlier rounds, reused so a round does not fault
        # in fresh pages (measured: a fresh buffer is filled ~5x slower)
        self._pool: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[Tensor]] = {}
        self._weights: dict[Hashable, dict[str, float]] = {}
        self._count = 0
        self._consumed = False

    # -- folding in -------------------------------------------------------

    def _resolve(self, key: Hashable) -> Hashable:
        if isinstance(key, str) and self._by_name:
            try:
                return self._by_name[key]
            except KeyError:
                raise ConfigError(
                    f"update names {key!r}, which is not in the aggregator's state_dict"
                ) from None
        return key

    def add(self, update: Update, weight: float = 1.0) -> None:
        """Fold one update in.

        Parameters
        ----------
        update:
            ``{tensor or name: {'param': Tensor, <state key>: Tensor}}`` (a bare
            tensor stands for ``{'param': tensor}``). Not modified and not kept.
        weight:
            This update's weight, e.g. ``meta['instances']``.
        """
        if self._consumed:
            raise ConfigError("the means were computed in place: call reset() before adding")
        w = check_weight(weight)
        # validate the whole update before touching the sums, so a bad upload
        # leaves the accumulator as it was
        items = [(self._resolve(key), state) for key, state in iter_update(update)]
        for key, state in items:
            param = state.get(PARAM)
            if isinstance(key, Tensor) and param is not None and param.shape != key.shape:
                raise ConfigError(
                    f"uploaded 'param' has shape {tuple(param.shape)} but the aggregator's "
                    f"{describe(key)} differs"
                )
            sums = self._sums.get(key, {})
            for name, t in state.items():
                if name in sums and sums[name].shape != t.shape:
                    raise ConfigError(
                        f"state {name!r} of {describe(key)} has shape {tuple(t.shape)}, "
                        f"earlier updates had {tuple(sums[name].shape)}"
                    )
                if name in sums and is_integral(sums[name]) != is_integral(t):
                    raise ConfigError(
                        f"state {name!r} of {describe(key)} mixes integer and float updates"
                    )
        with torch.no_grad():
            for key, state in items:
                sums = self._sums.setdefault(key, {})
                weights = self._weights.setdefault(key, {})
                device = key.device if isinstance(key, Tensor) else None
                for name, t in state.items():
                    acc = sums.get(name)
                    if acc is None:
                        sums[name] = self._first(t, w, device)
                    elif is_integral(acc):
                        torch.maximum(acc, t.to(acc.device), out=acc)
                    else:
                        acc.add_(t.to(acc.device), alpha=w)
                    weights[name] = weights.get(name, 0.0) + w
        self._count += 1

    def _first(self, t: Tensor, w: float, device: torch.device | None) -> Tensor:
        dev = device if device is not None else t.device
        if is_integral(t):
            return t.to(device=dev, copy=True)
        dtype = self._acc_dtype or accumulate_dtype(t.dtype)
        spare = self._pool.get((tuple(t.shape), dtype, torch.device(dev)))
        if spare:
            return spare.pop().copy_(t).mul_(w)
        return t.to(device=dev, dtype=dtype, copy=True).mul_(w)

    # -- reading out ------------------------------------------------------

    def result(self, in_place: bool = False) -> ParamStates:
        """The weighted means so far, as ``{key: {state name: Tensor}}``.

        Cast back to the parameter's dtype; nothing is applied to the model.
        By default the tensors are fresh and the accumulator is unchanged.
        With ``in_place`` the means are computed in the accumulator's own
        buffers (no second model in memory) and the accumulator is consumed:
        :meth:`reset` before adding the next round's updates.
        """
        out: ParamStates = {}
        for key, sums in self._sums.items():
            state: dict[str, Tensor] = {}
            for name, acc in sums.items():
                if is_integral(acc):
                    state[name] = acc.clone()
                    continue
                total = self._weights[key][name]
                if total <= 0.0:
                    raise ConfigError(
                        f"state {name!r} of {describe(key)}: the updates carrying it weigh 0 in total"
                    )
                mean = acc.div_(total) if in_place else acc.div(total)
                state[name] = mean.to(result_dtype(key, name, acc))
            out[key] = state
        self._consumed |= in_place
        return out

    def apply(self, optim_list: Any = None) -> ParamStates:
        """Install the means into the model and the optimizers, like ``naive_aggregation``.

        Parameters with ``requires_grad`` get ``state['grad'] = p - mean`` and
        ``p.grad`` in every optimizer of ``optim_list``; buffers are copied into
        the tensors, also when ``optim_list`` is None
        (:func:`~zmqfed.functional.agg_common.install_aggregate`). The means
        are computed in place (``result(in_place=True)``), so the accumulator
        is consumed: :meth:`reset` before the next round. Returns the param
        states. :meth:`result` is the pure counterpart.
        """
        param_states = add_pseudo_gradients(self.result(in_place=True))
        install_aggregate(param_states, optim_list)
        return param_states

    def reset(self, keep_buffers: bool = True) -> None:
        """Forget everything folded in (start the next round).

        The float sum buffers are kept for the next round unless
        ``keep_buffers`` is False, or the means were computed in place: then
        the buffers were handed out (as means, or as optimizer state loaded
        from them) and must not be overwritten.
        """
        self._pool.clear()
        if keep_buffers and not self._consumed:
            for sums in self._sums.values():
                for acc in sums.values():
                    if not is_integral(acc):
                        key = (tuple(acc.shape), acc.dtype, acc.device)
                        self._pool.setdefault(key, []).append(acc)
        self._sums.clear()
        self._weights.clear()
        self._count = 0
        self._consumed = False

    # -- introspection ----------------------------------------------------

    @property
    def count(self) -> int:
        """How many updates were folded in since the last reset."""
        return self._count

    def total_weight(self, key: Hashable, name: str = PARAM) -> float:
        """Total weight folded in for one tensor's state key (0.0 if none)."""
        return self._weights.get(self._resolve(key), {}).get(name, 0.0)

    @property
    def num_tensors(self) -> int:
        """Number of running-sum tensors held (one per tensor and state key)."""
        return sum(len(s) for s in self._sums.values())

    @property
    def nbytes(self) -> int:
        """Bytes held: the running sums plus buffers kept from earlier rounds."""
        held = [t for s in self._sums.values() for t in s.values()]
        held += [t for pool in self._pool.values() for t in pool]
        return sum(t.element_size() * t.numel() for t in held)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"RunningFedAvg(updates={self._count}, tensors={self.num_tensors}, nbytes={self.nbytes})"


#: Alias of :class:`RunningFedAvg`, the name it had before zmqfed kept "stream"
#: for chunked transfer. Kept so existing code keeps working; new code should
#: use ``RunningFedAvg``.
StreamingFedAvg = RunningFedAvg
