"""Central and local DP hooks through ``API`` over the in-memory network (the real protocol, no sockets).

Collaborators run ``run_collaborator`` in threads; their ``train`` sets the
model to ``served + delta`` with a delta the test chooses, so what the
aggregator ends with has a closed form.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import zmqfed.topo as topo
from zmqfed.api import API, run_collaborator
from zmqfed.core import Maintainer, step_points
from zmqfed.errors import ConfigError
from zmqfed.federated import MemoryNetwork
from zmqfed.functional import (
    AdaptiveClipping,
    PrivacyBudgetSpent,
    RDPAccountant,
    central_dp,
    count_step,
    local_dp,
    naive_aggregation,
)
from zmqfed.optim import FederatedOptimizer

TIMEOUT = 30.0
Delta = Callable[[int, int], dict[str, torch.Tensor]]  # (client, round) -> update


def model(width: int = 8) -> dict[str, torch.Tensor]:
    return {
        "w": torch.zeros(width, 4, requires_grad=True),
        "b": torch.zeros(width, requires_grad=True),
    }


def const_delta(values: list[float], width: int = 8) -> Delta:
    """Client ``i`` moves every value by ``values[i]``: update norm ``|v| * sqrt(5 width)``."""

    def delta(i: int, r: int) -> dict[str, torch.Tensor]:
        return {"w": torch.full((width, 4), values[i]), "b": torch.full((width,), values[i])}

    return delta


def run(
    n: int,
    rounds: int,
    delta: Delta,
    hook: Callable[[], Any],
    *,
    width: int = 8,
    local: bool = False,
    inspect: Callable[[Maintainer], None] | None = None,
) -> tuple[API, dict[str, torch.Tensor], list[Any], list[BaseException]]:
    """``rounds`` rounds of API with ``hook()`` registered (on every node when ``local``)."""
    network = MemoryNetwork()
    star = topo.star(n, "ipc:///memory/dp")
    state = model(width)
    agg = Maintainer(topo.analysis(star, "aggregator")[0], state, network=network, timeout=TIMEOUT)
    with agg:
        count_step(n)
        mech = hook()
    if inspect is not None:
        agg.on(step_points.upload_handled, lambda ctx: inspect(ctx.maintainer), nice=50)
    errors: list[BaseException] = []
    mechs: list[Any] = [mech]
    threads = []
    for i in range(n):
        local_state = model(width)
        col = Maintainer(
            topo.analysis(star, f"client{i}")[0], local_state, network=network, timeout=TIMEOUT
        )
        if local:
            with col:
                mechs.append(hook())

        def train(meta: Any, i: int = i, st: dict[str, torch.Tensor] = local_state) -> dict:
            with torch.no_grad():
                for name, d in delta(i, int(meta["round"])).items():
                    st[name].add_(d)
            return {"instances": 1 + 10 * i}

        def work(col: Maintainer = col, train: Any = train) -> None:
            try:
                run_collaborator(col, train, rounds=rounds, timeout=TIMEOUT)
            except BaseException as exc:
                errors.append(exc)
            finally:
                col.close()

        threads.append(threading.Thread(target=work, daemon=True))
    for t in threads:
        t.start()
    optim = FederatedOptimizer(torch.optim.SGD(state.values(), lr=1.0), "aggregator")
    api = API(agg, optim, rounds, naive_aggregation, progress=False, step_timeout=TIMEOUT)
    try:
        api.run()
    finally:
        agg.close(final=True)
        for t in threads:
            t.join(TIMEOUT)
    return api, state, mechs, errors


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state["b"].detach().reshape(-1), state["w"].detach().reshape(-1)])


# ----------------------------------------------------------------------------- central


def test_central_clips_every_upload_and_a_huge_one_cannot_dominate():
    norms: list[float] = []

    def inspect(m: Maintainer) -> None:  # what every later hook and the rule see
        upload = m.data_list[-1]
        norms.append(math.sqrt(sum(float(s["param"].pow(2).sum()) for s in upload.values())))

    # client 2 tries to move the model by 1e6 per value (and claims the most instances)
    values = [0.1, -0.05, 1e6]
    api, state, _, errors = run(
        3, 1, const_delta(values), lambda: central_dp(0.0, 1.0), inspect=inspect
    )
    assert not errors
    unit = math.sqrt(40)  # norm of a delta of 1 per value
    # the attacker's update is clipped to the bound; the others are within it: untouched
    assert sorted(norms) == pytest.approx([0.05 * unit, 0.1 * unit, 1.0], rel=1e-5)
    # uniform mean of the clipped updates: the attacker moves each value by 1/sqrt(40)/3 only
    want = (0.1 - 0.05 + 1 / unit) / 3
    torch.testing.assert_close(flat(state), torch.full((40,), want), rtol=1e-5, atol=1e-6)
    assert api.records[0].metrics["epsilon"] == math.inf  # no noise: no privacy


def test_central_noise_has_the_calibrated_std():
    z, clip, n, width = 1.5, 2.0, 4, 2500
    _, state, _, errors = run(
        n, 1, const_delta([0.0] * n, width), lambda: central_dp(z, clip, seed=7), width=width
    )
    assert not errors
    noise = flat(state)  # the clipped updates are 0: the model moved by the noise / n only
    assert noise.numel() == 5 * width
    expected = z * clip / n
    # 12,500 samples: the std estimate is within 2 % with overwhelming probability
    assert float(noise.std()) == pytest.approx(expected, rel=0.02)
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(noise.numel())


def test_central_reports_epsilon_and_stops_at_the_target():
    z = 2.0
    acc = RDPAccountant()
    acc.step(z, 1.0, steps=3)
    target = (acc.epsilon(1e-5) + acc.epsilon_after(1e-5, z, 1.0)) / 2  # 3 rounds fit, 4 do not
    api, _, mechs, errors = run(
        2, 10, const_delta([0.01, 0.02]), lambda: central_dp(z, 1.0, target_epsilon=target)
    )
    assert not errors  # the collaborators were told the federation ended
    assert len(api.records) == 3
    assert "privacy budget" in (api.ended_early or "")
    check = RDPAccountant()
    for record in api.records:
        check.step(z, 1.0)
        assert record.metrics["epsilon"] == pytest.approx(check.epsilon(1e-5))
        assert record.metrics["dp_clip"] == 1.0
    assert mechs[0].epsilon <= target


def test_central_target_too_small_for_one_round_is_refused():
    with pytest.raises(ConfigError, match="one round already spends"):
        run(1, 1, const_delta([0.0]), lambda: central_dp(0.5, 1.0, target_epsilon=0.1))


def test_central_adaptive_clip_moves_towards_the_norms():
    # every update has norm 10 * sqrt(40) = 63: far outside the initial clip of 1
    api, _, mechs, errors = run(
        4,
        6,
        const_delta([10.0] * 4),
        lambda: central_dp(0.5, 1.0, adaptive=AdaptiveClipping(learning_rate=0.5), seed=3),
    )
    assert not errors
    clips = [r.metrics["dp_clip"] for r in api.records]
    assert clips[0] == 1.0
    assert clips == sorted(clips) and clips[-1] > 2.5  # exp(0.25) per round, noise aside
    assert all(r.metrics["dp_within_clip"] <= 0.5 for r in api.records)
    # the clip bit costs privacy too: accounted with the combined multiplier
    assert mechs[0].accounted_multiplier < 0.5


# ------------------------------------------------------------------------------- local


def test_local_clips_and_noises_before_upload():
    received: list[torch.Tensor] = []

    def inspect(m: Maintainer) -> None:
        received.append(torch.cat([s["param"].reshape(-1) for s in m.data_list[-1].values()]))

    z, clip, width = 1.0, 0.5, 2000
    _, _, mechs, errors = run(
        2,
        1,
        const_delta([0.0, 100.0], width),
        lambda: local_dp(z, clip, seed=11),
        width=width,
        local=True,
        inspect=inspect,
    )
    assert not errors
    assert len(received) == 2
    for got in received:  # served model is 0: an upload is clip(delta) + noise
        assert float(got.std()) == pytest.approx(z * clip, rel=0.03)
    # the big update was clipped to 0.5 before noise: its mean shift is 0.5 / sqrt(10000)
    shifts = sorted(float(g.mean()) for g in received)
    assert shifts[1] == pytest.approx(0.005, abs=4 * z * clip / 100)
    for mech in mechs[1:]:
        assert mech.accountant.steps == 1
    # the collaborators' epsilon: multiplier z / 2 (two datasets differ by up to 2 clip)
    check = RDPAccountant()
    check.step(z / 2, 1.0)
    assert mechs[1].epsilon == pytest.approx(check.epsilon(1e-5))
    assert mechs[0].epsilon == pytest.approx(check.epsilon(1e-5))


def test_local_adaptive_clip_is_served_and_bits_travel_in_meta():
    bits: list[float] = []

    def inspect(m: Maintainer) -> None:
        bits.append(float(m.meta_list[-1]["dp_clipped"]))

    api, _, mechs, errors = run(
        3,
        4,
        const_delta([5.0] * 3),
        lambda: local_dp(0.1, 1.0, adaptive=AdaptiveClipping(count_stddev=0.1), seed=5),
        local=True,
        inspect=inspect,
    )
    assert not errors
    assert len(bits) == 12 and all(b < 0.1 for b in bits)  # all clipped: -1/2 + noise
    clips = [r.metrics["dp_clip"] for r in api.records]
    assert clips == sorted(clips) and clips[-1] > clips[0]
    served = [h["dp_clip"] for h in mechs[1].history]  # what a collaborator used
    assert served == pytest.approx(clips)


def test_local_collaborator_refuses_to_exceed_its_budget():
    z = 4.0
    acc = RDPAccountant()
    acc.step(z / 2, 1.0, steps=2)
    target = (acc.epsilon(1e-5) + acc.epsilon_after(1e-5, z / 2, 1.0)) / 2
    network = MemoryNetwork()
    star = topo.star(1, "ipc:///memory/dp-budget")
    col = Maintainer(topo.analysis(star, "client0")[0], model(), network=network)
    with col:
        mech = local_dp(z, 1.0, target_epsilon=target)
    col.data = {n: {"param": t.detach().clone()} for n, t in col.state_dict.items()}
    col.receive(col.data, "aggregator")  # as a download would: the served model is kept
    for _ in range(2):
        col.package()
        col.apply_hooks(col.packaged_data, unpackage=False)
    col.package()
    with pytest.raises(PrivacyBudgetSpent, match="target_epsilon"):
        col.apply_hooks(col.packaged_data, unpackage=False)
    assert mech.accountant.steps == 2
    col.close()


def test_hostile_clip_bits_are_clamped():
    network = MemoryNetwork()
    star = topo.star(2, "ipc:///memory/dp-bits")
    agg = Maintainer(topo.analysis(star, "aggregator")[0], model(), network=network)
    with agg:
        mech = local_dp(1.0, 1.0, adaptive=AdaptiveClipping(count_stddev=0.1))
    from zmqfed.meta import Meta

    agg.meta_list = [Meta({"dp_clipped": 1e300}), Meta({"dp_clipped": "nan"})]
    agg.run_step_point(step_points.aggregated, None)
    # 1e300 counts as 0.5 + 6 * 0.1, "nan" as nothing: within = (1.1 + 0) / 2 + 0.5 -> 1
    assert mech.history[0]["dp_within_clip"] == 1.0
    assert mech.clip == pytest.approx(math.exp(-0.2 * 0.5))
    agg.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": -1, "clip": 1}, "noise_multiplier"),
        ({"noise_multiplier": 1, "clip": 0}, "clip"),
        ({"noise_multiplier": 1, "clip": 1, "delta": 1.5}, "delta"),
        ({"noise_multiplier": 1, "clip": 1, "target_epsilon": -2}, "target_epsilon"),
        ({"noise_multiplier": 1, "clip": 1, "adaptive": 0.5}, "AdaptiveClipping"),
    ],
)
def test_bad_arguments_name_what_is_wrong(kwargs, match):
    star = topo.star(1, "ipc:///memory/dp-args")
    agg = Maintainer(topo.analysis(star, "aggregator")[0], model(), network=MemoryNetwork())
    for hook in (central_dp, local_dp):
        with agg, pytest.raises(ConfigError, match=match):
            hook(**kwargs)
    with pytest.raises(ConfigError, match="target_quantile"):
        AdaptiveClipping(target_quantile=1.0)
    agg.close()
