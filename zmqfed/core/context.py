"""The default Maintainer: set by ``with maintainer:``, used by ``zmqfed.functional``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from zmqfed.errors import ConfigError

if TYPE_CHECKING:
    from zmqfed.core.maintainer import Maintainer

__all__ = ["current_maintainer", "pop_maintainer", "push_maintainer"]

_stack: list[Maintainer] = []


def push_maintainer(maintainer: Maintainer) -> None:
    _stack.append(maintainer)


def pop_maintainer(maintainer: Maintainer) -> None:
    if _stack and _stack[-1] is maintainer:
        _stack.pop()


def current_maintainer(what: str = "this function") -> Maintainer:
    """The innermost ``with maintainer:`` block's Maintainer, or a clear error."""
    if not _stack:
        raise ConfigError(f"{what} needs a Maintainer: call it inside `with maintainer:`")
    return _stack[-1]
