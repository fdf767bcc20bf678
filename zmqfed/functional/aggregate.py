"""All aggregation rules in one import.

The rules live one family per module: :mod:`~zmqfed.functional.agg_mean`
(average, FedAvg, elastic), :mod:`~zmqfed.functional.agg_robust` (median,
trimmed mean, Krum), :mod:`~zmqfed.functional.running_mean` (running FedAvg),
:mod:`~zmqfed.functional.agg_rule` (the rule contract :class:`AggregationRule`
and :func:`call_rule`) and :mod:`~zmqfed.functional.agg_common` (the data
format, and how aggregates reach the model and the optimizers).
"""

from __future__ import annotations

from zmqfed.functional.agg_common import install_aggregate, load_param_states
from zmqfed.functional.agg_mean import average_aggregation, elastic_aggregation, naive_aggregation
from zmqfed.functional.agg_robust import (
    krum_aggregation,
    krum_select,
    median_aggregation,
    trimmed_mean_aggregation,
)
from zmqfed.functional.agg_rule import AggregationRule, call_rule
from zmqfed.functional.running_mean import RunningFedAvg, StreamingFedAvg

__all__ = [
    "AggregationRule",
    "RunningFedAvg",
    "StreamingFedAvg",
    "average_aggregation",
    "call_rule",
    "elastic_aggregation",
    "install_aggregate",
    "krum_aggregation",
    "krum_select",
    "load_param_states",
    "median_aggregation",
    "naive_aggregation",
    "trimmed_mean_aggregation",
]

# mypy checks every rule against the contract here
_RULES: tuple[AggregationRule, ...] = (
    average_aggregation,
    naive_aggregation,
    elastic_aggregation,
    median_aggregation,
    trimmed_mean_aggregation,
    krum_aggregation,
)
