"""``FedBuff``: asynchronous aggregation with a buffer (Nguyen et al., AISTATS 2022).

Collaborators train without waiting for each other: each downloads the
newest model, trains, uploads, and asks for the next version
(:func:`zmqfed.api.run_collaborator`, unchanged).  The aggregator takes
updates whenever they come and makes a server step every ``buffer`` counted
updates, so the slowest collaborator never holds a round.

Versions
    The server's version counts its steps.  An upload trained on the model
    of version ``b`` is tagged ``b + 1`` (as in synchronous rounds); its
    *staleness* is ``s = version - b`` when it arrives.  Updates staler than
    ``max_staleness`` are refused (``discarded``); the others count with
    weight ``instances * staleness_weight(s)``, by default ``1 / sqrt(1 + s)``.
Deltas
    An upload carries the collaborator's trained parameters; its update is
    their difference from the model of version ``b``, which the aggregator
    keeps for the last ``max_staleness + 1`` versions (so memory is
    ``max_staleness + 2`` models, whatever the number of collaborators).  The
    server step adds ``sum(w_i * delta_i) / sum(instances_i)`` to the model
    through the server optimizer (its pseudo-gradient is minus that).
Exactly once
    The transport counts at most one update per member per version (docs/
    reliability.md, "Exactly once"): a retried upload is acknowledged and
    not counted, and a fast member cannot fill the buffer alone -- after its
    update it waits (parked, no polling) for the next version.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from zmqfed.api import finish_aggregation, keep_record
from zmqfed.core import Maintainer, StepContext, step_points
from zmqfed.errors import ConfigError
from zmqfed.federated.protocol import meta_version
from zmqfed.functional.agg_common import optim_as_list
from zmqfed.isolation import update_is_finite

__all__ = ["FedBuff", "ServerStep", "inverse_sqrt_staleness"]

log = logging.getLogger(__name__)


def inverse_sqrt_staleness(staleness: int) -> float:
    """FedBuff's default staleness weight, ``1 / sqrt(1 + s)``."""
    return 1.0 / math.sqrt(1.0 + staleness)


@dataclass
class ServerStep:
    """One server step: which updates it took, with their staleness and weight."""

    step: int
    version: int
    seconds: float
    #: ``[sender, staleness, weight]`` of each update, in arrival order.
    updates: list[list[Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def max_staleness(self) -> int:
        """The stalest update taken."""
        return max((int(u[1]) for u in self.updates), default=0)


class FedBuff(threading.Thread):
    """Run ``steps`` asynchronous server steps on an aggregator.

    Parameters
    ----------
    maintainer:
        The aggregator's Maintainer (no step policy: FedBuff is its own).
    fed_optim:
        Server optimizer(s) over the model's parameters, e.g.
        ``FederatedOptimizer(SGD(params, lr=1.0), 'aggregator')``.
    steps:
        Server steps to make.
    buffer:
        Counted updates per server step (FedBuff's K).
    max_staleness:
        Updates staler than this many versions are refused.
    staleness_weight:
        ``f(s)`` multiplying an update's weight (default ``1/sqrt(1+s)``).
    evaluate:
        Called after each server step; its metrics join the step's record.
    on_step:
        Called with each :class:`ServerStep`.
    step_timeout:
        Bound in seconds on collecting one buffer.
    record_path:
        Append each :class:`ServerStep` as a JSON line here.
    keep_records:
        Server steps kept in :attr:`records` (``None``: all).
    """

    def __init__(
        self,
        maintainer: Maintainer,
        fed_optim: Any,
        steps: int,
        buffer: int,
        *,
        max_staleness: int = 8,
        staleness_weight: Callable[[int], float] = inverse_sqrt_staleness,
        evaluate: Callable[[], Mapping[str, Any]] | None = None,
        on_step: Callable[[ServerStep], None] | None = None,
        step_timeout: float | None = None,
        record_path: str | os.PathLike[str] | None = None,
        keep_records: int | None = None,
    ) -> None:
        super().__init__(name=f"zmqfed-fedbuff-{maintainer.nick_name}", daemon=True)
        if not maintainer.aggregator:
            raise ConfigError(
                "FedBuff runs on the aggregator; collaborators use run_collaborator()"
            )
        if steps <= 0 or buffer <= 0:
            raise ConfigError(f"steps and buffer must be positive, got {steps!r} and {buffer!r}")
        if buffer > len(maintainer.fed_props.collaborators):
            raise ConfigError(
                f"buffer {buffer} is larger than the group ({len(maintainer.fed_props.collaborators)}"
                " collaborators): each member counts once per version"
            )
        if max_staleness < 0:
            raise ConfigError(f"max_staleness must be >= 0, got {max_staleness!r}")
        self.m = maintainer
        self.optim_list = optim_as_list(fed_optim)
        if not self.optim_list:
            raise ConfigError("FedBuff needs a server optimizer (fed_optim)")
        maintainer.add_feature(
            "fedbuff",
            excludes=("central_dp", "secure_aggregation"),
            why="they work on synchronous rounds (docs/privacy.md); local_dp works with FedBuff",
        )
        self.steps = steps
        self.buffer = buffer
        self.max_staleness = max_staleness
        self.staleness_weight = staleness_weight
        self.evaluate = evaluate
        self.on_step = on_step
        self.step_timeout = step_timeout
        self.record_path = record_path
        self.records: deque[ServerStep] = deque(maxlen=keep_records)
        self.error: BaseException | None = None
        #: Why the steps ended before ``steps`` (``Maintainer.end_training``), or None.
        self.ended_early: str | None = None
        #: The served parameters of recent versions: updates are taken against them.
        self.bases: dict[int, dict[str, Tensor]] = {}
        self._sums: dict[str, Tensor] = {}
        self._instances = 0.0
        self._current: ServerStep | None = None
        self._staleness: dict[str, int] = {}
        maintainer.on(step_points.upload_received, self._admit, nice=40)
        maintainer.on(step_points.upload_handled, self._fold, nice=10)
        maintainer.on(step_points.after_peer, self._enough)

    # -- hooks ---------------------------------------------------------------
    def _admit(self, ctx: StepContext) -> bool | None:
        """``upload_received``: refuse updates from the future or staler than allowed."""
        m, pipe = ctx.maintainer, ctx.pipe
        if pipe is None:
            return None
        base = meta_version(pipe.meta) - 1
        staleness = m.version - base
        if base < 0 or staleness < 0 or base not in self.bases:
            m.discard(f"upload names version {base + 1}; the aggregator serves {m.version}")
            return False
        if staleness > self.max_staleness:
            m.discard(
                f"upload trained on version {base} is {staleness} versions stale "
                f"(at most {self.max_staleness} are taken)"
            )
            return False
        self._staleness[pipe.nick_name] = staleness
        return True

    @torch.no_grad()
    def _fold(self, ctx: StepContext) -> None:
        """``upload_handled``: add the counted update's weighted delta to the buffer."""
        m, pipe = ctx.maintainer, ctx.pipe
        if ctx.flag is not True or pipe is None or not m.data_list:
            return
        m.data_list.pop()
        data = m.data
        sender = m.sender_list[-1]
        if not update_is_finite({k: v for k, v in data.items()}):
            m.sender_list.pop()
            m.meta_list.pop()
            log.warning("%s: dropped a non-finite update from %s", m.nick_name, sender)
            return
        staleness = self._staleness.pop(pipe.nick_name, 0)
        base = self.bases[m.version - staleness]
        instances = float(m.meta_list[-1].get("instances", 1))
        weight = instances * self.staleness_weight(staleness)
        for name, served in base.items():
            delta = data[name]["param"].to(torch.float32) - served
            acc = self._sums.get(name)
            if acc is None:
                self._sums[name] = delta.mul_(weight)
            else:
                acc.add_(delta, alpha=weight)
        self._instances += instances
        assert self._current is not None
        self._current.updates.append([sender, staleness, weight])

    def _enough(self, ctx: StepContext) -> None:
        if len(ctx.maintainer.meta_list) >= self.buffer:
            ctx.maintainer.manual_stop()

    # -- the loop ------------------------------------------------------------
    def run(self) -> None:
        """Make every server step (in this thread, or in a new one with ``start()``)."""
        try:
            for step in range(self.steps):
                self._server_step(step)
                reason = self.m.end_reason
                if reason is not None:  # a hook said so (a privacy budget spent)
                    self.ended_early = reason
                    log.warning(
                        "%s: FedBuff ends after server step %d of %d: %s",
                        self.m.nick_name,
                        step,
                        self.steps,
                        reason,
                    )
                    break
        except BaseException as exc:
            self.error = exc
            if threading.current_thread() is threading.main_thread():
                raise
            log.exception("FedBuff stopped by an error")

    def _snapshot(self) -> None:
        v = self.m.version
        self.bases[v] = {
            name: t.detach().to(torch.float32, copy=True)
            for name, t in self.m.state_dict.items()
            if t.is_floating_point()
        }
        for old in [k for k in self.bases if k < v - self.max_staleness]:
            del self.bases[old]

    @torch.no_grad()
    def _server_step(self, step: int) -> ServerStep:
        m = self.m
        tic = time.perf_counter()
        self._snapshot()
        self._current = ServerStep(step=step, version=m.version, seconds=0.0)
        m.meta["round"] = step
        m.meta["rounds"] = self.steps
        m.round_metrics.clear()
        m.package(self.optim_list)
        m.step(timeout=self.step_timeout)
        if self._instances > 0:
            for optim in self.optim_list:
                optim.zero_grad()
            for name, p in m.state_dict.items():
                total = self._sums.get(name)
                if total is None:
                    continue
                update = total.div_(self._instances)
                if p.requires_grad:
                    p.grad = (-update).to(p.dtype)
                else:
                    p.add_(update.to(p.dtype))
            # the aggregated hooks (local DP's accountant) see each server step
            finish_aggregation(m, self.optim_list)
        self._sums.clear()
        self._instances = 0.0
        record = self._current
        if self.evaluate is not None:
            record.metrics.update(self.evaluate())
        record.metrics.update(m.round_metrics)  # what the aggregated hooks report (epsilon)
        m.clear()
        m.update_version()
        record.seconds = time.perf_counter() - tic
        keep_record(self.records, self.record_path, record)
        if self.on_step is not None:
            self.on_step(record)
        log.info(
            "server step %d: %d updates, staleness up to %d, %.2f s",
            step,
            len(record.updates),
            record.max_staleness,
            record.seconds,
        )
        return record
