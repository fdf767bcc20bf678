"""``zmqfed.wire``: the versioned, strict multipart message format.

Pure: imports neither ``zmq`` nor the socket layer.  ``encode(env)`` returns a
list of frames for ``send_multipart(copy=False)``; ``decode(frames)`` turns a
``recv_multipart(copy=False)`` result back into an :class:`Envelope`, checking
every length and count against :class:`Limits` before allocating, and raising
only :class:`zmqfed.errors.ProtocolError` for anything a peer can send.
"""

from __future__ import annotations

from zmqfed.wire.codec import CODECS, decode_tensor, encode_tensor
from zmqfed.wire.frames import Envelope, StreamAnnounce, decode, encode
from zmqfed.wire.header import KINDS, MAGIC, PROTOCOL_VERSION, Kind, header_only
from zmqfed.wire.limits import DEFAULT_LIMITS, Limits
from zmqfed.wire.stream import DEFAULT_STREAM, ChunkLayout, StreamConfig
from zmqfed.wire.tensors import EncodedTensors, encode_tensors

__all__ = [
    "CODECS",
    "DEFAULT_LIMITS",
    "DEFAULT_STREAM",
    "KINDS",
    "MAGIC",
    "PROTOCOL_VERSION",
    "ChunkLayout",
    "EncodedTensors",
    "Envelope",
    "Kind",
    "Limits",
    "StreamAnnounce",
    "StreamConfig",
    "decode",
    "decode_tensor",
    "encode",
    "encode_tensor",
    "encode_tensors",
    "header_only",
]
