"""``Limits``: the byte and count bounds that both ends of a link enforce.

The decoder checks every header field against these numbers *before* it
allocates anything, so a forged header or an lz4 bomb cannot make a receiver
allocate more than ``max_message_bytes`` (plus, for ``shuffle-lz4``, one
scratch copy of the largest tensor).  The sender checks the same numbers and
fails loudly, because ZeroMQ's MAXMSGSIZE backstop fails silently (the peer is
just disconnected, docs/zeromq.md §13).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from zmqfed.errors import ConfigError

__all__ = [
    "DEFAULT_LIMITS",
    "DESCRIPTOR_BYTES",
    "FIELDS_PER_TENSOR",
    "HEADER_SLACK",
    "Limits",
    "announced_frame_bound",
    "header_bound",
]

#: Added to ``max_frame_bytes`` for the socket's MAXMSGSIZE so the header frame
#: (≤ 64 KiB by default) always passes the per-frame socket limit.
HEADER_SLACK = 64 * 1024

#: ``max_header_bytes`` when no model sizes it.
DEFAULT_HEADER_BYTES = 64 * 1024

# libzmq takes MAXMSGSIZE as an int64; keep every bound well inside it.
_MAX_BOUND = 2**62

#: Bytes of one tensor descriptor in the header JSON besides its name: the
#: longest dtype and codec names, a 10-character field, byte counts and a rank-4
#: shape below 10**12, and the JSON punctuation come to 160 (docs/protocol.md §3).
DESCRIPTOR_BYTES = 160
#: Descriptors per tensor a model-sized header bound leaves room for: ``param``
#: and up to three optimizer states (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``).
FIELDS_PER_TENSOR = 4

# The smallest header that can be valid (magic, version byte, a minimal JSON
# object) is about 100 bytes; a limit below this would reject every message.
_MIN_HEADER_BYTES = 256


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds on one wire message, checked by both ``encode`` and ``decode``.

    Parameters
    ----------
    max_header_bytes : int
        Largest header frame (magic + version + JSON), checked before parsing.
    max_tensors : int
        Largest number of tensor descriptors in one message.
    max_message_bytes : int
        Largest total of *decoded* (raw) tensor bytes in one message; this is
        what bounds the receiver's allocation.
    max_frame_bytes : int
        Largest *encoded* tensor or object frame.
    allow_pickle : bool
        Accept (and produce) the opt-in cloudpickled ``object`` frame.  Leave
        ``False`` unless the peer is trusted with code execution.
    max_object_bytes : int
        Largest object frame when ``allow_pickle`` is set.

    Raises
    ------
    ConfigError
        If a field has the wrong type or is out of range; the message names it.

    Examples
    --------
    >>> Limits(max_frame_bytes=2**20).socket_maxmsgsize()
    1114112
    """

    max_header_bytes: int = 64 * 1024  # DEFAULT_HEADER_BYTES; Limits.for_model sizes it
    max_tensors: int = 100_000
    max_message_bytes: int = 4 * 2**30
    max_frame_bytes: int = 4 * 2**30
    allow_pickle: bool = False
    max_object_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "allow_pickle":
                if not isinstance(value, bool):
                    raise ConfigError(f"Limits.allow_pickle must be True or False, got {value!r}")
                continue
            # bool is an int subclass; True as a byte limit is certainly a mistake
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(
                    f"Limits.{f.name} must be an int, got {type(value).__name__} {value!r}"
                )
            low = _MIN_HEADER_BYTES if f.name == "max_header_bytes" else 0
            if not low <= value <= _MAX_BOUND:
                raise ConfigError(f"Limits.{f.name} = {value} is out of range [{low}, 2**62]")

    def socket_maxmsgsize(self) -> int:
        """The ZMQ ``MAXMSGSIZE`` to set on sockets that carry these messages.

        Every frame a conforming sender produces fits: tensor and object frames
        are at most ``max_frame_bytes`` and the header at most
        ``max_header_bytes`` (covered by the 64 KiB slack unless it was raised
        above ``max_frame_bytes``).

        Returns
        -------
        int
            ``max(max_frame_bytes, max_header_bytes) + 64 KiB``.
        """
        return max(self.max_frame_bytes, self.max_header_bytes) + HEADER_SLACK

    def within_frame_bound(self, bound: int | None) -> Limits:
        """These limits, with frames no larger than ``bound`` (what a peer accepts).

        A frame above the receiver's MAXMSGSIZE is dropped without a word
        (docs/zeromq.md §13); a sender checking these limits streams a tensor
        that large instead.
        """
        if bound is None or bound >= self.max_frame_bytes:
            return self
        return dataclasses.replace(self, max_frame_bytes=bound)

    @classmethod
    def for_model(
        cls,
        state_dict: Mapping[str, Any],
        *,
        headroom: float = 2.0,
        stream_threshold: int | None = None,
        **overrides: Any,
    ) -> Limits:
        """Limits sized from the model the node exchanges, with ``headroom``.

        ``max_frame_bytes`` (and so the socket's MAXMSGSIZE) becomes
        ``headroom`` times the largest tensor, at least 1 MiB and at most
        ``stream_threshold``: a peer can then pin at most HWM x that much
        memory in a receive queue, and larger tensors travel in chunks
        (streams check every chunk against the same bound).
        ``max_message_bytes`` becomes ``2 * headroom`` times the whole model
        (room for optimizer state uploaded with it), at least 64 MiB.
        ``max_header_bytes`` becomes :func:`header_bound` of the model's
        names: a header listing every tensor with optimizer state always
        fits, whatever the tensor count, and a hostile header is still
        bounded by the model, not by a constant a user must raise.

        Parameters
        ----------
        state_dict : mapping
            Name -> tensor (anything with ``numel()`` and ``element_size()``).
        headroom : float
            Factor over the model's sizes; must be at least 1.
        stream_threshold : int, optional
            Upper bound of the frame limit (messages above it stream anyway).
        **overrides
            Other ``Limits`` fields, e.g. ``allow_pickle=True``.

        Examples
        --------
        >>> import torch
        >>> Limits.for_model({"w": torch.zeros(2**20)}).max_frame_bytes // 2**20
        8
        """
        if not isinstance(headroom, (int, float)) or not math.isfinite(headroom) or headroom < 1:
            raise ConfigError(f"headroom must be a number >= 1, got {headroom!r}")
        sizes = [int(t.numel()) * int(t.element_size()) for t in state_dict.values()]
        largest, total = max(sizes, default=0), sum(sizes)
        frame = max(math.ceil(headroom * largest), 2**20)
        if stream_threshold is not None:
            frame = max(min(frame, stream_threshold), 2**20)
        message = max(math.ceil(2 * headroom * total), 64 * 2**20)
        values: dict[str, Any] = {
            "max_frame_bytes": min(frame, _MAX_BOUND),
            "max_message_bytes": min(message, _MAX_BOUND),
            "max_header_bytes": header_bound(state_dict.keys()),
        }
        values.update(overrides)
        return cls(**values)


def header_bound(names: Iterable[Any]) -> int:
    """The largest header a node exchanging tensors called ``names`` needs.

    Room for :data:`FIELDS_PER_TENSOR` descriptors per tensor (each
    :data:`DESCRIPTOR_BYTES` plus its name, JSON-escaped) and for the names
    once more (a HELLO declaring a subset lists them), plus 64 KiB for the
    rest of the header and the meta.  Linear in the tensor count: about
    0.8 KB per tensor with 30-character names, four times what a descriptor
    takes (docs/protocol.md §3).
    """
    total = 0
    count = 0
    for name in names:
        escaped = len(json.dumps(str(name), ensure_ascii=False).encode("utf-8"))
        total += FIELDS_PER_TENSOR * (escaped + DESCRIPTOR_BYTES) + escaped + 1
        count += 1
    if not count:
        return DEFAULT_HEADER_BYTES
    return min(DEFAULT_HEADER_BYTES + total, _MAX_BOUND)


def announced_frame_bound(value: Any) -> int | None:
    """The frame bound a peer announced (HELLO/WELCOME meta), or None if none or nonsense.

    Bounds below 64 KiB are ignored: no conforming peer sets one (the
    header alone may take 64 KiB).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= HEADER_SLACK:
        return value
    return None


#: The limits used when none are given: 4 GiB messages, pickle disabled.
DEFAULT_LIMITS = Limits()
