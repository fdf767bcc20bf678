"""Secure aggregation over real sockets: collaborators in threads, the aggregator in the test.

Each collaborator's "training" sets its model to a known update with a
known weight, so the secure result can be compared with plain FedAvg of the
same updates (``naive_aggregation``) within the quantization error.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import zmqfed.topo as topo
from zmqfed.api import API, run_collaborator
from zmqfed.core import Maintainer, StepContext, step_points
from zmqfed.errors import ConfigError, PeerOffline, RemoteError, SecurityError
from zmqfed.federated import Curve, create_keys
from zmqfed.functional import (
    SecAggAborted,
    count_step,
    naive_aggregation,
    secure_aggregation,
)
from zmqfed.functional.secagg import SecAggServer
from zmqfed.functional.secagg.client import b64
from zmqfed.functional.secagg.ring import SecAggConfig, from_wire
from zmqfed.functional.secagg.server import _layout
from zmqfed.optim import FederatedOptimizer

WEIGHTS = [30.0, 120.0, 5.0, 60.0, 250.0, 77.0, 18.0, 400.0]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 10))


def _update(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in _net().state_dict().items()}


def _bound(cfg: SecAggConfig, weights: list[float], largest: float) -> float:
    """The worst-case error of the secure mean (every rounding error at its extreme)."""
    n, q = len(weights), cfg.quantization_range
    factors = sum(weights) / cfg.max_weight
    return (n * 2 * cfg.clipping_range / q + largest * n / q) / (factors - n / q)


class Federation:
    """An aggregator (this thread) and collaborators (threads) on real sockets."""

    def __init__(self, endpoint: str, n: int, slow: float, curve_dir: Path | None = None):
        self.star = topo.star(n, endpoint)
        self.names = sorted(n.nick_name for n in self.star.nodes if n.nick_name != "aggregator")
        self.timeout = 60 * slow
        self.curve = Curve(curve_dir) if curve_dir is not None else None
        self.net = _net()
        props = topo.analysis(self.star, "aggregator")[0]
        self.agg = Maintainer(
            props, self.net.state_dict(keep_vars=True), timeout=self.timeout, curve=self.curve
        )
        self.cols: dict[str, Maintainer] = {}
        self.errors: dict[str, BaseException] = {}
        self.threads: list[threading.Thread] = []

    def collaborator(
        self, i: int, configure: Callable[[Maintainer], None] = lambda m: None, **secagg: Any
    ) -> None:
        name = self.names[i]
        net = _net()
        props = topo.analysis(self.star, name)[0]
        m = Maintainer(
            props, net.state_dict(keep_vars=True), timeout=self.timeout, curve=self.curve
        )
        self.cols[name] = m
        with m:
            secure_aggregation(**secagg)
        configure(m)

        def train(meta: Any) -> dict[str, Any]:
            with torch.no_grad():
                for key, value in _update(i).items():
                    net.state_dict()[key].copy_(value)
            return {"instances": WEIGHTS[i], "loss": float(i)}

        def target() -> None:
            try:
                run_collaborator(m, train, rounds=1)
            except BaseException as exc:  # reported to the test
                self.errors[name] = exc
            finally:
                m.close()

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(self.timeout)
            assert not thread.is_alive(), "a collaborator hangs"

    def api(self, **kwargs: Any) -> API:
        optim = FederatedOptimizer(torch.optim.SGD(self.net.parameters(), lr=1.0), "aggregator")
        return API(
            self.agg,
            optim,
            1,
            naive_aggregation,
            progress=False,
            evaluate=lambda: {"updates": len(self.agg.data_list)},
            reduce_func=lambda metas: {"loss": metas[0]["loss"]},
            **kwargs,
        )

    def plain_fedavg(self, clients: list[int]) -> dict[str, torch.Tensor]:
        """What plain FedAvg of the same updates gives (the reference)."""
        own = _net().state_dict(keep_vars=True)
        data = [{own[k]: {"param": v} for k, v in _update(i).items()} for i in clients]
        metas = [{"instances": WEIGHTS[i]} for i in clients]
        result = naive_aggregation(data, metas)
        return {k: result[p]["param"] for k, p in own.items()}

    def close(self) -> None:
        self.agg.close()
        for m in self.cols.values():
            m.close()


@pytest.fixture
def federation(free_tcp_endpoint, ipc_endpoint, slow_factor) -> Iterator[Callable[..., Federation]]:
    made: list[Federation] = []

    def make(n: int, *, ipc: bool = False, curve_dir: Path | None = None) -> Federation:
        endpoint = ipc_endpoint if ipc else free_tcp_endpoint
        made.append(Federation(endpoint, n, slow_factor, curve_dir))
        return made[-1]

    yield make
    for fed in made:
        fed.close()


def _assert_close_to(net: nn.Module, expected: dict[str, torch.Tensor], bound: float) -> None:
    for key, value in net.state_dict().items():
        err = (value - expected[key]).abs().max().item()
        assert err <= bound, f"{key}: error {err} above the quantization bound {bound}"


@pytest.mark.parametrize("mode", ["tcp", "ipc", "curve"])
def test_the_secure_mean_equals_plain_fedavg_within_the_quantization_error(
    federation, tmp_path, mode
):
    keys = None
    if mode == "curve":
        keys = tmp_path / "keys"
        for name in ["aggregator", *[f"client{i}" for i in range(5)]]:
            create_keys(keys, name)
    fed = federation(5, ipc=mode == "ipc", curve_dir=keys)
    with fed.agg:
        count_step(5)
        server = secure_aggregation()
    assert isinstance(server, SecAggServer) and server.mode == ("curve" if keys else "ephemeral")
    for i in range(5):
        fed.collaborator(i)
    api = fed.api()
    api.run()
    fed.join()
    assert not fed.errors, fed.errors
    (record,) = api.records
    assert record.metrics["updates"] == 1  # data_list held one update: the secure mean
    assert server.last_round["survivors"] and not server.last_round["dropped"]
    assert sorted(server.last_round["survivors"]) == fed.names
    largest = max(v.abs().max().item() for i in range(5) for v in _update(i).values())
    _assert_close_to(
        fed.net, fed.plain_fedavg(list(range(5))), _bound(SecAggConfig(), WEIGHTS[:5], largest)
    )
    assert record.metrics["loss"] == pytest.approx(2.0)  # the clients' mean, in the clear


@pytest.mark.parametrize("when", ["after masking", "before masking"])
def test_a_dropout_still_yields_the_right_sum(federation, when):
    """client2 leaves after its masked upload (it counts) or just before it (it does not)."""
    fed = federation(6)
    with fed.agg:
        count_step(6)
        server = secure_aggregation()
    victim = 2

    def leave(m: Maintainer, tensors: dict, meta: dict, send: Any) -> Any:
        if when == "after masking":
            ack = send(tensors, meta)
            m.close()
            return ack
        m.close()
        raise ConnectionAbortedError("left before uploading")

    for i in range(6):
        fed.collaborator(
            i, (lambda m: m.register_upload_wrapper(leave)) if i == victim else (lambda m: None)
        )
    api = fed.api()
    api.run()
    fed.join()
    name = fed.names[victim]
    assert set(fed.errors) == {name}  # only the victim failed, as it was made to
    clients = list(range(6)) if when == "after masking" else [i for i in range(6) if i != victim]
    assert server.last_round["dropped"] == ([] if when == "after masking" else [name])
    assert (name in server.last_round["survivors"]) == (when == "after masking")
    largest = max(v.abs().max().item() for i in clients for v in _update(i).values())
    weights = [WEIGHTS[i] for i in clients]
    _assert_close_to(fed.net, fed.plain_fedavg(clients), _bound(SecAggConfig(), weights, largest))


def test_a_member_that_joins_late_is_awaited_not_dropped(federation, slow_factor):
    """client2 starts only after the others advertised their keys: the round waits for it.

    A member that never joined is no dropout: a phase closing without it
    would cut every slow starter out of the first round.
    """
    fed = federation(3)
    with fed.agg:
        count_step(3)
        server = secure_aggregation()
    for i in (0, 1):
        fed.collaborator(i)

    def late() -> None:
        deadline = time.monotonic() + 30 * slow_factor
        while time.monotonic() < deadline:
            rnd = server.round
            if rnd is not None and len(rnd.publics) == 2:
                break
            time.sleep(0.01)
        time.sleep(0.5)  # the keys phase had every joined member's keys this long
        fed.collaborator(2)

    starter = threading.Thread(target=late, daemon=True)
    starter.start()
    fed.api().run()
    starter.join(fed.timeout)
    fed.join()
    assert not fed.errors, fed.errors
    assert sorted(server.last_round["survivors"]) == fed.names
    assert server.last_round["dropped"] == []
    largest = max(v.abs().max().item() for i in range(3) for v in _update(i).values())
    _assert_close_to(
        fed.net, fed.plain_fedavg([0, 1, 2]), _bound(SecAggConfig(), WEIGHTS[:3], largest)
    )


def test_below_the_threshold_the_round_aborts_and_the_model_stays(federation, caplog):
    """Three clients, threshold 2: two leave before uploading, one masked input cannot go on."""
    caplog.set_level(logging.INFO, logger="zmqfed.api")
    fed = federation(3)
    with fed.agg:
        count_step(3)
        secure_aggregation(threshold=2)
    before = {k: v.detach().clone() for k, v in fed.net.state_dict().items()}

    def leave(m: Maintainer, tensors: dict, meta: dict, send: Any) -> Any:
        m.close()
        raise ConnectionAbortedError("left before uploading")

    for i in range(3):
        fed.collaborator(
            i, (lambda m: m.register_upload_wrapper(leave)) if i else (lambda m: None), threshold=2
        )
    api = fed.api()
    with pytest.raises(
        SecAggAborted, match="only 1 clients uploaded masked inputs, fewer than the threshold 2"
    ):
        api.run()
    fed.agg.close(final=True)
    fed.join()
    for key, value in fed.net.state_dict().items():
        assert torch.equal(value, before[key]), key
    # The survivor is not left waiting: its parked request was refused with the reason,
    # or, if it asked after the abort, it learnt that the federation is over.
    survivor = fed.errors.get(fed.names[0])
    if survivor is None:  # run_collaborator says which, and returns
        assert (
            "upload not counted (discarded): secure aggregation of version 1 aborted" in caplog.text
            or "upload not sent: aggregator 'aggregator' finished the federation" in caplog.text
        ), caplog.text
    else:
        assert isinstance(survivor, PeerOffline), survivor


def test_what_the_aggregator_holds_for_a_client_is_uncorrelated_with_its_update(federation):
    fed = federation(3)
    with fed.agg:
        count_step(3)
        server = secure_aggregation()
    held: dict[str, torch.Tensor] = {}
    cfg = server.config

    def capture(ctx: StepContext) -> None:
        pipe = ctx.pipe
        if pipe is not None and pipe.request is not None:  # type: ignore[attr-defined]
            tensors = pipe.request.tensors  # type: ignore[attr-defined]
            layout = _layout(tensors, pipe.meta.get("secagg_ints"))
            held[pipe.nick_name] = from_wire(tensors, layout, cfg)

    fed.agg.on(step_points.upload_received, capture, nice=0)
    for i in range(3):
        fed.collaborator(i)
    fed.api().run()
    fed.join()
    assert not fed.errors
    update = torch.cat([v.reshape(-1) for _, v in sorted(_update(0).items())])
    quantized = (update.clamp(-8, 8) * WEIGHTS[0] / 1000 + 8) * (cfg.quantization_range / 16)
    masked = held[fed.names[0]][:-1].to(torch.float64)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])

    # Bounds at 5 standard deviations of what independent uniform noise gives
    # for n values (about 1 in 3.5 million runs fails by chance): correlation
    # 1/sqrt(n), the mean of uniform [0, 1) draws sqrt(1/12)/sqrt(n).
    n = update.numel()
    assert corr(quantized, update) > 0.99  # the encoding alone would give the update away
    assert abs(corr(masked, update)) < 5 / n**0.5  # 0.127 for the 1,540 values
    assert abs(masked.mean().item() / 2**32 - 0.5) < 5 * (1 / 12) ** 0.5 / n**0.5  # whole ring


class NosyServer(SecAggServer):
    """An aggregator that calls one survivor a dropout too, to rebuild all of its masks."""

    def unmask_request(self, rnd: Any) -> dict[str, Any]:
        request = super().unmask_request(rnd)
        request["dropped"] = [*request["dropped"], request["survivors"][0]]
        return request


def test_clients_refuse_an_aggregator_asking_for_both_shares_of_one_client(federation):
    fed = federation(4)
    with fed.agg:
        count_step(4)
    nosy = NosyServer(SecAggConfig())
    nosy.install(fed.agg)
    for i in range(4):
        fed.collaborator(i)
    with pytest.raises(SecAggAborted, match="cannot remove the masks"):
        fed.api().run()
    fed.agg.close()
    fed.join()
    assert set(fed.errors) == set(fed.names)
    for error in fed.errors.values():
        assert isinstance(error, SecurityError)
        assert "both the self-mask and the pairwise-mask shares" in str(error)
    assert nosy.last_round == {}  # nothing was unmasked


def test_secure_aggregation_checks_its_parameters_against_the_group(federation):
    fed = federation(3)
    with fed.agg, pytest.raises(ConfigError, match="exceed half"):
        secure_aggregation(threshold=1)
    with fed.agg, pytest.raises(ConfigError, match="overflow the ring"):
        secure_aggregation(quantization_range=2**30, modulus_range=2**31)


def test_the_benchmark_runs_and_reports_both_modes(run_python, tmp_path, slow_factor):
    out = tmp_path / "secagg.jsonl"
    proc = run_python(
        script=Path(__file__).resolve().parents[2] / "tools" / "secagg_bench.py",
        args=["--clients", "3", "--models", "digits", "--rounds", "1", "--json", str(out)],
    )
    stdout, stderr = proc.communicate(timeout=120 * slow_factor)
    assert proc.returncode == 0, stdout + stderr
    assert "| digits | 4,810 | 3 |" in stdout
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["plain"]["bytes"] > 0 and row["secagg"]["bytes"] > row["plain"]["bytes"]
    assert row["secagg"]["seconds"] > 0 and "secagg_bench.py" in row["command"]


def test_malformed_secagg_messages_are_refused_and_the_round_goes_on(federation):
    """A member sends nonsense in every phase, then leaves; the others' round completes."""
    fed = federation(4)
    with fed.agg:
        count_step(4)
        server = secure_aggregation()
    for i in range(3):
        fed.collaborator(i)
    hostile = Maintainer(
        topo.analysis(fed.star, fed.names[3])[0],
        _net().state_dict(keep_vars=True),
        timeout=fed.timeout,
    )
    fed.cols[fed.names[3]] = hostile
    reasons: list[str] = []

    def attack() -> None:
        hostile.update_version(1)
        for meta in (
            {"phase": "nonsense"},
            {"phase": "keys", "public": "not base64!"},
            {"phase": "keys", "public": b64(b"short")},
            {"phase": "shares", "bundles": {"client0": "AAAA"}},
            {"phase": "unmask"},
            {"phase": "reveal", "b": {}, "s": {}},
            {"phase": "keys", "public": b64(bytes(32))},  # a low-order point
        ):
            try:
                hostile.exchange("secagg", meta)
            except RemoteError as exc:
                reasons.append(f"{exc.code}: {exc.reason}")
        hostile.close()

    thread = threading.Thread(target=attack, daemon=True)
    thread.start()
    fed.api().run()
    thread.join(fed.timeout)
    fed.join()
    assert not fed.errors
    assert reasons[:-1] == [
        "discarded: secure aggregation: unknown phase 'nonsense'",
        "discarded: secure aggregation: the public key is not valid base64",
        "discarded: secure aggregation: the public key has 5 bytes, expected 32",
        "discarded: secure aggregation: client3 is not a member of this round",
        "discarded: secure aggregation: client3 uploaded no masked input in this round",
        "discarded: secure aggregation: client3 cannot reveal shares now",
    ]
    assert reasons[-1].startswith("discarded: secure aggregation: not a usable X25519 public key")
    assert sorted(server.last_round["survivors"]) == fed.names[:3]
    largest = max(v.abs().max().item() for i in range(3) for v in _update(i).values())
    _assert_close_to(
        fed.net, fed.plain_fedavg([0, 1, 2]), _bound(SecAggConfig(), WEIGHTS[:3], largest)
    )
