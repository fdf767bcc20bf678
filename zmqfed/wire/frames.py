"""``Envelope`` and its multipart frame layout: ``encode`` and ``decode``.

One message is ``[header, tensor frame ..., (object frame)]``:

- the header is ``MAGIC`` + one protocol-version byte + a UTF-8 JSON object
  ``{kind, sender, version, seq, incarnation, meta, tensors, object}`` where
  ``tensors`` lists one descriptor ``{key, field, dtype, shape, codec, nbytes,
  rawbytes}`` per tensor frame (the "metadata + tensor table" split of torch
  rpc), and ``object`` is ``null`` or ``{nbytes}``;
- one frame per tensor, zero-copy for the ``raw`` codec in both directions;
- an optional cloudpickled object frame, produced and accepted only when
  ``Limits.allow_pickle`` is set (docs/zeromq.md §21).

The version byte comes right after the magic so that a peer speaking another
protocol fails with a clear error instead of a JSON puzzle.  ``decode`` checks
the whole header and every frame length against ``Limits`` before it
allocates anything (see :mod:`zmqfed.wire.header`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import torch

from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.meta import check_json_safe
from zmqfed.wire.codec import CODECS, Buffer, decode_tensor
from zmqfed.wire.header import (
    DTYPES,
    KINDS,
    MAGIC,
    MAX_NAME_CHARS,
    PROTOCOL_VERSION,
    Header,
    TensorDesc,
    frame_view,
    header_only,
    parse_header,
)
from zmqfed.wire.limits import DEFAULT_LIMITS, Limits
from zmqfed.wire.tensors import EncodedTensors, apply_tied, encode_tensors

__all__ = [
    "DTYPES",
    "KINDS",
    "MAGIC",
    "PROTOCOL_VERSION",
    "Envelope",
    "StreamAnnounce",
    "decode",
    "encode",
    "header_only",
]

_MAX_INT = 2**63 - 1  # version/seq must fit an int64 on any peer


@dataclass(frozen=True)
class StreamAnnounce:
    """A received PUSH/DATA whose tensors follow as CHUNK messages (``zmqfed.wire.stream``).

    Attributes
    ----------
    id : str
        The stream id that CHUNK and CREDIT messages name.
    chunk : int
        Largest payload per CHUNK (already checked against ``max_frame_bytes``).
    tensors : tuple of TensorDesc
        The validated descriptors (raw codec; total within ``max_message_bytes``).
    tied : tuple of (str, str)
        ``(alias, source)`` names that arrive sharing tensors.
    """

    id: str
    chunk: int
    tensors: tuple[TensorDesc, ...]
    tied: tuple[tuple[str, str], ...] = ()

    @property
    def nbytes(self) -> int:
        """Total raw bytes the stream will carry."""
        return sum(d.rawbytes for d in self.tensors)


@dataclass(eq=False)
class Envelope:
    """One protocol message: routing fields, JSON-safe meta, tensors, object.

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.
    sender : str
        The sender's node name (at most 255 characters).
    version : int
        Model version / round the message refers to.
    seq : int
        Per-sender sequence number (idempotent retries).
    incarnation : str
        The aggregator's incarnation id (random per process start).
    meta : dict
        JSON-safe values only (``zmqfed.meta.check_json_safe``); tuples come
        back as lists, numpy/torch scalars as Python numbers.
    tensors : dict
        ``state-dict name -> field name ('param', 'exp_avg', ...) -> tensor``.
    obj : object
        An opt-in object sent with cloudpickle; needs ``allow_pickle`` on both
        ends.  ``None`` means no object frame.
    stream : StreamAnnounce, optional
        Set by ``decode`` on an announced (streamed) message, whose
        ``tensors`` are empty until its chunks arrived.

    Notes
    -----
    Equality is identity (``eq=False``): comparing tensors element-wise is
    never what ``==`` on a message should mean.
    """

    kind: str
    sender: str
    version: int = 0
    seq: int = 0
    incarnation: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    obj: Any = None
    stream: StreamAnnounce | None = None

    @property
    def nbytes(self) -> int:
        """Total raw (decoded) bytes of all tensors (tied ones once)."""
        unique = {id(t): t for fields in self.tensors.values() for t in fields.values()}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def __repr__(self) -> str:
        n = sum(len(fields) for fields in self.tensors.values())
        return (
            f"Envelope(kind={self.kind!r}, sender={self.sender!r}, version={self.version}, "
            f"seq={self.seq}, incarnation={self.incarnation!r}, meta={self.meta!r}, "
            f"tensors={n} ({self.nbytes} B), obj={'yes' if self.obj is not None else 'no'})"
        )


def _check_envelope(env: Envelope) -> None:
    """Raise ``ConfigError`` for a field the receiver would refuse."""
    if env.kind not in KINDS:
        raise ConfigError(f"kind {env.kind!r} is not one of {KINDS}")
    for name in ("sender", "incarnation"):
        value = getattr(env, name)
        if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
            raise ConfigError(f"{name} must be a str of at most {MAX_NAME_CHARS} characters")
    for name in ("version", "seq"):
        value = getattr(env, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
            raise ConfigError(f"{name} must be an int in [0, 2**63), got {value!r}")
    if not isinstance(env.meta, dict):
        raise ConfigError(f"meta must be a dict, got {type(env.meta).__name__}")
    if not isinstance(env.tensors, dict):
        raise ConfigError(f"tensors must be a dict, got {type(env.tensors).__name__}")


def _json_scalar(value: Any) -> Any:
    """``json.dumps`` fallback for numpy/torch scalars that check_json_safe accepted."""
    return value.item()


def _pickle_obj(obj: Any, limits: Limits) -> bytes:
    if not limits.allow_pickle:
        raise ProtocolError(
            "pickle is disabled: Envelope.obj needs Limits(allow_pickle=True) on both ends "
            "(only for peers trusted with code execution)"
        )
    try:
        data: bytes = cloudpickle.dumps(obj)
    except Exception as exc:  # pickling user objects can fail in many ways
        raise ConfigError(f"obj cannot be pickled: {exc}") from exc
    bound = min(limits.max_object_bytes, limits.max_frame_bytes)
    if len(data) > bound:
        raise ProtocolError(
            f"object frame of {len(data)} bytes exceeds max_object_bytes/max_frame_bytes={bound}"
        )
    return data


def encode(
    env: Envelope,
    *,
    codec: str = "raw",
    limits: Limits = DEFAULT_LIMITS,
    snapshot: bool = False,
    encoded: EncodedTensors | None = None,
    stream: tuple[str, int] | None = None,
) -> list[Buffer]:
    """Encode a message as a list of frames for ``send_multipart``.

    Parameters
    ----------
    env : Envelope
        The message.
    codec : str
        One of :data:`zmqfed.wire.CODECS`, applied to every tensor.
    limits : Limits
        Checked here so that a message the receiver would refuse fails loudly
        at the sender (MAXMSGSIZE would silently drop it).
    snapshot : bool
        Copy ``raw`` tensor bytes that alias the caller's tensors, so the
        caller may mutate them while libzmq is still sending.  Without it,
        do not touch the tensors until the send completed (docs/zeromq.md §14).
    encoded : EncodedTensors, optional
        Frames made earlier by :func:`encode_tensors`, sent instead of
        ``env.tensors`` (which must then be empty).  Lets one encoding of a
        model serve many replies; ``codec`` and ``snapshot`` do not apply.
    stream : (str, int), optional
        ``(stream id, chunk bytes)``: announce the tensors instead of sending
        them; the result is the header alone and the caller streams the raw
        ``encoded`` buffers as CHUNK messages (:mod:`zmqfed.wire.stream`).

    Returns
    -------
    list
        ``[header, tensor buffer ..., (object bytes)]``.  Raw buffers are uint8
        numpy views of the tensors' memory.  The list may be sent to many
        peers: it holds buffers, not iterators.

    Raises
    ------
    ConfigError
        Unknown kind or codec, a tensor dtype outside the allow-list, a bad
        field type, or meta that is not JSON-safe.
    ProtocolError
        A limit is exceeded, or ``obj`` is set while pickle is disabled.
    """
    if not isinstance(env, Envelope):
        raise ConfigError(f"encode() needs an Envelope, got {type(env).__name__}")
    if not isinstance(limits, Limits):
        raise ConfigError(f"limits must be a Limits, got {type(limits).__name__}")
    if codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r}; expected one of {CODECS}")
    _check_envelope(env)
    try:
        check_json_safe(env.meta, "meta")
    except RecursionError as exc:
        raise ConfigError("meta is nested too deeply") from exc
    # pickling fails cheaper than compressing every tensor: do it first
    obj_frame = _pickle_obj(env.obj, limits) if env.obj is not None else None
    if encoded is None:
        encoded = encode_tensors(env.tensors, codec=codec, limits=limits, snapshot=snapshot)
    else:
        if not isinstance(encoded, EncodedTensors):
            raise ConfigError(
                f"encoded must come from encode_tensors(), got {type(encoded).__name__}"
            )
        if env.tensors:
            raise ConfigError("give either env.tensors or encoded=, not both")
        encoded.check(limits, streamed=stream is not None)  # maybe made under other limits
    if stream is not None:
        if env.kind not in ("PUSH", "DATA") or obj_frame is not None:
            raise ConfigError("only PUSH and DATA without an object can be streamed")
        if any(d["codec"] != "raw" for d in encoded.descriptors):
            raise ConfigError("streamed tensors must be encoded with the raw codec")
        if not 0 < stream[1] <= limits.max_frame_bytes:
            raise ProtocolError(
                f"stream chunk of {stream[1]} bytes exceeds max_frame_bytes={limits.max_frame_bytes}"
            )

    doc = {
        "kind": env.kind,
        "sender": env.sender,
        "version": env.version,
        "seq": env.seq,
        "incarnation": env.incarnation,
        "meta": env.meta,
        "tensors": list(encoded.descriptors),
        "object": None if obj_frame is None else {"nbytes": len(obj_frame)},
    }
    if stream is not None:
        doc["stream"] = {"id": stream[0], "chunk": stream[1]}
    if encoded.tied:
        doc["tied"] = [list(pair) for pair in encoded.tied]
    try:
        text = json.dumps(
            doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_scalar
        )
        header = MAGIC + bytes([PROTOCOL_VERSION]) + text.encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:  # incl. lone surrogates
        raise ConfigError(f"header cannot be encoded as UTF-8 JSON: {exc}") from exc
    if len(header) > limits.max_header_bytes:
        raise ProtocolError(
            f"header of {len(header)} bytes exceeds max_header_bytes={limits.max_header_bytes} "
            f"({len(encoded.descriptors)} tensors); raise Limits.max_header_bytes on both ends, "
            "or send fewer tensors per message or less meta"
        )
    if stream is not None:
        return [header]
    frames: list[Buffer] = [header, *encoded.buffers]
    if obj_frame is not None:
        frames.append(obj_frame)
    return frames


def decode(frames: Sequence[Any], *, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Decode and validate a received message.

    Parameters
    ----------
    frames : sequence
        The frames after any routing id: ``bytes``, ``bytearray``,
        ``memoryview`` or objects with a ``.buffer`` (pyzmq ``Frame``).
    limits : Limits
        Bounds checked before anything is allocated.

    Returns
    -------
    Envelope
        Raw tensors from writable frames (pyzmq ``Frame``, bytearray) share
        memory with them; read-only frames (``bytes``) are copied once.

    Raises
    ------
    ProtocolError
        For every malformed, oversized or refused message, naming the field
        or tensor; no other exception escapes for any frame content.
    ConfigError
        If ``limits`` is not a ``Limits``.
    """
    if not isinstance(limits, Limits):
        raise ConfigError(f"limits must be a Limits, got {type(limits).__name__}")
    try:
        return _decode(frames, limits)
    except ProtocolError:
        raise
    except Exception as exc:  # a bug or a resource error must not kill the serving loop
        raise ProtocolError(f"malformed message ({type(exc).__name__}: {exc})") from exc


def _decode(frames: Sequence[Any], limits: Limits) -> Envelope:
    if isinstance(frames, (bytes, bytearray, memoryview, str)) or not isinstance(frames, Sequence):
        raise ProtocolError(f"decode() needs a sequence of frames, got {type(frames).__name__}")
    if not frames:
        raise ProtocolError("empty message: no header frame")
    head = parse_header(frames[0], limits)
    if head.stream is not None:
        if len(frames) != 1:
            raise ProtocolError(
                f"a streamed {head.kind} is one header frame, this message has {len(frames)}"
            )
        announce = StreamAnnounce(head.stream[0], head.stream[1], tuple(head.tensors), head.tied)
        return _envelope(head, stream=announce)
    n_tensors = len(head.tensors)
    expected = 1 + n_tensors + (head.object_nbytes is not None)
    if len(frames) != expected:
        extra = " + 1 object" if head.object_nbytes is not None else ""
        raise ProtocolError(
            f"message has {len(frames)} frames, header describes {expected} "
            f"(1 header + {n_tensors} tensors{extra})"
        )
    views = [frame_view(f, i) for i, f in enumerate(frames[1:], start=1)]
    for desc, view in zip(head.tensors, views[:n_tensors], strict=True):
        if view.nbytes != desc.nbytes:
            raise ProtocolError(
                f"{desc.name}: frame has {view.nbytes} bytes, header says {desc.nbytes}"
            )
    if head.object_nbytes is not None and views[-1].nbytes != head.object_nbytes:
        raise ProtocolError(
            f"object frame has {views[-1].nbytes} bytes, header says {head.object_nbytes}"
        )

    # Everything is validated; only now allocate (bounded by max_message_bytes).
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for desc, view in zip(head.tensors, views[:n_tensors], strict=True):
        t = decode_tensor(
            view,
            dtype=DTYPES[desc.dtype],
            shape=desc.shape,
            codec=desc.codec,
            raw_nbytes=desc.rawbytes,
            name=desc.name,
        )
        tensors.setdefault(desc.key, {})[desc.field] = t
    apply_tied(tensors, head.tied)
    obj = None
    if head.object_nbytes is not None:
        # parse_header refused the object frame unless allow_pickle is set
        try:
            obj = cloudpickle.loads(views[-1])
        except Exception as exc:
            raise ProtocolError(f"object frame cannot be unpickled ({exc})") from exc
    return _envelope(head, tensors=tensors, obj=obj)


def _envelope(head: Header, **content: Any) -> Envelope:
    """The Envelope of a validated header, with its decoded ``content``."""
    return Envelope(
        kind=head.kind,
        sender=head.sender,
        version=head.version,
        seq=head.seq,
        incarnation=head.incarnation,
        meta=head.meta,
        **content,
    )
