"""Client sampling over real sockets: seeded cohorts, over-selection, participation records.

Five collaborators (threads, each its own Maintainer and DEALER on tcp) run
``run_collaborator``; the aggregator runs ``API`` with
``client_sampling(sample=2, over_select=0.5)``: each round invites three and
ends at two uploads.  Training sets every weight to the collaborator's
number, so FedAvg of a round is the mean of the counted numbers.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import torch
from torch import nn

import zmqfed
import zmqfed.topo as topo
from zmqfed.api import API, run_collaborator
from zmqfed.core import Maintainer
from zmqfed.optim import FederatedOptimizer

NAMES = [f"client{i}" for i in range(5)]
ROUNDS = 3
SLOW = "client4"


def _draw(seed: int, version: int, k: int) -> list[str]:
    return sorted(random.Random(f"{seed}:{version}").sample(sorted(NAMES), k))


def _seed_with_slow_member_drawn() -> int:
    """A seed whose first cohort holds the slow member (so over-selection is exercised)."""
    for seed in range(100):
        if SLOW in _draw(seed, 0, 3):
            return seed
    raise AssertionError("no seed draws the slow member")


def test_sampled_rounds_train_the_cohort_only(free_tcp_endpoint, slow_factor):
    seed = _seed_with_slow_member_drawn()
    topology = topo.star(5, free_tcp_endpoint)
    net = nn.Linear(2, 1)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    agg = Maintainer(
        topo.analysis(topology, "aggregator")[0],
        net.state_dict(keep_vars=True),
        timeout=120 * slow_factor,
    )
    with agg:
        sampling = zmqfed.functional.client_sampling(2, over_select=0.5, seed=seed, min_online=5)
    trained: dict[int, set[str]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def collaborator(i: int) -> None:
        name = NAMES[i]
        try:
            model = nn.Linear(2, 1)
            m = Maintainer(
                topo.analysis(topology, name)[0],
                model.state_dict(keep_vars=True),
                timeout=120 * slow_factor,
            )

            def train(meta: Any) -> dict[str, Any]:
                with lock:
                    trained.setdefault(int(meta["version"]), set()).add(name)
                if name == SLOW:
                    time.sleep(2.0 * slow_factor)  # a straggler: over-selection covers it
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float(i))
                return {"instances": 1}

            run_collaborator(m, train)
            m.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=collaborator, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    server = FederatedOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), "aggregator")
    api = API(agg, server, ROUNDS, zmqfed.functional.naive_aggregation, progress=False)
    api.run()
    stats = agg.stats
    agg.close(final=True)
    for t in threads:
        t.join(60 * slow_factor)
    assert not errors, errors
    records = list(api.records)
    assert [r.participants for r in records] == [2] * ROUNDS
    for r in records:
        # the seeded uniform draw over the five online collaborators
        assert r.cohort == _draw(seed, r.version, 3), r
        assert len(r.counted) == 2 and set(r.counted) <= set(r.cohort)
        # nobody outside the cohort got this version's model
        assert trained.get(r.version, set()) <= set(r.cohort)
    assert SLOW in records[0].cohort and SLOW not in records[0].counted
    assert [s.cohort for s in sampling.history] == [r.cohort for r in records]
    # FedAvg of the last round: the mean of the counted collaborators' numbers
    last = [NAMES.index(n) for n in records[-1].counted]
    for p in net.parameters():
        assert torch.allclose(p, torch.full_like(p, sum(last) / len(last)))
    # the left-out waited parked (WAIT), not refused; only late stragglers are refused
    assert stats["parked"] > 0
    assert set(stats["refused"]) <= {"discarded"}, stats["refused"]


def test_sampling_arguments_are_checked(free_tcp_endpoint):
    topology = topo.star(3, free_tcp_endpoint)
    agg = Maintainer(topo.analysis(topology, "aggregator")[0], {"w": torch.zeros(2)})
    try:
        with agg:
            for kwargs, match in [
                ({}, "exactly one"),
                ({"sample": 2, "fraction": 0.5}, "exactly one"),
                ({"sample": 0}, "positive"),
                ({"fraction": 1.5}, "fraction"),
                ({"sample": 2, "over_select": -1}, "over_select"),
                ({"sample": 2, "min_count": 3}, "min_count"),
            ]:
                try:
                    zmqfed.functional.client_sampling(**kwargs)
                except zmqfed.ConfigError as exc:
                    assert match in str(exc), (kwargs, exc)
                else:
                    raise AssertionError(f"{kwargs} was accepted")
            sampling = zmqfed.functional.client_sampling(fraction=0.5, over_select=1.0)
        assert (sampling.wanted, sampling.invited) == (2, 3)  # ceil(1.5); at most the group
    finally:
        agg.close()


def test_zmqfed_sim_samples_clients_per_round(run_python, tmp_path, slow_factor):
    """``zmqfed-sim --sample``: the daemons' aggregator trains a seeded sample each round."""
    from pathlib import Path

    logdir = tmp_path / "logs"
    proc = run_python(
        module="zmqfed.cli.sim",
        args=[
            "--star", "4",
            "--app", "tests.integration.toy_app:factory",
            "--rounds", "3",
            "--sample", "2",
            "--sample-seed", "3",
            "--set", "min_clients=2",  # with round_timeout: the sample's deadline
            "--set", "round_timeout=60",
            "--set", "min_online=4",  # draw over all four: a reproducible cohort
            "--logdir", str(logdir),
            "--timeout", str(240 * slow_factor),
        ],
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    out, err = proc.communicate(timeout=300 * slow_factor)
    assert proc.returncode == 0, (out, err)
    import json

    lines = (logdir / "aggregator.rounds.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["participants"] for r in records] == [2, 2, 2]
    names = [f"client{i}" for i in range(4)]
    for r in records:
        expected = sorted(random.Random(f"3:{r['version']}").sample(names, 2))
        assert r["cohort"] == expected and sorted(r["counted"]) == expected, r
