"""Client sampling: each round trains a seeded, uniform sample of the online collaborators.

Cross-device federations have far more clients than a round needs.
:func:`client_sampling` is a step policy (like ``count_step``): at each step
it draws a cohort uniformly from the collaborators online, serves the model
to the cohort only, and ends the step once ``sample`` of them have uploaded,
or at the ``deadline`` with at least ``min_count``.  Over-selection invites
``sample * (1 + over_select)`` so that stragglers do not hold the round.

A collaborator left out asks for the model as usual and is parked (WAIT):
it waits without polling, is not counted in the step, and is not a failure;
the next step draws again.  What was drawn and who was counted is on
:attr:`ClientSampling.history` and in ``Maintainer.cohort`` (which
:class:`~zmqfed.api.API` copies into its round records).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from zmqfed.core import Maintainer, StepContext, current_maintainer
from zmqfed.core import step_points as points
from zmqfed.errors import ConfigError
from zmqfed.federated.protocol import meta_version

__all__ = ["ClientSampling", "RoundSample", "client_sampling"]

#: Seconds between two counts of the online collaborators while a cohort is awaited.
_COUNT_EVERY = 0.1


@dataclass
class RoundSample:
    """One step's draw."""

    version: int
    online: int
    cohort: list[str]
    counted: list[str] = field(default_factory=list)


class ClientSampling:
    """The state of :func:`client_sampling` on one aggregator (returned by it).

    Attributes
    ----------
    history:
        One :class:`RoundSample` per step, the current one last.
    """

    def __init__(
        self,
        maintainer: Maintainer,
        *,
        sample: int | None,
        fraction: float | None,
        seed: int,
        over_select: float,
        deadline: float | None,
        min_count: int,
        min_online: int | None,
        history: int | None,
    ) -> None:
        self.m = maintainer
        self.min_online = min_online
        self.sample_size = sample
        self.fraction = fraction
        self.seed = seed
        self.over_select = over_select
        self.deadline = deadline
        self.min_count = min_count
        self.keep_history = history
        self.history: list[RoundSample] = []
        self._cohort: frozenset[str] | None = None
        self._started = time.monotonic()
        self._counted_at = -math.inf
        self._online = 0

    # -- sizes ---------------------------------------------------------------
    @property
    def wanted(self) -> int:
        """Uploads that end a step: ``sample``, or ``fraction`` of the group (at least 1)."""
        if self.sample_size is not None:
            return min(self.sample_size, len(self.m.fed_props.collaborators))
        assert self.fraction is not None
        return max(1, math.ceil(self.fraction * len(self.m.fed_props.collaborators)))

    @property
    def invited(self) -> int:
        """How many are drawn: ``wanted`` plus the over-selection, at most the group."""
        extra = math.ceil(self.wanted * (1 + self.over_select))
        return min(extra, len(self.m.fed_props.collaborators))

    # -- hooks ---------------------------------------------------------------
    def start(self, ctx: StepContext) -> None:
        self._cohort = None
        self._started = time.monotonic()
        self._counted_at = -math.inf
        self.m.cohort = None
        if self.deadline is not None:
            self.m.wake_at(self._started + self.deadline)
        self._draw_if_ready()

    def _online_now(self) -> int:
        now = time.monotonic()
        if now - self._counted_at >= _COUNT_EVERY:
            self._counted_at = now
            self._online = sum(1 for p in self.m.all_pipes() if not p.is_offline)
        return self._online

    def _draw_if_ready(self, force: bool = False) -> bool:
        if self._cohort is not None:
            return True
        online = self._online_now()
        needed = self.invited if self.min_online is None else max(self.invited, self.min_online)
        if online < min(needed, len(self.m.fed_props.collaborators)) and not (force and online):
            return False
        names = sorted(p.nick_name for p in self.m.all_pipes() if not p.is_offline)
        rng = random.Random(f"{self.seed}:{self.m.version}")
        cohort = rng.sample(names, min(self.invited, len(names)))
        self._cohort = frozenset(cohort)
        self.m.cohort = sorted(cohort)
        self.history.append(RoundSample(self.m.version, len(names), sorted(cohort)))
        if self.keep_history is not None:
            del self.history[: -self.keep_history]
        self.m.wake_at(time.monotonic())  # serve the cohort's parked downloads now
        return True

    def download_requested(self, ctx: StepContext) -> bool:
        m, pipe = ctx.maintainer, ctx.pipe
        if pipe is None or meta_version(pipe.meta) > m.version:
            return False
        if not self._draw_if_ready() or pipe.nick_name not in (self._cohort or ()):
            return False  # not in this step's sample: parked, asked again next step
        m.meta["version"] = m.version
        pipe.set_meta(m.meta)
        return True

    def upload_received(self, ctx: StepContext) -> bool | None:
        pipe = ctx.pipe
        if pipe is None or self._cohort is None or pipe.nick_name in self._cohort:
            return True
        ctx.maintainer.discard(
            f"{pipe.nick_name} was not sampled for version {ctx.maintainer.version}"
        )
        return False

    def after_peer(self, ctx: StepContext) -> None:
        m = ctx.maintainer
        late = self.deadline is not None and time.monotonic() - self._started >= self.deadline
        if not self._draw_if_ready(force=late):
            return
        received = len(m.meta_list)
        if received >= self.wanted or (late and received >= self.min_count):
            self.history[-1].counted = list(m.sender_list)
            m.manual_stop()
        elif late:
            m.wake_at(time.monotonic() + 0.5)

    def accept(self, ctx: StepContext) -> bool:
        return True

    def summary(self) -> dict[str, Any]:
        """The latest draw as a dict (empty before the first)."""
        if not self.history:
            return {}
        last = self.history[-1]
        return {"version": last.version, "online": last.online, "selected": len(last.cohort)}


def client_sampling(
    sample: int | None = None,
    fraction: float | None = None,
    *,
    seed: int = 0,
    over_select: float = 0.0,
    deadline: float | None = None,
    min_count: int = 1,
    min_online: int | None = None,
    history: int | None = 100,
) -> ClientSampling:
    """Train a seeded uniform sample of the online collaborators each step.

    Parameters
    ----------
    sample, fraction:
        Exactly one: the uploads that end a step, as a number or as a
        fraction of the group's collaborators (at least 1).
    seed:
        The draw of a step is ``random.Random(f"{seed}:{version}")`` over the
        sorted names of the online collaborators: reproducible.
    over_select:
        Invite ``ceil(sample * (1 + over_select))``; the step still ends at
        ``sample`` uploads, so the slowest invited do not hold it.
    deadline:
        Seconds after the step's start at which it ends with at least
        ``min_count`` uploads (stragglers' late uploads are refused as stale).
        Also when fewer than the invited number are online then: the draw
        takes whoever is online.
    min_count:
        Uploads needed to end a step at the deadline.
    min_online:
        Draw only once this many collaborators are online (default: the
        number invited); at the deadline whoever is online is drawn from.
    history:
        Draws kept in :attr:`ClientSampling.history` (``None``: all).

    Returns
    -------
    ClientSampling
        The policy's state: ``history`` of draws and counted members.

    Examples
    --------
    >>> with maintainer:  # doctest: +SKIP
    ...     sampling = zmqfed.functional.client_sampling(100, over_select=0.3, deadline=60)
    """
    maintainer = current_maintainer("client_sampling()")
    if (sample is None) == (fraction is None):
        raise ConfigError("client_sampling needs exactly one of sample=K or fraction=f")
    if sample is not None and (
        isinstance(sample, bool) or not isinstance(sample, int) or sample < 1
    ):
        raise ConfigError(f"sample must be a positive int, got {sample!r}")
    if fraction is not None and not (isinstance(fraction, float | int) and 0 < fraction <= 1):
        raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
    if not (isinstance(over_select, float | int) and over_select >= 0):
        raise ConfigError(f"over_select must be >= 0, got {over_select!r}")
    if deadline is not None and not deadline > 0:
        raise ConfigError(f"deadline must be positive seconds, got {deadline!r}")
    if not isinstance(min_count, int) or min_count < 0:
        raise ConfigError(f"min_count must be an int >= 0, got {min_count!r}")
    policy = ClientSampling(
        maintainer,
        sample=sample,
        fraction=fraction,
        seed=seed,
        over_select=float(over_select),
        deadline=deadline,
        min_count=min_count,
        min_online=min_online,
        history=history,
    )
    if min_count > policy.wanted:
        raise ConfigError(f"min_count {min_count} is above the sample size {policy.wanted}")
    if not maintainer.aggregator:
        return policy
    maintainer.on(points.step_started, policy.start)
    maintainer.on(points.download_requested, policy.download_requested)
    maintainer.on(points.upload_received, policy.upload_received)
    maintainer.on(points.peer_leaving, policy.accept)
    maintainer.on(points.after_peer, policy.after_peer)
    return policy
