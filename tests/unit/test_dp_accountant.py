"""The RDP accountant against published values (TensorFlow Privacy's and Opacus's tests, Mironov 2017)."""

from __future__ import annotations

import math

import pytest

from zmqfed.errors import ConfigError
from zmqfed.functional import RDPAccountant
from zmqfed.functional.dp_accountant import compute_rdp, epsilon_from_rdp


def test_subsampled_gaussian_rdp_matches_tensorflow_privacy():
    # tensorflow_privacy's rdp_accountant_test.test_compute_rdp_sequence: q=0.01,
    # z=2.5, 50 steps, integer and fractional orders
    got = compute_rdp(0.01, 2.5, 50, [1.5, 2.5, 5, 50, 100, math.inf])
    want = [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307, math.inf]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-5)


def test_full_participation_is_the_plain_gaussian():
    # Mironov 2017, proposition 7: RDP of order a is a / (2 z^2)
    for a in (1.5, 2.0, 7.25, 40.0):
        assert compute_rdp(1.0, 2.0, 3, [a])[0] == pytest.approx(3 * a / 8)


def test_epsilon_matches_opacus_published_value():
    # opacus tests/accountants_test.py: z=1.5, q=0.04, 90 epochs, delta=1e-5
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.5, sample_rate=0.04, steps=int(90 / 0.04))
    assert acc.epsilon(1e-5) == pytest.approx(7.32911117143, abs=1e-8)
    assert acc.steps == 2250


def test_same_as_opacus_accountant_step_by_step():
    accountants = pytest.importorskip("opacus.accountants")
    theirs = accountants.RDPAccountant()
    ours = RDPAccountant()
    for z, q in [(1.1, 0.01), (0.7, 0.3), (2.0, 1.0), (0.9, 0.05)] * 5:
        theirs.step(noise_multiplier=z, sample_rate=q)
        ours.step(z, q)
        assert ours.epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    low, high = RDPAccountant(), RDPAccountant()
    eps = []
    for _ in range(5):
        low.step(0.8, 1.0)
        high.step(3.0, 1.0)
        eps.append(low.epsilon(1e-5))
        assert high.epsilon(1e-5) < low.epsilon(1e-5)
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert low.epsilon_after(1e-5, 0.8, 1.0) > eps[-1]
    assert low.steps == 5  # epsilon_after accounts nothing


def test_state_round_trip():
    acc = RDPAccountant()
    acc.step(1.0, 0.5, steps=3)
    again = RDPAccountant()
    again.load_state_dict(acc.state_dict())
    assert again.epsilon(1e-6) == acc.epsilon(1e-6) and again.steps == 3


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: compute_rdp(1.5, 1.0, 1, [2.0]), "sample_rate"),
        (lambda: compute_rdp(0.5, -1.0, 1, [2.0]), "noise_multiplier"),
        (lambda: compute_rdp(0.5, 1.0, 1, [1.0]), "orders"),
        (lambda: epsilon_from_rdp([2.0], [0.1], 0.0), "delta"),
        (lambda: RDPAccountant(orders=[]), "orders"),
    ],
)
def test_bad_input_names_what_is_wrong(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_no_noise_is_no_privacy():
    acc = RDPAccountant()
    acc.step(0.0, 1.0)
    assert acc.epsilon(1e-5) == math.inf
