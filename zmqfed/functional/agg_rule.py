"""The aggregation-rule contract, and calling any rule with the optimizers where it takes them.

:class:`AggregationRule` types what :class:`~zmqfed.api.API` and the node
runner expect of ``agg_func``; :func:`call_rule` calls every rule that way,
OpenFed-style custom rules (whose third positional parameter takes the
optimizers, whatever its name) included.  The data format and installing
an aggregate are :mod:`zmqfed.functional.agg_common`'s.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from zmqfed.errors import ConfigError
from zmqfed.functional.agg_common import ParamStates, Update, install_aggregate

__all__ = ["OPTIM_LIST", "AggregationRule", "call_rule"]

#: The name under which a rule takes the optimizers.
OPTIM_LIST = "optim_list"


class AggregationRule(Protocol):
    """The contract of an aggregation rule: ``rule(data_list, meta_list, *, optim_list=None)``.

    Every rule of :mod:`zmqfed.functional` satisfies it (mypy checks that in
    :mod:`zmqfed.functional.aggregate`); :class:`~zmqfed.api.API` and the
    node runner call rules through :func:`call_rule`.

    Parameters
    ----------
    data_list:
        One update per collaborator, ``{aggregator tensor: {'param': Tensor,
        <optimizer-state key>: Tensor}}`` (see this module's docstring). Read,
        never modified.
    meta_list:
        The updates' metas, in the same order (``meta['instances']`` weights
        the mean rules). Rules that do not use it still accept it.
    optim_list:
        ``None`` (the default): only compute. The rule then changes no tensor
        of the model and no optimizer. Otherwise one optimizer or a list of
        them (:func:`optim_as_list`): the rule also installs its result with
        :func:`install_aggregate` (buffers into the model, ``p.grad`` and the
        aggregated optimizer state into every optimizer). The parameter may
        sit anywhere as long as it can be passed by keyword as ``optim_list``:
        OpenFed's ``elastic_aggregation(data_list, meta_list, quantile,
        optim_list)`` has it fourth.

    Returns
    -------
    ParamStates
        ``{tensor: {'param': aggregate, 'grad': p - aggregate (tensors with
        requires_grad), <state key>: aggregate}}``, the same whether or not
        ``optim_list`` is given.

    Notes
    -----
    A rule's hyperparameters (``quantile``, ``beta``, ``f``, ``m``) are extra
    parameters with defaults, passed by keyword: ``call_rule(rule, ...,
    quantile=0.3)``, ``API(..., agg_func_kwargs=dict(quantile=0.3))``. They
    are not spelled ``**kwargs`` in the protocol: that would admit only rules
    that accept arbitrary keywords.

    OpenFed-style custom rules whose third parameter is required or named
    otherwise, such as ``def agg(data_list, meta_list, optim_list)`` or
    ``def agg(d, m, optims)``, do not match the protocol, but
    :func:`call_rule` still calls them right.

    Examples
    --------
    A custom rule: FedAvg that drops updates with a non-finite loss::

        import math

        from zmqfed.functional import install_aggregate, naive_aggregation


        def finite_fedavg(data_list, meta_list, *, optim_list=None, key="loss"):
            kept = [i for i, m in enumerate(meta_list) if math.isfinite(m.get(key, 0.0))]
            states = naive_aggregation([data_list[i] for i in kept], [meta_list[i] for i in kept])
            if optim_list is not None:
                install_aggregate(states, optim_list)
            return states


        API(maintainer, fed_optim, rounds, finite_fedavg, dict(key="val_loss"))
    """

    def __call__(
        self,
        data_list: Sequence[Update],
        meta_list: Sequence[Mapping[str, Any]],
        /,
        *,
        optim_list: Any = None,
    ) -> ParamStates: ...


def call_rule(
    rule: AggregationRule | Callable[..., Any],
    data_list: Sequence[Update],
    meta_list: Sequence[Mapping[str, Any]],
    optim_list: Any = None,
    **kwargs: Any,
) -> Any:
    """Call an aggregation rule, handing it the optimizers the way it accepts them.

    Rules differ in where the optimizers go: ``naive_aggregation(data_list,
    meta_list, optim_list)`` takes them third, OpenFed's
    ``elastic_aggregation(data_list, meta_list, quantile, optim_list)`` fourth,
    an OpenFed-style custom rule ``def agg(d, m, optims)`` third under another
    name. Passing them positionally as the third argument to every rule would
    put them into ``quantile``. The rule's signature decides, in this order:

    1. a parameter named ``optim_list`` (not positional-only): by keyword;
    2. a third positional parameter that is required or defaults to ``None``
       and is not named in ``kwargs``: positionally, third (OpenFed's custom
       rules);
    3. ``**kwargs``: by keyword, as ``optim_list``;
    4. ``*args``: positionally, third;
    5. none of these (e.g. ``def agg(d, m, beta=0.1)``): the rule takes no
       optimizers. It is called with ``data_list``, ``meta_list`` and
       ``kwargs`` only, and when ``optim_list`` is not None its returned
       ``param_states`` are installed here with :func:`install_aggregate`
       (pseudo-gradients are the rule's to compute, see
       :func:`add_pseudo_gradients`).

    A callable whose signature cannot be read (a builtin) gets the optimizers
    positionally, third.  A rule that names ``data_list`` and ``meta_list``
    and takes the optimizers by keyword gets the updates by keyword too, as
    OpenFed's API passed them (``paillier_aggregation`` has its private key
    second).

    Parameters
    ----------
    rule:
        An :class:`AggregationRule` or an OpenFed-style rule.
    data_list, meta_list:
        The received updates and their metas.
    optim_list:
        ``None`` (compute only), one optimizer or a list of them.
    **kwargs:
        The rule's own keyword arguments (``quantile=0.3``, ``beta=0.2``).

    Returns
    -------
    Any
        What the rule returned (``ParamStates`` for the rules of zmqfed).

    Raises
    ------
    ConfigError
        If a rule that takes no optimizers returned something other than a
        mapping while optimizers were given.
    """
    fn: Callable[..., Any] = rule  # the signature is read at run time
    slot = _optim_slot(fn, kwargs)
    if slot == "positional":
        return fn(data_list, meta_list, optim_list, **kwargs)
    args: tuple[Any, ...] = (data_list, meta_list)
    named: dict[str, Any] = {}
    if _names_updates(fn):
        args, named = (), {"data_list": data_list, "meta_list": meta_list}
    if slot == "keyword":
        return fn(*args, **named, optim_list=optim_list, **kwargs)
    result = fn(*args, **named, **kwargs)
    if optim_list is not None:
        if not isinstance(result, Mapping):
            raise ConfigError(
                f"{_rule_name(rule)} takes no optimizers, so its result is installed for it, "
                f"but it returned {type(result).__name__}, not param_states"
            )
        install_aggregate(result, optim_list)
    return result


def _rule_name(rule: Callable[..., Any]) -> str:
    return getattr(rule, "__qualname__", None) or type(rule).__name__


def _names_updates(rule: Callable[..., Any]) -> bool:
    """``rule`` takes ``data_list`` and ``meta_list`` by those names (keyword-capable)."""
    try:
        params = inspect.signature(rule).parameters.values()
    except (TypeError, ValueError):
        return False
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {"data_list", "meta_list"} <= names


def _optim_slot(rule: Callable[..., Any], kwargs: Mapping[str, Any]) -> str | None:
    """Where ``rule`` takes the optimizers: "keyword", "positional" or None (see call_rule)."""
    try:
        params = list(inspect.signature(rule).parameters.values())
    except (TypeError, ValueError):  # no signature to read: OpenFed's positional call
        return "positional"
    if any(
        p.name == OPTIM_LIST and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params
    ):
        return "keyword"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3:
        third = positional[2]
        if third.name not in kwargs and (third.default is third.empty or third.default is None):
            return "positional"
    kinds = {p.kind for p in params}
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return "keyword"
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return "positional"
    return None
