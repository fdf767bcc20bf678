"""Mean-type aggregation rules with OpenFed's signatures: average, FedAvg, elastic.

All three read OpenFed's ``data_list`` / ``meta_list`` format (see
:mod:`zmqfed.functional.agg_common`), reduce every state key with an in-place
running sum (:class:`~zmqfed.functional.running_mean.RunningFedAvg`), add the
pseudo-gradients and return the param states. Called without ``optim_list``
they only compute (nothing of the model or of any optimizer changes); given
``optim_list`` they also install the result
(:func:`~zmqfed.functional.agg_common.install_aggregate`: buffers copied into
the model, ``p.grad`` and optimizer state loaded). Typical aggregator round::

    fed_optim.zero_grad()
    naive_aggregation(maintainer.data_list, maintainer.meta_list, optim_list=fed_optim)
    fed_optim.step()  # FederatedOptimizer(SGD(lr=1.0)): p becomes the FedAvg mean
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from zmqfed.errors import ConfigError
from zmqfed.functional.agg_common import (
    PARAM,
    ParamStates,
    Update,
    add_pseudo_gradients,
    describe,
    install_if_given,
    instances_weights,
)
from zmqfed.functional.running_mean import RunningFedAvg

__all__ = ["average_aggregation", "elastic_aggregation", "naive_aggregation"]

IMPORTANCE = "importance"


def _weighted_mean(data_list: Sequence[Update], weights: Sequence[float]) -> ParamStates:
    acc = RunningFedAvg()
    for update, w in zip(data_list, weights, strict=True):
        acc.add(update, w)
    return acc.result()


def average_aggregation(
    data_list: Sequence[Update],
    meta_list: Sequence[Mapping[str, Any]] | None = None,
    optim_list: Any = None,
) -> ParamStates:
    """Unweighted mean of every state key over the updates that carry it.

    Parameters
    ----------
    data_list:
        One dict per update, ``{aggregator tensor: {'param': Tensor, ...}}``.
    meta_list:
        Ignored (accepted for a uniform signature).
    optim_list:
        ``None`` (default): only compute. Otherwise one optimizer or a list of
        them: the aggregate is installed (buffers copied into the model; each
        optimizer receives ``p.grad = p - mean`` and the averaged state).

    Returns
    -------
    dict
        ``{tensor: {'param': mean, 'grad': p - mean (parameters only), ...}}``.
    """
    del meta_list
    param_states = _weighted_mean(data_list, [1.0] * len(data_list))
    return install_if_given(add_pseudo_gradients(param_states), optim_list)


def naive_aggregation(
    data_list: Sequence[Update],
    meta_list: Sequence[Mapping[str, Any]],
    optim_list: Any = None,
) -> ParamStates:
    """FedAvg: the mean weighted by ``meta['instances']`` (McMahan et al. 2017).

    Each tensor's (and each state key's) weights are normalised over the
    updates that carry it, so partial updates are averaged correctly. Equal to
    :class:`RunningFedAvg` fed the same updates with ``weight=instances``.
    ``optim_list`` and the return value are those of :func:`average_aggregation`.
    """
    weights = instances_weights(meta_list, len(data_list))
    param_states = _weighted_mean(data_list, weights)
    return install_if_given(add_pseudo_gradients(param_states), optim_list)


def elastic_aggregation(
    data_list: Sequence[Update],
    meta_list: Sequence[Mapping[str, Any]],
    quantile: float = 0.5,
    optim_list: Any = None,
) -> ParamStates:
    """Elastic aggregation (Chen et al., CVPR 2023), as in OpenFed.

    Like FedAvg, but every parameter's pseudo-gradient is scaled elementwise by
    ``1 + quantile - importance / max(importance)``, where ``importance`` is
    the instance-weighted mean of the collaborators' parameter sensitivities
    (uploaded by :class:`~zmqfed.optim.ElasticOptimizer` as the ``'importance'``
    state). Coordinates the clients find sensitive move less, insensitive ones
    more. ``'importance'`` is consumed here and not loaded into the optimizers.

    OpenFed's parameter order: ``quantile`` comes before ``optim_list``, so
    ``elastic_aggregation(data_list, meta_list, 0.3, optim)`` works
    positionally; code that calls rules it does not know (``API``) goes
    through :func:`~zmqfed.functional.agg_rule.call_rule`, which passes the
    optimizers by keyword. ``optim_list`` and the return value are those of
    :func:`average_aggregation`.

    Raises
    ------
    ConfigError
        If a parameter with ``requires_grad`` arrives without ``'importance'``.
    """
    if not 0.0 <= float(quantile) <= 1.0:
        raise ConfigError(f"quantile must be in [0, 1], got {quantile!r}")
    weights = instances_weights(meta_list, len(data_list))
    param_states = _weighted_mean(data_list, weights)

    for key, state in param_states.items():
        if (
            PARAM in state
            and isinstance(key, Tensor)
            and key.requires_grad
            and IMPORTANCE not in state
        ):
            raise ConfigError(
                f"elastic aggregation needs the 'importance' state for {describe(key)}; "
                "train collaborators with ElasticOptimizer and call acg() before uploading"
            )

    def elastic_grad(p: Tensor, state: dict[str, Tensor]) -> Tensor:
        importance = state[IMPORTANCE].to(torch.float32)
        peak = importance.max()
        # all-zero importance (e.g. a dead layer): treat as uniform, not 0/0
        norm = importance / peak if peak > 0 else torch.zeros_like(importance)
        return (p.detach() - state[PARAM]) * (1.0 + quantile - norm).to(p.dtype)

    add_pseudo_gradients(param_states, grad_fn=elastic_grad)
    for state in param_states.values():
        state.pop(IMPORTANCE, None)
    return install_if_given(param_states, optim_list)


#: The upload field the rule consumes besides ``param`` (what an aggregator
#: running it must accept: ``zmqfed.api.prepare_for_rule``).
elastic_aggregation.upload_fields = (IMPORTANCE,)  # type: ignore[attr-defined]
