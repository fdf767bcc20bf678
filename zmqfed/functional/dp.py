"""Differential privacy as one-line hooks: central (aggregator-side) and local (client-side).

Both are the Gaussian mechanism on clipped updates (:mod:`zmqfed.functional.dp_mechanism`),
accounted by Rényi DP (:mod:`zmqfed.functional.dp_accountant`), with the
privacy spent reported after every round (``epsilon`` in ``RoundRecord.metrics``,
the daemon's ``rounds.jsonl`` and the progress bar) and an optional budget:
with ``target_epsilon`` the federation stops (``API`` logs why) before a
round would spend more.

* :func:`central_dp`, on the aggregator (trusted to see updates):
  every upload is clipped on arrival to norm ``clip`` around the served
  model, whatever its sender claims; after the aggregation rule, the
  aggregate of the floating-point tensors becomes the *uniform* mean of the
  clipped updates plus N(0, (z clip / n)^2) per value (DP-FedAvg, McMahan
  et al. 2018). Sensitivity: one collaborator added or removed moves the sum
  by at most ``clip`` (user-level DP).
* :func:`local_dp`, on every node: each collaborator clips its own update and
  adds N(0, (z clip)^2) before it leaves, so nothing private reaches the
  aggregator. Two of a collaborator's datasets can move its clipped update by
  up to ``2 clip``, so its epsilon is accounted with multiplier ``z / 2``.
  The aggregator's side accounts the same way and, with adaptive clipping,
  moves the clip from the collaborators' noised "within the clip" bits
  (``meta['dp_clipped']``) and serves it in ``meta['dp_clip']``.

Register the same call inside ``with maintainer:`` on every node (or
``App(configure=...)`` for daemons); each does its role's part. Only
``param`` is privatized: other floating-point fields of an upload
(optimizer state) are dropped by :func:`central_dp` and refused by
:func:`local_dp`. The noise comes from torch's generator seeded from the OS
(or ``seed``): not a cryptographically secure source, and floating-point
attacks on the Gaussian sampler are not addressed (docs/privacy.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from zmqfed.core import Maintainer, StepContext, current_maintainer, step_points
from zmqfed.errors import ConfigError
from zmqfed.functional.dp_accountant import RDPAccountant
from zmqfed.functional.dp_mechanism import (
    AdaptiveClipping,
    check_positive,
    clip_update,
    combined_noise_multiplier,
    gaussian_noise,
    make_generator,
)

__all__ = ["CLIP_BIT", "CLIP_KEY", "DPMechanism", "PrivacyBudgetSpent", "central_dp", "local_dp"]

log = logging.getLogger(__name__)

#: Meta key of a collaborator's noised, centred "my update was within the clip" bit.
CLIP_BIT = "dp_clipped"
#: Meta key of the clip the aggregator serves under adaptive local DP.
CLIP_KEY = "dp_clip"
PARAM = "param"
_BIT_RANGE = 6.0  # a noised bit further than this many stddevs from +-1/2 is clamped


class PrivacyBudgetSpent(ConfigError):
    """A collaborator refused to release another update: its ``target_epsilon`` would be exceeded."""


class DPMechanism:
    """A DP hook's state on one node: the clip in force, the accountant, what each round spent.

    Returned by :func:`central_dp` and :func:`local_dp`.
    """

    def __init__(
        self,
        kind: str,
        noise_multiplier: float,
        clip: float,
        *,
        delta: float,
        target_epsilon: float | None,
        adaptive: AdaptiveClipping | None,
        sample_rate: float,
        accounted_multiplier: float,
        seed: int | None,
    ) -> None:
        self.kind = kind
        self.noise_multiplier = noise_multiplier
        #: The clip in force (moves each round under adaptive clipping).
        self.clip = clip
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.adaptive = adaptive
        self.sample_rate = sample_rate
        #: The noise multiplier one round is accounted with.
        self.accounted_multiplier = accounted_multiplier
        self.accountant = RDPAccountant()
        self.generator = make_generator(seed)
        #: Per round: ``{'epsilon', 'dp_clip', 'dp_within_clip', 'participants'}``.
        self.history: list[dict[str, float]] = []

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (for :attr:`delta`)."""
        return self.accountant.epsilon(self.delta)

    def next_epsilon(self) -> float:
        """Epsilon after one more round."""
        return self.accountant.epsilon_after(
            self.delta, self.accounted_multiplier, self.sample_rate
        )

    def check_budget(self) -> None:
        """ConfigError if not even one round fits in ``target_epsilon``."""
        if self.target_epsilon is not None and self.next_epsilon() > self.target_epsilon:
            raise ConfigError(
                f"{self.kind}: one round already spends epsilon {self.next_epsilon():.3g} > "
                f"target_epsilon {self.target_epsilon:g} (delta {self.delta:g}); raise "
                "noise_multiplier or the target"
            )

    def account_round(self, m: Maintainer, within: float | None, participants: int) -> None:
        """Account one round on the aggregator: report, adapt the clip, end at the budget."""
        self.accountant.step(self.accounted_multiplier, self.sample_rate)
        eps = self.epsilon
        row = {"epsilon": eps, CLIP_KEY: self.clip, "participants": float(participants)}
        if within is not None:
            row["dp_within_clip"] = within
        self.history.append(row)
        m.round_metrics.update({k: v for k, v in row.items() if k != "participants"})
        if self.adaptive is not None and within is not None:
            self.clip = self.adaptive.next_clip(self.clip, within)
        if self.target_epsilon is not None and self.next_epsilon() > self.target_epsilon:
            m.end_training(
                f"privacy budget: epsilon {eps:.4g} spent (delta {self.delta:g}); another round "
                f"would exceed target_epsilon {self.target_epsilon:g}"
            )

    def __repr__(self) -> str:
        return (
            f"DPMechanism({self.kind}, z={self.noise_multiplier:g}, clip={self.clip:.4g}, "
            f"rounds={self.accountant.steps}, epsilon={self.epsilon:.4g}, delta={self.delta:g})"
        )


def _float_params(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: p for n, p in state_dict.items() if p.is_floating_point()}


def _settings(
    noise_multiplier: float,
    clip: float,
    delta: float,
    target_epsilon: float | None,
    adaptive: AdaptiveClipping | None,
) -> tuple[float, float, float, float | None]:
    z = check_positive(noise_multiplier, "noise_multiplier", zero=True)
    c = check_positive(clip, "clip")
    d = float(delta)
    if not 0 < d < 1:
        raise ConfigError(f"delta must lie in (0, 1), got {delta!r}")
    t = None if target_epsilon is None else check_positive(target_epsilon, "target_epsilon")
    if adaptive is not None and not isinstance(adaptive, AdaptiveClipping):
        raise ConfigError(f"adaptive must be an AdaptiveClipping, got {type(adaptive).__name__}")
    return z, c, d, t


# ----------------------------------------------------------------------------- central


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
    z, c, d, t = _settings(noise_multiplier, clip, delta, target_epsilon, adaptive)
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
    _CentralHooks(m, mech, count_multiplier).register()
    return mech


class _CentralHooks:
    """The aggregator's part of :func:`central_dp`."""

    def __init__(self, m: Maintainer, mech: DPMechanism, count_multiplier: float | None) -> None:
        self.m = m
        self.mech = mech
        self.count_stddev = None if count_multiplier is None else count_multiplier / 2
        self.params = _float_params(m.state_dict)
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


# ------------------------------------------------------------------------------- local


def local_dp(
    noise_multiplier: float,
    clip: float,
    *,
    delta: float = 1e-5,
    target_epsilon: float | None = None,
    adaptive: AdaptiveClipping | None = None,
    seed: int | None = None,
) -> DPMechanism:
    """Client-side (local) DP: each collaborator clips and noises its own update before upload.

    Register the same call on every node. A collaborator uploads
    ``served + clip(update) + N(0, (noise_multiplier * clip)^2)`` and, under
    adaptive clipping, its noised centred bit in ``meta['dp_clipped']``; it
    refuses to release an update that would take its own epsilon beyond
    ``target_epsilon`` (:class:`PrivacyBudgetSpent`). The aggregator's part
    reports epsilon, adapts and serves the clip (``meta['dp_clip']``), and
    ends training at the budget. Parameters as :func:`central_dp`; there is
    no ``sample_rate``: every release is accounted (a collaborator knows
    when it takes part).
    """
    m = current_maintainer("local_dp()")
    z, c, d, t = _settings(noise_multiplier, clip, delta, target_epsilon, adaptive)
    bit_stddev = None if adaptive is None else (adaptive.count_stddev or 1.0)
    mech = DPMechanism(
        "local_dp",
        z,
        c,
        delta=d,
        target_epsilon=t,
        adaptive=adaptive,
        sample_rate=1.0,
        # two datasets of one collaborator: its clipped updates differ by up to 2 clip;
        # its bit (centred, +-1/2) by 1
        accounted_multiplier=combined_noise_multiplier(z / 2, bit_stddev),
        seed=seed,
    )
    mech.check_budget()
    if m.aggregator:
        _LocalAggregator(m, mech, bit_stddev).register()
    else:
        _LocalCollaborator(m, mech, bit_stddev).register()
    return mech


class _LocalAggregator:
    def __init__(self, m: Maintainer, mech: DPMechanism, bit_stddev: float | None) -> None:
        self.m, self.mech, self.bit_stddev = m, mech, bit_stddev

    def register(self) -> None:
        if self.mech.adaptive is not None:
            self.m.meta[CLIP_KEY] = self.mech.clip
        self.m.on(step_points.aggregated, self.account, nice=0)

    def account(self, ctx: StepContext) -> None:
        m, mech = ctx.maintainer, self.mech
        n = len(m.meta_list)
        if n == 0:
            return
        within = None
        if mech.adaptive is not None:
            assert self.bit_stddev is not None
            span = 0.5 + _BIT_RANGE * self.bit_stddev
            bits = []
            for meta in m.meta_list:
                try:
                    bit = float(meta.get(CLIP_BIT, math.nan))
                except (TypeError, ValueError):
                    bit = math.nan
                # a missing or absurd bit pulls neither way; a large one is clamped
                bits.append(0.0 if not math.isfinite(bit) else min(span, max(-span, bit)))
            within = min(1.0, max(0.0, sum(bits) / n + 0.5))
        mech.account_round(m, within, n)
        if mech.adaptive is not None:
            m.meta[CLIP_KEY] = mech.clip


class _LocalCollaborator:
    def __init__(self, m: Maintainer, mech: DPMechanism, bit_stddev: float | None) -> None:
        self.m, self.mech, self.bit_stddev = m, mech, bit_stddev
        self.params = _float_params(m.state_dict)
        self.served: dict[str, Tensor] = {}
        self.released: tuple[Any, dict[str, Tensor]] | None = None

    def register(self) -> None:
        # after decryption/decompression (-100), before device alignment (0)
        self.m.register_unpackage_hook(-50, self.keep_served)
        # after device alignment (100), before compression or encryption (200)
        self.m.register_package_hook(150, self.privatize)

    def keep_served(self, state: dict[str, Tensor], p: Tensor, *, name: str) -> dict[str, Tensor]:
        if name in self.params and PARAM in state:
            self.served[name] = state[PARAM].detach().to(torch.float32).clone()
        return state

    def privatize(self, state: dict[str, Tensor], p: Tensor, *, name: str) -> dict[str, Tensor]:
        if name not in self.params:
            return state
        extra = [k for k, v in state.items() if k != PARAM and v.is_floating_point()]
        if extra:
            raise ConfigError(
                f"local_dp privatizes 'param' only; the upload of {name!r} also carries {extra}: "
                "package without the optimizer state"
            )
        packaged = self.m.packaged_data
        if self.released is None or self.released[0] is not packaged:
            self.released = (packaged, self._release(packaged))
        state[PARAM] = self.released[1][name].to(p.dtype)
        return state

    @torch.no_grad()
    def _release(self, packaged: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Clip and noise the whole update once per ``package()``; account the release."""
        mech = self.mech
        if not self.served:
            raise ConfigError("local_dp: download the global model before uploading")
        target = mech.target_epsilon
        if target is not None and mech.next_epsilon() > target:
            raise PrivacyBudgetSpent(
                f"{self.m.nick_name}: another update would spend epsilon {mech.next_epsilon():.4g} "
                f"> target_epsilon {target:g} (delta {mech.delta:g}); not uploading"
            )
        clip = mech.clip
        served_clip = self.m.meta.get(CLIP_KEY) if mech.adaptive is not None else None
        if served_clip is not None:  # the noise scales with it: privacy holds for any clip
            clip = check_positive(served_clip, f"the served meta[{CLIP_KEY!r}]")
        deltas = {
            n: packaged[n][PARAM].detach().to(torch.float32) - self.served[n] for n in self.params
        }
        clipped, norm = clip_update(deltas, clip)
        noise = gaussian_noise(clipped, mech.noise_multiplier * clip, mech.generator)
        if self.bit_stddev is not None:
            bit = (0.5 if norm <= clip else -0.5) + float(
                torch.randn((), generator=mech.generator) * self.bit_stddev
            )
            self.m.meta[CLIP_BIT] = bit
        mech.accountant.step(mech.accounted_multiplier, 1.0)
        mech.history.append({"epsilon": mech.epsilon, CLIP_KEY: clip})
        if math.isfinite(mech.epsilon):  # (no noise: infinite, and meta is JSON)
            self.m.meta["dp_epsilon"] = mech.epsilon
        return {n: self.served[n] + clipped[n] + noise[n] for n in self.params}
