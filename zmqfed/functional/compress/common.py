"""What the compressors share: stats, registration per Maintainer, field checks."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from zmqfed.core import Maintainer
from zmqfed.errors import ConfigError, ProtocolError

__all__ = [
    "DECODE_NICE",
    "DESCRIPTOR_BYTES",
    "ENCODE_NICE",
    "HALF_DTYPES",
    "INDEX",
    "OFFSET",
    "PARAM",
    "SCALE",
    "CompressionStats",
    "Registry",
    "check_fields",
    "count_decode",
    "count_encode",
    "node_sends",
    "raise_on",
    "register",
    "registry",
    "state_nbytes",
]

log = logging.getLogger(__name__)

PARAM = "param"
#: Suffixes of the extra fields of an int8 field ``f``: ``f.scale`` and ``f.offset``.
SCALE = ".scale"
OFFSET = ".offset"
#: The extra field of a top-k upload: the flat indices of the values in ``param``.
INDEX = ".index"

# Encoders after every other package hook (device_alignment: 100), decoders
# before every other unpackage hook (device_alignment: 0).
ENCODE_NICE = 200
DECODE_NICE = -100
# Roughly what one more tensor descriptor costs in the JSON header: a tensor
# whose compression saves less than this per extra field is sent as it is.
DESCRIPTOR_BYTES = 128

HALF_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

#: ``hook(state, p, name=...) -> state``: an encoder or decoder of one tensor's fields.
Hook = Callable[..., dict[str, Tensor]]


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
class Registry:
    """What this module registered on one maintainer."""

    encoders: dict[str, str] = field(default_factory=dict)  # direction -> codec


_registries: weakref.WeakKeyDictionary[Maintainer, Registry] = weakref.WeakKeyDictionary()


def registry(maintainer: Maintainer) -> Registry:
    reg = _registries.get(maintainer)
    if reg is None:
        reg = _registries[maintainer] = Registry()
    return reg


def register(
    maintainer: Maintainer,
    codec: str,
    *,
    stats: CompressionStats,
    encode: Hook | None,
    decode: Hook | None,
) -> None:
    reg = registry(maintainer)
    if encode is not None:
        direction = "upload" if maintainer.collaborator else "download"
        other = reg.encoders.get(direction)
        if other is not None:
            raise ConfigError(
                f"{codec}: {maintainer.nick_name}'s {direction}s are already compressed by "
                f"{other}; use one compressor per direction"
            )
        reg.encoders[direction] = codec
        maintainer.register_package_hook(nice=ENCODE_NICE, package_hook=count_encode(stats, encode))
    if decode is not None:
        maintainer.register_unpackage_hook(
            nice=DECODE_NICE, unpackage_hook=count_decode(stats, decode)
        )


def node_sends(maintainer: Maintainer, upload: bool, download: bool) -> bool:
    """Whether this node encodes: collaborators send uploads, aggregators downloads."""
    return upload if maintainer.collaborator else download


def count_encode(stats: CompressionStats, encode: Hook) -> Hook:
    """``encode`` counting bytes in ``stats``, without autograd."""

    @torch.no_grad()
    def hook(state: dict[str, Tensor], p: Tensor, *, name: str) -> dict[str, Tensor]:
        stats.raw_bytes_out += state_nbytes(state)
        state = encode(state, p, name=name)
        stats.bytes_out += state_nbytes(state)
        return state

    return hook


def count_decode(stats: CompressionStats, decode: Hook) -> Hook:
    """``decode`` counting bytes in ``stats``, without autograd."""

    @torch.no_grad()
    def hook(state: dict[str, Tensor], p: Tensor, *, name: str) -> dict[str, Tensor]:
        stats.bytes_in += state_nbytes(state)
        state = decode(state, p, name=name)
        stats.raw_bytes_in += state_nbytes(state)
        return state

    return hook


def state_nbytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor))


def check_fields(fields: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(fields, str):
        fields = (fields,)
    out = tuple(fields)
    if not out or not all(isinstance(f, str) and f for f in out):
        raise ConfigError(f"{what}: fields must be non-empty strings, got {out!r}")
    return out


def raise_on(problem: str | None) -> None:
    if problem is not None:
        raise ProtocolError(problem)
