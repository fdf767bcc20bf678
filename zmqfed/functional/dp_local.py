"""Local (client-side) user-level DP: each collaborator clips and noises its own update.

See :mod:`zmqfed.functional.dp` for the mechanisms side by side and
docs/privacy.md for what each protects and costs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from zmqfed.core import Maintainer, StepContext, current_maintainer, step_points
from zmqfed.errors import ConfigError
from zmqfed.functional.dp import (
    CLIP_BIT,
    CLIP_KEY,
    PARAM,
    DPMechanism,
    PrivacyBudgetSpent,
    float_params,
    settings,
)
from zmqfed.functional.dp_mechanism import (
    AdaptiveClipping,
    check_positive,
    clip_update,
    combined_noise_multiplier,
    gaussian_noise,
)

__all__ = ["local_dp"]

_BIT_RANGE = 6.0  # a noised bit further than this many stddevs from +-1/2 is clamped


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
    z, c, d, t = settings(noise_multiplier, clip, delta, target_epsilon, adaptive)
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
        self.params = float_params(m.state_dict)
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
