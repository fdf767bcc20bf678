"""Rényi-DP accounting of the (subsampled) Gaussian mechanism: epsilon for a given delta.

Every round of a DP mechanism in zmqfed is one release of a Gaussian
mechanism with noise multiplier ``z`` (noise std / sensitivity), applied to a
random fraction ``q`` of the population (``q = 1``: everybody takes part).
Its Rényi DP of order ``a`` (Mironov, Talwar and Zhang 2019, "Rényi
Differential Privacy of the Sampled Gaussian Mechanism", sections 3.2-3.3)
is ``log(A_a) / (a - 1)`` with

* integer ``a``: ``A_a = sum_k C(a, k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 z^2))``;
* fractional ``a``: the two-sided series of the same paper with ``erfc``
  terms, summed until its terms fall below ``exp(-30)``;
* ``q = 1``: exactly ``a / (2 z^2)`` (Mironov 2017, proposition 7).

RDP adds up over rounds; epsilon for a ``delta`` is the best order's
``rdp - (log(delta) + log(a)) / (a - 1) + log((a - 1) / a)`` (Balle et al.
2020, theorem 21), the conversion Opacus uses. The orders are Opacus's
defaults, so the two accountants give the same numbers;
``tests/unit/test_dp_accountant.py`` checks published values of both
TensorFlow Privacy and Opacus.

Pure Python (``math`` only): no optional dependency is needed to account.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from zmqfed.errors import ConfigError

__all__ = ["DEFAULT_ORDERS", "RDPAccountant", "compute_rdp", "epsilon_from_rdp"]

#: Rényi orders tried: Opacus's ``RDPAccountant.DEFAULT_ALPHAS``.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
)

_STOP = -30.0  # the fractional-order series stops when its terms fall below exp(-30)


def _log_add(a: float, b: float) -> float:
    """``log(exp(a) + exp(b))``."""
    lo, hi = min(a, b), max(a, b)
    if lo == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """``log(exp(a) - exp(b))`` for ``a >= b``."""
    if b == -math.inf:
        return a
    if a < b:
        raise ValueError("the log of a negative number")
    if a == b:
        return -math.inf
    return a + math.log(-math.expm1(b - a))


def _log_erfc(x: float) -> float:
    """``log(erfc(x))``, also where ``erfc`` underflows (an asymptotic series beyond x = 20)."""
    if x < 20.0:
        return math.log(math.erfc(x))
    r = 1.0 / (x * x)
    return (
        -x * x
        - math.log(x)
        - 0.5 * math.log(math.pi)
        + math.log1p(-r / 2 + 3 * r * r / 4 - 15 * r**3 / 8)
    )


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    for k in range(alpha + 1):
        log_coef = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        term = (
            log_coef
            + k * math.log(q)
            + (alpha - k) * math.log1p(-q)
            + (k * k - k) / (2 * sigma * sigma)
        )
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    log_a0 = log_a1 = -math.inf
    z0 = sigma * sigma * math.log(1 / q - 1) + 0.5
    log_coef, positive = 0.0, True  # C(alpha, 0) = 1, kept as log|C| and its sign
    i = 0
    while True:
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma * sigma) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma * sigma) + log_e1
        if positive:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        if max(log_s0, log_s1) < _STOP:
            return _log_add(log_a0, log_a1)
        # C(alpha, i + 1) = C(alpha, i) * (alpha - i) / (i + 1)
        factor = (alpha - i) / (i + 1)
        if factor == 0:
            return _log_add(log_a0, log_a1)
        log_coef += math.log(abs(factor))
        positive = positive == (factor > 0)
        i += 1


def _rdp_one(q: float, sigma: float, alpha: float) -> float:
    if q == 0:
        return 0.0
    if sigma == 0 or math.isinf(alpha):
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma * sigma)
    if float(alpha).is_integer():
        log_a = _log_a_integer(q, sigma, int(alpha))
    else:
        log_a = _log_a_fractional(q, sigma, alpha)
    return log_a / (alpha - 1)


def _check(noise_multiplier: float, sample_rate: float) -> tuple[float, float]:
    z, q = float(noise_multiplier), float(sample_rate)
    if not (math.isfinite(z) and z >= 0):
        raise ConfigError(
            f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}"
        )
    if not 0.0 <= q <= 1.0:
        raise ConfigError(f"sample_rate must lie in [0, 1], got {sample_rate!r}")
    return z, q


def compute_rdp(
    sample_rate: float, noise_multiplier: float, steps: int, orders: Sequence[float]
) -> list[float]:
    """RDP of ``steps`` subsampled Gaussian releases, one value per order.

    Parameters
    ----------
    sample_rate:
        Probability ``q`` that one individual takes part in a release.
    noise_multiplier:
        Noise standard deviation over the sensitivity (``z``).
    steps:
        Releases composed.
    orders:
        Rényi orders ``> 1`` (``inf`` allowed).
    """
    z, q = _check(noise_multiplier, sample_rate)
    if any(not a > 1 for a in orders):
        raise ConfigError("Rényi orders must be > 1")
    return [steps * _rdp_one(q, z, float(a)) for a in orders]


def epsilon_from_rdp(
    orders: Sequence[float], rdp: Sequence[float], delta: float
) -> tuple[float, float]:
    """``(epsilon, best order)`` for ``delta`` from RDP values (Balle et al. 2020's conversion)."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta must lie in (0, 1), got {delta!r}")
    best, best_order = math.inf, math.nan
    for a, r in zip(orders, rdp, strict=True):
        if math.isinf(a) or math.isinf(r) or math.isnan(r):
            continue
        eps = r - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        if eps < best:
            best, best_order = eps, a
    return max(best, 0.0), best_order


class RDPAccountant:
    """Adds up the RDP of Gaussian releases; :meth:`epsilon` for a given delta.

    Parameters
    ----------
    orders:
        Rényi orders to track (default :data:`DEFAULT_ORDERS`).

    Examples
    --------
    >>> acc = RDPAccountant()
    >>> for _ in range(2250):
    ...     acc.step(noise_multiplier=1.5, sample_rate=0.04)
    >>> round(acc.epsilon(1e-5), 4)
    7.3291
    """

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        self.orders = tuple(float(a) for a in orders)
        if not self.orders or any(not a > 1 for a in self.orders):
            raise ConfigError("RDPAccountant needs Rényi orders > 1")
        self.rdp = [0.0] * len(self.orders)
        #: Releases accounted so far.
        self.steps = 0

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Account ``steps`` releases with noise ``noise_multiplier`` at ``sample_rate``."""
        add = compute_rdp(sample_rate, noise_multiplier, steps, self.orders)
        self.rdp = [r + a for r, a in zip(self.rdp, add, strict=True)]
        self.steps += steps

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far, for ``delta``."""
        return epsilon_from_rdp(self.orders, self.rdp, delta)[0]

    def epsilon_after(
        self, delta: float, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> float:
        """Epsilon if ``steps`` more releases were made (nothing is accounted)."""
        add = compute_rdp(sample_rate, noise_multiplier, steps, self.orders)
        return epsilon_from_rdp(
            self.orders, [r + a for r, a in zip(self.rdp, add, strict=True)], delta
        )[0]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the orders, the RDP so far and the step count."""
        return {"orders": list(self.orders), "rdp": list(self.rdp), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (the orders must match)."""
        if [float(a) for a in state["orders"]] != list(self.orders):
            raise ConfigError("the checkpointed accountant tracked other Rényi orders")
        self.rdp = [float(r) for r in state["rdp"]]
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return f"RDPAccountant(steps={self.steps})"
