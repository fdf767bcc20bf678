"""What travels of a node's state: its tensors, and the optimizer state its contract allows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from zmqfed.core.contracts import contract_keys
from zmqfed.errors import ProtocolError

__all__ = ["install_state", "package_state"]

PARAM = "param"


def package_state(
    own: Mapping[str, Tensor],
    optims: Sequence[Any],
    direction: str,
    state_keys: Sequence[str] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """``{name: {'param': tensor, <state key>: tensor}}`` for one upload or download.

    Each optimizer contributes the state keys its contract lets travel in
    ``direction`` (``state_keys`` overrides). The live tensor always wins over
    an optimizer state entry named ``param`` (an aggregation may leave a
    stale one in the optimizer).
    """
    packaged: dict[str, dict[str, Tensor]] = {}
    for name, p in own.items():
        entry: dict[str, Tensor] = {}
        for optim in optims:
            state = optim.state.get(p) if hasattr(optim.state, "get") else None
            if not state:
                continue
            keys = state_keys if state_keys is not None else contract_keys(optim, direction)
            for key in keys:
                value = state.get(key)
                if isinstance(value, Tensor):
                    entry[key] = value
        entry[PARAM] = p
        packaged[name] = entry
    return packaged


@torch.no_grad()
def install_state(
    own: Mapping[str, Tensor],
    received: Mapping[str, Mapping[str, Any]],
    optims: Sequence[Any],
    direction: str,
    state_keys: Sequence[str] | None = None,
) -> None:
    """Copy received ``param`` into each tensor, and the accepted state into ``optims``.

    Only the keys an optimizer accepts from ``direction`` (``state_keys``
    overrides) are written: data received cannot plant state an optimizer
    never asked for.
    """
    for name, p in own.items():
        entry = received.get(name)
        if entry is None or PARAM not in entry:
            raise ProtocolError(f"received data has no 'param' for {name!r}")
        if entry[PARAM].data_ptr() != p.data_ptr():  # else: streamed in place
            p.copy_(entry[PARAM])
        for optim in optims:
            keys = state_keys if state_keys is not None else contract_keys(optim, direction)
            for key in keys:
                value = entry.get(key)
                if isinstance(value, Tensor):
                    optim.state[p][key] = value.clone()
