"""Opt-in lossy compression of the exchanged tensors, as package/unpackage hooks.

Call the same function inside ``with maintainer:`` on the aggregator and on
every collaborator::

    with maintainer:
        stats = zmqfed.functional.int8_quantization()

=========================  ==========  ============================================
function                   directions  tensor bytes sent (float32 model)
=========================  ==========  ============================================
``half_precision()``       both        1/2: float16 or bfloat16
``int8_quantization()``    both        ~1/4: int8 plus a float32 scale
``topk_sparsification()``  upload      ~2 x fraction: the k largest entries of the
                                       update minus the downloaded model, plus
                                       their int32 indices
=========================  ==========  ============================================

Common rules:

* Only floating-point fields of floating-point tensors are compressed:
  integer buffers (BatchNorm's ``num_batches_tracked``) and every field not
  named in ``fields`` (optimizer state by default) travel unchanged.
* The sender's encoder runs after every other package hook (nice 200, after
  ``device_alignment``'s 100); the receiver's decoder runs before every other
  unpackage hook (nice -100), so other hooks only ever see dense tensors of
  the local dtype.
* A node always decodes what it receives in the compressed format; the
  ``upload``/``download`` flags only choose what it sends compressed. A node
  may compress each direction with one compressor only (``ConfigError``
  otherwise), e.g. ``half_precision(upload=False)`` with
  ``topk_sparsification()``.
* int8 and top-k send tensors too small to pay for their extra header
  entries (about 128 bytes each) as they are.
* Each function returns a :class:`CompressionStats` of this node's tensor
  bytes before and after its hooks. An aggregator encodes the served model
  once per version, whatever the number of downloads;
  ``maintainer.stats`` counts the bytes of every message.

Received compressed data is validated (dtypes, shapes, index ranges) before
it is used: a malformed upload is refused with ``bad-upload``, a malformed
download raises ``ProtocolError``.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import Tensor

from zmqfed.core import Maintainer, current_maintainer
from zmqfed.errors import ConfigError, ProtocolError

__all__ = ["CompressionStats", "half_precision", "int8_quantization", "topk_sparsification"]

log = logging.getLogger(__name__)

PARAM = "param"
#: Suffixes of the extra fields of an int8 field ``f``: ``f.scale`` and ``f.offset``.
SCALE = ".scale"
OFFSET = ".offset"
#: The extra field of a top-k upload: the flat indices of the values in ``param``.
INDEX = ".index"

# Encoders after every other package hook (device_alignment: 100), decoders
# before every other unpackage hook (device_alignment: 0).
_ENCODE_NICE = 200
_DECODE_NICE = -100
# Roughly what one more tensor descriptor costs in the JSON header: a tensor
# whose compression saves less than this per extra field is sent as it is.
_DESCRIPTOR_BYTES = 128

_HALF_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

Hook = Callable[[dict[str, Tensor], Tensor], dict[str, Tensor]]


@dataclass
class CompressionStats:
    """Tensor bytes through one compressor's hooks on this node (headers excluded).

    ``raw_bytes_out`` / ``bytes_out``: what this node's outgoing states held
    before and after encoding; ``bytes_in`` / ``raw_bytes_in``: what its
    incoming states held as received and after decoding. Untouched fields
    (integer buffers, optimizer state) count on both sides.
    """

    codec: str
    raw_bytes_out: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    raw_bytes_in: int = 0

    @property
    def saved_bytes(self) -> int:
        """Outgoing bytes saved: ``raw_bytes_out - bytes_out``."""
        return self.raw_bytes_out - self.bytes_out

    @property
    def ratio(self) -> float:
        """Outgoing ``raw_bytes_out / bytes_out`` (1.0 before anything was sent)."""
        return self.raw_bytes_out / self.bytes_out if self.bytes_out else 1.0

    def reset(self) -> None:
        """Set every counter back to 0."""
        self.raw_bytes_out = self.bytes_out = self.bytes_in = self.raw_bytes_in = 0


# --------------------------------------------------------------------------- registration


@dataclass
class _Registry:
    """What this module registered on one maintainer."""

    encoders: dict[str, str] = field(default_factory=dict)  # direction -> codec


_registries: weakref.WeakKeyDictionary[Maintainer, _Registry] = weakref.WeakKeyDictionary()


def _registry(maintainer: Maintainer) -> _Registry:
    reg = _registries.get(maintainer)
    if reg is None:
        reg = _registries[maintainer] = _Registry()
    return reg


def _register(
    maintainer: Maintainer,
    codec: str,
    *,
    stats: CompressionStats,
    encode: Hook | None,
    decode: Hook | None,
) -> None:
    reg = _registry(maintainer)
    if encode is not None:
        direction = "upload" if maintainer.collaborator else "download"
        other = reg.encoders.get(direction)
        if other is not None:
            raise ConfigError(
                f"{codec}: {maintainer.nick_name}'s {direction}s are already compressed by "
                f"{other}; use one compressor per direction"
            )
        reg.encoders[direction] = codec
        maintainer.register_package_hook(
            nice=_ENCODE_NICE, package_hook=_count_encode(stats, encode)
        )
    if decode is not None:
        maintainer.register_unpackage_hook(
            nice=_DECODE_NICE, unpackage_hook=_count_decode(stats, decode)
        )


def _sends(maintainer: Maintainer, upload: bool, download: bool) -> bool:
    """Whether this node encodes: collaborators send uploads, aggregators downloads."""
    return upload if maintainer.collaborator else download


def _count_encode(stats: CompressionStats, encode: Hook) -> Hook:
    """``encode`` counting bytes in ``stats``, without autograd."""

    @torch.no_grad()
    def hook(state: dict[str, Tensor], p: Tensor) -> dict[str, Tensor]:
        stats.raw_bytes_out += _nbytes(state)
        state = encode(state, p)
        stats.bytes_out += _nbytes(state)
        return state

    return hook


def _count_decode(stats: CompressionStats, decode: Hook) -> Hook:
    """``decode`` counting bytes in ``stats``, without autograd."""

    @torch.no_grad()
    def hook(state: dict[str, Tensor], p: Tensor) -> dict[str, Tensor]:
        stats.bytes_in += _nbytes(state)
        state = decode(state, p)
        stats.raw_bytes_in += _nbytes(state)
        return state

    return hook


def _nbytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor))


def _check_fields(fields: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(fields, str):
        fields = (fields,)
    out = tuple(fields)
    if not out or not all(isinstance(f, str) and f for f in out):
        raise ConfigError(f"{what}: fields must be non-empty strings, got {out!r}")
    return out


def _raise_on(problem: str | None) -> None:
    if problem is not None:
        raise ProtocolError(problem)


# --------------------------------------------------------------------------- half precision


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
    wire = _HALF_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if wire not in (torch.float16, torch.bfloat16):
        raise ConfigError(
            f"half_precision: dtype must be torch.float16 or torch.bfloat16, got {dtype!r}"
        )
    assert isinstance(wire, torch.dtype)
    names = _check_fields(fields, "half_precision")
    top = torch.finfo(wire).max

    def encode(state: dict[str, Tensor], p: Tensor) -> dict[str, Tensor]:
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

    def decode(state: dict[str, Tensor], p: Tensor) -> dict[str, Tensor]:
        if p.is_floating_point():
            for f in names:
                t = state.get(f)
                if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16):
                    state[f] = t.to(p.dtype)
        return state

    stats = CompressionStats("float16" if wire == torch.float16 else "bfloat16")
    sends = _sends(maintainer, upload, download)
    _register(
        maintainer,
        f"half_precision({stats.codec})",
        stats=stats,
        encode=encode if sends else None,
        decode=decode,
    )
    return stats


# --------------------------------------------------------------------------- int8


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
    names = _check_fields(fields, "int8_quantization")
    extra = 1 if symmetric else 2

    def encode(state: dict[str, Tensor], p: Tensor) -> dict[str, Tensor]:
        if not p.is_floating_point():
            return state
        for f in names:
            t = state.get(f)
            if not isinstance(t, Tensor) or not t.is_floating_point():
                continue
            if t.numel() * (t.element_size() - 1) - 4 * extra <= _DESCRIPTOR_BYTES * extra:
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

    def decode(state: dict[str, Tensor], p: Tensor) -> dict[str, Tensor]:
        _raise_on(_check_int8(state, p))
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
    sends = _sends(maintainer, upload, download)
    _register(
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


# --------------------------------------------------------------------------- top-k


def topk_sparsification(fraction: float = 0.01, *, error_feedback: bool = True) -> CompressionStats:
    """Upload only the largest ``fraction`` of each update's change; the aggregator fills in.

    A collaborator computes ``delta = local - downloaded`` per floating-point
    tensor (the reference is the model it last downloaded,
    ``maintainer.data[name]['param']``) and uploads the ``k = ceil(fraction *
    numel)`` entries of largest magnitude as ``param`` plus their flat
    indices as ``param.index`` (int32; int64 beyond 2**31 elements). The
    aggregator's decoder rebuilds the dense ``global + delta`` from its own
    tensor, which must still be the model the collaborator downloaded (true
    within a round; a stale upload's delta lands on the newer model).

    With ``error_feedback`` (default) the collaborator keeps what it did not
    send (one residual tensor per parameter) and adds it to the next
    update, so every change is eventually sent; without it the unsent part
    of each update is dropped.

    Parameters
    ----------
    fraction:
        Share of each tensor's entries sent, in (0, 1].
    error_feedback:
        Accumulate the unsent remainder on the collaborator (memory: one model).

    Returns
    -------
    CompressionStats

    Notes
    -----
    Upload-only: downloads are not sparsified (the aggregator has no
    reference on the collaborators' side). Only ``param`` is sparsified;
    optimizer state travels dense. A tensor whose sparse form would not be
    smaller is sent dense (with error feedback: ``local + residual``, which
    empties the residual). Before the first download there is no reference:
    the upload is dense and a warning is logged. An upload that fails after
    encoding loses its top-k entries (the residual has moved on).
    """
    maintainer = current_maintainer("topk_sparsification()")
    if isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0 < float(fraction) <= 1:
        raise ConfigError(f"topk_sparsification: fraction must be in (0, 1], got {fraction!r}")
    if not isinstance(error_feedback, bool):
        raise ConfigError(
            f"topk_sparsification: error_feedback must be True or False, got {error_feedback!r}"
        )
    stats = CompressionStats(f"top-{float(fraction):g}")
    if maintainer.aggregator:
        _register(
            maintainer,
            "topk_sparsification",
            stats=stats,
            encode=None,
            decode=_topk_decode,
        )
    else:
        encoder = _TopKEncoder(maintainer, float(fraction), error_feedback)
        _register(maintainer, "topk_sparsification", stats=stats, encode=encoder, decode=None)
    return stats


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _TopKEncoder:
    """The collaborator's top-k package hook and its error-feedback residuals."""

    def __init__(self, maintainer: Maintainer, fraction: float, error_feedback: bool) -> None:
        self.m = maintainer
        self.fraction = fraction
        self.error_feedback = error_feedback
        self.residuals: dict[str, Tensor] = {}
        self._names: dict[int, str] = {}
        self._warned = False

    def _name(self, p: Tensor) -> str | None:
        name = self._names.get(id(p))
        if name is None or self.m.state_dict.get(name) is not p:
            self._names = {id(t): n for n, t in self.m.state_dict.items()}
            name = self._names.get(id(p))
        return name

    def __call__(self, state: dict[str, Tensor], p: Tensor) -> dict[str, Tensor]:
        param = state.get(PARAM)
        if (
            not isinstance(param, Tensor)
            or not param.is_floating_point()
            or not p.is_floating_point()
            or param.shape != p.shape
        ):
            return state
        name = self._name(p)
        reference = self.m.data.get(name, {}).get(PARAM) if name is not None else None
        if reference is None or reference.shape != p.shape:
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s: topk_sparsification: no downloaded model to take the update from; "
                    "uploading dense",
                    self.m.nick_name,
                )
            return state
        assert name is not None
        work = _work_dtype(param.dtype)
        base = reference.detach().to(device=param.device, dtype=work)
        update = param.detach().to(work) - base
        residual = self.residuals.get(name) if self.error_feedback else None
        if residual is not None:
            update += residual
        flat = update.reshape(-1)
        n = flat.numel()
        k = max(1, math.ceil(self.fraction * n))
        index_dtype = torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64
        sparse = k * (param.element_size() + index_dtype.itemsize)
        if n * param.element_size() - sparse <= _DESCRIPTOR_BYTES:
            # dense is as small: send everything, the residual included
            if residual is not None:
                state[PARAM] = (base + update).to(param.dtype)
                del self.residuals[name]
            return state
        index = flat.abs().topk(k, sorted=False).indices
        values = flat[index].to(param.dtype)
        if self.error_feedback:
            flat[index] -= values.to(work)  # what was sent, to the last rounding
            self.residuals[name] = update
        state[PARAM] = values
        state[PARAM + INDEX] = index.to(index_dtype)
        return state


def _topk_decode(state: dict[str, Tensor], p: Tensor) -> dict[str, Tensor]:
    """Aggregator: ``param = p + scatter(values at index)``, dense in ``p``'s dtype."""
    _raise_on(_check_topk(state, p))
    index = state.pop(PARAM + INDEX, None)
    if index is None:
        return state
    work = _work_dtype(p.dtype)
    dense = p.detach().to(work).reshape(-1).clone()
    dense.index_add_(0, index.to(device=dense.device, dtype=torch.int64), state[PARAM].to(dense))
    state[PARAM] = dense.reshape(p.shape).to(p.dtype)
    return state


def _check_topk(fields: Mapping[str, Tensor], p: Tensor) -> str | None:
    """Why ``fields`` is not a valid top-k upload (None if it is, or is dense)."""
    for key in fields:
        if key.endswith(INDEX) and key != PARAM + INDEX:
            return f"only 'param' can be sparse, got {key!r}"
    index = fields.get(PARAM + INDEX)
    if index is None:
        return None
    values = fields.get(PARAM)
    if not isinstance(values, Tensor) or not isinstance(index, Tensor):
        return f"{PARAM + INDEX!r} without the values in 'param'"
    if not p.is_floating_point():
        return f"sparse 'param' for a {p.dtype} tensor"
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
        return f"{PARAM + INDEX!r} must be a 1-d int32/int64 tensor, got {index.dtype} {list(index.shape)}"
    if not values.is_floating_point() or values.shape != index.shape:
        return (
            f"sparse 'param' must hold one floating-point value per index, got {values.dtype} "
            f"{list(values.shape)} for {index.numel()} indices"
        )
    n = p.numel()
    if index.numel() > n:
        return f"{index.numel()} sparse values for a tensor of {n} elements"
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        return f"{PARAM + INDEX!r} holds indices outside [0, {n})"
    return None
