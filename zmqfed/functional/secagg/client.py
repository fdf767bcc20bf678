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
        cfg, me = self.config, m.nick_name
        weight = float(meta.get(cfg.weight_key, 1.0))
        layout = layout_of(tensors)  # what cannot be encoded fails before any exchange
        check_weight(weight, cfg)

        # 1. keys: who takes part, the round seed, the neighbours' keys.
        curve = m.curve
        own = (
            crypto.curve_key_pair(curve.key_pair(me)[1])
            if curve is not None
            else crypto.KeyPair.generate()
        )
        reply = m.exchange(
            TOPIC, {"phase": "keys", "public": None if curve else b64(own.public)}
        ).meta
        seed = unb64(reply.get("round"), "the round seed", 16)
        members = _names(reply.get("members"), "the members")
        if me not in members or len(set(members)) != len(members):
            raise SecurityError(f"the round's members are malformed or lack {me}: {members[:8]}")
        k, t = cfg.resolve(len(members))
        if reply.get("neighbours") != k or reply.get("threshold") != t:
            raise SecurityError(
                f"the aggregator announced k={reply.get('neighbours')}, t={reply.get('threshold')}; "
                f"this client's configuration gives k={k}, t={t} for {len(members)} clients"
            )
        mode = "curve" if curve is not None else "ephemeral"
        if reply.get("mode") != mode:
            raise SecurityError(
                f"the aggregator runs {reply.get('mode')!r} keys, this client {mode!r}"
            )
        context = round_context(seed, m.version)
        graph = neighbourhoods(seed, members, k)
        mine = graph[me]
        publics = reply.get("publics")
        if curve is not None:
            keys = {v: crypto.curve_public_key(curve.public_key(v)) for v in mine}
        else:
            if not isinstance(publics, dict) or set(publics) != set(mine):
                raise SecurityError("the aggregator sent keys of other clients than the neighbours")
            keys = {v: unb64(publics[v], f"{v}'s public key", crypto.KEY_BYTES) for v in mine}
        secret = {v: crypto.agree(own, keys[v]) for v in mine}
        enc = {v: crypto.derive(secret[v], "enc", pair_context(context, me, v)) for v in mine}
        seeds = {v: crypto.derive(secret[v], "mask", pair_context(context, me, v)) for v in mine}

        # 2. shares: the self-mask seed and every pairwise seed, t-of-k among the neighbours.
        self_seed = os.urandom(crypto.KEY_BYTES)
        xs = [members.index(v) + 1 for v in mine]
        columns = [crypto.split_secret(self_seed, xs, t)]
        columns += [crypto.split_secret(seeds[w], xs, t) for w in mine]
        bundles = {
            v: b64(
                crypto.seal(
                    enc[v], b"".join(col[i] for col in columns), context + f"|{me}>{v}".encode()
                )
            )
            for i, v in enumerate(mine)
        }
        reply = m.exchange(TOPIC, {"phase": "shares", "bundles": bundles}).meta
        incoming = reply.get("bundles")
        if not isinstance(incoming, dict) or not set(incoming) <= set(mine):
            raise SecurityError(
                "the aggregator forwarded bundles from clients that are no neighbours"
            )
        held: dict[
            str, tuple[bytes, dict[str, bytes]]
        ] = {}  # w -> (share of b_w, {v: share of s_wv})
        for w, text in incoming.items():
            plain = crypto.unseal(
                enc[w], unb64(text, f"{w}'s bundle"), context + f"|{w}>{me}".encode()
            )
            theirs = graph[w]
            if len(plain) != crypto.SHARE_BYTES * (1 + len(theirs)):
                raise SecurityError(f"{w}'s bundle has the wrong size")
            cut = [
                plain[i : i + crypto.SHARE_BYTES] for i in range(0, len(plain), crypto.SHARE_BYTES)
            ]
            held[w] = (cut[0], dict(zip(theirs, cut[1:], strict=True)))

        # 3. the masked upload: only neighbours whose bundle arrived mask with this client.
        masks = [(self_seed, 1)] + [(seeds[w], 1 if me < w else -1) for w in sorted(held)]
        with _MASKING:
            vector = encode_update(tensors, weight, cfg, self._generator)
            crypto.add_masks(vector, masks, cfg.bits)
            wire = to_wire(vector, layout, cfg)
        del vector
        out_meta = {key: value for key, value in meta.items() if key != cfg.weight_key}
        out_meta["secagg_ints"] = [[n, f] for n, f, _, is_float in layout if not is_float]
        ack = send(wire, out_meta)
        del wire

        # 4. unmasking: reveal one kind of share per neighbour, never both.
        reply = m.exchange(TOPIC, {"phase": "unmask"}).meta
        survivors = set(_names(reply.get("survivors"), "the survivors"))
        dropped = set(_names(reply.get("dropped"), "the dropouts"))
        self.check_unmask_request(me, survivors, dropped, set(members), t)
        reveal_b = {w: b64(held[w][0]) for w in sorted(survivors & set(held))}
        reveal_s = {
            w: {v: b64(share) for v, share in held[w][1].items() if v in survivors}
            for w in sorted(dropped & set(held))
        }
        m.exchange(TOPIC, {"phase": "reveal", "b": reveal_b, "s": reveal_s})
        self.last_round = {
            "members": members,
            "neighbours": mine,
            "shared": sorted(held),
            "survivors": sorted(survivors),
            "dropped": sorted(dropped),
        }
        return ack

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
