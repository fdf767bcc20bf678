"""Central (aggregator-side) user-level DP: clip every upload on arrival, noise the aggregate.

See :mod:`zmqfed.functional.dp` for the mechanisms side by side and
docs/privacy.md for what each protects and costs.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from zmqfed.core import Maintainer, StepContext, current_maintainer, step_points
from zmqfed.errors import ConfigError
from zmqfed.functional.dp import PARAM, DPMechanism, float_params, settings
from zmqfed.functional.dp_mechanism import (
    AdaptiveClipping,
    clip_update,
    combined_noise_multiplier,
    gaussian_noise,
)

__all__ = ["central_dp"]

log = logging.getLogger(__name__)

#: Why central DP and FedBuff do not combine (its noise calibrates one round's mean).
ASYNC_WHY = (
    "central DP noises the mean of one synchronous round, and FedBuff folds stale updates "
    "one by one with staleness weights; with FedBuff use local_dp (each collaborator clips "
    "and noises its own update, and the aggregator's accountant counts every server step)"
)


def central_dp(
    noise_multiplier: float,
    clip: float,
    *,
    delta: float = 1e-5,
    target_epsilon: float | None = None,
    adaptive: AdaptiveClipping | None = None,
    sample_rate: float = 1.0,
    seed: int | None = None,
) -> DPMechanism:
    """Aggregator-side (central) user-level DP: clip every upload, noise the aggregate.

    Parameters
    ----------
    noise_multiplier:
        ``z``: the noise on the sum of clipped updates has std ``z * clip``.
    clip:
        L2 bound on each collaborator's update (the initial clip when adaptive).
    delta:
        The delta epsilon is reported for.
    target_epsilon:
        Stop training before a round would spend more.
    adaptive:
        Move the clip towards a quantile of the norms (:class:`AdaptiveClipping`).
    sample_rate:
        Probability that a collaborator takes part in a round: 1.0 unless
        participants are really drawn uniformly at random from a larger
        population (the accountant's amplification by sampling relies on it).
    seed:
        Seed of the noise (tests); default from the OS.

    Returns
    -------
    DPMechanism
        Its ``history`` and ``epsilon``; on a collaborator nothing is registered.
    """
    m = current_maintainer("central_dp()")
    z, c, d, t = settings(noise_multiplier, clip, delta, target_epsilon, adaptive)
    q = float(sample_rate)
    if not 0 < q <= 1:
        raise ConfigError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    count_multiplier = None
    if adaptive is not None:
        expected = max(1.0, len(m.fed_props.collaborators) * q)
        count_multiplier = 2 * (adaptive.count_stddev or expected / 20)  # bits of sensitivity 1/2
    mech = DPMechanism(
        "central_dp",
        z,
        c,
        delta=d,
        target_epsilon=t,
        adaptive=adaptive,
        sample_rate=q,
        accounted_multiplier=combined_noise_multiplier(z, count_multiplier),
        seed=seed,
    )
    mech.check_budget()
    if not m.aggregator:
        return mech
    m.add_feature("central_dp", excludes=("fedbuff",), why=ASYNC_WHY)
    _CentralHooks(m, mech, count_multiplier).register()
    return mech


class _CentralHooks:
    """The aggregator's part of :func:`central_dp`."""

    def __init__(self, m: Maintainer, mech: DPMechanism, count_multiplier: float | None) -> None:
        self.m = m
        self.mech = mech
        self.count_stddev = None if count_multiplier is None else count_multiplier / 2
        self.params = float_params(m.state_dict)
        self.sums: dict[str, Tensor] = {}
        self.base: dict[str, Tensor] = {}  # the served floating-point buffers
        self.count = 0
        self.within = 0
        self.warned: set[str] = set()

    def register(self) -> None:
        self.m.on(step_points.step_started, self.reset, nice=0)
        # before any other hook sees the upload (running_fedavg folds at nice 10)
        self.m.on(step_points.upload_handled, self.clip_upload, nice=0)
        self.m.on(step_points.aggregated, self.noise_aggregate, nice=0)

    def reset(self, ctx: StepContext) -> None:
        self.sums.clear()
        self.base.clear()
        self.count = self.within = 0

    @torch.no_grad()
    def clip_upload(self, ctx: StepContext) -> None:
        m = ctx.maintainer
        if not ctx.flag or not m.data_list:
            return
        upload = m.data_list[-1]
        by_tensor = {id(p): n for n, p in self.params.items()}
        deltas: dict[str, Tensor] = {}
        for p, state in upload.items():
            name = by_tensor.get(id(p))
            if name is None:
                continue
            for field in [k for k, v in state.items() if k != PARAM and v.is_floating_point()]:
                del state[field]  # not privatized: must not reach the model
                if field not in self.warned:
                    self.warned.add(field)
                    log.warning(
                        "central_dp drops the uploaded field %r: only 'param' is privatized", field
                    )
            deltas[name] = state[PARAM].to(torch.float32) - p.detach().to(torch.float32)
        clipped, norm = clip_update(deltas, self.mech.clip)
        if not math.isfinite(norm):
            log.warning("central_dp: an upload from %s is not finite; it counts as zero", ctx.pipe)
        for p, state in upload.items():
            name = by_tensor.get(id(p))
            if name is None:
                continue
            if name in self.sums:
                self.sums[name].add_(clipped[name])
            else:
                self.sums[name] = clipped[name].clone()
                if not p.requires_grad:
                    self.base[name] = p.detach().clone()
            # what later hooks and the rule see: the served model plus the clipped update
            state[PARAM] = clipped[name].add_(p.detach()).to(p.dtype)
        self.count += 1
        self.within += int(norm <= self.mech.clip)

    @torch.no_grad()
    def noise_aggregate(self, ctx: StepContext) -> None:
        if self.count == 0:
            return
        mech, n = self.mech, self.count
        noise = gaussian_noise(self.sums, mech.noise_multiplier * mech.clip, mech.generator)
        for name, total in self.sums.items():
            p = self.params[name]
            mean = (total + noise[name]) / n
            if p.requires_grad:  # the server optimizer steps onto p + mean
                p.grad = (-mean).to(p.dtype)
            else:
                p.copy_(self.base[name] + mean.to(p.dtype))
        within = None
        if mech.adaptive is not None:
            assert self.count_stddev is not None
            centred = self.within - n / 2
            noisy = centred + float(torch.randn((), generator=mech.generator)) * self.count_stddev
            within = min(1.0, max(0.0, noisy / n + 0.5))
        mech.account_round(ctx.maintainer, within, n)
        self.reset(ctx)
