"""Updates as vectors in a modular ring, and who masks with whom.

* :class:`SecAggConfig` -- the protocol's parameters, checked once.
* :func:`layout_of`, :func:`encode_update`, :func:`to_wire`,
  :func:`from_wire`, :func:`decode_sum` -- fixed point in the ring
  ``Z_M``, ``M = modulus_range`` (a power of two): a floating-point value
  is clipped to ``[-clipping_range, clipping_range]``, multiplied by the
  client's weight factor ``f = weight / max_weight`` and mapped by unbiased
  stochastic rounding to an integer in ``[0, quantization_range]``; ``f``
  itself travels as one more element, so the sum yields the weighted mean.
  Integer tensors (``num_batches_tracked``) are summed exactly and
  averaged without weights.
* :func:`neighbourhoods` -- SecAgg+'s random Harary graph: the
  participants on a ring ordered by a hash of the round seed, each joined to
  the ``k / 2`` nearest on either side.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from zmqfed.errors import ConfigError, ProtocolError

__all__ = [
    "WEIGHT_FIELD",
    "Layout",
    "SecAggConfig",
    "check_weight",
    "decode_sum",
    "encode_update",
    "from_wire",
    "layout_of",
    "neighbourhoods",
    "to_wire",
]

log = logging.getLogger(__name__)

#: The field of the upload's first tensor that carries the weight factor.
WEIGHT_FIELD = "secagg.weight"
#: Largest neighbourhood: the share bundles travel in message headers (64 KiB).
MAX_NEIGHBOURS = 128
#: Values encoded per piece (8 MiB of float64): bounds the memory encoding takes.
PIECE = 2**20

#: ``((name, field, shape, is_float), ...)``: what one upload holds, in order.
Layout = tuple[tuple[str, str, tuple[int, ...], bool], ...]


@dataclass(frozen=True, kw_only=True)
class SecAggConfig:
    """The parameters of secure aggregation (the same on every node).

    Parameters
    ----------
    threshold:
        Shares needed to rebuild a client's secrets, and the fewest clients a
        round may go on with. An int, a fraction of the neighbourhood size
        ``k``, or None: ``k // 2 + 1``. It must exceed ``k / 2``, so that no
        aggregator can collect enough shares to unmask one client.
    neighbours:
        ``k``, the clients each one shares masks and secrets with (SecAgg+);
        None: the smallest even number >= ``2 * log2(n)``, all others for
        small groups. Must be even unless it reaches ``n - 1``.
    clipping_range, quantization_range, modulus_range, max_weight:
        Fixed point: values are clipped to ``[-clipping_range,
        clipping_range]`` and mapped to ``[0, quantization_range]`` in the
        ring of ``modulus_range`` (a power of two, at most ``2**62``); a
        client's weight (``meta[weight_key]``) must not exceed
        ``max_weight``. ``n * quantization_range`` must stay below
        ``modulus_range``. Flower's defaults.
    weight_key:
        The upload meta key holding the client's weight (FedAvg's
        ``instances``); 1 when absent.
    timeout:
        Seconds each phase waits for the clients of the previous one; None
        waits for every one that stays connected or has not joined yet (a
        client that joined and disconnects is a dropout at once).
    """

    threshold: int | float | None = None
    neighbours: int | None = None
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 1000.0
    weight_key: str = "instances"
    timeout: float | None = None

    def __post_init__(self) -> None:
        t = self.threshold
        if t is not None and (
            isinstance(t, bool)
            or not isinstance(t, (int, float))
            or (isinstance(t, int) and t < 1)
            or (isinstance(t, float) and not 0 < t <= 1)
        ):
            raise ConfigError(f"threshold must be an int >= 1 or a fraction in (0, 1], got {t!r}")
        k = self.neighbours
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"neighbours must be an int >= 1, got {k!r}")
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise ConfigError(f"clipping_range must be > 0, got {self.clipping_range!r}")
        if not isinstance(self.quantization_range, int) or self.quantization_range < 2:
            raise ConfigError(
                f"quantization_range must be an int >= 2, got {self.quantization_range!r}"
            )
        m = self.modulus_range
        if not isinstance(m, int) or m < 4 or m & (m - 1) or m > 2**62:
            raise ConfigError(f"modulus_range must be a power of two in [4, 2**62], got {m!r}")
        if m <= self.quantization_range:
            raise ConfigError(
                f"modulus_range ({m}) must exceed quantization_range ({self.quantization_range})"
            )
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ConfigError(f"max_weight must be > 0, got {self.max_weight!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout must be positive seconds or None, got {self.timeout!r}")

    @property
    def bits(self) -> int:
        """``log2(modulus_range)``."""
        return self.modulus_range.bit_length() - 1

    @property
    def wire_dtype(self) -> torch.dtype:
        """How ring elements travel: int32 (bit patterns) up to ``2**32``, int64 above."""
        return torch.int32 if self.bits <= 32 else torch.int64

    def max_clients(self) -> int:
        """The most clients whose sum cannot wrap around the ring."""
        return (self.modulus_range - 1) // self.quantization_range

    def resolve(self, n: int) -> tuple[int, int]:
        """``(k, t)`` for a round of ``n`` participants; ConfigError naming what does not fit."""
        if n < 2:
            raise ConfigError(f"secure aggregation needs at least 2 clients, got {n}")
        if n > self.max_clients():
            raise ConfigError(
                f"{n} clients overflow the ring: n * quantization_range must stay below "
                f"modulus_range ({self.quantization_range} * {n} >= {self.modulus_range})"
            )
        k = self.neighbours
        if k is None:
            k = 2 * math.ceil(math.log2(n))
        k = min(k, n - 1)
        if k < n - 1 and k % 2:
            raise ConfigError(f"neighbours must be even (a Harary graph), got {k} for {n} clients")
        if k > MAX_NEIGHBOURS:
            raise ConfigError(f"neighbours must be at most {MAX_NEIGHBOURS}, got {k}")
        t = self.threshold
        if t is None:
            t = k // 2 + 1
        elif isinstance(t, float):
            t = max(1, math.ceil(t * k))
        if not k / 2 < t <= k:
            raise ConfigError(
                f"threshold {t} must exceed half the neighbourhood ({k} neighbours) and not "
                f"exceed it: below, an aggregator could rebuild both secrets of a client"
            )
        return k, t


def neighbourhoods(seed: bytes, members: Sequence[str], k: int) -> dict[str, list[str]]:
    """Each member's ``k`` neighbours in the round's Harary graph (sorted names)."""
    order = sorted(members, key=lambda name: hashlib.sha256(seed + name.encode()).digest())
    n = len(order)
    out: dict[str, list[str]] = {}
    for i, name in enumerate(order):
        if k >= n - 1:
            peers = [m for m in order if m != name]
        else:
            peers = [order[(i + d) % n] for j in range(1, k // 2 + 1) for d in (j, -j)]
        out[name] = sorted(peers)
    return out


def layout_of(
    tensors: Mapping[str, Mapping[str, Tensor]], integers: set[tuple[str, str]] | None = None
) -> Layout:
    """The layout of an upload: every (name, field) in sorted order, with shape and kind.

    For a masked upload as received (every tensor holds ring elements), pass
    ``integers``, the (name, field) pairs that were integer tensors: the
    weight field is left out.
    """
    out = []
    for name in sorted(tensors):
        for field in sorted(tensors[name]):
            t = tensors[name][field]
            if not isinstance(t, Tensor):
                raise ConfigError(f"secure aggregation uploads tensors; {name}.{field} is not one")
            if integers is not None:
                if field != WEIGHT_FIELD:
                    out.append((name, field, tuple(t.shape), (name, field) not in integers))
                continue
            if t.is_complex():
                raise ConfigError(f"secure aggregation cannot sum complex {name}.{field}")
            out.append((name, field, tuple(t.shape), t.is_floating_point()))
    if not out:
        raise ConfigError("secure aggregation needs an upload with tensors")
    return tuple(out)


def _length(layout: Layout) -> int:
    return sum(math.prod(shape) for _, _, shape, _ in layout) + 1


def check_weight(weight: float, cfg: SecAggConfig) -> None:
    """ConfigError unless ``weight`` is a number in ``[0, max_weight]``."""
    if not (math.isfinite(weight) and 0 <= weight <= cfg.max_weight):
        raise ConfigError(
            f"secure aggregation: weight {weight!r} must be in [0, max_weight={cfg.max_weight}]"
        )


def encode_update(
    tensors: Mapping[str, Mapping[str, Tensor]],
    weight: float,
    cfg: SecAggConfig,
    generator: torch.Generator,
) -> Tensor:
    """One client's update as ring elements (int64): every field in layout order, then ``f``.

    Float fields become ``floor((clip(x) * f + c) * q / 2c + U)``, ``U``
    uniform in [0, 1): unbiased stochastic rounding into ``[0, q]``. Done a
    piece at a time in float64, so the extra memory stays small.
    """
    check_weight(weight, cfg)
    factor = weight / cfg.max_weight
    c, q = cfg.clipping_range, cfg.quantization_range
    layout = layout_of(tensors)
    out = torch.empty(_length(layout), dtype=torch.int64)
    offset = clipped = 0
    for name, field, _, is_float in layout:
        flat = tensors[name][field].detach().reshape(-1)
        target = out[offset : offset + flat.numel()]
        offset += flat.numel()
        if not is_float:
            target.copy_(flat.to(torch.int64).remainder(cfg.modulus_range))
            continue
        for start in range(0, flat.numel(), PIECE):
            x = flat[start : start + PIECE].to(torch.float64, copy=True)
            low, high = torch.aminmax(x)
            if float(low) < -c or float(high) > c:
                clipped += int((x.abs() > c).sum())
            x.clamp_(-c, c).mul_(factor * q / (2 * c)).add_(q / 2)
            x.add_(torch.rand(x.shape, generator=generator, dtype=torch.float64)).floor_()
            target[start : start + x.numel()].copy_(x)
    noise = float(torch.rand((), generator=generator, dtype=torch.float64))
    out[-1] = math.floor(factor * q + noise)
    if clipped:
        log.warning("secure aggregation clipped %d values to +-%s", clipped, c)
    return out


def to_wire(vector: Tensor, layout: Layout, cfg: SecAggConfig) -> dict[str, dict[str, Tensor]]:
    """Split a ring vector into the upload's tensors (``cfg.wire_dtype``), weight under the first.

    For rings up to ``2**32`` the int32 tensor holds each element's bit
    pattern: int64 -> int32 keeps the low 32 bits (checked by the tests).
    """
    vector = vector.to(cfg.wire_dtype)
    out: dict[str, dict[str, Tensor]] = {}
    offset = 0
    for name, field, shape, _ in layout:
        size = math.prod(shape)
        out.setdefault(name, {})[field] = vector[offset : offset + size].reshape(shape)
        offset += size
    out[layout[0][0]][WEIGHT_FIELD] = vector[offset : offset + 1]
    return out


def from_wire(
    tensors: Mapping[str, Mapping[str, Tensor]], layout: Layout, cfg: SecAggConfig
) -> Tensor:
    """The ring vector of a received masked upload; ``ProtocolError`` naming what does not fit."""
    names = {name for name, _, _, _ in layout}
    if set(tensors) != names:
        raise ProtocolError("a masked upload must hold exactly the round's tensors")
    expected = [*((n, f, s) for n, f, s, _ in layout), (layout[0][0], WEIGHT_FIELD, (1,))]
    got = sum(len(fields) for fields in tensors.values())
    if got != len(expected):
        raise ProtocolError(f"a masked upload has {got} fields, the round's layout {len(expected)}")
    vector = torch.empty(_length(layout), dtype=torch.int64)
    offset = 0
    for name, field, shape in expected:
        t = tensors[name].get(field)
        if t is None:
            raise ProtocolError(f"a masked upload lacks {name}.{field}")
        if t.dtype != cfg.wire_dtype or tuple(t.shape) != shape:
            raise ProtocolError(
                f"masked {name}.{field} is {t.dtype} {list(t.shape)}, expected "
                f"{cfg.wire_dtype} {list(shape)}"
            )
        vector[offset : offset + t.numel()].copy_(t.reshape(-1))
        offset += t.numel()
    if cfg.wire_dtype == torch.int32:
        return vector.bitwise_and_(0xFFFFFFFF)
    if bool(((vector < 0) | (vector >= cfg.modulus_range)).any()):
        raise ProtocolError("a masked upload holds values outside the ring")
    return vector


def decode_sum(
    total: Tensor, layout: Layout, count: int, cfg: SecAggConfig, like: Mapping[str, Tensor]
) -> tuple[dict[str, dict[str, Tensor]], float]:
    """The weighted mean of ``count`` unmasked updates, and their total weight.

    ``like`` maps names to the aggregator's tensors: float fields come back
    in their dtype. Raises ``ProtocolError`` when the weights sum to zero.
    """
    c, q, m = cfg.clipping_range, cfg.quantization_range, cfg.modulus_range
    factor_sum = float(total[-1]) / q
    if factor_sum <= 0:
        raise ProtocolError("the clients' weights sum to zero: nothing to average")
    out: dict[str, dict[str, Tensor]] = {}
    offset = 0
    for name, field, shape, is_float in layout:
        size = math.prod(shape)
        part = total[offset : offset + size]
        offset += size
        if is_float:
            value = (part.to(torch.float64) * (2 * c / q) - count * c) / factor_sum
            own = like.get(name)
            dtype = own.dtype if own is not None and own.is_floating_point() else torch.float32
            value = value.to(dtype)
        else:
            signed = torch.where(part >= m // 2, part - m, part)
            value = torch.div(signed, count, rounding_mode="floor")
            own = like.get(name)
            if own is not None and not own.is_floating_point() and field == "param":
                value = value.to(own.dtype)
        out.setdefault(name, {})[field] = value.reshape(shape)
    return out, factor_sum * cfg.max_weight
