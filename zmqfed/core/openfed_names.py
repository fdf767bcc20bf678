"""OpenFed's core-layer helpers: ``fed_context`` and ``DefaultMaintainer``."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from zmqfed.core.context import current_maintainer
from zmqfed.errors import ConfigError, PeerOffline, PeerTimeout

if TYPE_CHECKING:
    from zmqfed.core.maintainer import Maintainer

__all__ = ["DefaultMaintainer", "fed_context"]

R = TypeVar("R")


def fed_context(func: Callable[..., R]) -> Callable[..., R | bool]:
    """Decorate a method of an object with a ``pipe``: a peer gone offline becomes ``False``.

    The method runs inside ``self.pipe.dist_props`` (unless its lock is
    held already, as OpenFed did). If the peer goes offline
    (``PeerOffline``, OpenFed's ``DeviceOffline``) or does not answer in
    time (``PeerTimeout``: OpenFed reported a transfer that timed out as
    offline too), a warning is issued and the method returns ``False``.
    """

    @functools.wraps(func)
    def call(self: Any, *args: Any, **kwargs: Any) -> R | bool:
        def safe() -> R | bool:
            try:
                return func(self, *args, **kwargs)
            except (PeerOffline, PeerTimeout) as exc:
                warnings.warn(f"{func.__qualname__} failed: {exc}", RuntimeWarning, stacklevel=3)
                return False

        dist_props = self.pipe.dist_props
        if dist_props.lock.locked():
            return safe()
        with dist_props:
            return safe()

    return call


class _DefaultMaintainerType(type):
    @property
    def _default_maintainer(cls) -> Maintainer | None:
        try:
            return current_maintainer()
        except ConfigError:
            return None

    @_default_maintainer.setter
    def _default_maintainer(cls, value: object) -> None:
        raise ConfigError(
            "DefaultMaintainer._default_maintainer is the Maintainer of the innermost "
            "`with maintainer:` block; enter that block instead of setting it"
        )


class DefaultMaintainer(metaclass=_DefaultMaintainerType):
    """OpenFed's record of the default Maintainer, for hooks that register themselves.

    ``DefaultMaintainer._default_maintainer`` is the Maintainer of the
    innermost ``with maintainer:`` block, ``None`` outside one (the same as
    :func:`zmqfed.core.current_maintainer`, which raises instead).
    """
