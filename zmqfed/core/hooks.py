"""``HookRegistry``: a Maintainer's package, unpackage and step hooks, in priority order.

Hooks run in order of ``nice`` (lower first), then of registration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from zmqfed.core import step_points
from zmqfed.core.contracts import PackageHook, StepContext, StepHook, takes_name
from zmqfed.errors import ConfigError

__all__ = ["HookRegistry"]

#: ``{tensor name: {field: tensor}}``.
Fields = Mapping[str, Mapping[str, Tensor]]


@dataclass(order=True)
class _Entry:
    nice: int
    order: int
    hook: Callable[..., Any] = field(compare=False)
    named: bool = field(default=False, compare=False)  # a package hook taking ``name``


class HookRegistry:
    """The hooks of one Maintainer."""

    def __init__(self) -> None:
        self._package: list[_Entry] = []
        self._unpackage: list[_Entry] = []
        self._step: dict[str, list[_Entry]] = {}
        self._order = 0

    def _entry(self, nice: int, hook: Callable[..., Any], *, named: bool = False) -> _Entry:
        if not callable(hook):
            raise ConfigError(f"a hook must be callable, got {hook!r}")
        self._order += 1
        return _Entry(int(nice), self._order, hook, named)

    def add_package(self, nice: int, hook: PackageHook) -> None:
        """Transform outgoing data, per tensor."""
        self._package.append(self._entry(nice, hook, named=takes_name(hook)))
        self._package.sort()

    def add_unpackage(self, nice: int, hook: PackageHook) -> None:
        """Transform received data, per tensor."""
        self._unpackage.append(self._entry(nice, hook, named=takes_name(hook)))
        self._unpackage.sort()

    def add_step(self, point: str, hook: StepHook, nice: int = 50) -> None:
        """Run ``hook(ctx)`` at step point ``point`` (zmqfed's or OpenFed's name)."""
        name = step_points.canonical(point) if isinstance(point, str) else None
        if name is None:
            raise ConfigError(
                f"unknown step point {point!r}; expected one of {step_points.STEP_NAMES} "
                f"or OpenFed's {tuple(step_points.OPENFED_NAMES)}"
            )
        hooks = self._step.setdefault(name, [])
        hooks.append(self._entry(nice, hook))
        hooks.sort()

    def run_step(self, ctx: StepContext) -> bool | None:
        """Run the hooks of ``ctx.point``: False if any refused, True if any accepted."""
        outputs = [entry.hook(ctx) for entry in self._step.get(ctx.point, ())]
        if any(out is False for out in outputs):
            return False
        if any(out is True for out in outputs):
            return True
        return None

    def apply(
        self, data: Fields, own: Mapping[str, Tensor], *, unpackage: bool
    ) -> dict[str, dict[str, Tensor]]:
        """Run the (un)package hooks on copies of ``data``'s per-tensor dicts.

        ``own`` maps names to the node's own tensors; tensors it does not
        hold pass through untouched.
        """
        entries = self._unpackage if unpackage else self._package
        out: dict[str, dict[str, Tensor]] = {}
        for name, fields in data.items():
            state = dict(fields)
            p = own.get(name)
            if p is not None:
                for entry in entries:
                    state = entry.hook(state, p, name=name) if entry.named else entry.hook(state, p)
            out[name] = state
        return out
