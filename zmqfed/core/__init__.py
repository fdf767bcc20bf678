"""Core layer: the ``Maintainer``, its step points and the hook contracts."""

from __future__ import annotations

from zmqfed.core import step_points
from zmqfed.core import step_points as steps  # the module's earlier name
from zmqfed.core.context import current_maintainer
from zmqfed.core.contracts import StepContext, StepResult
from zmqfed.core.maintainer import Maintainer
from zmqfed.core.openfed_names import DefaultMaintainer, fed_context

__all__ = [
    "DefaultMaintainer",
    "Maintainer",
    "StepContext",
    "StepResult",
    "current_maintainer",
    "fed_context",
    "step_points",
    "steps",
]
