"""The aggregator's side of secure aggregation: phases, parking, unmasking.

Hooks on the aggregator's step (installed by ``secure_aggregation``) run
one round of the protocol per step. Each phase collects one exchange (or
the masked upload) from every client of the previous phase and parks the
requests until the phase closes: when every such client has answered or
disconnected (a member that has not joined yet is awaited), or ``timeout``
seconds after the phase opened. A phase that
closes with fewer clients than the threshold aborts the round
(:class:`SecAggAborted`); otherwise the aggregator removes the masks and
records exactly one upload: the clients' weighted mean, with their total
weight as ``meta[weight_key]``. docs/privacy.md has the message sequence.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from zmqfed.core import StepContext, step_points
from zmqfed.errors import ConfigError, ProtocolError, SecurityError, ZmqfedError
from zmqfed.functional.secagg import crypto
from zmqfed.functional.secagg.client import TOPIC, b64, round_context, unb64
from zmqfed.functional.secagg.ring import (
    Layout,
    SecAggConfig,
    decode_sum,
    from_wire,
    layout_of,
    neighbourhoods,
)
from zmqfed.meta import Meta
from zmqfed.wire import Kind

if TYPE_CHECKING:
    from zmqfed.core import Maintainer
    from zmqfed.federated import Pipe

__all__ = ["SecAggAborted", "SecAggServer"]

log = logging.getLogger(__name__)

KEYS, SHARES, MASKING, UNMASK, DONE = "keys", "shares", "masking", "unmask", "done"
_ORDER = (KEYS, SHARES, MASKING, UNMASK, DONE)
_BUNDLE_OVERHEAD = 12 + 16  # nonce and tag of crypto.seal


class SecAggAborted(ZmqfedError):
    """A secure-aggregation round could not finish: too few clients, or shares missing.

    Raised by the aggregator's ``step()``; no model was produced for the round.
    """


class _Round:
    """One round's state on the aggregator."""

    def __init__(self, version: int, expected: list[str]) -> None:
        self.version = version
        self.seed = os.urandom(16)
        self.context = round_context(self.seed, version)
        self.expected = set(expected)
        self.phase = KEYS
        self.deadline = math.inf
        self.publics: dict[str, str | None] = {}
        self.members: list[str] = []
        self.k = self.t = 0
        self.graph: dict[str, list[str]] = {}
        self.bundles: dict[str, dict[str, str]] = {}
        self.shared: list[str] = []  # U2: sent their shares
        self.layout: Layout | None = None
        self.total: Tensor | None = None
        self.masked: list[str] = []  # U3: uploaded
        self.metas: list[Meta] = []
        self.revealed: set[str] = set()
        self.b_shares: dict[str, dict[int, bytes]] = {}
        self.s_shares: dict[tuple[str, str], dict[int, bytes]] = {}

    def past(self, phase: str) -> bool:
        return _ORDER.index(self.phase) > _ORDER.index(phase)

    def x(self, name: str) -> int:
        return self.members.index(name) + 1


class SecAggServer:
    """The aggregator's hooks (installed by ``secure_aggregation``).

    Parameters
    ----------
    config:
        The protocol's parameters (the same as the collaborators').
    participants:
        ``participants(maintainer) -> names`` of the clients expected in a
        round (default: every collaborator of the group); a per-round sample
        goes here.
    """

    def __init__(
        self,
        config: SecAggConfig,
        participants: Callable[[Maintainer], list[str]] | None = None,
    ) -> None:
        self.config = config
        self.participants = participants or (lambda m: list(m.fed_props.collaborators))
        self.round: _Round | None = None
        #: ``'curve'`` (the nodes' CurveZMQ keys) or ``'ephemeral'`` (fresh keys each round).
        self.mode = "ephemeral"
        self._pending: tuple[str, Tensor] | None = None
        #: What the last finished round did: members, survivors, dropouts, seconds unmasking.
        self.last_round: dict[str, Any] = {}

    def install(self, m: Maintainer) -> None:
        """Register the hooks on the aggregator ``m``."""
        self.mode = "curve" if m.curve is not None else "ephemeral"
        m.on(step_points.step_started, self._start)
        m.on(step_points.exchange_requested, self._exchange)
        m.on(step_points.upload_received, self._upload_received, nice=60)
        m.on(step_points.upload_handled, self._upload_handled, nice=0)
        # first of the unpackage hooks: a masked upload is ring elements, not a model
        m.register_unpackage_hook(-(2**30), self._stand_in)
        m.on(step_points.after_peer, self._recheck, nice=0)
        m.on(step_points.peer_left, self._recheck, nice=0)

    # -- hooks -------------------------------------------------------------------
    def _start(self, ctx: StepContext) -> None:
        m = ctx.maintainer
        self.round = _Round(m.version + 1, self.participants(m))
        self._pending = None

    def _recheck(self, ctx: StepContext) -> None:
        """After each peer: close a phase whose deadline passed or whose straggler left."""
        rnd = self.round  # news is handled where it arrives
        if rnd is None or rnd.phase == DONE:
            return
        if ctx.point == step_points.peer_left or time.monotonic() >= rnd.deadline:
            self._advance(ctx.maintainer)

    def _exchange(self, ctx: StepContext) -> bool | None:
        m, pipe = ctx.maintainer, ctx.pipe
        if pipe is None or pipe.meta.get("topic") != TOPIC:
            return None
        rnd, name = self.round, pipe.nick_name
        try:
            version = _version(pipe)
            if rnd is None or rnd.phase == DONE or version != rnd.version:
                raise ProtocolError(f"no secure-aggregation round for version {version} is open")
            phase = pipe.meta.get("phase")
            record = {
                KEYS: self._keys,
                SHARES: self._shares,
                "unmask": self._unmask,
                "reveal": self._reveal,
            }
            if phase not in record:
                raise ProtocolError(f"unknown phase {str(phase)[:32]!r}")
            if record[phase](rnd, name, pipe.meta):
                self._advance(m)  # only news can close a phase; a parked request is no news
        except ProtocolError as exc:
            return self._refuse(m, f"secure aggregation: {exc}")
        return self._answer(m, rnd, pipe, str(phase))

    def _upload_received(self, ctx: StepContext) -> bool | None:
        m, pipe = ctx.maintainer, ctx.pipe
        if pipe is None or getattr(pipe, "request", None) is None:
            return None
        rnd, name = self.round, pipe.nick_name
        try:
            if rnd is None or rnd.phase != MASKING or name not in rnd.shared:
                raise ProtocolError(f"{name} has no place in this round's masked-input phase")
            if _version(pipe) != rnd.version:
                raise ProtocolError(f"upload for version {_version(pipe)}, round is {rnd.version}")
            tensors = pipe.request.tensors  # type: ignore[attr-defined]
            layout = _layout(tensors, pipe.meta.get("secagg_ints"))
            if rnd.layout is None:
                rnd.layout = layout
            elif layout != rnd.layout:
                raise ProtocolError("the masked upload's tensors differ from the other clients'")
            self._pending = (name, from_wire(tensors, layout, self.config))
        except ProtocolError as exc:
            return self._refuse(m, f"secure aggregation: {exc}")
        return None

    def _stand_in(self, state: dict[str, Tensor], p: Tensor) -> dict[str, Tensor]:
        """While a masked upload is received, stand the model's own tensors in for it.

        ``_upload_received`` took the masked vector and checked it against
        the round's layout (int32 ring elements and the weight field); the
        aggregator's check of an upload against the model would refuse that
        layout, and the entry it records is dropped at ``upload_handled``.
        """
        return {"param": p} if self._pending is not None else state

    def _upload_handled(self, ctx: StepContext) -> None:
        pending, self._pending = self._pending, None
        m, rnd = ctx.maintainer, self.round
        if not ctx.flag or pending is None or rnd is None or ctx.pipe is None:
            return
        name, vector = pending
        if name != ctx.pipe.nick_name:
            return
        m.data_list.pop()  # the masked upload is not an update: only the sum will be
        rnd.metas.append(m.meta_list.pop())
        ring = self.config.modulus_range - 1
        rnd.total = vector if rnd.total is None else rnd.total.add_(vector).bitwise_and_(ring)
        rnd.masked.append(name)
        self._advance(m)

    # -- recording ---------------------------------------------------------------
    def _keys(self, rnd: _Round, name: str, meta: Meta) -> bool:
        if rnd.phase != KEYS or name in rnd.publics:
            return False  # parked, or a resend: answered from the closed phase
        if name not in rnd.expected:
            raise ProtocolError(f"{name} is not a participant of this round")
        public = meta.get("public")
        if (public is None) != (self.mode == "curve"):
            raise ProtocolError("the key mode (CURVE or ephemeral) differs from the aggregator's")
        if public is not None:
            try:
                crypto.check_public(unb64(public, "the public key", crypto.KEY_BYTES))
            except SecurityError as exc:
                raise ProtocolError(f"not a usable X25519 public key ({exc})") from None
        if not rnd.publics:
            rnd.deadline = self._deadline()
        rnd.publics[name] = public
        return True

    def _shares(self, rnd: _Round, name: str, meta: Meta) -> bool:
        if rnd.phase == KEYS or name not in rnd.members:
            raise ProtocolError(f"{name} is not a member of this round")
        if rnd.phase != SHARES or name in rnd.bundles:
            return False  # parked, or a resend
        bundles = meta.get("bundles")
        if not isinstance(bundles, dict) or set(bundles) != set(rnd.graph[name]):
            raise ProtocolError("the share bundles must be addressed to exactly the neighbours")
        size = _BUNDLE_OVERHEAD + crypto.SHARE_BYTES * (1 + rnd.k)
        for v, text in bundles.items():
            unb64(text, f"the bundle for {v}", size)
        rnd.bundles[name] = dict(bundles)
        return True

    def _unmask(self, rnd: _Round, name: str, meta: Meta) -> bool:
        if name not in rnd.masked and (rnd.past(MASKING) or not rnd.past(SHARES)):
            raise ProtocolError(f"{name} uploaded no masked input in this round")
        return False  # nothing to record: parked until the masked inputs are in

    def _reveal(self, rnd: _Round, name: str, meta: Meta) -> bool:
        if rnd.phase != UNMASK or name not in rnd.masked:
            raise ProtocolError(f"{name} cannot reveal shares now")
        if name in rnd.revealed:
            return False
        survivors, x = set(rnd.masked), rnd.x(name)
        mine = set(rnd.graph[name]) & set(rnd.shared)
        b, s = meta.get("b"), meta.get("s")
        if not isinstance(b, dict) or not isinstance(s, dict):
            raise ProtocolError("a reveal holds 'b' and 's' maps")
        if not set(b) <= mine & survivors or not set(s) <= mine - survivors:
            raise ProtocolError("revealed shares of clients it was not asked about")
        b_got = {w: unb64(v, f"the share of {w}", crypto.SHARE_BYTES) for w, v in b.items()}
        s_got: dict[tuple[str, str], bytes] = {}
        for w, per_v in s.items():
            if not isinstance(per_v, dict) or not set(per_v) <= set(rnd.graph[w]) & survivors:
                raise ProtocolError(f"revealed seeds of {w} with clients that did not upload")
            for v, text in per_v.items():
                s_got[(w, v)] = unb64(text, f"the share of {w}-{v}", crypto.SHARE_BYTES)
        for w, share in b_got.items():
            rnd.b_shares.setdefault(w, {})[x] = share
        for pair, share in s_got.items():
            rnd.s_shares.setdefault(pair, {})[x] = share
        rnd.revealed.add(name)
        return True

    # -- answering ---------------------------------------------------------------
    def _answer(self, m: Maintainer, rnd: _Round, pipe: Pipe, phase: str) -> bool | None:
        name = pipe.nick_name
        if phase == KEYS:
            if not rnd.past(KEYS):
                return False
            if name not in rnd.members:
                return self._refuse(
                    m, "secure aggregation: the round's participants were fixed without you"
                )
            publics = {v: rnd.publics[v] for v in rnd.graph[name] if rnd.publics[v] is not None}
            pipe.set_meta(
                {
                    "round": b64(rnd.seed),
                    "members": rnd.members,
                    "neighbours": rnd.k,
                    "threshold": rnd.t,
                    "mode": self.mode,
                    "publics": publics,
                }
            )
            return True
        if phase == SHARES:
            if not rnd.past(SHARES):
                return False
            if name not in rnd.shared:
                return self._refuse(m, "secure aggregation: the share phase closed without you")
            incoming = {w: rnd.bundles[w][name] for w in rnd.graph[name] if w in rnd.bundles}
            pipe.set_meta({"bundles": incoming})
            return True
        if phase == "unmask":
            if not rnd.past(MASKING):
                return False
            if name not in rnd.masked:
                return self._refuse(
                    m, "secure aggregation: the masked-input phase closed without you"
                )
            pipe.set_meta(self.unmask_request(rnd))
            return True
        pipe.set_meta({})  # reveal: recorded
        return True

    def unmask_request(self, rnd: _Round) -> dict[str, Any]:
        """What every survivor is asked in the unmasking phase: who survived, who dropped."""
        return {
            "survivors": sorted(rnd.masked),
            "dropped": sorted(set(rnd.shared) - set(rnd.masked)),
        }

    def _refuse(self, m: Maintainer, reason: str) -> bool:
        log.warning("%s: %s", m.nick_name, reason)
        m.discard(reason)
        return False

    # -- phases ------------------------------------------------------------------
    def _deadline(self) -> float:
        timeout = self.config.timeout
        return math.inf if timeout is None else time.monotonic() + timeout

    def _advance(self, m: Maintainer) -> None:
        """Close every phase that is complete or past its deadline; abort below the threshold."""
        rnd = self.round
        if rnd is None:
            return
        pipes = {p.nick_name: p for p in m.all_pipes()}

        def waiting(names: Any, done: Any) -> bool:
            # A member that has not joined yet (a slow start) is awaited like a
            # connected one; only one that joined and left is a dropout.
            return any(
                n not in done and (not pipes[n].is_offline or pipes[n].last_seen is None)
                for n in names
                if n in pipes
            )

        while rnd.phase != DONE:
            now = time.monotonic()
            late = now >= rnd.deadline
            if rnd.phase == KEYS:
                if not rnd.publics or (waiting(rnd.expected, rnd.publics) and not late):
                    break
                self._close_keys(m, rnd)
            elif rnd.phase == SHARES:
                if waiting(rnd.members, rnd.bundles) and not late:
                    break
                rnd.shared = sorted(rnd.bundles)
                self._next(m, rnd, MASKING, len(rnd.shared), "sent their shares")
            elif rnd.phase == MASKING:
                if waiting(rnd.shared, rnd.masked) and not late:
                    break
                self._next(m, rnd, UNMASK, len(rnd.masked), "uploaded masked inputs")
            else:
                if waiting(rnd.masked, rnd.revealed) and not late:
                    break
                self._finish(m, rnd)
        if rnd.deadline < math.inf:
            m.wake_at(rnd.deadline)

    def _close_keys(self, m: Maintainer, rnd: _Round) -> None:
        rnd.members = sorted(rnd.publics)
        try:
            rnd.k, rnd.t = self.config.resolve(len(rnd.members))
        except ZmqfedError as exc:
            self._abort(m, rnd, f"{len(rnd.members)} clients advertised keys: {exc}")
        rnd.graph = neighbourhoods(rnd.seed, rnd.members, rnd.k)
        self._next(m, rnd, SHARES, len(rnd.members), "advertised keys")

    def _next(self, m: Maintainer, rnd: _Round, phase: str, count: int, what: str) -> None:
        if count < max(rnd.t, 2):
            self._abort(
                m, rnd, f"only {count} clients {what}, fewer than the threshold {max(rnd.t, 2)}"
            )
        log.debug("%s: secure aggregation: %d clients %s", m.nick_name, count, what)
        rnd.phase = phase
        rnd.deadline = self._deadline()
        m.wake_at(time.monotonic())  # serve the requests parked on the closed phase

    def _finish(self, m: Maintainer, rnd: _Round) -> None:
        tic = time.perf_counter()
        cfg = self.config
        assert rnd.total is not None and rnd.layout is not None
        total = rnd.total
        survivors = rnd.masked
        dropped = sorted(set(rnd.shared) - set(survivors))
        masks: list[tuple[bytes, int]] = []
        try:
            for v in survivors:  # the self masks: v added each
                masks.append((crypto.combine_shares(rnd.b_shares.get(v, {}), rnd.t), -1))
            for w in dropped:  # survivor v added mask(s_vw) if v < w, subtracted it otherwise
                for v in rnd.graph[w]:
                    if v in survivors:
                        seed = crypto.combine_shares(rnd.s_shares.get((w, v), {}), rnd.t)
                        masks.append((seed, -1 if v < w else 1))
        except SecurityError as exc:
            self._abort(m, rnd, f"cannot remove the masks: {exc}")
        crypto.add_masks(total, masks, cfg.bits)
        data, weight = decode_sum(total, rnd.layout, len(survivors), cfg, m.state_dict)
        meta = Meta(_mean_metrics(rnd.metas))
        meta[cfg.weight_key] = weight
        meta["secagg_clients"] = len(survivors)
        meta["secagg_dropped"] = dropped
        # one entry for the whole round: its sender names the survivors, not one member
        m.record_upload(data, meta, f"secure aggregation of {len(survivors)}")
        rnd.phase = DONE
        self.last_round = {
            "version": rnd.version,
            "members": rnd.members,
            "survivors": list(survivors),
            "dropped": dropped,
            "neighbours": rnd.k,
            "threshold": rnd.t,
            "unmask_seconds": time.perf_counter() - tic,
        }
        log.info(
            "%s: secure aggregation of %d clients (%d dropped) in round %d",
            m.nick_name,
            len(survivors),
            len(dropped),
            rnd.version,
        )
        m.manual_stop()

    def _abort(self, m: Maintainer, rnd: _Round, reason: str) -> None:
        message = f"secure aggregation of version {rnd.version} aborted: {reason}"
        current = m.pipe
        try:  # refuse every request still waiting, so no collaborator waits for nothing
            for pipe in m.all_pipes():
                request = getattr(pipe, "request", None)
                if request is not None and request.kind in (Kind.ASK, Kind.PUSH):
                    m.pipe = pipe  # Maintainer.discard acts on the current pipe
                    m.discard(message)
        finally:
            m.pipe = current
        self.round = None
        raise SecAggAborted(message)


def _version(pipe: Pipe) -> int:
    """The version a pending request was sent at (the collaborator's, after training)."""
    request = getattr(pipe, "request", None)
    return -1 if request is None else int(request.version)


def _layout(tensors: Any, ints: Any) -> Layout:
    """The layout of a masked upload: its tensors, less the weight, and which were integers."""
    if not isinstance(ints, list) or not all(
        isinstance(i, list) and len(i) == 2 and all(isinstance(s, str) for s in i) for i in ints
    ):
        raise ProtocolError("meta 'secagg_ints' must list [name, field] pairs")
    try:
        return layout_of(tensors, {(n, f) for n, f in ints})
    except ConfigError as exc:
        raise ProtocolError(f"a masked upload: {exc}") from None


def _mean_metrics(metas: list[Meta]) -> dict[str, Any]:
    """The plain mean of every number all clients reported (their weights are secret)."""
    out: dict[str, Any] = {}
    for key in metas[0] if metas else ():
        values = [meta.get(key) for meta in metas]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if key not in ("version", "secagg_ints") and len(numbers) == len(values):
            out[key] = sum(numbers) / len(numbers)
    if metas and "mode" in metas[0]:
        out["mode"] = metas[0]["mode"]
    return out
