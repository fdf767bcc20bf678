"""Partial models: what a collaborator exchanges when it trains only part of the model.

Adapter-only federations (LoRA through ``peft``, a frozen backbone with a
trainable head) exchange a subset of the model: the aggregator holds the
whole model, each collaborator uploads and downloads only what it trains.
A collaborator says so with ``Maintainer(props, trainable_state_dict(model),
partial=True)``: it declares these names when it says HELLO, and the
aggregator then serves it exactly those tensors and accepts an upload only
if it carries exactly those (docs/protocol.md §5).  Aggregation weights each
tensor over the updates that carry it
(:class:`~zmqfed.functional.RunningFedAvg`), and tensors nobody sent stay as
they were.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from zmqfed.errors import ConfigError

__all__ = ["trainable_state_dict"]


def trainable_state_dict(module: nn.Module, *, buffers: bool = False) -> dict[str, Tensor]:
    """The parameters of ``module`` that require a gradient, by state-dict name.

    The tensors are the module's own (as ``state_dict(keep_vars=True)`` gives
    them), so downloads land in them and uploads read them.  With ``peft``,
    these are the adapter weights (``lora_A``, ``lora_B``); the frozen base
    stays local.

    Parameters
    ----------
    module:
        The model.
    buffers:
        Also include the buffers of modules that have a trainable parameter
        (a trainable BatchNorm's running statistics).

    Raises
    ------
    ConfigError
        If no parameter of ``module`` requires a gradient.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"trainable_state_dict needs an nn.Module, got {type(module).__name__}")
    full: dict[str, Any] = module.state_dict(keep_vars=True)
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    out = {name: t for name, t in full.items() if id(t) in trainable}
    if not out:
        raise ConfigError("no parameter of the module requires a gradient: nothing to exchange")
    if buffers:
        owners = {
            prefix
            for prefix, sub in module.named_modules()
            if any(p.requires_grad for p in sub.parameters(recurse=False))
        }
        for prefix, sub in module.named_modules():
            if prefix not in owners:
                continue
            for bname, _ in sub.named_buffers(recurse=False):
                key = f"{prefix}.{bname}" if prefix else bname
                if key in full:
                    out[key] = full[key]
    return out
