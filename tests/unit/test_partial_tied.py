"""Partial collaborators, tied tensors and model-sized header bounds, over the real protocol code.

The Maintainers run on an in-memory network (the transports, handshake and
validation are the code that runs on ZeroMQ); the wire cases encode and
decode real frames.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.errors import ConfigError, PeerTimeout, ProtocolError, RemoteError
from zmqfed.federated import ErrorCode, MemoryNetwork
from zmqfed.functional import count_step, naive_aggregation
from zmqfed.optim import FederatedOptimizer
from zmqfed.partial import trainable_state_dict
from zmqfed.props import AGGREGATOR
from zmqfed.wire import MAGIC, PROTOCOL_VERSION, Envelope, Limits, decode, encode

TIMEOUT = 20.0


def _full(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "base.w": torch.randn(6, 4, generator=g),
        "base.b": torch.randn(4, generator=g),
        "head.w": torch.randn(4, 2, generator=g),
        "head.b": torch.randn(2, generator=g),
    }


def _run(fn: Callable[[], None], errors: list[BaseException]) -> threading.Thread:
    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _star(n: int) -> Any:
    return topo.star(n, "ipc:///memory/partial")


def test_partial_collaborators_exchange_their_subset_and_fedavg_weights_per_tensor() -> None:
    net = MemoryNetwork()
    star = _star(2)
    agg_sd = {k: torch.nn.Parameter(v) for k, v in _full(0).items()}
    before = {k: v.detach().clone() for k, v in agg_sd.items()}
    agg = Maintainer(topo.analysis(star, "aggregator")[0], agg_sd, network=net, timeout=TIMEOUT)
    subsets = {"client0": ["head.w", "head.b"], "client1": ["head.w"]}
    cols = {}
    for i, name in enumerate(("client0", "client1")):
        own = {k: v for k, v in _full(i + 1).items() if k in subsets[name]}
        cols[name] = Maintainer(
            topo.analysis(star, name)[0], own, network=net, timeout=TIMEOUT, partial=True
        )
    got: dict[str, set[str]] = {}
    sent: dict[str, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def work(name: str, weight: int) -> Callable[[], None]:
        def fn() -> None:
            m = cols[name]
            m.step(upload=False)
            got[name] = set(m.data)
            m.unpackage()
            with torch.no_grad():
                for t in m.state_dict.values():
                    t.add_(weight)
            sent[name] = {k: v.clone() for k, v in m.state_dict.items()}
            m.meta["instances"] = weight
            m.package()
            m.step(download=False)

        return fn

    with agg:
        count_step(2)
    try:
        threads = [_run(work("client0", 1), errors), _run(work("client1", 3), errors)]
        agg.step()  # serve both downloads and receive both uploads
        for t in threads:
            t.join(TIMEOUT)
        assert not errors, errors
        assert got == {"client0": {"head.w", "head.b"}, "client1": {"head.w"}}
        server = FederatedOptimizer(torch.optim.SGD(agg_sd.values(), lr=1.0), AGGREGATOR)
        server.zero_grad()
        naive_aggregation(agg.data_list, agg.meta_list, optim_list=server)
        server.step()
        with torch.no_grad():
            # head.w: both carry it (weights 1 and 3); head.b: only client0; base: nobody
            want_w = (sent["client0"]["head.w"] * 1 + sent["client1"]["head.w"] * 3) / 4
            torch.testing.assert_close(agg_sd["head.w"], want_w, rtol=0, atol=1e-6)
            torch.testing.assert_close(
                agg_sd["head.b"], sent["client0"]["head.b"], rtol=0, atol=1e-6
            )
            assert torch.equal(agg_sd["base.w"], before["base.w"])
            assert torch.equal(agg_sd["base.b"], before["base.b"])
    finally:
        for m in (agg, *cols.values()):
            m.close()


def test_upload_must_carry_exactly_the_declared_subset() -> None:
    net = MemoryNetwork()
    star = _star(1)
    agg = Maintainer(topo.analysis(star, "aggregator")[0], _full(0), network=net, timeout=TIMEOUT)
    own = {k: v for k, v in _full(1).items() if k.startswith("head")}
    col = Maintainer(
        topo.analysis(star, "client0")[0], own, network=net, timeout=TIMEOUT, partial=True
    )
    errors: list[BaseException] = []
    seen: list[BaseException] = []

    def fn() -> None:
        col.step(upload=False)
        col.package()
        del col.packaged_data["head.b"]  # declared, but not sent
        try:
            col.step(download=False)
        except RemoteError as exc:
            seen.append(exc)
        col.package()
        col.packaged_data["base.w"] = {"param": _full(1)["base.w"]}  # not declared
        try:
            col.step(download=False)
        except RemoteError as exc:
            seen.append(exc)

    handled: list[bool] = []

    def count(ctx: Any) -> None:
        handled.append(bool(ctx.flag))
        if len(handled) == 2:
            agg.manual_stop()

    agg.on("upload_handled", count)
    try:
        thread = _run(fn, errors)
        agg.step()  # serves the download, then refuses the two uploads
        thread.join(TIMEOUT)
        assert not errors, errors
        assert [e.code for e in seen] == [ErrorCode.BAD_UPLOAD, ErrorCode.BAD_UPLOAD]
        assert "lacks 1 tensors" in seen[0].reason and "head.b" in seen[0].reason
        assert "unknown tensors" in seen[1].reason and "base.w" in seen[1].reason
        assert handled == [False, False] and agg.data_list == []
    finally:
        col.close()
        agg.close()


def test_a_hello_declaring_tensors_the_aggregator_lacks_is_refused() -> None:
    net = MemoryNetwork()
    star = _star(1)
    agg = Maintainer(topo.analysis(star, "aggregator")[0], _full(0), network=net, timeout=TIMEOUT)
    own = {"head.w": torch.zeros(4, 2), "lora.A": torch.zeros(2, 2)}
    col = Maintainer(
        topo.analysis(star, "client0")[0], own, network=net, timeout=TIMEOUT, partial=True
    )
    errors: list[BaseException] = []
    seen: list[RemoteError] = []

    def fn() -> None:
        try:
            col.step(upload=False, timeout=5.0)
        except RemoteError as exc:
            seen.append(exc)

    agg.on("after_peer", lambda ctx: agg.manual_stop() if seen else None)
    try:
        thread = _run(fn, errors)
        with contextlib.suppress(PeerTimeout):  # stopped once refused, or nobody joined
            agg.step(timeout=10.0)
        thread.join(TIMEOUT)
        assert not errors, errors
        assert seen and seen[0].code == ErrorCode.SUBSET and "lora.A" in seen[0].reason
    finally:
        col.close()
        agg.close()


def test_partial_is_for_collaborators_and_trainable_state_dict_takes_trainable_tensors() -> None:
    star = _star(1)
    with pytest.raises(ConfigError, match="for collaborators"):
        Maintainer(
            topo.analysis(star, "aggregator")[0], _full(0), network=MemoryNetwork(), partial=True
        )
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1)
    )
    for p in model[0].parameters():
        p.requires_grad_(False)
    sd = trainable_state_dict(model)
    assert sorted(sd) == ["1.bias", "1.weight", "2.bias", "2.weight"]
    assert sd["2.weight"] is model[2].weight  # the module's own tensors
    with_buffers = trainable_state_dict(model, buffers=True)
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(with_buffers)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameter"):
        trainable_state_dict(model)


# ----------------------------------------------------------------------------- tied tensors
def _tied_model() -> dict[str, torch.Tensor]:
    emb = torch.nn.Parameter(torch.randn(50, 8))
    return {
        "wte.weight": emb,
        "h.weight": torch.nn.Parameter(torch.randn(8, 8)),
        "lm_head.weight": emb,
    }


def test_tied_tensors_travel_once_and_arrive_tied() -> None:
    sd = _tied_model()
    frames = encode(Envelope("DATA", "agg", tensors={k: {"param": v} for k, v in sd.items()}))
    doc = json.loads(bytes(frames[0])[len(MAGIC) + 1 :])
    assert [d["key"] for d in doc["tensors"]] == ["wte.weight", "h.weight"]
    assert doc["tied"] == [["lm_head.weight", "wte.weight"]]
    assert len(frames) == 3  # header + two tensor frames: the embedding once
    env = decode([bytes(memoryview(f)) for f in frames])
    assert env.tensors["lm_head.weight"]["param"] is env.tensors["wte.weight"]["param"]
    assert torch.equal(env.tensors["lm_head.weight"]["param"], sd["wte.weight"])
    assert env.nbytes == (50 * 8 + 8 * 8) * 4
    # tensors that only look alike are not tied
    twins = {"a": {"param": torch.zeros(3)}, "b": {"param": torch.zeros(3)}}
    assert "tied" not in json.loads(bytes(encode(Envelope("PUSH", "x", tensors=twins))[0])[7:])


@pytest.mark.parametrize(
    ("tied", "match"),
    [
        ([["b", "nope"]], "no descriptor lists"),
        ([["a", "a"]], "described twice"),
        ([["b", "a"], ["b", "a"]], "described twice"),
        ([["b"]], r"must be \[alias, source\]"),
        ({"b": "a"}, "must be a list"),
    ],
)
def test_hostile_tied_lists_are_refused(tied: Any, match: str) -> None:
    frames = encode(Envelope("PUSH", "x", tensors={"a": {"param": torch.zeros(2)}}))
    doc = json.loads(bytes(frames[0])[len(MAGIC) + 1 :])
    doc["tied"] = tied
    head = MAGIC + bytes([PROTOCOL_VERSION]) + json.dumps(doc).encode()
    with pytest.raises(ProtocolError, match=match):
        decode([head, *frames[1:]])


def test_tied_upload_is_one_update_of_the_shared_tensor() -> None:
    net = MemoryNetwork()
    star = _star(1)
    agg_sd = _tied_model()
    agg = Maintainer(topo.analysis(star, "aggregator")[0], agg_sd, network=net, timeout=TIMEOUT)
    col_sd = _tied_model()
    col = Maintainer(topo.analysis(star, "client0")[0], col_sd, network=net, timeout=TIMEOUT)
    errors: list[BaseException] = []
    tied_on_arrival: list[bool] = []

    def fn() -> None:
        col.step(upload=False)
        tied_on_arrival.append(
            col.data["lm_head.weight"]["param"] is col.data["wte.weight"]["param"]
        )
        col.unpackage()
        col.meta["instances"] = 1
        col.package()
        col.step(download=False)

    with agg:
        count_step(1)
    try:
        thread = _run(fn, errors)
        agg.step()
        thread.join(TIMEOUT)
        assert not errors, errors
        assert tied_on_arrival == [True]
        assert torch.equal(col_sd["wte.weight"], agg_sd["wte.weight"])
        assert col_sd["lm_head.weight"] is col_sd["wte.weight"]
        (update,) = agg.data_list
        assert len(update) == 2  # keyed by the aggregator's tensors: the tied one once
        assert agg.stats["bytes_in"] == (50 * 8 + 8 * 8) * 4
    finally:
        col.close()
        agg.close()


# ----------------------------------------------------------------------------- tensor count
def test_ten_thousand_tensors_with_optimizer_state_fit_a_model_sized_header() -> None:
    sd = {f"model.layers.{i}.mlp.weight": torch.zeros(2) for i in range(10_000)}
    tensors = {
        k: {"param": v, "exp_avg": v.clone(), "exp_avg_sq": v.clone()} for k, v in sd.items()
    }
    env = Envelope("PUSH", "c", tensors=tensors)
    with pytest.raises(ProtocolError, match="max_header_bytes=65536"):
        encode(env)  # the fixed default bound of earlier versions
    limits = Limits.for_model(sd)
    frames = encode(env, limits=limits)
    assert len(frames[0]) < limits.max_header_bytes
    out = decode([bytes(memoryview(f)) for f in frames], limits=limits)
    assert len(out.tensors) == 10_000 and set(out.tensors["model.layers.7.mlp.weight"]) == {
        "param",
        "exp_avg",
        "exp_avg_sq",
    }
    # the bound grows with the model, so a hostile header is bounded by it
    pad = MAGIC + bytes([PROTOCOL_VERSION]) + b'{"pad":"' + b"x" * limits.max_header_bytes + b'"}'
    with pytest.raises(ProtocolError, match=f"limit max_header_bytes={limits.max_header_bytes}"):
        decode([pad], limits=limits)
    small = Limits.for_model({"w": torch.zeros(1)})
    assert small.max_header_bytes < 70_000


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_round_trip_and_integer_buffers_take_the_max(dtype) -> None:
    net = MemoryNetwork()
    star = _star(2)

    def model(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {
            "w": torch.nn.Parameter(torch.randn(8, 4, generator=g).to(dtype)),
            "bn.running_mean": torch.randn(4, generator=g).to(dtype),
            "bn.num_batches_tracked": torch.tensor(10 * seed, dtype=torch.int64),
        }

    agg_sd = model(0)
    agg = Maintainer(topo.analysis(star, "aggregator")[0], agg_sd, network=net, timeout=TIMEOUT)
    cols = {
        n: Maintainer(topo.analysis(star, n)[0], model(i + 1), network=net, timeout=TIMEOUT)
        for i, n in enumerate(("client0", "client1"))
    }
    sent: dict[str, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def work(name: str, weight: int) -> Callable[[], None]:
        def fn() -> None:
            m = cols[name]
            m.step(upload=False)
            assert all(m.data[k]["param"].dtype == v.dtype for k, v in m.state_dict.items())
            mine = {k: v.detach().clone() for k, v in m.state_dict.items()}  # own values
            m.unpackage()
            with torch.no_grad():
                for k, v in m.state_dict.items():
                    v.copy_(mine[k])  # upload this collaborator's own model
            sent[name] = mine
            m.meta["instances"] = weight
            m.package()
            m.step(download=False)

        return fn

    with agg:
        count_step(2)
    try:
        threads = [_run(work("client0", 1), errors), _run(work("client1", 3), errors)]
        agg.step()
        for t in threads:
            t.join(TIMEOUT)
        assert not errors, errors
        server = FederatedOptimizer(torch.optim.SGD([agg_sd["w"]], lr=1.0), AGGREGATOR)
        server.zero_grad()
        naive_aggregation(agg.data_list, agg.meta_list, optim_list=server)
        server.step()
        assert agg_sd["w"].dtype == dtype and agg_sd["bn.running_mean"].dtype == dtype
        for key in ("w", "bn.running_mean"):
            want = (sent["client0"][key].float() + 3 * sent["client1"][key].float()) / 4
            torch.testing.assert_close(agg_sd[key].float(), want, rtol=2e-2, atol=2e-2)
        # the integer counter is never averaged into a float: the larger of the two
        assert agg_sd["bn.num_batches_tracked"].dtype == torch.int64
        assert int(agg_sd["bn.num_batches_tracked"]) == 20
    finally:
        for m in (agg, *cols.values()):
            m.close()


# ----------------------------------------------------------------------------- algorithms
def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    for p in net[0].parameters():  # a frozen backbone; the head trains
        p.requires_grad_(False)
    return net


@pytest.mark.parametrize("algo", ["fedprox", "scaffold", "fedyogi"])
def test_partial_collaborators_through_api_with_each_algorithm(algo: str) -> None:
    from zmqfed import API
    from zmqfed.api import run_collaborator
    from zmqfed.functional import average_aggregation
    from zmqfed.optim import FedYogi, ProxOptimizer, ScaffoldOptimizer
    from zmqfed.props import COLLABORATOR

    net = MemoryNetwork()
    star = _star(2)
    agg_net = _net(0)
    frozen = {k: v.clone() for k, v in agg_net[0].state_dict().items()}
    head = {k: v.clone() for k, v in agg_net[2].state_dict().items()}
    agg = Maintainer(
        topo.analysis(star, "aggregator")[0],
        agg_net.state_dict(keep_vars=True),
        network=net,
        timeout=TIMEOUT,
    )
    params = list(agg_net.parameters())
    if algo == "scaffold":
        server: Any = ScaffoldOptimizer(torch.optim.SGD(params, lr=1.0), role=AGGREGATOR)
    elif algo == "fedyogi":
        server = FedYogi(params, lr=0.05)
    else:
        server = FederatedOptimizer(torch.optim.SGD(params, lr=1.0), AGGREGATOR)
    with agg:
        count_step(2)
    errors: list[BaseException] = []
    cols = []
    threads = []
    for i, name in enumerate(("client0", "client1")):
        local_net = _net(0)
        col = Maintainer(
            topo.analysis(star, name)[0],
            trainable_state_dict(local_net),
            network=net,
            timeout=TIMEOUT,
            partial=True,
        )
        cols.append(col)
        sgd = torch.optim.SGD([p for p in local_net.parameters() if p.requires_grad], lr=0.1)
        if algo == "scaffold":
            local: Any = ScaffoldOptimizer(sgd, role=COLLABORATOR)
        elif algo == "fedprox":
            local = ProxOptimizer(sgd, COLLABORATOR, mu=0.1)
        else:
            local = FederatedOptimizer(sgd, COLLABORATOR)
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)

        def train(
            meta: Any, local_net: Any = local_net, local: Any = local, x: Any = x, y: Any = y
        ) -> dict[str, Any]:
            for _ in range(3):
                loss = torch.nn.functional.cross_entropy(local_net(x), y)
                local.zero_grad()
                loss.backward()
                local.step()
            return {"instances": 16, "loss": float(loss.detach())}

        threads.append(
            _run(
                lambda col=col, train=train, local=local: run_collaborator(
                    col, train, fed_optim=local, rounds=2
                ),
                errors,
            )
        )
    try:
        rule = average_aggregation if algo == "scaffold" else naive_aggregation
        try:
            API(agg, server, 2, rule, progress=False, step_timeout=TIMEOUT).run()
        finally:
            for t in threads:
                t.join(1 if errors else TIMEOUT)
            assert not errors, errors
        for k, v in agg_net[0].state_dict().items():
            assert torch.equal(v, frozen[k]), f"the frozen {k} changed"
        assert not torch.equal(agg_net[2].weight, head["weight"])
        assert all(torch.isfinite(p).all() for p in agg_net.parameters())
    finally:
        for m in (agg, *cols):
            m.close()
