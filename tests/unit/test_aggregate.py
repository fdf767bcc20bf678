"""Aggregation rules against numpy references: mean, FedAvg, elastic, robust, streaming, reduce."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from zmqfed.errors import ConfigError
from zmqfed.functional.aggregate import (
    StreamingFedAvg,
    average_aggregation,
    elastic_aggregation,
    krum_aggregation,
    krum_select,
    load_param_states,
    median_aggregation,
    naive_aggregation,
    trimmed_mean_aggregation,
)
from zmqfed.functional.reduce import AutoReducer, meta_reduce
from zmqfed.optim import FederatedOptimizer
from zmqfed.props import AGGREGATOR

torch.manual_seed(0)


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    return dict(net.state_dict(keep_vars=True))


def make_updates(net: nn.Module, n: int, seed: int = 0, keys=("exp_avg",), spread: float = 1.0):
    """n updates keyed by the net's tensors: params/buffers plus optimizer-state keys."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        upd = {}
        for p in tensors(net).values():
            if p.is_floating_point():
                state = {"param": p.detach() + spread * torch.randn(p.shape, generator=g)}
                if p.requires_grad:
                    for k in keys:
                        state[k] = torch.randn(p.shape, generator=g)
            else:  # num_batches_tracked
                state = {"param": torch.tensor(10 * (i + 1), dtype=p.dtype)}
            upd[p] = state
        out.append(upd)
    return out


def np_weighted(values, weights):
    v = np.stack([x.double().numpy() for x in values])
    w = np.asarray(weights, dtype=np.float64)
    return np.tensordot(w / w.sum(), v, axes=1)


# ----------------------------------------------------------------------- mean rules


@pytest.mark.parametrize("weighted", [False, True])
def test_mean_rules_match_numpy(weighted):
    net = make_net()
    before = {n: p.detach().clone() for n, p in tensors(net).items()}
    updates = make_updates(net, 4)
    instances = [1, 2, 3, 10]
    metas = [{"instances": k} for k in instances]
    weights = instances if weighted else [1, 1, 1, 1]
    rule = naive_aggregation if weighted else average_aggregation
    states = rule(updates, metas)

    for name, p in tensors(net).items():
        st = states[p]
        if name.endswith("num_batches_tracked"):
            assert st["param"].dtype == torch.int64 and int(st["param"]) == 40  # max, not a mean
            assert int(p) == 40 and "grad" not in st
            continue
        ref = np_weighted([u[p]["param"] for u in updates], weights)
        np.testing.assert_allclose(st["param"].double().numpy(), ref, rtol=1e-6, atol=1e-6)
        assert st["param"].dtype == p.dtype
        if p.requires_grad:
            np.testing.assert_allclose(
                st["grad"].numpy(), before[name].numpy() - ref, rtol=1e-5, atol=1e-6
            )
            ref_m = np_weighted([u[p]["exp_avg"] for u in updates], weights)
            np.testing.assert_allclose(st["exp_avg"].double().numpy(), ref_m, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(
                p.detach(), before[name]
            )  # params move only via the optimizer
        else:  # float buffers: copied in, never a gradient
            assert "grad" not in st
            np.testing.assert_allclose(p.detach().double().numpy(), ref, rtol=1e-6, atol=1e-6)


def test_missing_params_and_state_keys_are_normalised_over_carriers():
    net = make_net()
    lin_w = net[0].weight
    lin_b = net[0].bias
    updates = make_updates(net, 3)
    del updates[1][lin_b]  # update 1 did not train the bias
    del updates[2][lin_w]["exp_avg"]  # update 2 sent no exp_avg for the weight
    metas = [{"instances": 2}, {"instances": 3}, {"instances": 5}]
    states = naive_aggregation(updates, metas)

    ref_b = np_weighted([updates[0][lin_b]["param"], updates[2][lin_b]["param"]], [2, 5])
    np.testing.assert_allclose(states[lin_b]["param"].double().numpy(), ref_b, rtol=1e-6)
    ref_m = np_weighted([updates[0][lin_w]["exp_avg"], updates[1][lin_w]["exp_avg"]], [2, 3])
    np.testing.assert_allclose(states[lin_w]["exp_avg"].double().numpy(), ref_m, rtol=1e-6)
    ref_w = np_weighted([u[lin_w]["param"] for u in updates], [2, 3, 5])
    np.testing.assert_allclose(states[lin_w]["param"].double().numpy(), ref_w, rtol=1e-6)


def test_openfed_flow_sgd_lr1_gives_weighted_mean():
    net = make_net()
    fed = FederatedOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), role=AGGREGATOR)
    updates = make_updates(net, 5)
    metas = [{"instances": k} for k in (5, 1, 1, 2, 7)]
    fed.zero_grad()
    naive_aggregation(updates, metas, optim_list=fed)
    fed.step()
    for p in net.parameters():
        ref = np_weighted([u[p]["param"] for u in updates], [5, 1, 1, 2, 7])
        np.testing.assert_allclose(p.detach().double().numpy(), ref, rtol=1e-5, atol=1e-6)
        state = fed.state[p]
        assert "param" not in state and "grad" not in state  # no stale model in the optimizer
        ref_m = np_weighted([u[p]["exp_avg"] for u in updates], [5, 1, 1, 2, 7])
        np.testing.assert_allclose(state["exp_avg"].double().numpy(), ref_m, rtol=1e-6)


def test_list_of_optimizers_and_unknown_params():
    net = make_net()
    extra = nn.Parameter(torch.zeros(3))
    opt_a = torch.optim.SGD([*net.parameters(), extra], lr=1.0)
    opt_b = torch.optim.SGD(net.parameters(), lr=0.5)
    states = average_aggregation(make_updates(net, 2), optim_list=[opt_a, opt_b])
    assert extra.grad is None
    for p in net.parameters():
        assert p.grad is states[p]["grad"]
    assert load_param_states(opt_b, states) == len(list(net.parameters()))


def test_dtypes_float64_and_bf16_uploads():
    p64 = nn.Parameter(torch.randn(5, dtype=torch.float64))
    ups = [{p64: {"param": p64.detach() + i * 1e-12}} for i in range(3)]
    st = average_aggregation(ups)[p64]
    assert st["param"].dtype == torch.float64
    np.testing.assert_allclose(
        st["param"].numpy(), p64.detach().numpy() + 1e-12, rtol=0, atol=1e-15
    )

    p32 = nn.Parameter(torch.randn(6))
    ups = [{p32: {"param": torch.full((6,), float(v), dtype=torch.bfloat16)}} for v in (1.0, 2.0)]
    st = average_aggregation(ups)[p32]
    assert st["param"].dtype == torch.float32 and st["grad"].dtype == torch.float32
    torch.testing.assert_close(st["param"], torch.full((6,), 1.5))


def test_python_numbers_and_none_values():
    p = nn.Parameter(torch.zeros(2))
    ups = [
        {p: {"param": torch.ones(2), "step": 3, "unused": None}},
        {p: {"param": torch.zeros(2), "step": 5}},
    ]
    st = average_aggregation(ups)[p]
    assert int(st["step"]) == 5 and "unused" not in st  # ints: max


def test_mean_rule_errors():
    net = make_net()
    ups = make_updates(net, 2)
    with pytest.raises(ConfigError, match="instances"):
        naive_aggregation(ups, [{"instances": 1}, {}])
    with pytest.raises(ConfigError, match="3 entries"):
        naive_aggregation(ups, [{"instances": 1}, {"instances": 1}, {"instances": 1}])
    with pytest.raises(ConfigError, match="meta_list"):
        naive_aggregation(ups, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=">= 0"):
        naive_aggregation(ups, [{"instances": -1}, {"instances": 1}])
    with pytest.raises(ConfigError, match="weigh 0"):
        naive_aggregation(ups, [{"instances": 0}, {"instances": 0}])
    w = net[0].weight
    bad = [
        {w: {"param": torch.zeros(2, 3)}},
        {w: {"param": torch.zeros(2, 3), "m": torch.zeros(4)}},
    ]
    bad[0][w]["m"] = torch.zeros(3)
    with pytest.raises(ConfigError, match="shape"):
        average_aggregation(bad)
    with pytest.raises(ConfigError, match="shape"):
        average_aggregation([{w: {"param": torch.zeros(3, 2)}}])
    assert average_aggregation([]) == {}


def test_elastic_matches_closed_form():
    p = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    buf = torch.zeros(4)
    x = [torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([2.0, 1.0, 0.0, 1.0])]
    imp = [torch.tensor([0.1, 0.0, 0.4, 0.2]), torch.tensor([0.3, 0.2, 0.0, 0.2])]
    ups = [{p: {"param": x[i], "importance": imp[i]}, buf: {"param": x[i]}} for i in range(2)]
    metas = [{"instances": 1}, {"instances": 3}]
    fed = FederatedOptimizer(torch.optim.SGD([p], lr=1.0), role=AGGREGATOR)
    fed.zero_grad()
    st = elastic_aggregation(ups, metas, quantile=0.3, optim_list=fed)
    mean = (x[0] * 1 + x[1] * 3) / 4
    i_mean = (imp[0] * 1 + imp[1] * 3) / 4
    scale = 1 + 0.3 - i_mean / i_mean.max()
    expect_grad = (p.detach() - mean) * scale
    torch.testing.assert_close(st[p]["grad"], expect_grad)
    assert "importance" not in st[p] and "importance" not in fed.state[p]
    torch.testing.assert_close(buf, mean)
    fed.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, 2.0, 3.0, 4.0]) - expect_grad)


def test_elastic_needs_importance_and_survives_zero_importance():
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ConfigError, match="importance"):
        elastic_aggregation([{p: {"param": torch.zeros(3)}}], [{"instances": 1}])
    st = elastic_aggregation(
        [{p: {"param": torch.zeros(3), "importance": torch.zeros(3)}}],
        [{"instances": 1}],
        quantile=0.5,
    )
    torch.testing.assert_close(st[p]["grad"], torch.full((3,), 1.5))


# --------------------------------------------------------------------- robust rules


def flat_updates(values: np.ndarray):
    p = nn.Parameter(torch.zeros(values.shape[1:]))
    return p, [{p: {"param": torch.from_numpy(v).float()}} for v in values]


@pytest.mark.parametrize("n", [5, 6])
def test_median_matches_numpy(n):
    rng = np.random.default_rng(n)
    vals = rng.normal(size=(n, 4, 3))
    p, ups = flat_updates(vals)
    st = median_aggregation(ups)
    np.testing.assert_allclose(
        st[p]["param"].numpy(), np.median(vals.astype(np.float32), axis=0), rtol=1e-6
    )
    np.testing.assert_allclose(
        st[p]["grad"].numpy(), -np.median(vals, axis=0), rtol=1e-5, atol=1e-6
    )


def test_trimmed_mean_matches_numpy():
    rng = np.random.default_rng(3)
    vals = rng.normal(size=(10, 7)).astype(np.float32)
    p, ups = flat_updates(vals)
    st = trimmed_mean_aggregation(ups, beta=0.2)
    ref = np.sort(vals, axis=0)[2:8].mean(axis=0)
    np.testing.assert_allclose(st[p]["param"].numpy(), ref, rtol=1e-6)
    st0 = trimmed_mean_aggregation(ups, beta=0.0)
    np.testing.assert_allclose(st0[p]["param"].numpy(), vals.mean(axis=0), rtol=1e-5)
    with pytest.raises(ConfigError, match="beta"):
        trimmed_mean_aggregation(ups, beta=0.5)


def test_krum_matches_bruteforce():
    rng = np.random.default_rng(7)
    vals = rng.normal(size=(7, 5))
    vals[2] += 3.0
    p, ups = flat_updates(vals)
    f = 2
    v32 = vals.astype(np.float32).astype(np.float64)
    d = ((v32[:, None, :] - v32[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(d[i], i))[: 7 - f - 2].sum() for i in range(7)]
    expect = list(np.argsort(scores, kind="stable"))
    assert krum_select(ups, f=f, m=7) == expect
    st = krum_aggregation(ups, f=f, m=3)
    np.testing.assert_allclose(st[p]["param"].numpy(), v32[expect[:3]].mean(axis=0), rtol=1e-6)
    st1 = krum_aggregation(ups, f=f, m=1)
    np.testing.assert_allclose(st1[p]["param"].numpy(), v32[expect[0]], rtol=1e-6)


def test_krum_errors():
    _, ups = flat_updates(np.zeros((3, 2)))
    with pytest.raises(ConfigError, match="f \\+ 3"):
        krum_aggregation(ups, f=1)
    with pytest.raises(ConfigError, match="m="):
        krum_aggregation(ups, f=0, m=4)
    assert krum_aggregation([], f=1) == {}


def test_robust_rules_resist_one_poisoned_update():
    net = make_net()
    honest = make_updates(net, 8, seed=1, spread=0.05)
    poisoned = make_updates(net, 1, seed=2)[0]
    for st in poisoned.values():
        if st["param"].is_floating_point():
            st["param"] = torch.full_like(st["param"], 1e6)
    updates = [*honest[:4], poisoned, *honest[4:]]
    metas = [{"instances": 10}] * len(updates)
    params = list(net.parameters())
    honest_mean = {p: torch.stack([u[p]["param"] for u in honest]).mean(0) for p in params}

    def err(states):
        return max(float((states[p]["param"] - honest_mean[p]).abs().max()) for p in params)

    assert err(naive_aggregation(updates, metas)) > 1e4
    assert err(median_aggregation(updates)) < 0.1
    assert err(trimmed_mean_aggregation(updates, beta=0.15)) < 0.1
    assert err(krum_aggregation(updates, f=1, m=3)) < 0.1
    st = median_aggregation(updates)
    nbt = net[1].num_batches_tracked
    assert st[nbt]["param"].dtype == torch.int64  # integer buffers: lower median, still int


# ------------------------------------------------------------------------ streaming


def test_streaming_equals_list_form_and_numpy():
    net = make_net()
    updates = make_updates(net, 6, seed=4)
    weights = [3, 1, 4, 1, 5, 9]
    list_net, stream_net = make_net(), make_net()
    sd_list, sd_stream = tensors(list_net), tensors(stream_net)
    # the same updates, keyed by each net's own tensors / by name
    names = {p: n for n, p in tensors(net).items()}
    list_updates = [{sd_list[names[p]]: s for p, s in u.items()} for u in updates]
    named_updates = [{names[p]: s for p, s in u.items()} for u in updates]

    ref = naive_aggregation(list_updates, [{"instances": w} for w in weights])
    acc = StreamingFedAvg(sd_stream)
    for u, w in zip(named_updates, weights, strict=True):
        acc.add(u, weight=w)
    got = acc.apply()
    assert acc.count == 6 and len(acc) == 6
    for name in sd_list:
        for k, v in ref[sd_list[name]].items():
            torch.testing.assert_close(got[sd_stream[name]][k], v, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sd_stream[name].detach(), sd_list[name].detach())
    assert acc.total_weight("0.weight") == sum(weights)


def test_streaming_memory_is_independent_of_n():
    net = make_net()
    sizes = []
    for n in (1, 40):
        acc = StreamingFedAvg()
        for u in make_updates(net, n):
            acc.add(u, 1.0)
        sizes.append((acc.num_tensors, acc.nbytes))
    assert sizes[0] == sizes[1]
    per_model = sum(p.numel() * 4 for p in net.parameters())
    assert sizes[0][0] == len(tensors(net)) + len(list(net.parameters()))  # param + exp_avg
    assert sizes[0][1] < 3 * per_model + 64


def test_streaming_leaves_updates_alone_and_rejects_bad_updates_atomically():
    p = nn.Parameter(torch.zeros(3))
    q = nn.Parameter(torch.zeros(2))
    u = {p: {"param": torch.ones(3)}, q: {"param": torch.ones(2), "m": torch.ones(2)}}
    acc = StreamingFedAvg()
    acc.add(u, 2.0)
    torch.testing.assert_close(u[p]["param"], torch.ones(3))  # the upload is not modified
    bad = {p: {"param": torch.full((3,), 5.0)}, q: {"param": torch.ones(2), "m": torch.ones(5)}}
    with pytest.raises(ConfigError, match="shape"):
        acc.add(bad, 1.0)
    assert acc.count == 1
    torch.testing.assert_close(acc.result()[p]["param"], torch.ones(3))  # p was not folded in
    with pytest.raises(ConfigError, match="not in the aggregator"):
        StreamingFedAvg({"w": p}).add({"nope": torch.ones(3)})
    with pytest.raises(ConfigError, match="shape"):
        StreamingFedAvg({"w": p}).add({"w": torch.ones(1, 3)})
    with pytest.raises(ConfigError, match=">= 0"):
        acc.add(u, float("nan"))
    acc.reset()
    assert acc.count == 0 and acc.num_tensors == 0 and acc.result() == {}


def test_streaming_reuses_its_buffers_across_rounds_without_aliasing_results():
    p = nn.Parameter(torch.zeros(1000))
    acc = StreamingFedAvg()
    acc.add({p: {"param": torch.ones(1000), "exp_avg": torch.ones(1000)}}, 1.0)
    first = acc.result()
    held = acc.nbytes
    acc.reset()
    assert acc.nbytes == held  # kept for the next round
    acc.add({p: {"param": torch.full((1000,), 3.0), "exp_avg": torch.zeros(1000)}}, 2.0)
    acc.add({p: {"param": torch.full((1000,), 6.0), "exp_avg": torch.zeros(1000)}}, 1.0)
    torch.testing.assert_close(acc.result()[p]["param"], torch.full((1000,), 4.0))
    assert acc.nbytes == held
    torch.testing.assert_close(first[p]["param"], torch.ones(1000))  # earlier results untouched
    acc.reset(keep_buffers=False)
    assert acc.nbytes == 0


def test_streaming_name_keyed_without_state_dict_cannot_apply():
    acc = StreamingFedAvg()
    acc.add({"w": torch.ones(3)})
    acc.add({"w": torch.zeros(3)}, 3.0)
    torch.testing.assert_close(acc.result()["w"]["param"], torch.full((3,), 0.25))
    with pytest.raises(ConfigError, match="keyed by name"):
        acc.apply()


# --------------------------------------------------------------------------- reduce


def test_meta_reduce_weighted():
    metas = [
        {"instances": 10, "accuracy": 0.5, "loss": 2.0},
        {"instances": 30, "accuracy": 1.0},
        {"instances": 0, "accuracy": 0.0, "loss": 9.0},
    ]
    out = meta_reduce(metas, ["accuracy", "loss", "missing"])
    assert out == pytest.approx({"accuracy": 0.875, "loss": 2.0})
    assert meta_reduce(metas, "accuracy", weight_key=None)["accuracy"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="instances"):
        meta_reduce([{"accuracy": 1.0}], ["accuracy"])
    with pytest.raises(ConfigError, match="not a number"):
        meta_reduce([{"instances": 1, "accuracy": "high"}], ["accuracy"])


def test_auto_reducer(tmp_path):
    log = tmp_path / "log.jsonl"
    r = AutoReducer(["accuracy"], ignore_keys=["secret"], log_file=log)
    r.add({"accuracy": 0.5, "instances": 10, "version": 3, "secret": 1})
    r.add({"accuracy": 1.0, "instances": 30, "version": 3})
    m = r.reduce()
    assert m["accuracy"] == pytest.approx(0.875) and m["instances"] == 40 and m["version"] == 3
    assert "secret" not in m and r.buffer == []
    assert json.loads(log.read_text().strip())["accuracy"] == pytest.approx(0.875)
    with pytest.raises(ConfigError, match="empty"):
        r.reduce()


def test_streaming_result_in_place_matches_and_consumes():
    from zmqfed.errors import ConfigError
    from zmqfed.functional.streaming import StreamingFedAvg

    p = torch.zeros(3, requires_grad=True)
    updates = [({p: {"param": torch.full((3,), float(v))}}, w) for v, w in ((1, 1), (4, 2))]
    fresh, in_place = StreamingFedAvg(), StreamingFedAvg()
    for acc in (fresh, in_place):
        for update, w in updates:
            acc.add(update, weight=w)
    expected = fresh.result()[p]["param"]
    got = in_place.result(in_place=True)[p]["param"]
    assert torch.allclose(got, expected) and torch.allclose(got, torch.full((3,), 3.0))
    assert in_place.nbytes == fresh.nbytes  # no second copy of the model was made
    with pytest.raises(ConfigError, match="reset"):
        in_place.add(updates[0][0])
    in_place.reset()  # consumed buffers are not recycled: `got` stays valid
    in_place.add(updates[0][0], weight=1.0)
    assert torch.allclose(got, torch.full((3,), 3.0))


def test_meta_reduce_takes_openfeds_keyword():
    metas = [{"instances": 1, "loss": 1.0}, {"instances": 3, "loss": 3.0}]
    assert meta_reduce(metas, reduce_keys=["loss"]) == {"loss": pytest.approx(2.5)}
    with pytest.raises(ConfigError, match="keys to average"):
        meta_reduce(metas)
    with pytest.raises(ConfigError, match="keys to average"):
        meta_reduce(metas, ["loss"], reduce_keys=["loss"])
