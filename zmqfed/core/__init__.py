"""Core layer: the ``Maintainer`` and the names of its step points."""

from __future__ import annotations

from zmqfed.core import steps
from zmqfed.core.context import current_maintainer
from zmqfed.core.maintainer import Maintainer

__all__ = ["Maintainer", "current_maintainer", "steps"]
