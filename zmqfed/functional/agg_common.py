"""Shared plumbing of the aggregation rules: data format, dtypes, installing.

The data format is OpenFed's. ``data_list`` holds one dict per received
update, keyed by the aggregator's own tensors (the values of
``network.state_dict(keep_vars=True)``); each value is a dict
``{'param': tensor, <optimizer-state key>: tensor, ...}``. A rule reduces
every (tensor, key) pair over the updates that carry it and returns
``param_states``: the same shape of dict, one entry per tensor.

Computing and installing an aggregate are two steps:

* :func:`add_pseudo_gradients` (pure, part of computing): a tensor with
  ``requires_grad`` gets ``state['grad'] = p - state['param']``, the
  *pseudo-gradient*, so ``FederatedOptimizer(SGD(lr=1.0)).step()`` moves ``p``
  onto the aggregate and any other server optimizer (Adam, Yogi, momentum
  SGD) acts on the averaged client update. A buffer (``requires_grad`` False:
  BatchNorm running stats, ``num_batches_tracked``) never becomes a gradient.
* :func:`install_aggregate` (the one step that writes): copies each buffer's
  aggregate into the aggregator's tensor and loads ``p.grad`` and the other
  aggregated keys into every optimizer (:func:`load_param_states`).

A rule called without ``optim_list`` only computes: it changes no tensor of
the model and no optimizer. Given ``optim_list`` (OpenFed's contract: the rule
loads its result into the optimizers it is given) it also installs. That
contract is typed in :mod:`zmqfed.functional.agg_rule`.

:func:`load_param_states` leaves ``'param'`` and ``'grad'`` out of the
optimizer state (unlike OpenFed), so a later ``package(optim)`` cannot serve
last round's average instead of the stepped weights.

Integer and boolean tensors (``num_batches_tracked``) are never averaged into
floats: the mean rules take their elementwise maximum, the robust rules their
(lower) median; the result keeps the integer dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from zmqfed.core.contracts import contract_keys, optim_as_list
from zmqfed.errors import ConfigError

__all__ = [
    "GRAD",
    "PARAM",
    "ParamStates",
    "Update",
    "accumulate_dtype",
    "add_pseudo_gradients",
    "as_state_tensor",
    "check_weight",
    "describe",
    "gather",
    "install_aggregate",
    "install_if_given",
    "instances_weights",
    "is_integral",
    "iter_update",
    "load_param_states",
    "optim_as_list",
    "result_dtype",
]

logger = logging.getLogger(__name__)

PARAM = "param"
GRAD = "grad"

#: One upload: ``{tensor (or name): {'param': Tensor, <state key>: Tensor}}``. Keys are
#: typed ``Any`` because ``Mapping`` is invariant in its key type.
Update = Mapping[Any, Any]

#: ``{tensor (or name): {'param': Tensor, 'grad': Tensor, <state key>: Tensor}}``
ParamStates = dict[Any, dict[str, Tensor]]


def describe(key: Hashable) -> str:
    """A short human name for a parameter key (a name or a tensor's shape)."""
    if isinstance(key, Tensor):
        return f"tensor of shape {tuple(key.shape)} ({key.dtype})"
    return repr(key)


def is_integral(t: Tensor) -> bool:
    """True for integer and boolean tensors, which are never averaged."""
    return not (t.is_floating_point() or t.is_complex())


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are kept in: float32, or float64/complex for those inputs."""
    if dtype in (torch.float64, torch.complex64, torch.complex128):
        return dtype
    return torch.float32


def result_dtype(key: Hashable, name: str, value: Tensor) -> torch.dtype:
    """The dtype an aggregate is cast back to.

    ``'param'`` and any state tensor shaped like the parameter follow the
    aggregator's own tensor (so a bf16-compressed upload does not downgrade the
    model or the optimizer state); other tensors (scalars like Adam's ``step``)
    keep the dtype they arrived in.
    """
    if is_integral(value):
        return value.dtype
    if (
        isinstance(key, Tensor)
        and key.is_floating_point()
        and (name == PARAM or value.shape == key.shape)
    ):
        return key.dtype
    return value.dtype


def as_state_tensor(value: Any, key: Hashable, name: str) -> Tensor | None:
    """A state value as a tensor (Python numbers become 0-d tensors); None stays None."""
    if value is None or isinstance(value, Tensor):
        return value
    if isinstance(value, (bool, int, float)):
        return torch.as_tensor(value)
    raise ConfigError(
        f"state {name!r} of {describe(key)} is a {type(value).__name__}; aggregation needs tensors or numbers"
    )


def iter_update(update: Update) -> Iterator[tuple[Hashable, dict[str, Tensor]]]:
    """Yield ``(key, {state name: tensor})`` for one update, dropping ``None`` values.

    A bare tensor in place of the state dict is read as ``{'param': tensor}``.
    """
    if not isinstance(update, Mapping):
        raise ConfigError(
            f"an update must be a dict keyed by tensors or names, got {type(update).__name__}"
        )
    for key, state in update.items():
        if isinstance(state, Tensor):
            state = {PARAM: state}
        elif not isinstance(state, Mapping):
            raise ConfigError(
                f"the update for {describe(key)} must be a dict of state tensors, got {type(state).__name__}"
            )
        out: dict[str, Tensor] = {}
        for name, value in state.items():
            t = as_state_tensor(value, key, name)
            if t is not None:
                if name == PARAM and isinstance(key, Tensor) and t.shape != key.shape:
                    raise ConfigError(
                        f"uploaded 'param' has shape {tuple(t.shape)} but the aggregator's {describe(key)} "
                        "differs"
                    )
                out[name] = t
        yield key, out


def gather(
    data_list: Sequence[Update],
) -> dict[Hashable, dict[str, list[tuple[int, Tensor]]]]:
    """Group values by tensor and state key, in first-seen order, with update indices."""
    grouped: dict[Hashable, dict[str, list[tuple[int, Tensor]]]] = {}
    for i, update in enumerate(data_list):
        for key, state in iter_update(update):
            slot = grouped.setdefault(key, {})
            for name, t in state.items():
                values = slot.setdefault(name, [])
                if values and values[0][1].shape != t.shape:
                    raise ConfigError(
                        f"state {name!r} of {describe(key)}: update {i} has shape {tuple(t.shape)}, "
                        f"update {values[0][0]} has {tuple(values[0][1].shape)}"
                    )
                values.append((i, t))
    return grouped


def instances_weights(
    meta_list: Sequence[Mapping[str, Any]] | None, n: int, key: str = "instances"
) -> list[float]:
    """Per-update weights read from ``meta[key]`` (checked: finite and >= 0)."""
    if meta_list is None:
        raise ConfigError(f"this aggregation rule weights updates by meta[{key!r}]; pass meta_list")
    if len(meta_list) != n:
        raise ConfigError(f"meta_list has {len(meta_list)} entries but data_list has {n}")
    weights = []
    for i, meta in enumerate(meta_list):
        try:
            w = meta[key]
        except (KeyError, TypeError):
            raise ConfigError(f"meta_list[{i}] has no {key!r}") from None
        weights.append(check_weight(w, f"meta_list[{i}][{key!r}]"))
    return weights


def check_weight(weight: Any, what: str = "weight") -> float:
    """A weight as a float, or ConfigError if it is not a finite number >= 0."""
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {weight!r}") from None
    if not math.isfinite(w) or w < 0:
        raise ConfigError(f"{what} must be finite and >= 0, got {weight!r}")
    return w


GradFn = Callable[[Tensor, dict[str, Tensor]], Tensor]


def _tensor_key(key: Hashable) -> Tensor:
    if not isinstance(key, Tensor):
        raise ConfigError(
            f"cannot apply the aggregate of {key!r}: updates are keyed by name; "
            "key them by the aggregator's tensors or give RunningFedAvg the state_dict"
        )
    return key


@torch.no_grad()
def add_pseudo_gradients(param_states: ParamStates, grad_fn: GradFn | None = None) -> ParamStates:
    """Add ``state['grad'] = p - state['param']`` for every tensor with ``requires_grad``.

    Pure: reads the aggregator's tensors, writes only into ``param_states``.
    Buffers get no ``'grad'``; entries without ``'param'`` (only optimizer
    state was uploaded) are left alone.

    Parameters
    ----------
    param_states:
        A rule's aggregate, keyed by the aggregator's tensors.
    grad_fn:
        ``grad_fn(p, state)`` replaces the pseudo-gradient ``p - state['param']``
        (elastic aggregation scales it).

    Returns
    -------
    dict
        ``param_states`` itself.

    Raises
    ------
    ConfigError
        If an entry with ``'param'`` is keyed by name: there is no tensor to
        take the difference with.
    """
    for key, state in param_states.items():
        if PARAM not in state:
            continue
        p = _tensor_key(key)
        if p.requires_grad:
            grad = grad_fn(p, state) if grad_fn is not None else p.detach() - state[PARAM]
            state[GRAD] = grad.to(dtype=p.dtype)
    return param_states


def load_param_states(optim: Any, param_states: Mapping[Any, Mapping[str, Tensor]]) -> int:
    """Install ``p.grad`` and the aggregated optimizer state into ``optim``.

    Only the state keys ``optim`` declares as its ``upload_keys`` are written
    (SCAFFOLD's ``c``): the average of what clients uploaded never replaces a
    server optimizer's own state (FedAvgM's momentum, FedYogi's moments).
    ``'param'`` and ``'grad'`` themselves are never written into
    ``optim.state``. Returns how many of the optimizer's parameters received
    a state.
    """
    loaded = missing = 0
    accepted = set(contract_keys(optim, "upload")) - {PARAM, GRAD}
    for group in optim.param_groups:
        for p in group["params"]:
            state = param_states.get(p)
            if state is None:
                missing += 1
                continue
            if p.requires_grad and GRAD in state:
                p.grad = state[GRAD]
            extra = {k: v for k, v in state.items() if k in accepted}
            if extra:
                optim.state[p].update(extra)
            loaded += 1
    if missing:
        logger.debug("aggregate loaded for %d parameters, %d had no update", loaded, missing)
    return loaded


@torch.no_grad()
def install_aggregate(
    param_states: Mapping[Any, Mapping[str, Tensor]], optim_list: Any = None
) -> None:
    """Install a computed aggregate: buffers into the model, the rest into the optimizers.

    The one step of aggregation that writes. Every buffer (a tensor without
    ``requires_grad``) with an aggregated ``'param'`` is overwritten with it;
    then every optimizer of ``optim_list`` gets ``p.grad`` (the
    pseudo-gradient) and the aggregated optimizer state
    (:func:`load_param_states`). Parameters themselves move only when the
    optimizers step.

    Parameters
    ----------
    param_states:
        What a rule returned (with its pseudo-gradients), keyed by the
        aggregator's tensors. Install it before the parameters change: the
        pseudo-gradients were taken against their current values.
    optim_list:
        ``None``, one optimizer, or a list/tuple of them. With ``None`` only
        the buffers are written.

    Raises
    ------
    ConfigError
        If an entry with ``'param'`` is keyed by name (nothing to write into).
    """
    for key, state in param_states.items():
        if PARAM not in state:
            continue
        p = _tensor_key(key)
        if not p.requires_grad:
            p.copy_(state[PARAM])
    for optim in optim_as_list(optim_list):
        load_param_states(optim, param_states)


def install_if_given(param_states: ParamStates, optim_list: Any) -> ParamStates:
    """A rule's last step: install the aggregate when ``optim_list`` is not None.

    ``None`` keeps the rule pure; anything else, even an empty list, installs
    (buffers included). Returns ``param_states``.
    """
    if optim_list is not None:
        install_aggregate(param_states, optim_list)
    return param_states
