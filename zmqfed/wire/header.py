"""The header frame: constants, the dtype allow-list, and strict validation.

Every check here runs on at most ``Limits.max_header_bytes`` of input and
allocates nothing proportional to what the header *claims*: sizes are compared
with the limits using Python integers (no overflow), the dtype goes through an
explicit table (never ``getattr(torch, name)``), and JSON is parsed with
duplicate keys, ``NaN`` and infinities refused.  A header that passes
guarantees ``prod(shape) * itemsize == rawbytes``, that ``sum(rawbytes)`` is
within ``max_message_bytes`` and every frame within ``max_frame_bytes``.
"""

from __future__ import annotations

import enum
import gc
import json
import math
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from zmqfed.errors import ProtocolError
from zmqfed.wire.codec import LZ4_MAX_BYTES, WIRE_CODECS
from zmqfed.wire.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "KINDS",
    "MAGIC",
    "MAX_NAME_CHARS",
    "MAX_RANK",
    "MAX_STREAM_ID_CHARS",
    "PROTOCOL_VERSION",
    "Kind",
    "frame_view",
    "header_only",
    "parse_header",
]

#: First bytes of every header frame.
MAGIC = b"ZMQFED"
#: The byte after ``MAGIC``; a peer with another value is refused with a clear error.
PROTOCOL_VERSION = 2


class Kind(str, enum.Enum):
    """Message kinds (docs/protocol.md §4); each equals its wire string (``Kind.PUSH == "PUSH"``)."""

    HELLO = "HELLO"  # collaborator -> aggregator: handshake, frame bound, session
    WELCOME = "WELCOME"  # the handshake's answer: incarnation, frame bound
    PULL = "PULL"  # collaborator asks for the model of a version
    DATA = "DATA"  # the model, answering a PULL
    PUSH = "PUSH"  # collaborator uploads its update
    ACK = "ACK"  # the upload was accepted
    WAIT = "WAIT"  # the request is parked until the aggregator can answer it
    ERROR = "ERROR"  # the request was refused (meta: code, reason)
    BYE = "BYE"  # leaving (meta ``final``: the federation is over)
    PING = "PING"  # liveness probe
    PONG = "PONG"
    CHUNK = "CHUNK"  # a part of a streamed PUSH or DATA
    CREDIT = "CREDIT"  # the receiver of a stream allows more bytes in flight
    SET = "SET"  # pipe channel: a key-value pair for the peer (either direction)
    TRANSFER = "TRANSFER"  # pipe channel: one ordered item of tensors and JSON (either direction)
    ASK = "ASK"  # collaborator -> aggregator: one more exchange, outside the model's PUSH/PULL
    REPLY = "REPLY"  # the answer to an ASK (meta and tensors set by the aggregator's hooks)

    def __str__(self) -> str:
        return self.value


#: Message kinds as sent on the wire.
KINDS = tuple(kind.value for kind in Kind)
#: Longest stream id in a streamed message's header (see :mod:`zmqfed.wire.stream`).
MAX_STREAM_ID_CHARS = 64
#: The dtype allow-list: wire name -> torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
#: torch dtype -> wire name.
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
#: Longest sender / incarnation string.
MAX_NAME_CHARS = 255
#: Highest tensor rank accepted.
MAX_RANK = 32

_PREFIX = MAGIC + bytes([PROTOCOL_VERSION])
_TOP_KEYS = ("kind", "sender", "version", "seq", "incarnation", "meta", "tensors", "object")
#: Optional top-level key of an announced (streamed) PUSH or DATA.
_STREAM_KEY = "stream"
#: Optional top-level key: ``[[alias, source], ...]`` of tied tensor names.
_TIED_KEY = "tied"
_DESC_KEYS = ("key", "field", "dtype", "shape", "codec", "nbytes", "rawbytes")
_DESC_KEY_SET = frozenset(_DESC_KEYS)
_MAX_INT = 2**63 - 1
# bounds prod(max(dim, 1)) * itemsize, so even an empty tensor's strides fit int64
_MAX_CAPACITY = 2**62


@dataclass(frozen=True)
class TensorDesc:
    """One validated tensor descriptor."""

    key: str
    field: str
    dtype: str
    shape: tuple[int, ...]
    codec: str
    nbytes: int
    rawbytes: int

    @property
    def name(self) -> str:
        """How error messages refer to the tensor."""
        return f"tensor {_short(self.key)}/{_short(self.field)}"


@dataclass(frozen=True)
class Header:
    """A validated header; ``doc`` is the JSON object as received."""

    kind: str
    sender: str
    version: int
    seq: int
    incarnation: str
    meta: dict[str, Any]
    tensors: list[TensorDesc]
    object_nbytes: int | None
    doc: dict[str, Any]
    #: ``(stream id, chunk bytes)`` when the tensors follow as CHUNK messages.
    stream: tuple[str, int] | None = None
    #: ``(alias, source)`` names: the alias arrives sharing the source's tensors.
    tied: tuple[tuple[str, str], ...] = ()


def _short(value: Any, width: int = 60) -> str:
    """repr() cut to ``width`` so hostile 60 KB names do not flood the logs."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def frame_view(frame: Any, index: int) -> memoryview:
    """A memoryview of a frame (uses ``.buffer`` of a pyzmq Frame) without copying."""
    inner = getattr(frame, "buffer", None)
    try:
        return memoryview(inner if inner is not None else frame)
    except TypeError:
        raise ProtocolError(f"frame {index} is a {type(frame).__name__}, not a buffer") from None


def _reject_constant(name: str) -> NoReturn:
    raise ProtocolError(f"header JSON contains {name}; only finite numbers are allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # '1e999' parses to inf without parse_constant
        raise ProtocolError(f"header JSON number {_short(text)} is not finite")
    return value


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # two parsers could disagree on which one wins: refuse
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ProtocolError(f"header JSON repeats the key {_short(k)}")
            seen.add(k)
    return obj


def _is_uint(value: Any, bound: int = _MAX_INT) -> bool:
    # JSON ints are exactly int; this also refuses True/False (an int subclass)
    return type(value) is int and 0 <= value <= bound


def _uint(value: Any, what: str, bound: int = _MAX_INT) -> int:
    if not _is_uint(value, bound):
        raise ProtocolError(f"{what} must be an int in [0, {bound}], got {_short(value)}")
    return value


def _exact_keys(
    obj: dict[str, Any], keys: tuple[str, ...], what: str, optional: tuple[str, ...] = ()
) -> None:
    for k in keys:
        if k not in obj:
            raise ProtocolError(f"{what} lacks the field {k!r}")
    for k in obj:
        if k not in keys and k not in optional:
            raise ProtocolError(f"{what} has an unknown field {_short(k)}")


def _parse_json(view: memoryview, limits: Limits) -> dict[str, Any]:
    n = view.nbytes
    if n > limits.max_header_bytes:  # before copying or parsing anything
        raise ProtocolError(
            f"header frame has {n} bytes, limit max_header_bytes={limits.max_header_bytes}"
        )
    raw = view.tobytes()
    if raw[: len(MAGIC)] != MAGIC[: min(n, len(MAGIC))]:
        raise ProtocolError(
            f"not a zmqfed message: header starts with {raw[: len(MAGIC)]!r}, expected {MAGIC!r}"
        )
    if n < len(_PREFIX):
        raise ProtocolError(f"header frame truncated: {n} bytes, need at least {len(_PREFIX)}")
    if raw[len(MAGIC)] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks protocol {raw[len(MAGIC)]}, this node speaks {PROTOCOL_VERSION}"
        )
    try:
        text = raw[len(_PREFIX) :].decode("utf-8")
        doc = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_pairs,
        )
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, digits
        raise ProtocolError(f"header is not valid UTF-8 JSON ({_short(str(exc), 120)})") from exc
    if not isinstance(doc, dict):
        raise ProtocolError(f"header JSON must be an object, got {type(doc).__name__}")
    return doc


def _parse_desc(i: int, d: Any, limits: Limits, *, streamed: bool = False) -> TensorDesc:
    # Runs once per tensor (thousands per message): error text is built only on failure.
    if not isinstance(d, dict):
        raise ProtocolError(f"tensor descriptor #{i} must be an object, got {type(d).__name__}")
    key, fld = d.get("key"), d.get("field")
    if not isinstance(key, str) or not isinstance(fld, str):
        raise ProtocolError(f"tensor descriptor #{i}: key and field must be strings")

    def name() -> str:
        return f"tensor {_short(key)}/{_short(fld)}"

    def fail(msg: str) -> NoReturn:
        raise ProtocolError(f"{name()}: {msg}")

    if d.keys() != _DESC_KEY_SET:
        _exact_keys(d, _DESC_KEYS, name())
    dtype_name = d["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        fail(f"dtype {_short(dtype_name)} is not one of {list(DTYPES)}")
    shape = d["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        fail(f"shape must be a list of at most {MAX_RANK} ints")
    itemsize = DTYPES[dtype_name].itemsize
    capacity = itemsize
    for s in shape:  # exact big-int arithmetic, stopped early: no overflow, no huge work
        if not _is_uint(s, _MAX_CAPACITY):
            fail(f"shape entry must be an int in [0, {_MAX_CAPACITY}], got {_short(s)}")
        capacity *= max(s, 1)
        if capacity > _MAX_CAPACITY:
            fail(f"shape {_short(shape)} is too large")
    codec = d["codec"]
    if codec not in WIRE_CODECS:
        fail(f"codec {_short(codec)} is not one of {list(WIRE_CODECS)}")
    nbytes, rawbytes = d["nbytes"], d["rawbytes"]
    for what, value in (("nbytes", nbytes), ("rawbytes", rawbytes)):
        if not _is_uint(value):
            fail(f"{what} must be an int in [0, {_MAX_INT}], got {_short(value)}")
    need = math.prod(shape) * itemsize
    if need != rawbytes:
        fail(f"shape {shape} {dtype_name} needs {need} bytes, header says {rawbytes}")
    if codec == "raw" and nbytes != rawbytes:
        fail(f"raw frame must have rawbytes={rawbytes} bytes, header says {nbytes}")
    if codec != "raw" and not (0 < rawbytes <= LZ4_MAX_BYTES and nbytes > 0):
        fail(f"{codec} frame cannot hold {rawbytes} bytes in {nbytes}")
    if streamed:
        if codec != "raw":
            fail(f"a streamed tensor must use the raw codec, not {_short(codec)}")
    elif nbytes > limits.max_frame_bytes:
        fail(f"frame of {nbytes} bytes exceeds max_frame_bytes={limits.max_frame_bytes}")
    return TensorDesc(key, fld, dtype_name, tuple(shape), codec, nbytes, rawbytes)


def _parse_object(obj: Any, limits: Limits) -> int | None:
    if obj is None:
        return None
    if not limits.allow_pickle:
        # refused on the header alone: the object frame is never looked at
        raise ProtocolError(
            "message carries a pickled object frame, but pickle is not enabled here "
            "(Limits.allow_pickle=False); refused without unpickling"
        )
    if not isinstance(obj, dict):
        raise ProtocolError(f"header 'object' must be null or an object, got {type(obj).__name__}")
    _exact_keys(obj, ("nbytes",), "header 'object'")
    bound = min(limits.max_object_bytes, limits.max_frame_bytes)
    return _uint(obj["nbytes"], "object nbytes", bound)


def parse_header(frame: Any, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Validate a header frame completely; raise ``ProtocolError`` naming the fault."""
    view = frame_view(frame, 0)
    if view.nbytes < _GC_PAUSE_BYTES or not gc.isenabled():
        return _parse_header(view, limits)
    # A header of thousands of descriptors makes hundreds of thousands of
    # objects; the cyclic GC would scan the process's live objects again and
    # again meanwhile (measured: about half the parse time). None of them can
    # form a cycle, so the collector waits until the header is parsed.
    gc.disable()
    try:
        return _parse_header(view, limits)
    finally:
        gc.enable()


#: Headers from this size on are parsed with the cyclic GC paused.
_GC_PAUSE_BYTES = 64 * 1024


def _parse_header(view: memoryview, limits: Limits) -> Header:
    doc = _parse_json(view, limits)
    _exact_keys(doc, _TOP_KEYS, "header", optional=(_STREAM_KEY, _TIED_KEY))
    stream = _parse_stream(doc[_STREAM_KEY], limits) if _STREAM_KEY in doc else None
    kind = doc["kind"]
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {_short(kind)}; expected one of {KINDS}")
    for name in ("sender", "incarnation"):
        value = doc[name]
        if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
            raise ProtocolError(f"header {name!r} must be a str of at most {MAX_NAME_CHARS} chars")
    version = _uint(doc["version"], "header 'version'")
    seq = _uint(doc["seq"], "header 'seq'")
    meta = doc["meta"]
    if not isinstance(meta, dict):
        raise ProtocolError(f"header 'meta' must be an object, got {type(meta).__name__}")
    descs = doc["tensors"]
    if not isinstance(descs, list):
        raise ProtocolError(f"header 'tensors' must be a list, got {type(descs).__name__}")
    if len(descs) > limits.max_tensors:
        raise ProtocolError(
            f"header lists {len(descs)} tensors, limit max_tensors={limits.max_tensors}"
        )
    object_nbytes = _parse_object(doc["object"], limits)
    if stream is not None:
        if kind not in ("PUSH", "DATA"):
            raise ProtocolError(f"only PUSH and DATA can be streamed, not {kind}")
        if object_nbytes is not None:
            raise ProtocolError("a streamed message cannot carry an object frame")
    tensors: list[TensorDesc] = []
    seen: set[tuple[str, str]] = set()
    total = 0
    for i, d in enumerate(descs):
        desc = _parse_desc(i, d, limits, streamed=stream is not None)
        if (desc.key, desc.field) in seen:
            raise ProtocolError(f"{desc.name} appears twice in the header")
        seen.add((desc.key, desc.field))
        total += desc.rawbytes
        if total > limits.max_message_bytes:
            raise ProtocolError(
                f"tensors up to {desc.name} hold {total} bytes, "
                f"limit max_message_bytes={limits.max_message_bytes}"
            )
        tensors.append(desc)
    tied = _parse_tied(doc[_TIED_KEY], tensors, limits) if _TIED_KEY in doc else ()
    return Header(
        kind,
        doc["sender"],
        version,
        seq,
        doc["incarnation"],
        meta,
        tensors,
        object_nbytes,
        doc,
        stream,
        tied,
    )


def _parse_tied(
    spec: Any, tensors: list[TensorDesc], limits: Limits
) -> tuple[tuple[str, str], ...]:
    """The ``tied`` pairs: each alias is new, each source a name the descriptors list."""
    if not isinstance(spec, list):
        raise ProtocolError(f"header 'tied' must be a list, got {type(spec).__name__}")
    if len(spec) + len(tensors) > limits.max_tensors:
        raise ProtocolError(
            f"header lists {len(tensors)} tensors and {len(spec)} tied names, "
            f"limit max_tensors={limits.max_tensors}"
        )
    keys = {d.key for d in tensors}
    aliases: set[str] = set()
    out: list[tuple[str, str]] = []
    for pair in spec:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(x, str) for x in pair)
        ):
            raise ProtocolError(f"header 'tied' entry {_short(pair)} must be [alias, source]")
        alias, source = pair
        if source not in keys:
            raise ProtocolError(
                f"tied name {_short(alias)} refers to {_short(source)}, which no descriptor lists"
            )
        if alias in keys or alias in aliases:
            raise ProtocolError(f"tied name {_short(alias)} is described twice")
        aliases.add(alias)
        out.append((alias, source))
    return tuple(out)


def _parse_stream(spec: Any, limits: Limits) -> tuple[str, int]:
    """``(id, chunk bytes)`` of a header's ``stream`` field."""
    if not isinstance(spec, dict):
        raise ProtocolError(f"header 'stream' must be an object, got {type(spec).__name__}")
    _exact_keys(spec, ("id", "chunk"), "header 'stream'")
    sid = spec["id"]
    if not isinstance(sid, str) or not 0 < len(sid) <= MAX_STREAM_ID_CHARS:
        raise ProtocolError(f"stream id must be a str of 1-{MAX_STREAM_ID_CHARS} chars")
    chunk = _uint(spec["chunk"], "stream chunk", limits.max_frame_bytes)
    if chunk == 0:
        raise ProtocolError("stream chunk must be positive")
    return sid, chunk


def header_only(frames_or_header: Any, *, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Validate and return a message's header without touching its data frames.

    Useful to route or refuse a message (kind, sender, version, sizes) before
    decoding its tensors.  Frame count and lengths are *not* checked here.

    Parameters
    ----------
    frames_or_header : list, tuple or buffer
        The message's frames (the first is used) or the header frame itself.
    limits : Limits
        As for :func:`zmqfed.wire.decode`.

    Returns
    -------
    dict
        The header's JSON object: kind, sender, version, seq, incarnation,
        meta, tensors (descriptor dicts) and object.

    Raises
    ------
    ProtocolError
        If the header is invalid, exactly as ``decode`` would report it.
    """
    try:
        if isinstance(frames_or_header, (list, tuple)):
            if not frames_or_header:
                raise ProtocolError("empty message: no header frame")
            frames_or_header = frames_or_header[0]
        return parse_header(frames_or_header, limits).doc
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed header ({type(exc).__name__}: {exc})") from exc
