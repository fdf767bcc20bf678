"""The collaborator's side of secure aggregation: an upload wrapper that runs the protocol.

Around each upload (``Maintainer.register_upload_wrapper``), over four
exchanges and the PUSH itself (docs/privacy.md has the message sequence):

1. ``keys``: advertise an ephemeral X25519 public key (none when the nodes
   run CURVE: their long-term keys are used); the answer names the round's
   participants, the round seed and the neighbours' keys.
2. ``shares``: Shamir-share the self-mask seed and the pairwise mask seeds
   among the neighbours, each bundle sealed for its recipient; the answer
   brings the bundles addressed to this client.
3. the PUSH: the update in the ring, plus the self mask and the pairwise
   masks of the neighbours that shared (they cancel in the sum).
4. ``unmask`` / ``reveal``: learn who survived and who dropped; reveal the
   self-mask shares of survivors and the pairwise-seed shares of dropouts --
   never both for the same client (:class:`~zmqfed.errors.SecurityError`).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import threading
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from zmqfed.errors import ProtocolError, SecurityError
from zmqfed.functional.secagg import crypto
from zmqfed.functional.secagg.ring import (
    SecAggConfig,
    check_weight,
    encode_update,
    layout_of,
    neighbourhoods,
    to_wire,
)

if TYPE_CHECKING:
    from zmqfed.core import Maintainer
    from zmqfed.core.contracts import SendUpload
    from zmqfed.wire import Envelope

__all__ = ["TOPIC", "SecAggClient", "b64", "pair_context", "round_context", "unb64"]

#: The exchange topic of every secure-aggregation message.
TOPIC = "secagg"
#: Encoding and masking are CPU-bound: collaborators simulated in one process
#: (threads) take turns, one per core, so their buffers do not pile up in memory.
_MASKING = threading.BoundedSemaphore(os.cpu_count() or 1)


def b64(data: bytes) -> str:
    """Bytes as base64 text, for meta."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str, size: int | None = None) -> bytes:
    """Base64 text from a peer as bytes; ``ProtocolError`` naming ``what`` if it is not."""
    if not isinstance(text, str) or len(text) > 65536:
        raise ProtocolError(f"{what} must be base64 text")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{what} is not valid base64") from None
    if size is not None and len(data) != size:
        raise ProtocolError(f"{what} has {len(data)} bytes, expected {size}")
    return data


def round_context(seed: bytes, version: int) -> bytes:
    """What binds keys and ciphertexts to one round of one federation."""
    return b"zmqfed-secagg/1|" + seed + b"|" + version.to_bytes(8, "big")


def pair_context(context: bytes, a: str, b: str) -> bytes:
    """The round context of the pair {a, b}: the same from both ends."""
    low, high = sorted((a, b))
    return context + b"|" + low.encode() + b"|" + high.encode()


def _names(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{what} must be a list of names")
    return list(value)


class _ClientRound:
    """What one client knows during one round."""

    def __init__(self, me: str, version: int) -> None:
        self.me = me
        self.version = version
        self.members: list[str] = []
        self.k = self.t = 0
        self.context = b""
        self.graph: dict[str, list[str]] = {}
        self.enc: dict[str, bytes] = {}  # neighbour -> key sealing the bundles between us
        self.seeds: dict[str, bytes] = {}  # neighbour -> pairwise mask seed
        self.self_seed = os.urandom(crypto.KEY_BYTES)
        #: neighbour w -> (share of w's self-mask seed, {v: share of w's seed with v})
        self.held: dict[str, tuple[bytes, dict[str, bytes]]] = {}

    @property
    def neighbours(self) -> list[str]:
        return self.graph[self.me]


class SecAggClient:
    """The upload wrapper of one collaborator (registered by ``secure_aggregation``)."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self._generator = torch.Generator().manual_seed(secrets.randbits(63))
        #: What the last round did: participants, neighbours, survivors, dropouts.
        self.last_round: dict[str, Any] = {}

    def __call__(
        self,
        m: Maintainer,
        tensors: dict[str, dict[str, Tensor]],
        meta: dict[str, Any],
        send: SendUpload,
    ) -> Envelope:
        cfg = self.config
        weight = float(meta.get(cfg.weight_key, 1.0))
        layout = layout_of(tensors)  # what cannot be encoded fails before any exchange
        check_weight(weight, cfg)
        rnd = _ClientRound(m.nick_name, m.version)
        self._keys(m, rnd)
        self._shares(m, rnd)
        # the masked upload: only neighbours whose bundle arrived mask with this client
        masks = [(rnd.self_seed, 1)]
        masks += [(rnd.seeds[w], 1 if rnd.me < w else -1) for w in sorted(rnd.held)]
        with _MASKING:
            vector = encode_update(tensors, weight, cfg, self._generator)
            crypto.add_masks(vector, masks, cfg.bits)
            wire = to_wire(vector, layout, cfg)
        del vector
        out_meta = {key: value for key, value in meta.items() if key != cfg.weight_key}
        out_meta["secagg_ints"] = [[n, f] for n, f, _, is_float in layout if not is_float]
        ack = send(wire, out_meta)
        del wire
        self._unmask(m, rnd)
        return ack

    def _keys(self, m: Maintainer, rnd: _ClientRound) -> None:
        """Phase 1: learn the members, the round seed and the neighbours' keys; agree on secrets."""
        cfg, me, curve = self.config, rnd.me, m.curve
        if curve is not None:
            own = crypto.curve_key_pair(curve.key_pair(me)[1])
        else:
            own = crypto.KeyPair.generate()
        public = None if curve is not None else b64(own.public)
        reply = m.exchange(TOPIC, {"phase": "keys", "public": public}).meta
        seed = unb64(reply.get("round"), "the round seed", 16)
        rnd.members = _names(reply.get("members"), "the members")
        if me not in rnd.members or len(set(rnd.members)) != len(rnd.members):
            raise SecurityError(f"the round's members are malformed or lack {me}")
        rnd.k, rnd.t = cfg.resolve(len(rnd.members))
        if reply.get("neighbours") != rnd.k or reply.get("threshold") != rnd.t:
            raise SecurityError(
                f"the aggregator announced k={reply.get('neighbours')}, "
                f"t={reply.get('threshold')}; this client's configuration gives "
                f"k={rnd.k}, t={rnd.t} for {len(rnd.members)} clients"
            )
        mode = "curve" if curve is not None else "ephemeral"
        if reply.get("mode") != mode:
            raise SecurityError(
                f"the aggregator runs {reply.get('mode')!r} keys, this client {mode!r}"
            )
        rnd.context = round_context(seed, rnd.version)
        rnd.graph = neighbourhoods(seed, rnd.members, rnd.k)
        if curve is not None:  # long-term keys from the keys directory: nothing to relay
            keys = {v: crypto.curve_public_key(curve.public_key(v)) for v in rnd.neighbours}
        else:
            publics = reply.get("publics")
            if not isinstance(publics, dict) or set(publics) != set(rnd.neighbours):
                raise SecurityError("the aggregator sent keys of other clients than the neighbours")
            keys = {v: unb64(publics[v], f"{v}'s key", crypto.KEY_BYTES) for v in rnd.neighbours}
        for v in rnd.neighbours:
            secret, pair = crypto.agree(own, keys[v]), pair_context(rnd.context, me, v)
            rnd.enc[v] = crypto.derive(secret, "enc", pair)
            rnd.seeds[v] = crypto.derive(secret, "mask", pair)

    def _shares(self, m: Maintainer, rnd: _ClientRound) -> None:
        """Phase 2: deal t-of-k shares of the self-mask seed and of every pairwise seed."""
        me, mine = rnd.me, rnd.neighbours
        xs = [rnd.members.index(v) + 1 for v in mine]
        columns = [crypto.split_secret(rnd.self_seed, xs, rnd.t)]
        columns += [crypto.split_secret(rnd.seeds[w], xs, rnd.t) for w in mine]
        bundles = {}
        for i, v in enumerate(mine):
            plain = b"".join(column[i] for column in columns)
            bundles[v] = b64(crypto.seal(rnd.enc[v], plain, rnd.context + f"|{me}>{v}".encode()))
        reply = m.exchange(TOPIC, {"phase": "shares", "bundles": bundles}).meta
        incoming = reply.get("bundles")
        if not isinstance(incoming, dict) or not set(incoming) <= set(mine):
            raise SecurityError(
                "the aggregator forwarded bundles of clients that are no neighbours"
            )
        size = crypto.SHARE_BYTES
        for w, text in incoming.items():
            associated = rnd.context + f"|{w}>{me}".encode()
            plain = crypto.unseal(rnd.enc[w], unb64(text, f"{w}'s bundle"), associated)
            theirs = rnd.graph[w]
            if len(plain) != size * (1 + len(theirs)):
                raise SecurityError(f"{w}'s bundle has the wrong size")
            cut = [plain[i : i + size] for i in range(0, len(plain), size)]
            rnd.held[w] = (cut[0], dict(zip(theirs, cut[1:], strict=True)))

    def _unmask(self, m: Maintainer, rnd: _ClientRound) -> None:
        """Phase 4: learn who survived; reveal one kind of share per neighbour, never both."""
        reply = m.exchange(TOPIC, {"phase": "unmask"}).meta
        survivors = set(_names(reply.get("survivors"), "the survivors"))
        dropped = set(_names(reply.get("dropped"), "the dropouts"))
        self.check_unmask_request(rnd.me, survivors, dropped, set(rnd.members), rnd.t)
        held = rnd.held
        reveal_b = {w: b64(held[w][0]) for w in sorted(survivors & set(held))}
        reveal_s = {
            w: {v: b64(share) for v, share in held[w][1].items() if v in survivors}
            for w in sorted(dropped & set(held))
        }
        m.exchange(TOPIC, {"phase": "reveal", "b": reveal_b, "s": reveal_s})
        self.last_round = {
            "members": rnd.members,
            "neighbours": rnd.neighbours,
            "shared": sorted(held),
            "survivors": sorted(survivors),
            "dropped": sorted(dropped),
        }

    @staticmethod
    def check_unmask_request(
        me: str, survivors: set[str], dropped: set[str], members: set[str], t: int
    ) -> None:
        """Refuse an unmasking request that could unmask a client (``SecurityError``).

        Asking for a client's self-mask share (it survived) *and* its pairwise
        seeds (it dropped) would let the aggregator remove every mask of
        that client's update; so would calling this client a dropout after
        it uploaded, or going on with fewer than ``t`` survivors.
        """
        both = survivors & dropped
        if both:
            raise SecurityError(
                f"the aggregator asked for both the self-mask and the pairwise-mask shares of "
                f"{sorted(both)}: refused, that would unmask their updates"
            )
        if me not in survivors:
            raise SecurityError(f"the aggregator calls {me} a dropout after it uploaded: refused")
        if not (survivors | dropped) <= members:
            raise SecurityError("the aggregator named clients that are not in the round")
        if len(survivors) < t:
            raise SecurityError(
                f"only {len(survivors)} survivors, fewer than the threshold {t}: refused"
            )
