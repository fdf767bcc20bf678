"""``int8_quantization``: int8 values and a float32 scale (symmetric or affine)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from zmqfed.core import current_maintainer
from zmqfed.errors import ConfigError
from zmqfed.functional.compress.common import (
    DESCRIPTOR_BYTES,
    OFFSET,
    PARAM,
    SCALE,
    CompressionStats,
    check_fields,
    node_sends,
    raise_on,
    register,
)

__all__ = ["int8_quantization"]

log = logging.getLogger(__name__)


def int8_quantization(
    *,
    symmetric: bool = True,
    fields: Iterable[str] = (PARAM,),
    upload: bool = True,
    download: bool = True,
) -> CompressionStats:
    """Send floating-point ``fields`` as 8-bit integers with a per-tensor scale.

    Symmetric: ``f`` becomes int8 ``q = round(x / s)`` with
    ``s = max|x| / 127``, plus the float32 scalar field ``f.scale``. Affine
    (``symmetric=False``): uint8 ``q = round((x - min) / s)`` with
    ``s = (max - min) / 255``, plus ``f.scale`` and ``f.offset`` (= min);
    twice as fine when the values are not centred on 0. The receiver
    computes ``q * s (+ offset)`` in its local dtype; every element is off
    by at most ``s / 2``.

    Parameters
    ----------
    symmetric:
        Symmetric int8 (default) or affine uint8.
    fields:
        State fields to quantize (default ``'param'`` only).
    upload, download:
        Which directions this node sends quantized.

    Returns
    -------
    CompressionStats

    Notes
    -----
    Tensors holding inf or NaN are sent unchanged.
    """
    maintainer = current_maintainer("int8_quantization()")
    if not isinstance(symmetric, bool):
        raise ConfigError(f"int8_quantization: symmetric must be True or False, got {symmetric!r}")
    names = check_fields(fields, "int8_quantization")
    extra = 1 if symmetric else 2

    def encode(state: dict[str, Tensor], p: Tensor, *, name: str) -> dict[str, Tensor]:
        if not p.is_floating_point():
            return state
        for f in names:
            t = state.get(f)
            if not isinstance(t, Tensor) or not t.is_floating_point():
                continue
            if t.numel() * (t.element_size() - 1) - 4 * extra <= DESCRIPTOR_BYTES * extra:
                continue  # too small to pay for the extra fields
            x = t.detach().to(torch.float32)
            if symmetric:
                amax = float(x.abs().max())
                if not math.isfinite(amax):
                    continue
                scale = torch.tensor(amax / 127 if amax > 0 else 1.0, device=x.device)
                state[f] = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
            else:
                lo, hi = (float(v) for v in torch.aminmax(x))
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    continue
                scale = torch.tensor((hi - lo) / 255 if hi > lo else 1.0, device=x.device)
                offset = torch.tensor(lo, device=x.device)
                state[f] = torch.round((x - offset) / scale).clamp_(0, 255).to(torch.uint8)
                state[f + OFFSET] = offset
            state[f + SCALE] = scale
        return state

    def decode(state: dict[str, Tensor], p: Tensor, *, name: str) -> dict[str, Tensor]:
        raise_on(_check_int8(state, p))
        for key in [k for k in state if k.endswith(SCALE)]:
            f = key[: -len(SCALE)]
            scale = state.pop(key).to(torch.float32).reshape(())
            offset = state.pop(f + OFFSET, None)
            x = state[f].to(torch.float32) * scale.to(state[f].device)
            if offset is not None:
                x += offset.to(device=x.device, dtype=torch.float32).reshape(())
            state[f] = x.to(p.dtype)
        return state

    stats = CompressionStats("int8" if symmetric else "uint8-affine")
    sends = node_sends(maintainer, upload, download)
    register(
        maintainer,
        f"int8_quantization({stats.codec})",
        stats=stats,
        encode=encode if sends else None,
        decode=decode,
    )
    return stats


def _check_int8(fields: Mapping[str, Tensor], p: Tensor) -> str | None:
    """Why ``fields`` is not a valid int8 encoding (None if it is, or holds none)."""
    for key, aux in fields.items():
        if key.endswith(OFFSET):
            if key[: -len(OFFSET)] + SCALE not in fields:
                return f"{key!r} without {key[: -len(OFFSET)] + SCALE!r}"
            continue
        if not key.endswith(SCALE):
            continue
        f = key[: -len(SCALE)]
        q = fields.get(f)
        if not isinstance(q, Tensor):
            return f"{key!r} without the quantized field {f!r}"
        if not p.is_floating_point():
            return f"quantized {f!r} for a {p.dtype} tensor"
        offset = fields.get(f + OFFSET)
        want = torch.int8 if offset is None else torch.uint8
        if q.dtype != want:
            return f"quantized {f!r} must be {want}, got {q.dtype}"
        for name, t in ((key, aux), (f + OFFSET, offset)):
            if t is None:
                continue
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.numel() != 1:
                return f"{name!r} must be one floating-point number"
            if not math.isfinite(float(t)):
                return f"{name!r} is not finite"
    return None
