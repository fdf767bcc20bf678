"""The Gaussian mechanism's parts, on updates: clipping, calibrated noise, adaptive clipping.

An *update* is what one collaborator contributes to a round: its model minus
the model it was served, over every floating-point tensor. Differential
privacy bounds each update's L2 norm by a clip ``C`` (:func:`clip_update`)
and adds Gaussian noise of standard deviation ``z * C``
(:func:`gaussian_noise`) to what is released; ``z`` is the noise multiplier
the accountant (:mod:`zmqfed.functional.dp_accountant`) is told.

Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially
Private Learning with Adaptive Clipping") moves ``C`` towards a quantile of
the update norms: each round every participant says whether its norm was
within ``C`` (a bit, centred to +-1/2 and noised), and
``C <- C * exp(-learning_rate * (fraction within - target_quantile))``
(:class:`AdaptiveClipping`).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from zmqfed.errors import ConfigError

__all__ = [
    "AdaptiveClipping",
    "check_positive",
    "clip_update",
    "combined_noise_multiplier",
    "gaussian_noise",
    "make_generator",
    "update_norm",
]


def check_positive(value: float, what: str, *, zero: bool = False) -> float:
    """``value`` as a float, or ConfigError naming ``what`` unless finite and > 0 (>= 0 with ``zero``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v < 0 or (v == 0 and not zero):
        raise ConfigError(
            f"{what} must be a finite number {'>=' if zero else '>'} 0, got {value!r}"
        )
    return v


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded by ``seed``, or from the OS's entropy when None."""
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else int(seed))


def update_norm(update: Mapping[str, Tensor]) -> float:
    """L2 norm of an update over all its tensors (inf/NaN if any value is)."""
    total = 0.0
    for t in update.values():
        # per tensor in its own dtype (float32 sums are exact to ~1e-6 relative), added in float64
        total += float(torch.linalg.vector_norm(t.detach())) ** 2
    return math.sqrt(total)


def clip_update(update: Mapping[str, Tensor], clip: float) -> tuple[dict[str, Tensor], float]:
    """Scale ``update`` so its L2 norm is at most ``clip``; returns ``(clipped, norm before)``.

    Float32 tensors within the bound are returned as they are (not copied).
    An update holding inf or NaN cannot be scaled into the ball: it becomes
    zeros (it contributes nothing, and the bound holds).
    """
    norm = update_norm(update)
    if not math.isfinite(norm):
        return {k: torch.zeros_like(t, dtype=torch.float32) for k, t in update.items()}, norm
    if norm <= clip:
        return {k: t.detach().to(torch.float32) for k, t in update.items()}, norm
    factor = clip / norm
    return {k: t.detach().to(torch.float32) * factor for k, t in update.items()}, norm


def gaussian_noise(
    like: Mapping[str, Tensor], std: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Independent N(0, std^2) float32 noise shaped like each tensor of ``like``."""
    return {
        k: torch.randn(t.shape, generator=generator, dtype=torch.float32) * std
        for k, t in like.items()
    }


def combined_noise_multiplier(update_multiplier: float, count_multiplier: float | None) -> float:
    """One Gaussian mechanism equivalent to noising the update and the clip bit together.

    Two Gaussian releases of one individual's data with noise multipliers
    ``z1`` and ``z2`` compose exactly like one release with
    ``(z1^-2 + z2^-2)^-1/2`` (Andrew et al. 2021, theorem 1; Mironov 2017).
    """
    if count_multiplier is None or math.isinf(count_multiplier):
        return update_multiplier
    if update_multiplier == 0 or count_multiplier == 0:
        return 0.0
    return (update_multiplier**-2 + count_multiplier**-2) ** -0.5


@dataclass(frozen=True)
class AdaptiveClipping:
    """Adaptive clipping to a quantile of the update norms (Andrew et al. 2021).

    Parameters
    ----------
    target_quantile:
        Fraction of updates that should fall within the clip (``gamma``, 0.5:
        the median norm).
    learning_rate:
        Geometric step of the clip per round (``eta_C``; 0.2 as in the paper).
    count_stddev:
        Standard deviation of the noise on the sum of the centred bits
        (central DP), or on each collaborator's own bit (local DP). ``None``:
        the paper's choice, the expected number of participants / 20
        (central), or 1.0 (local).
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < float(self.target_quantile) < 1.0:
            raise ConfigError(
                f"AdaptiveClipping.target_quantile must lie in (0, 1), got {self.target_quantile!r}"
            )
        check_positive(self.learning_rate, "AdaptiveClipping.learning_rate")
        if self.count_stddev is not None:
            check_positive(self.count_stddev, "AdaptiveClipping.count_stddev")

    def next_clip(self, clip: float, fraction_within: float) -> float:
        """The clip for the next round, from this round's (noised) fraction of norms within ``clip``."""
        return clip * math.exp(-self.learning_rate * (fraction_within - self.target_quantile))
