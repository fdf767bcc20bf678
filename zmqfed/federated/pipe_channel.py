"""``PipeChannel``: the pipe-level channel of one pipe -- what arrived, and the message layout.

OpenFed's pipes had two ways to talk besides the Maintainer's rounds: a
key-value store (``direct_set`` / ``direct_get``) and a point-to-point
transfer of any object (``upload`` / ``download``). zmqfed carries both as
messages on the group's own sockets (docs/protocol.md §7):

* **SET** ``{key, value}``: the value the sender set under ``key``; the
  receiver keeps the last value per key.
* **TRANSFER** ``{value, paths[, meta]}`` plus one tensor frame per path:
  one item, kept in order in the receiver's inbox until downloaded.
  ``value`` is the item as JSON with ``null`` where a tensor goes and
  ``paths[i]`` names where tensor frame ``i`` goes, so a tensor, a dict of
  tensors, or any JSON-safe structure holding tensors travels without
  pickle. ``meta`` is the pipe meta the sender set (``Pipe.set_meta``).

Every message is acknowledged with ACK once it is kept; the sender sends it
again until then, so the receiver drops what it has already kept
(:meth:`PipeChannel.is_duplicate`). This module is pure: it builds and checks
the messages and keeps what arrived, within bounds; each transport's
:mod:`~zmqfed.federated.channel_ends` sends and waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.meta import Meta, check_json_safe
from zmqfed.wire import Envelope

__all__ = [
    "MAX_INBOX",
    "MAX_KEYS",
    "MAX_KEY_CHARS",
    "MAX_PATH",
    "Item",
    "PipeChannel",
    "pack",
    "parse_set",
    "set_meta",
    "unpack",
]

#: Longest key of ``direct_set``.
MAX_KEY_CHARS = 256
#: Keys one peer may set on one pipe; a SET with a new key beyond them is refused.
MAX_KEYS = 1024
#: Items an inbox holds before it stops acknowledging (the sender waits and retries).
MAX_INBOX = 64
#: Deepest nesting of an uploaded item (and longest path of a tensor in it).
MAX_PATH = 32
#: The field name of a TRANSFER's tensor frames.
_FIELD = "tensor"


@dataclass(frozen=True)
class Item:
    """One received upload: the value, the meta it came with, its tensor bytes."""

    value: Any
    meta: Meta | None
    nbytes: int


class PipeChannel:
    """What the peer sent on one pipe's channel; written only by the transport's end.

    Attributes
    ----------
    values : dict
        The last value the peer set under each key.
    inbox : deque of Item
        Uploads from the peer, oldest first, not downloaded yet.
    acked : int
        The highest sequence number of this end's channel messages the peer
        acknowledged (used where this end numbers them itself: the aggregator).
    """

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.inbox: deque[Item] = deque()
        self.inbox_bytes = 0
        self.acked = 0
        self._seq = 0
        self._last: tuple[str, int] | None = None

    def next_seq(self) -> int:
        """A fresh sequence number for this end's next channel message."""
        self._seq += 1
        return self._seq

    def acknowledged(self, seq: int) -> None:
        """The peer acknowledged channel message ``seq`` (and so every earlier one)."""
        self.acked = max(self.acked, seq)

    def is_duplicate(self, origin: str, seq: int) -> bool:
        """Whether message ``seq`` of the peer process ``origin`` was kept already.

        A sender has one channel message in flight and numbers its messages
        upwards, so one was kept if a later or equal number was; ``origin``
        (the collaborator's session, the aggregator's incarnation) starts the
        count again for a new process.
        """
        return self._last is not None and self._last[0] == origin and seq <= self._last[1]

    def kept(self, origin: str, seq: int) -> None:
        """Message ``seq`` of ``origin`` was kept: its repeats are duplicates."""
        self._last = (origin, seq)

    def keep_value(self, key: str, value: Any) -> None:
        """Keep the peer's ``value`` under ``key``; ``ProtocolError`` beyond ``MAX_KEYS`` keys."""
        if key not in self.values and len(self.values) >= MAX_KEYS:
            raise ProtocolError(f"the peer set {MAX_KEYS} keys already; {key[:64]!r} refused")
        self.values[key] = value

    def has_room(self, nbytes: int, budget: int) -> bool:
        """Whether an upload of ``nbytes`` fits the inbox (an empty inbox takes any one)."""
        if not self.inbox:
            return True
        return len(self.inbox) < MAX_INBOX and self.inbox_bytes + nbytes <= budget

    def keep_item(self, item: Item) -> None:
        """Append an upload to the inbox."""
        self.inbox.append(item)
        self.inbox_bytes += item.nbytes

    def take_item(self) -> Item:
        """The oldest upload, removed from the inbox."""
        item = self.inbox.popleft()
        self.inbox_bytes -= item.nbytes
        return item


# -- SET -----------------------------------------------------------------------------


def _key_problem(key: Any) -> str | None:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
        return f"a key must be a str of 1-{MAX_KEY_CHARS} characters, got {repr(key)[:80]}"
    return None


def set_meta(key: str, value: Any) -> dict[str, Any]:
    """The meta of a SET; ``ConfigError`` for a bad key or a value JSON cannot carry."""
    problem = _key_problem(key)
    if problem is not None:
        raise ConfigError(f"direct_set: {problem}")
    check_json_safe(value, f"direct_set({key!r}) value")
    return {"key": key, "value": value}


def parse_set(meta: Mapping[str, Any]) -> tuple[str, Any]:
    """``(key, value)`` of a received SET; ``ProtocolError`` naming the fault."""
    if set(meta) != {"key", "value"}:
        raise ProtocolError(f"a SET's meta has the fields key and value, not {sorted(meta)[:8]}")
    problem = _key_problem(meta["key"])
    if problem is not None:
        raise ProtocolError(f"SET: {problem}")
    return meta["key"], meta["value"]


# -- TRANSFER ------------------------------------------------------------------------


def pack(
    data: Any, *, allow_pickle: bool = False
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], Any]:
    """Lay out ``data`` for a TRANSFER: ``(meta, tensors, object)``.

    Tensors anywhere in dicts (str keys), lists and tuples go as tensor
    frames, everything else as JSON (tuples arrive as lists). Anything else
    is a ``ConfigError`` naming it, unless ``allow_pickle``: then ``data``
    goes whole as the message's pickled object.
    """
    tensors: list[torch.Tensor] = []
    paths: list[list[str | int]] = []

    def walk(x: Any, path: list[str | int]) -> Any:
        where = "upload data" + "".join(f"[{p!r}]" for p in path)
        if len(path) > MAX_PATH:
            raise ConfigError(f"{where}: nested deeper than {MAX_PATH} levels")
        if isinstance(x, torch.Tensor):
            paths.append(path)
            tensors.append(x)
            return None
        if isinstance(x, Mapping):
            out = {}
            for k, v in x.items():
                if not isinstance(k, str):
                    raise ConfigError(f"{where}: key {k!r} is not a str")
                out[k] = walk(v, [*path, k])
            return out
        if isinstance(x, (list, tuple)):
            return [walk(v, [*path, i]) for i, v in enumerate(x)]
        check_json_safe(x, where)
        item = getattr(x, "item", None)
        return item() if callable(item) else x  # numpy / torch scalars as numbers

    try:
        skeleton = walk(data, [])
    except ConfigError:
        if not allow_pickle:
            raise
        return {"value": None, "paths": []}, {}, data
    frames = {str(i): {_FIELD: t} for i, t in enumerate(tensors)}
    return {"value": skeleton, "paths": paths}, frames, None


def unpack(env: Envelope) -> Item:
    """The item a received TRANSFER carries; ``ProtocolError`` naming the fault.

    The tensors were decoded (and bounded) by the wire; this checks that the
    layout puts each of them into an empty slot of the JSON value exactly once.
    """
    meta = env.meta
    if not {"value", "paths"} <= set(meta) <= {"value", "paths", "meta"}:
        raise ProtocolError(
            f"a TRANSFER's meta has the fields value, paths and meta, not {sorted(meta)[:8]}"
        )
    paths = meta["paths"]
    if not isinstance(paths, list):
        raise ProtocolError("TRANSFER paths must be a list")
    want = {str(i) for i in range(len(paths))}
    if set(env.tensors) != want or any(set(f) != {_FIELD} for f in env.tensors.values()):
        raise ProtocolError(
            f"a TRANSFER with {len(paths)} paths needs the tensor frames 0..{len(paths) - 1} "
            f"of field {_FIELD!r}"
        )
    item_meta = meta.get("meta")
    if item_meta is not None and not isinstance(item_meta, dict):
        raise ProtocolError("TRANSFER meta must be an object")
    if env.obj is not None:  # only decoded at all where pickle is allowed
        if paths or meta["value"] is not None:
            raise ProtocolError("a TRANSFER with an object carries nothing else")
        return Item(env.obj, _meta(item_meta), 0)
    value = meta["value"]
    for i, path in enumerate(paths):
        value = _place(value, path, env.tensors[str(i)][_FIELD], i)
    return Item(value, _meta(item_meta), env.nbytes)


def _meta(meta: dict[str, Any] | None) -> Meta | None:
    return None if meta is None else Meta(meta)


def _place(root: Any, path: Any, tensor: torch.Tensor, i: int) -> Any:
    """``root`` with ``tensor`` in the empty slot ``path`` names."""
    if not isinstance(path, list) or len(path) > MAX_PATH:
        raise ProtocolError(f"TRANSFER path {i} must be a list of at most {MAX_PATH} steps")
    if not path:
        if root is not None:
            raise ProtocolError(f"TRANSFER path {i} names the value, which is not empty")
        return tensor
    node = root
    for depth, step in enumerate(path):
        in_dict = isinstance(node, dict) and isinstance(step, str) and step in node
        in_list = isinstance(node, list) and type(step) is int and 0 <= step < len(node)
        if not (in_dict or in_list):
            raise ProtocolError(f"TRANSFER path {i} leads nowhere at step {depth}")
        slot = node[step]
        if depth == len(path) - 1:
            if slot is not None:
                raise ProtocolError(f"TRANSFER path {i} names a slot that is not empty")
            node[step] = tensor
        node = slot
    return root
