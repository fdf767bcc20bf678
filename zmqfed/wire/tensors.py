"""``encode_tensors``: a nested tensor dict encoded once into frames and descriptors.

An aggregator answers many PULLs with the same model.  Encoding (and, with
``snapshot``, copying) it once and handing the result to ``encode(...,
encoded=...)`` for every reply makes each DATA message cost one small header:
the buffers are shared, which is valid because libzmq only reads them.

Tied tensors (names whose fields share storage, like GPT-2's ``wte.weight``
and ``lm_head.weight``) are encoded once: the later name becomes an alias of
the first in ``EncodedTensors.tied`` and :func:`apply_tied` makes them share
one tensor again on arrival (docs/protocol.md §3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.wire.codec import CODECS, Buffer, encode_tensor
from zmqfed.wire.header import DTYPE_NAMES, DTYPES
from zmqfed.wire.limits import DEFAULT_LIMITS, Limits

__all__ = ["EncodedTensors", "apply_tied", "encode_tensors", "find_tied"]


@dataclass(frozen=True, eq=False)
class EncodedTensors:
    """Tensor frames and their header descriptors, ready to be sent many times.

    Attributes
    ----------
    descriptors : tuple of dict
        One header descriptor per frame (``key, field, dtype, shape, codec,
        nbytes, rawbytes``); treat as read-only.
    buffers : tuple
        The frames, in descriptor order.
    nbytes : int
        Total raw (decoded) tensor bytes.
    tied : tuple of (str, str)
        ``(alias, source)``: ``alias`` has no descriptors of its own and
        arrives sharing every field's tensor with ``source``.
    """

    descriptors: tuple[dict[str, Any], ...]
    buffers: tuple[Buffer, ...]
    nbytes: int
    tied: tuple[tuple[str, str], ...] = ()

    @property
    def encoded_nbytes(self) -> int:
        """Total bytes of the frames as sent."""
        return sum(int(d["nbytes"]) for d in self.descriptors)

    def check(self, limits: Limits, *, streamed: bool = False) -> None:
        """Raise ``ProtocolError`` if these frames break ``limits``.

        ``encode`` calls this because the frames may have been made under
        other limits than the message they are sent in.  A ``streamed``
        message's frames are sent in chunks, so only its totals are checked.
        """
        if len(self.descriptors) + len(self.tied) > limits.max_tensors:
            raise ProtocolError(
                f"message has {len(self.descriptors) + len(self.tied)} tensors, "
                f"limit max_tensors={limits.max_tensors}"
            )
        if self.nbytes > limits.max_message_bytes:
            raise ProtocolError(
                f"message holds {self.nbytes} tensor bytes, "
                f"limit max_message_bytes={limits.max_message_bytes}"
            )
        for d in self.descriptors:
            if not streamed and d["nbytes"] > limits.max_frame_bytes:
                raise ProtocolError(
                    f"tensor {d['key']!r}/{d['field']!r}: {d['codec']} frame of {d['nbytes']} "
                    f"bytes exceeds max_frame_bytes={limits.max_frame_bytes}"
                )


def _items(tensors: Any, limits: Limits) -> list[tuple[str, str, torch.Tensor]]:
    """Flatten and type-check the nested dict; enforce the count and total limits."""
    if not isinstance(tensors, Mapping):
        raise ConfigError(f"tensors must be a dict, got {type(tensors).__name__}")
    items: list[tuple[str, str, torch.Tensor]] = []
    total = 0
    for key, fields in tensors.items():
        if not isinstance(key, str) or not isinstance(fields, Mapping):
            raise ConfigError(f"tensors[{key!r}] must map a str key to a dict of fields")
        for fld, t in fields.items():
            name = f"tensor {key!r}/{fld!r}"
            if not isinstance(fld, str) or not isinstance(t, torch.Tensor):
                raise ConfigError(f"{name}: field names must be str and values tensors")
            if t.dtype not in DTYPE_NAMES:
                raise ConfigError(
                    f"{name}: dtype {t.dtype} cannot be sent; allowed: {list(DTYPES)}"
                )
            items.append((key, fld, t))
            total += t.numel() * t.element_size()
    # both checked before any tensor is copied or compressed
    if len(items) > limits.max_tensors:
        raise ProtocolError(
            f"message has {len(items)} tensors, limit max_tensors={limits.max_tensors}"
        )
    if total > limits.max_message_bytes:
        raise ProtocolError(
            f"message holds {total} tensor bytes, limit max_message_bytes={limits.max_message_bytes}"
        )
    return items


def _storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What makes two tensors the same memory, element for element (None: empty)."""
    if not t.numel() or t.layout != torch.strided:
        return None
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        t.dtype,
        tuple(t.shape),
        tuple(t.stride()),
    )


def find_tied(tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, str]:
    """``{alias: source}`` for names whose fields all share storage with an earlier name's.

    Two names are tied when they hold the same set of fields and every field
    is the same memory (same storage, offset, dtype, shape and strides), as a
    model's shared parameter appears under each of its names in
    ``state_dict(keep_vars=True)``.  The first name in order is the source.
    """
    first: dict[tuple[Any, ...], str] = {}
    tied: dict[str, str] = {}
    for key, fields in tensors.items():
        if not isinstance(fields, Mapping) or not fields:
            continue
        parts = []
        for fld, t in fields.items():
            mem = _storage_key(t) if isinstance(t, torch.Tensor) else None
            if mem is None:
                break
            parts.append((str(fld), mem))
        else:
            sig = tuple(sorted(parts, key=lambda p: p[0]))
            source = first.setdefault(sig, key)
            if source != key:
                tied[key] = source
    return tied


def apply_tied(
    tensors: dict[str, dict[str, torch.Tensor]], tied: Sequence[tuple[str, str]]
) -> dict[str, dict[str, torch.Tensor]]:
    """Give every alias the very tensors of its source (in place; returns ``tensors``)."""
    for alias, source in tied:
        tensors[alias] = dict(tensors[source])
    return tensors


def encode_tensors(
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    codec: str = "raw",
    limits: Limits = DEFAULT_LIMITS,
    snapshot: bool = False,
    streamed: bool = False,
    tie: bool = True,
) -> EncodedTensors:
    """Encode ``state-dict name -> field -> tensor`` into frames.

    Parameters
    ----------
    tensors : mapping
        ``{'fc.weight': {'param': t, 'exp_avg': m}, ...}``.
    codec : str
        One of :data:`zmqfed.wire.CODECS`, applied to every tensor.
    limits : Limits
        Count, total and per-frame limits, checked here so the sender fails
        loudly (MAXMSGSIZE would silently drop an oversized frame).
    snapshot : bool
        Copy raw buffers that alias the caller's tensors, so the caller may
        mutate them while libzmq still reads the frames (docs/zeromq.md §14).
        Compressed frames and copies made for non-contiguous tensors are
        already private and are not copied again.
    streamed : bool
        The frames will be sent in chunks (:mod:`zmqfed.wire.stream`):
        ``max_frame_bytes`` bounds the chunks, not these frames.
    tie : bool
        Send names that share storage once (:func:`find_tied`).

    Returns
    -------
    EncodedTensors

    Raises
    ------
    ConfigError
        Unknown codec, a non-tensor value, or a dtype outside the allow-list.
    ProtocolError
        Too many tensors, too many bytes, or a frame above ``max_frame_bytes``.
    """
    if codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r}; expected one of {CODECS}")
    items = _items(tensors, limits)
    tied = find_tied(tensors) if tie else {}
    if tied:
        items = [item for item in items if item[0] not in tied]
    descriptors: list[dict[str, Any]] = []
    buffers: list[Buffer] = []
    total = 0
    for key, fld, t in items:
        rawbytes = t.numel() * t.element_size()
        if not streamed and codec == "raw" and rawbytes > limits.max_frame_bytes:  # before copying
            raise ProtocolError(
                f"tensor {key!r}/{fld!r}: raw frame of {rawbytes} bytes exceeds "
                f"max_frame_bytes={limits.max_frame_bytes}"
            )
        used, buf = encode_tensor(t, codec)
        if snapshot and used == "raw" and rawbytes and t.device.type == "cpu":
            assert isinstance(buf, np.ndarray)
            if buf.ctypes.data == t.data_ptr():  # a view of the caller's memory
                buf = buf.copy()
        nbytes = buf.nbytes if isinstance(buf, (np.ndarray, memoryview)) else len(buf)
        if not streamed and nbytes > limits.max_frame_bytes:
            raise ProtocolError(
                f"tensor {key!r}/{fld!r}: {used} frame of {nbytes} bytes exceeds "
                f"max_frame_bytes={limits.max_frame_bytes}"
            )
        descriptors.append(
            {
                "key": key,
                "field": fld,
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "codec": used,
                "nbytes": nbytes,
                "rawbytes": rawbytes,
            }
        )
        buffers.append(buf)
        total += rawbytes
    return EncodedTensors(tuple(descriptors), tuple(buffers), total, tuple(tied.items()))
