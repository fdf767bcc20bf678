"""The protocol both ends speak: kinds, error codes, envelopes, handshake, chunk I/O.

Everything here is shared by the aggregator's and the collaborator's
transport, so each rule of the protocol is written once:

* :class:`Kind` and :class:`ErrorCode` -- what a message is, why a request
  was refused;
* :func:`stamp` -- the one function that builds an outgoing envelope
  (sender, incarnation, version, seq);
* :func:`hello_meta`, :func:`hello_problem`, :func:`welcome_meta` and
  :func:`peer_frame_bound` -- the handshake and the frame bound each side announces (a frame above the
  receiver's MAXMSGSIZE would be dropped without a word, docs/zeromq.md §13);
* :func:`meta_version` -- the version a message's meta names;
* :data:`CHANNEL_KINDS` -- the pipe channel's messages, which are no requests
  (their layout: :mod:`zmqfed.federated.pipe_channel`);
* :func:`recv_message`, :func:`land_chunk`, :func:`discard_rest` and
  :func:`pump` -- chunked streams on a port: a CHUNK's payload lands in
  its tensors with ``recv_into``, and chunks go out while credit lasts.

The message flow itself is described in ``docs/architecture.md``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from zmqfed.errors import ProtocolError
from zmqfed.federated.ports import Frame, Port, Tracker
from zmqfed.wire import PROTOCOL_VERSION, Envelope, Kind, Limits
from zmqfed.wire.header import Header, parse_header
from zmqfed.wire.limits import announced_frame_bound
from zmqfed.wire.stream import CHUNK_PREFIX, parse_chunk_meta

if TYPE_CHECKING:
    from zmqfed.federated.chunked import InStream, OutStream
    from zmqfed.props import FederatedProperties

__all__ = [
    "CHANNEL_KINDS",
    "CONNECTION_ERRORS",
    "CONTRIBUTED",
    "MAX_REASON_CHARS",
    "REHELLO_ERRORS",
    "SUBSET_KEY",
    "ErrorCode",
    "Kind",
    "declared_subset",
    "discard_rest",
    "error_meta",
    "hello_meta",
    "hello_problem",
    "land_chunk",
    "meta_version",
    "parse_chunk",
    "peer_frame_bound",
    "pump",
    "recv_message",
    "stamp",
    "welcome_meta",
]


class ErrorCode(str, enum.Enum):
    """Why an aggregator refused a message (ERROR ``meta['code']``)."""

    PROTOCOL = "protocol"  # malformed, or another protocol version
    UNKNOWN_PEER = "unknown-peer"  # the routing id is not a member of the group
    IDENTITY = "identity"  # routing id, sender and CURVE key disagree
    FINGERPRINT = "fingerprint"  # the peer's topology describes another group
    HELLO_FIRST = "hello-first"  # a request before the handshake
    STALE_INCARNATION = "stale-incarnation"  # addressed to an earlier aggregator process
    UNEXPECTED = "unexpected"  # a kind an aggregator does not accept
    BAD_UPLOAD = "bad-upload"  # the upload does not fit the model
    ALREADY_COUNTED = "already-counted"  # another process of this member contributed already
    NAME_IN_USE = "name-in-use"  # two live processes say HELLO with one node's name
    OVER_CAPACITY = "over-capacity"  # the aggregator holds as many peers as it can
    DISCARDED = "discarded"  # a step hook refused the request for good
    STREAM = "stream"  # a chunk broke the stream's rules
    STREAM_ABORTED = "stream-aborted"  # the served model changed while it streamed
    CHANNEL = "channel"  # a pipe-channel message (SET, TRANSFER) broke its layout or bounds
    SUBSET = "subset"  # a HELLO declares tensors the aggregator's model does not have

    def __str__(self) -> str:
        return self.value


#: DATA meta key: the member already has an upload counted for this version.
CONTRIBUTED = "contributed"
#: Errors about the connection itself, sent with seq 0 when the request could
#: not be read: they answer whatever request is pending.
CONNECTION_ERRORS = frozenset({ErrorCode.IDENTITY, ErrorCode.UNKNOWN_PEER, ErrorCode.PROTOCOL})
#: Errors after which a collaborator says HELLO again and sends its request again.
REHELLO_ERRORS = frozenset({ErrorCode.HELLO_FIRST, ErrorCode.STALE_INCARNATION})
#: Messages of the pipe-level channel (``Pipe.direct_set``, ``Pipe.upload``): either end
#: sends them, the other keeps them for the user and answers ACK; they are no requests.
CHANNEL_KINDS = frozenset({Kind.SET, Kind.TRANSFER})


def stamp(
    kind: Kind,
    sender: str,
    *,
    seq: int,
    incarnation: str = "",
    version: int = 0,
    meta: Mapping[str, Any] | None = None,
    tensors: dict[str, Any] | None = None,
) -> Envelope:
    """The envelope of an outgoing message: every header field in one place."""
    return Envelope(
        kind=kind.value,
        sender=sender,
        version=max(version, 0),
        seq=seq,
        incarnation=incarnation,
        meta=dict(meta) if meta is not None else {},
        tensors=tensors or {},
    )


#: Characters of an ERROR's reason: it may quote what the peer sent (tensor names).
MAX_REASON_CHARS = 500


def error_meta(code: ErrorCode, reason: str) -> dict[str, Any]:
    """The meta of an ERROR message (a long reason is cut to ``MAX_REASON_CHARS``)."""
    if len(reason) > MAX_REASON_CHARS:
        reason = f"{reason[:MAX_REASON_CHARS]}... ({len(reason)} characters)"
    return {"code": code.value, "reason": reason}


def hello_meta(
    *,
    fingerprint: str,
    session: str,
    aggregator: str,
    endpoint: str,
    limits: Limits,
    tensors: Collection[str] | None = None,
) -> dict[str, Any]:
    """What a collaborator announces in HELLO: who it is and the largest frame it accepts.

    ``tensors`` declares the subset of the model it exchanges (a partial
    collaborator: trainable tensors, LoRA adapters); None means all of it.
    """
    meta: dict[str, Any] = {
        "protocol": PROTOCOL_VERSION,
        "fingerprint": fingerprint,
        "session": session,
        "aggregator": aggregator,
        "endpoint": endpoint,
        "max_frame_bytes": limits.max_frame_bytes,
    }
    if tensors is not None:
        meta[SUBSET_KEY] = list(tensors)
    return meta


#: HELLO meta key: the tensor names a partial collaborator exchanges.
SUBSET_KEY = "tensors"


def declared_subset(
    meta: Mapping[str, Any], known: Collection[str] | None
) -> frozenset[str] | tuple[ErrorCode, str] | None:
    """The subset a HELLO declares: names (all ``known``), None (the whole model), or why not.

    A declaration must be a non-empty list of distinct names of the
    aggregator's model; anything else is refused (``subset``), so a
    collaborator never trains on a model the aggregator does not hold.
    """
    if SUBSET_KEY not in meta:
        return None
    names = meta[SUBSET_KEY]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return ErrorCode.SUBSET, "the declared tensors must be a non-empty list of names"
    subset = frozenset(names)
    if len(subset) != len(names):
        return ErrorCode.SUBSET, "the declared tensors name a tensor twice"
    if known is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            return (
                ErrorCode.SUBSET,
                f"{len(unknown)} declared tensors are not in the aggregator's model, "
                f"e.g. {[u[:64] for u in unknown[:3]]}",
            )
    return subset


def hello_problem(
    meta: Mapping[str, Any], props: FederatedProperties, *, authenticated: bool = False
) -> tuple[ErrorCode, str] | None:
    """Why the aggregator of ``props`` refuses a HELLO with ``meta`` (None: it does not).

    The reason names the aggregator's endpoint and members only to an
    ``authenticated`` peer (CURVE): anyone else who guessed one member name
    would learn the roster from it (docs/security.md).
    """
    protocol = meta.get("protocol")
    if protocol != PROTOCOL_VERSION:
        return (
            ErrorCode.PROTOCOL,
            f"peer speaks protocol {protocol!r}, {props.nick_name} speaks {PROTOCOL_VERSION}",
        )
    fingerprint = meta.get("fingerprint")
    if fingerprint != props.fingerprint:
        reason = f"group fingerprint {fingerprint!r} differs from {props.nick_name}'s: "
        if authenticated:
            reason += (
                f"the aggregator's topology has endpoint {props.address.endpoint} and "
                f"collaborators {list(props.collaborators)}"
            )
        else:
            reason += "the two nodes read different topologies (zmqfed-topo compile shows each)"
        return ErrorCode.FINGERPRINT, reason
    return None


def welcome_meta(*, incarnation: str, limits: Limits, joined: bool = False) -> dict[str, Any]:
    """What an aggregator answers in WELCOME: its incarnation, largest frame, and
    whether this HELLO (re)joined the peer (anything it had pending was dropped)."""
    return {"incarnation": incarnation, "max_frame_bytes": limits.max_frame_bytes, "joined": joined}


def peer_frame_bound(meta: Mapping[str, Any]) -> int | None:
    """The frame bound a HELLO or WELCOME announced (None: none, or nonsense)."""
    return announced_frame_bound(meta.get("max_frame_bytes"))


def meta_version(meta: Mapping[str, Any]) -> int:
    """The version a message's meta names (what a PULL asks for, what a PUSH answers).

    -1 when it names none, or something that is not an int.
    """
    version = meta.get("version", -1)
    if isinstance(version, int) and not isinstance(version, bool):
        return version
    return -1


# -- chunked streams on a port --------------------------------------------------


def recv_message(port: Port, land: Callable[[list[Frame]], bool]) -> list[Frame] | None:
    """Receive one waiting message (:class:`~zmqfed.federated.ports.WouldBlock` if none).

    For a CHUNK (``[routing id,] header, payload``), ``land(frames so far)``
    is asked first; when it returns True it consumed the rest of the message
    (normally with ``recv_into``) and None is returned.  Otherwise every
    frame is returned.  A CHUNK is recognised by its header's first bytes,
    before any Python object is made of its payload.
    """
    frames = [port.recv_frame()]
    if port.routed and frames[-1].more:
        frames.append(port.recv_frame())
    header = frames[-1]
    if (
        header.more
        and len(header.buffer) > len(CHUNK_PREFIX)
        and header.buffer[: len(CHUNK_PREFIX)] == CHUNK_PREFIX
        and land(frames)
    ):
        return None
    while frames[-1].more:
        frames.append(port.recv_frame())
    return frames


def parse_chunk(frame: Frame, limits: Limits) -> tuple[Header, str, int, int] | None:
    """``(header, stream id, offset, nbytes)`` of a well-formed CHUNK header, else None.

    None leaves the message to the ordinary path, which refuses it.
    """
    try:
        head = parse_header(frame, limits)
        sid, offset, nbytes = parse_chunk_meta(head.meta)
    except ProtocolError:
        return None
    if head.tensors:  # a CHUNK's payload is one raw frame, described by its meta
        return None
    return head, sid, offset, nbytes


def land_chunk(port: Port, stream: InStream, offset: int, nbytes: int) -> None:
    """Receive a CHUNK's payload frame into ``stream``; ``ProtocolError`` if it is not exactly that.

    The rest of the message is always consumed, also on error.
    """
    try:
        target = stream.target(offset, nbytes)
    except ProtocolError:
        discard_rest(port)
        raise
    got = port.recv_into(target)
    extra = discard_rest(port)  # a CHUNK has exactly one payload
    if got != nbytes or extra:
        raise ProtocolError(
            f"stream {stream.id}: chunk payload of {got} bytes in {1 + extra} frames, "
            f"header says {nbytes} bytes in 1"
        )
    stream.landed(offset, nbytes)


def discard_rest(port: Port) -> int:
    """Receive and drop the remaining frames of the current message; returns how many."""
    n = 0
    while port.has_more():
        port.recv_into(memoryview(bytearray()))
        n += 1
    return n


def pump(port: Port, stream: OutStream, route: list[bytes] | None = None) -> int:
    """Send ``stream``'s chunks on ``port`` while its credit lasts; returns how many.

    ``route`` is the routing id frame a ROUTER port needs.  Stops at the
    high-water mark; raises :class:`~zmqfed.federated.ports.Unreachable`
    when the peer is gone.
    """
    prefix = route or []

    def send(frames: list[Any]) -> Tracker | None:
        return port.send([*prefix, *frames], track=True)

    return stream.pump(send)
