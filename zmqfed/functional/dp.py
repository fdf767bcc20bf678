"""Differential privacy as one-line hooks: what central and local DP share.

Both are the Gaussian mechanism on clipped updates (:mod:`zmqfed.functional.dp_mechanism`),
accounted by Rényi DP (:mod:`zmqfed.functional.dp_accountant`), with the
privacy spent reported after every round (``epsilon`` in ``RoundRecord.metrics``,
the daemon's ``rounds.jsonl`` and the progress bar) and an optional budget:
with ``target_epsilon`` the federation stops (``API`` logs why) before a
round would spend more.

* :func:`~zmqfed.functional.dp_central.central_dp`, on the aggregator
  (trusted to see updates): every upload is clipped on arrival to norm
  ``clip`` around the served model, whatever its sender claims; after the aggregation rule, the
  aggregate of the floating-point tensors becomes the *uniform* mean of the
  clipped updates plus N(0, (z clip / n)^2) per value (DP-FedAvg, McMahan
  et al. 2018). Sensitivity: one collaborator added or removed moves the sum
  by at most ``clip`` (user-level DP).
* :func:`~zmqfed.functional.dp_local.local_dp`, on every node: each
  collaborator clips its own update and adds N(0, (z clip)^2) before it leaves, so nothing private reaches the
  aggregator. Two of a collaborator's datasets can move its clipped update by
  up to ``2 clip``, so its epsilon is accounted with multiplier ``z / 2``.
  The aggregator's side accounts the same way and, with adaptive clipping,
  moves the clip from the collaborators' noised "within the clip" bits
  (``meta['dp_clipped']``) and serves it in ``meta['dp_clip']``.

Register the same call inside ``with maintainer:`` on every node (or
``App(configure=...)`` for daemons); each does its role's part. Only
``param`` is privatized: other floating-point fields of an upload
(optimizer state) are dropped by central DP and refused by local DP. The
noise comes from torch's generator seeded from the OS (or ``seed``): not a cryptographically secure source, and floating-point
attacks on the Gaussian sampler are not addressed (docs/privacy.md).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from zmqfed.core import Maintainer
from zmqfed.errors import ConfigError
from zmqfed.functional.dp_accountant import RDPAccountant
from zmqfed.functional.dp_mechanism import AdaptiveClipping, check_positive, make_generator

__all__ = [
    "CLIP_BIT",
    "CLIP_KEY",
    "DPMechanism",
    "PrivacyBudgetSpent",
    "float_params",
    "settings",
]

#: Meta key of a collaborator's noised, centred "my update was within the clip" bit.
CLIP_BIT = "dp_clipped"
#: Meta key of the clip the aggregator serves under adaptive local DP.
CLIP_KEY = "dp_clip"
PARAM = "param"


class PrivacyBudgetSpent(ConfigError):
    """A collaborator refused to release another update: its ``target_epsilon`` would be exceeded."""


class DPMechanism:
    """A DP hook's state on one node: the clip in force, the accountant, what each round spent.

    Returned by ``central_dp`` and ``local_dp``.
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


def float_params(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The floating-point tensors of ``state_dict``: what DP privatizes."""
    return {n: p for n, p in state_dict.items() if p.is_floating_point()}


def settings(
    noise_multiplier: float,
    clip: float,
    delta: float,
    target_epsilon: float | None,
    adaptive: AdaptiveClipping | None,
) -> tuple[float, float, float, float | None]:
    """Checked ``(noise_multiplier, clip, delta, target_epsilon)``; ConfigError names what is wrong."""
    z = check_positive(noise_multiplier, "noise_multiplier", zero=True)
    c = check_positive(clip, "clip")
    d = float(delta)
    if not 0 < d < 1:
        raise ConfigError(f"delta must lie in (0, 1), got {delta!r}")
    t = None if target_epsilon is None else check_positive(target_epsilon, "target_epsilon")
    if adaptive is not None and not isinstance(adaptive, AdaptiveClipping):
        raise ConfigError(f"adaptive must be an AdaptiveClipping, got {type(adaptive).__name__}")
    return z, c, d, t
