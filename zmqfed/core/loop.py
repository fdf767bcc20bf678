"""The aggregator's step loop: one Poller over the group's ROUTER.

No sleeps and no busy waiting: the loop blocks in ``poll`` until a message
arrives, a hook asked to be woken (``Maintainer.wake_at``), the idle interval
passes (so zombie/period hooks run) or the step's deadline expires. Requests
the hooks refuse are parked on their pipe and looked at again whenever the
state changes — at the next message, the next step, or a version change.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch
import zmq

from zmqfed.core import steps
from zmqfed.errors import PeerTimeout, ProtocolError
from zmqfed.federated import DRAINED, AggregatorGroup, AggregatorPipe
from zmqfed.meta import Meta
from zmqfed.wire import EncodedTensors, encode_tensors

if TYPE_CHECKING:
    from zmqfed.core.maintainer import Maintainer

__all__ = ["AggregatorLoop"]

log = logging.getLogger(__name__)

#: Seconds a streamed download may go without progress before it is aborted.
STREAM_STALL = 30.0
#: Messages handled before the loop looks at its deadline and timers again.
DRAIN_BATCH = 512


class AggregatorLoop:
    """Runs ``Maintainer.step()`` on an aggregator."""

    def __init__(
        self, maintainer: Maintainer, group: AggregatorGroup, *, idle_interval: float
    ) -> None:
        self.m = maintainer
        self.group = group
        self.idle_interval = idle_interval
        self.stopped = False
        self._wake = math.inf
        self._data: dict[str, dict[str, torch.Tensor]] | None = None  # after package hooks
        self._whole: EncodedTensors | None = None  # snapshot, shared by every DATA reply
        self._streamed: EncodedTensors | None = None  # live views, sent in chunks
        self._deferred: list[AggregatorPipe] = []
        self.parked = 0  # requests answered with WAIT
        self.encodes = 0  # times the served model was encoded

    # -- cache of the served model ---------------------------------------
    def invalidate(self) -> None:
        """The served state changed: encode again on the next download request."""
        self._data = self._whole = self._streamed = None
        self.group.quiesce()  # no chunk of the old state may still be in flight

    def version_changed(self) -> None:
        self.group.version = max(self.m.version, 0)
        self.invalidate()

    def served_frames(self, pipe: AggregatorPipe) -> tuple[EncodedTensors, bool]:
        """The served model's frames, encoded once per state, and whether to stream them.

        Streamed when the model is above the stream threshold or a tensor is
        above what ``pipe``'s peer accepts in one frame (its HELLO said).
        """
        group = self.group
        if self._data is None:
            source = self.m.packaged_data or {n: {"param": p} for n, p in self.m.state_dict.items()}
            with torch.no_grad():
                self._data = self.m.apply_hooks(source, unpackage=False)
        if group.stream.should_stream(self._data, group.peer_limits(pipe)):
            if self._streamed is None:
                # Chunks are sent from the live tensors (no second copy of a huge
                # model); invalidate() and the end of run() wait until libzmq is
                # done with them, before anyone may change the tensors.
                self.encodes += 1
                self._streamed = encode_tensors(
                    self._data, codec="raw", limits=group.limits, streamed=True
                )
            return self._streamed, True
        if self._whole is None:
            # Snapshot: libzmq reads the buffers after send() returns, while
            # the user may already be averaging into the live tensors.
            self.encodes += 1
            self._whole = encode_tensors(
                self._data, codec=group.codec, limits=group.limits, snapshot=True
            )
        return self._whole, False

    def wake_at(self, when: float) -> None:
        self._wake = min(self._wake, when)

    # -- the loop -----------------------------------------------------------
    def run(self, timeout: float | None) -> bool:
        m = self.m
        self.stopped = False
        self.invalidate()
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        m.run_step_hooks(steps.at_new_episode)
        # pipes that changed while the last step finished its downloads
        for pipe in self._deferred:
            if pipe.online and pipe not in m.pipes:
                m.pipes.append(pipe)
        self._deferred.clear()
        self._cycle_parked()
        next_idle = time.monotonic() + self.idle_interval
        poller = zmq.Poller()
        poller.register(self.group.sock, zmq.POLLIN)
        poller.register(self.group.monitor, zmq.POLLIN)
        while not self.stopped:
            now = time.monotonic()
            until = min(deadline, next_idle, self._wake, self.group.next_probe)
            wait_ms = max(0, math.ceil((until - now) * 1000))
            events = dict(poller.poll(wait_ms))
            if self.group.monitor in events or time.monotonic() >= self.group.next_probe:
                for pipe in self.group.drain_monitor():
                    if pipe in m.pipes and not self.stopped:
                        self._cycle(pipe)  # offline: the destroy hooks run
            if self.group.sock in events:
                self._drain()
            now = time.monotonic()
            if not self.stopped and (now >= next_idle or now >= self._wake):
                self._wake = math.inf
                self.group.pump_all()
                for member in list(m.pipes):
                    if self.stopped:
                        break
                    assert isinstance(member, AggregatorPipe)
                    self._cycle(member)
                if not m.pipes:  # nobody joined yet: time-based policies still decide
                    m.pipe = None
                    m.run_step_hooks(steps.at_last)
                next_idle = time.monotonic() + self.idle_interval
            if not self.stopped and time.monotonic() >= deadline:
                self.group.quiesce()
                self._timed_out(timeout or 0.0)
        self._finish_downloads(poller, deadline)
        self.group.quiesce()
        return True

    def _finish_downloads(self, poller: zmq.Poller, deadline: float) -> None:
        """Let streamed downloads that were started finish before ``step()`` returns.

        Only credit is served here; requests that arrive meanwhile wait for the
        next step. A download that makes no progress for ``STREAM_STALL``
        seconds (or outlives the step's deadline) is aborted by ``quiesce``.
        """
        group = self.group
        progress, last = -1, time.monotonic()
        while group.sending():
            now = time.monotonic()
            sent = group.streamed_bytes()
            if sent != progress:
                progress, last = sent, now
            until = min(deadline, last + STREAM_STALL)
            if now >= until:
                log.warning("%s: a streamed download stalled; aborting it", self.m.nick_name)
                return
            events = dict(poller.poll(max(1, math.ceil(min(until - now, 0.5) * 1000))))
            if group.monitor in events:
                self._deferred.extend(group.drain_monitor())
            if group.sock in events:
                while (result := group.receive_nowait()) is not DRAINED:
                    if isinstance(result, AggregatorPipe):
                        self._deferred.append(result)
            group.pump_all()

    def _drain(self) -> None:
        """Handle waiting messages, at most ``DRAIN_BATCH``: a flood must not starve timers."""
        m = self.m
        for _ in range(DRAIN_BATCH):
            if self.stopped:
                return
            result = self.group.receive_nowait()
            if result is DRAINED:
                return
            if result is None:
                continue
            pipe: AggregatorPipe = result
            if pipe.online and pipe not in m.pipes:
                m.pipes.append(pipe)
            elif not pipe.online and pipe not in m.pipes:
                continue  # BYE from a peer that never joined this step's view
            self._cycle(pipe)
            if not self.stopped:
                self._cycle_parked(exclude=pipe)

    def _cycle_parked(self, exclude: AggregatorPipe | None = None) -> None:
        for pipe in list(self.m.pipes):
            if self.stopped:
                return
            if (
                pipe is not exclude
                and isinstance(pipe, AggregatorPipe)
                and pipe.pending is not None
            ):
                self._cycle(pipe)

    def _cycle(self, pipe: AggregatorPipe) -> None:
        """OpenFed's per-pipe sequence: at_first, the branch of the pipe's state, at_last."""
        m = self.m
        m.pipe = pipe
        m.run_step_hooks(steps.at_first)
        if pipe.is_offline:
            m.run_step_hooks(steps.before_destroy)
            if pipe in m.pipes:
                m.pipes.remove(pipe)
            m.run_step_hooks(steps.after_destroy, True)
        elif pipe.is_zombie:
            m.run_step_hooks(steps.at_zombie)
        elif pipe.is_pushing:
            if m.run_step_hooks(steps.before_download) is not False:
                flag = self._receive_upload(pipe)
                m.run_step_hooks(steps.after_download, flag)
            else:
                self._park(pipe)
                m.run_step_hooks(steps.at_failed)
        elif pipe.is_pulling:
            verdict = m.run_step_hooks(steps.before_upload)
            if verdict is None:  # no hook decided: serve versions we have reached
                verdict = _requested_version(pipe) <= m.version
            if verdict:
                flag = self._serve(pipe)
                m.run_step_hooks(steps.after_upload, flag)
            else:
                self._park(pipe)
                m.run_step_hooks(steps.at_failed)
        else:
            m.run_step_hooks(steps.at_invalid_state)
        m.run_step_hooks(steps.at_last)

    # -- branches -------------------------------------------------------------
    def discard(self, pipe: AggregatorPipe, reason: str) -> None:
        """Refuse ``pipe``'s pending request for good, telling the collaborator why."""
        if pipe.pending is None:
            return
        log.info(
            "%s: discarded %s from %s: %s",
            self.m.nick_name,
            pipe.pending.kind,
            pipe.nick_name,
            reason,
        )
        pipe.reply("ERROR", meta={"code": "discarded", "reason": reason})
        pipe.pending = None

    def _park(self, pipe: AggregatorPipe) -> None:
        if pipe.pending is not None and not pipe.told_to_wait:
            pipe.told_to_wait = True
            self.parked += 1
            self.group.send(
                pipe,
                "WAIT",
                seq=pipe.pending.seq if pipe.pending else 0,
                meta={"version": self.m.version},
            )

    def _receive_upload(self, pipe: AggregatorPipe) -> bool:
        m = self.m
        env = pipe.pending
        assert env is not None
        try:
            data = m.receive(env.tensors, pipe.nick_name)
        except ProtocolError as exc:
            log.warning("%s: refused an upload: %s", m.nick_name, exc)
            pipe.reply("ERROR", meta={"code": "bad-upload", "reason": str(exc)})
            pipe.pending = None
            return False
        m.data = data
        m.data_list.append({p: data[name] for name, p in m.state_dict.items()})
        m.meta_list.append(Meta(env.meta))
        pipe.remember_upload(pipe.session, env.seq)
        pipe.reply("ACK", meta={"version": m.version})
        pipe.pending = None
        log.debug(
            "%s: received upload %d from %s (%d bytes)",
            m.nick_name,
            env.seq,
            pipe.nick_name,
            env.nbytes,
        )
        return True

    def _serve(self, pipe: AggregatorPipe) -> bool:
        m = self.m
        meta = pipe.take_out_meta()
        if meta is None:
            meta = Meta(m.meta)
            meta["version"] = m.version
        encoded, streamed = self.served_frames(pipe)
        if streamed:
            ok = self.group.start_out_stream(
                pipe, "DATA", meta=meta.to_json_dict(), encoded=encoded
            )
        else:
            ok = pipe.reply("DATA", meta=meta.to_json_dict(), encoded=encoded)
        pipe.pending = None
        return ok

    def _timed_out(self, timeout: float) -> None:
        m = self.m
        online = sorted(p.nick_name for p in m.pipes)
        missing = sorted(set(m.fed_props.collaborators) - set(online))
        raise PeerTimeout(
            ", ".join(missing) or m.nick_name,
            timeout,
            f"let {m.nick_name} finish its step ({len(m.meta_list)} uploads received; "
            f"online: {online}; never joined or left: {missing})",
        )


def _requested_version(pipe: AggregatorPipe) -> int:
    version = pipe.meta.get("version", -1)
    return version if isinstance(version, int) and not isinstance(version, bool) else -1
