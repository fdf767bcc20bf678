"""Step policies: hooks that decide when an aggregator's ``step()`` ends.

Each registers on the default Maintainer (``with maintainer:``) and does
nothing on collaborators, as in OpenFed.  The hooks receive the
:class:`~zmqfed.core.StepContext` of the point they run at, so they act on
the peer it names.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from zmqfed.core import Maintainer, StepContext, current_maintainer
from zmqfed.core import step_points as points
from zmqfed.core.contracts import as_context
from zmqfed.errors import ConfigError
from zmqfed.federated.protocol import meta_version

__all__ = ["count_step", "deadline_step", "dispatch_step", "period_step", "version_check"]

log = logging.getLogger(__name__)


def _counts(counts: int | Sequence[int]) -> list[int]:
    items = [counts] if isinstance(counts, int) else list(counts)
    if not items or any(not isinstance(c, int) or c <= 0 for c in items):
        raise ConfigError(f"counts must be positive ints, got {counts!r}")
    return items


def version_check(ctx: StepContext | Maintainer) -> bool:
    """``download_requested`` hook: serve a download only once this version is reached.

    A collaborator that asks for a newer version is parked until
    ``update_version`` gets the aggregator there.  Registers with
    ``Maintainer.on`` or, OpenFed-style, with ``register_step_hook``.
    """
    ctx = as_context(ctx)
    m, pipe = ctx.maintainer, ctx.pipe
    if pipe is None or meta_version(pipe.meta) > m.version:
        return False
    m.meta["version"] = m.version
    pipe.set_meta(m.meta)
    return True


def _accept(ctx: StepContext) -> bool:
    return True


def _register_common(maintainer: Maintainer, *, serve: bool = True) -> None:
    if serve:
        maintainer.on(points.download_requested, version_check)
    maintainer.on(points.peer_leaving, _accept)
    maintainer.on(points.upload_received, _accept)


class _StepClock:
    """Time since the current step began; wakes the loop when ``seconds`` have passed."""

    def __init__(self, maintainer: Maintainer, seconds: float) -> None:
        self.seconds = seconds
        self.tic = time.monotonic()
        maintainer.on(points.step_started, self._start)

    def _start(self, ctx: StepContext) -> None:
        self.tic = time.monotonic()
        ctx.maintainer.wake_at(self.tic + self.seconds)

    @property
    def expired(self) -> bool:
        return time.monotonic() - self.tic >= self.seconds


def count_step(counts: int | Sequence[int]) -> None:
    """End each step once ``counts`` uploads were received.

    With a list, consecutive steps use the counts in turn (cycling).

    >>> count_step(15)  # doctest: +SKIP
    >>> count_step([5, 15])  # doctest: +SKIP
    """
    maintainer = current_maintainer("count_step()")
    items = _counts(counts)
    if not maintainer.aggregator:
        return
    _register_common(maintainer)
    members = len(maintainer.fed_props.collaborators)
    if members and max(items) > members:
        # More uploads than members: one process plays several clients per
        # version (OpenFed's simulations), so each member may count that often.
        need = -(-max(items) // members)
        if need > maintainer.uploads_per_member:
            log.info(
                "count_step(%s) with %d collaborators: each may contribute %d uploads per version",
                counts,
                members,
                need,
            )
            maintainer.uploads_per_member = need
    idx = 0

    def after_peer(ctx: StepContext) -> None:
        nonlocal idx
        m = ctx.maintainer
        if len(m.meta_list) >= items[idx]:
            m.manual_stop()
            idx = (idx + 1) % len(items)

    maintainer.on(points.after_peer, after_peer)


def period_step(period: float) -> None:
    """End each step ``period`` seconds after it started, whatever was received."""
    maintainer = current_maintainer("period_step()")
    if period <= 0:
        raise ConfigError(f"period must be positive seconds, got {period!r}")
    if not maintainer.aggregator:
        return
    _register_common(maintainer)
    clock = _StepClock(maintainer, period)

    def after_peer(ctx: StepContext) -> None:
        if clock.expired:
            ctx.maintainer.manual_stop()

    maintainer.on(points.after_peer, after_peer)


def deadline_step(counts: int, seconds: float, min_count: int = 1) -> None:
    """End a step at ``counts`` uploads, or after ``seconds`` with at least ``min_count``.

    The straggler policy: a dead or slow collaborator cannot stall the round
    beyond the deadline once enough updates arrived.
    """
    maintainer = current_maintainer("deadline_step()")
    _counts(counts)
    if seconds <= 0 or min_count < 0 or min_count > counts:
        raise ConfigError(
            f"deadline_step needs seconds > 0 and 0 <= min_count <= counts, "
            f"got seconds={seconds!r}, min_count={min_count!r}, counts={counts!r}"
        )
    if not maintainer.aggregator:
        return
    _register_common(maintainer)
    clock = _StepClock(maintainer, seconds)

    def after_peer(ctx: StepContext) -> None:
        m = ctx.maintainer
        received = len(m.meta_list)
        late = clock.expired
        if received >= counts or (late and received >= min_count):
            m.manual_stop()
        elif late:
            m.wake_at(time.monotonic() + 0.5)

    maintainer.on(points.after_peer, after_peer)


def dispatch_step(
    counts: int | Sequence[int], parts_list: dict[str, list[Any]], seed: int | None = None
) -> None:
    """Hand each downloading collaborator a part id and mode; end at ``counts`` uploads.

    Each step samples ``counts`` part ids from ``parts_list[mode]`` (modes
    taken in turn, e.g. ``dict(train=range(100), test=range(50))``); a
    collaborator receives ``meta['part_id']`` and ``meta['mode']``. Requests
    beyond the sampled parts are parked until the next step.
    """
    maintainer = current_maintainer("dispatch_step()")
    items = _counts(counts)
    if not parts_list:
        raise ConfigError("dispatch_step needs a non-empty parts_list")
    modes = list(parts_list)
    values = [list(v) for v in parts_list.values()]
    for mode, value, count in zip(modes, values, items, strict=False):
        if len(value) < count:
            raise ConfigError(
                f"dispatch_step: mode {mode!r} has {len(value)} parts, fewer than {count}"
            )
    if not maintainer.aggregator:
        return
    rng = random.Random(seed)
    idx = 0
    pending = rng.sample(values[0], items[0])

    def download_requested(ctx: StepContext) -> bool:
        if not pending or ctx.pipe is None:
            return False  # every part of this step is out: wait for the next step
        m = ctx.maintainer
        m.meta["version"] = m.version
        m.meta["part_id"] = pending.pop()
        m.meta["mode"] = modes[idx % len(modes)]
        ctx.pipe.set_meta(m.meta)
        return True

    def after_peer(ctx: StepContext) -> None:
        nonlocal idx, pending
        m = ctx.maintainer
        if len(m.meta_list) >= items[idx % len(items)]:
            m.manual_stop()
            idx += 1
            k = idx % len(modes)
            pending = rng.sample(values[k], items[idx % len(items)])

    maintainer.on(points.download_requested, download_requested)
    maintainer.on(points.after_peer, after_peer)
    _register_common(maintainer, serve=False)
