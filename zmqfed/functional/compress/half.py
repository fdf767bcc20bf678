"""``half_precision``: float16 or bfloat16 on the wire."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

from zmqfed.core import current_maintainer
from zmqfed.errors import ConfigError
from zmqfed.functional.compress.common import (
    HALF_DTYPES,
    PARAM,
    CompressionStats,
    check_fields,
    node_sends,
    register,
)

__all__ = ["half_precision"]

log = logging.getLogger(__name__)


def half_precision(
    dtype: torch.dtype | str = torch.float16,
    *,
    fields: Iterable[str] = (PARAM,),
    upload: bool = True,
    download: bool = True,
) -> CompressionStats:
    """Send floating-point ``fields`` as float16 or bfloat16; the receiver casts back.

    Parameters
    ----------
    dtype:
        ``torch.float16`` (10-bit mantissa: relative error <= 2**-11, range
        +-65504) or ``torch.bfloat16`` (7-bit mantissa: relative error
        <= 2**-8, float32's range); also ``'fp16'``, ``'bf16'``.
    fields:
        State fields to cast (default ``'param'`` only; optimizer state such
        as ``'exp_avg'`` may be added). The receiver casts them back to its
        local tensor's dtype.
    upload, download:
        Which directions this node sends cast (a collaborator uploads, an
        aggregator serves downloads).

    Returns
    -------
    CompressionStats

    Notes
    -----
    A tensor with values beyond float16's range is sent unchanged rather than
    as infinities.
    """
    maintainer = current_maintainer("half_precision()")
    wire = HALF_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if wire not in (torch.float16, torch.bfloat16):
        raise ConfigError(
            f"half_precision: dtype must be torch.float16 or torch.bfloat16, got {dtype!r}"
        )
    assert isinstance(wire, torch.dtype)
    names = check_fields(fields, "half_precision")
    top = torch.finfo(wire).max

    def encode(state: dict[str, Tensor], p: Tensor, *, name: str) -> dict[str, Tensor]:
        if not p.is_floating_point():
            return state
        for f in names:
            t = state.get(f)
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.dtype == wire:
                continue
            if wire == torch.float16 and t.numel() and float(t.abs().max()) > top:
                continue
            state[f] = t.detach().to(wire)
        return state

    def decode(state: dict[str, Tensor], p: Tensor, *, name: str) -> dict[str, Tensor]:
        if p.is_floating_point():
            for f in names:
                t = state.get(f)
                if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16):
                    state[f] = t.to(p.dtype)
        return state

    stats = CompressionStats("float16" if wire == torch.float16 else "bfloat16")
    sends = node_sends(maintainer, upload, download)
    register(
        maintainer,
        f"half_precision({stats.codec})",
        stats=stats,
        encode=encode if sends else None,
        decode=decode,
    )
    return stats
