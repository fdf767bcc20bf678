"""Aggregation rules against numpy references: mean, FedAvg, elastic, robust, running mean, reduce."""

from __future__ import annotations

import json
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from zmqfed.api import API, aggregate_and_step
from zmqfed.errors import ConfigError
from zmqfed.functional.agg_common import optim_as_list
from zmqfed.functional.aggregate import (
    RunningFedAvg,
    average_aggregation,
    call_rule,
    elastic_aggregation,
    install_aggregate,
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
    for name, p in tensors(net).items():  # computing the aggregate writes nothing
        torch.testing.assert_close(p.detach(), before[name])
    install_aggregate(states)  # buffers into the model

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
        # the optimizer-state contract: FederatedOptimizer declares no upload keys,
        # so the clients' averaged exp_avg never lands in the server optimizer
        assert "exp_avg" not in state


class _SharesExpAvg(FederatedOptimizer):
    upload_keys = ("exp_avg",)


def test_aggregated_state_is_installed_only_for_declared_upload_keys():
    net = make_net()
    momentum = torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.9)
    plain = FederatedOptimizer(momentum, role=AGGREGATOR)
    updates = make_updates(net, 3)
    metas = [{"instances": k} for k in (1, 2, 3)]
    for p in net.parameters():  # the server's own FedAvgM state
        momentum.state[p]["momentum_buffer"] = torch.full_like(p, 7.0)
    naive_aggregation(updates, metas, optim_list=plain)
    for p in net.parameters():
        assert set(momentum.state[p]) == {"momentum_buffer"}
        assert torch.equal(momentum.state[p]["momentum_buffer"], torch.full_like(p, 7.0))
    shares = _SharesExpAvg(torch.optim.SGD(net.parameters(), lr=1.0), role=AGGREGATOR)
    naive_aggregation(updates, metas, optim_list=shares)
    for p in net.parameters():
        ref_m = np_weighted([u[p]["exp_avg"] for u in updates], [1, 2, 3])
        np.testing.assert_allclose(shares.state[p]["exp_avg"].double().numpy(), ref_m, rtol=1e-6)


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


# ------------------------------------------------- computing vs installing (purity)

ALL_RULES = [
    pytest.param(average_aggregation, {}, id="average"),
    pytest.param(naive_aggregation, {}, id="naive"),
    pytest.param(elastic_aggregation, {"quantile": 0.3}, id="elastic"),
    pytest.param(median_aggregation, {}, id="median"),
    pytest.param(trimmed_mean_aggregation, {"beta": 0.2}, id="trimmed_mean"),
    pytest.param(krum_aggregation, {"f": 1, "m": 2}, id="krum"),
]


def rekeyed(updates, source: nn.Module, target: nn.Module):
    """The same updates keyed by ``target``'s tensors instead of ``source``'s."""
    names = {p: n for n, p in tensors(source).items()}
    sd = tensors(target)
    return [{sd[names[p]]: dict(s) for p, s in u.items()} for u in updates]


def server(net: nn.Module) -> FederatedOptimizer:
    return FederatedOptimizer(
        torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.9), role=AGGREGATOR
    )


@pytest.mark.parametrize("rule, kwargs", ALL_RULES)
def test_rules_without_optim_list_write_nothing_and_install_gives_the_same(rule, kwargs):
    net = make_net()
    updates = make_updates(net, 5, keys=("exp_avg", "importance"))
    for u in updates:
        for state in u.values():
            if "importance" in state:
                state["importance"] = state["importance"].abs()
    metas = [{"instances": k} for k in (1, 2, 3, 4, 5)]
    opt = server(net)
    for p in net.parameters():  # gradients and state left over from earlier
        p.grad = torch.full_like(p, 7.0)
        opt.state[p]["exp_avg"] = torch.full_like(p, 3.0)
    model = {n: t.detach().clone() for n, t in tensors(net).items()}
    grads = {p: p.grad for p in net.parameters()}
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in net.parameters()}

    pure = rule(updates, metas, **kwargs)

    for n, t in tensors(net).items():  # parameters and buffers alike
        torch.testing.assert_close(t.detach(), model[n], rtol=0, atol=0)
    for p in net.parameters():
        assert p.grad is grads[p] and bool((p.grad == 7.0).all())
        assert opt.state[p].keys() == state[p].keys()
        for k, v in state[p].items():
            torch.testing.assert_close(opt.state[p][k], v, rtol=0, atol=0)

    # installing the pure result is what the rule does when given the optimizers
    twin = make_net()
    twin_opt = server(twin)
    for q in twin.parameters():  # the same leftover state as the original's
        twin_opt.state[q]["exp_avg"] = torch.full_like(q, 3.0)
    given = rule(rekeyed(updates, net, twin), metas, optim_list=twin_opt, **kwargs)
    opt.zero_grad()
    install_aggregate(pure, opt)
    opt.step()
    twin_opt.step()
    twin_sd = tensors(twin)
    for n, t in tensors(net).items():
        got, expected = pure.get(t), given.get(twin_sd[n])
        assert (got is None) == (expected is None), n
        if got is not None:
            assert got.keys() == expected.keys(), n
            for k in got:
                torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
        torch.testing.assert_close(t.detach(), twin_sd[n].detach(), rtol=0, atol=0)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert opt.state[p].keys() == twin_opt.state[q].keys()
        for k in opt.state[p]:
            torch.testing.assert_close(opt.state[p][k], twin_opt.state[q][k], rtol=0, atol=0)
    assert any(not torch.equal(t.detach(), model[n]) for n, t in tensors(net).items())


def test_optim_list_none_computes_an_empty_list_installs_buffers():
    net = make_net()
    bn = net[1]
    before = bn.running_mean.clone()
    updates = make_updates(net, 2)
    metas = [{"instances": 1}, {"instances": 1}]
    naive_aggregation(updates, metas, optim_list=None)
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)
    states = naive_aggregation(updates, metas, optim_list=[])
    torch.testing.assert_close(bn.running_mean, states[bn.running_mean]["param"])
    assert int(bn.num_batches_tracked) == 20
    assert all(p.grad is None for p in net.parameters())  # no optimizer, no p.grad


def test_install_aggregate_needs_tensor_keys():
    with pytest.raises(ConfigError, match="keyed by name"):
        install_aggregate({"w": {"param": torch.ones(2)}})
    install_aggregate({"w": {"exp_avg": torch.ones(2)}})  # nothing to write: fine


# ------------------------------------------------------- the rule contract: call_rule


def elastic_case():
    """An aggregator tensor, two updates with importance, metas, and a server optimizer."""
    p = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = [torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([2.0, 1.0, 0.0, 1.0])]
    imp = [torch.tensor([0.1, 0.0, 0.4, 0.2]), torch.tensor([0.3, 0.2, 0.0, 0.2])]
    ups = [{p: {"param": x[i], "importance": imp[i]}} for i in range(2)]
    metas = [{"instances": 1}, {"instances": 3}]
    return p, ups, metas, FederatedOptimizer(torch.optim.SGD([p], lr=1.0), role=AGGREGATOR)


def test_call_rule_gives_elastic_the_optimizers_by_keyword_and_its_quantile():
    p, ups, metas, fed = elastic_case()
    _, ups2, _, _ = elastic_case()
    direct = elastic_aggregation(ups2, metas, 0.3)  # OpenFed's positional shape, pure
    st = call_rule(elastic_aggregation, ups, metas, fed, quantile=0.3)
    torch.testing.assert_close(st[p]["grad"], direct[next(iter(direct))]["grad"])
    assert p.grad is st[p]["grad"]  # installed into the optimizer it was given
    other = call_rule(elastic_aggregation, ups, metas, None, quantile=0.9)
    assert not torch.allclose(other[p]["grad"], st[p]["grad"])  # quantile reached the rule
    assert p.grad is st[p]["grad"]  # ... and without optimizers nothing was installed
    partial_rule = partial(elastic_aggregation, quantile=0.3)
    torch.testing.assert_close(call_rule(partial_rule, ups, metas, fed)[p]["grad"], p.grad)


def _uploads(ups, metas, p) -> SimpleNamespace:
    """What aggregate_and_step reads of an aggregator's Maintainer."""
    return SimpleNamespace(
        data_list=ups,
        meta_list=metas,
        sender_list=[f"c{i}" for i in range(len(ups))],
        state_dict={"p": p},
        nick_name="agg",
        run_step_point=lambda point, pipe: None,
    )


def test_aggregate_and_step_runs_elastic_with_kwargs():
    p, ups, metas, fed = elastic_case()
    expected = p.detach() - elastic_aggregation(ups, metas, quantile=0.3)[p]["grad"]
    m = _uploads(ups, metas, p)
    aggregate_and_step(m, [fed], elastic_aggregation, quantile=0.3)  # type: ignore[arg-type]
    torch.testing.assert_close(p.detach(), expected)


def test_optimizers_as_a_list_one_way_everywhere():
    opt = object()
    assert optim_as_list(None) == [] and optim_as_list(opt) == [opt]
    assert optim_as_list((opt, opt)) == [opt, opt]
    # aggregate_and_step takes one optimizer as well as a list
    p, ups, metas, fed = elastic_case()
    expected = p.detach() - naive_aggregation(ups, metas)[p]["grad"]
    m = _uploads(ups, metas, p)
    aggregate_and_step(m, fed, naive_aggregation)  # type: ignore[arg-type]
    torch.testing.assert_close(p.detach(), expected)
    aggregator = SimpleNamespace(aggregator=True, nick_name="agg")
    for none in (None, [], ()):
        with pytest.raises(ConfigError, match="server optimizer"):
            API(aggregator, none, 1, naive_aggregation)  # type: ignore[arg-type]


OPTS = [object()]  # stands for the server optimizers


def openfed_rule(data_list, meta_list, optim_list):
    return optim_list


def renamed_third(d, m, optims):  # OpenFed-style custom rule, another name
    return optims


def renamed_third_default(d, m, optims=None):
    return optims


def keyword_only(data_list, meta_list, *, optim_list=None, beta=0.1):
    return optim_list, beta


def var_kwargs(d, m, **kw):
    return kw


def third_and_var_kwargs(d, m, optims, **kw):
    return optims, kw


def var_args(d, m, *args, beta=0.1):
    return args, beta


class RuleObject:
    def __call__(self, data_list, meta_list, quantile=0.5, optim_list=None):
        return optim_list, quantile


@pytest.mark.parametrize(
    "rule, kwargs, received",
    [
        pytest.param(openfed_rule, {}, OPTS, id="openfed"),
        pytest.param(renamed_third, {}, OPTS, id="third-positional"),
        pytest.param(renamed_third_default, {}, OPTS, id="third-positional-None"),
        pytest.param(keyword_only, {"beta": 0.2}, (OPTS, 0.2), id="keyword-only"),
        pytest.param(var_kwargs, {"beta": 0.2}, {"optim_list": OPTS, "beta": 0.2}, id="**kw"),
        pytest.param(third_and_var_kwargs, {"b": 2}, (OPTS, {"b": 2}), id="third-and-**kw"),
        pytest.param(var_args, {"beta": 0.2}, ((OPTS,), 0.2), id="*args"),
        pytest.param(RuleObject(), {"quantile": 0.7}, (OPTS, 0.7), id="quantile-first"),
        pytest.param(partial(keyword_only, beta=0.3), {}, (OPTS, 0.3), id="partial"),
    ],
)
def test_call_rule_passes_optimizers_to_every_rule_shape(rule, kwargs, received):
    assert call_rule(rule, [], [], OPTS, **kwargs) == received


def test_call_rule_installs_for_a_rule_that_takes_no_optimizers():
    net = make_net()
    updates = make_updates(net, 3)
    seen = []

    def pure(data_list, meta_list, beta=0.1):  # third parameter: a hyperparameter
        seen.append(beta)
        return average_aggregation(data_list)

    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    states = call_rule(pure, updates, [{}] * 3, opt, beta=0.3)
    assert seen == [0.3]
    for p in net.parameters():
        assert p.grad is states[p]["grad"]
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, states[bn.running_mean]["param"])
    before = bn.running_var.clone()
    call_rule(pure, make_updates(net, 2, seed=5), [{}] * 2)  # no optimizers: nothing installed
    torch.testing.assert_close(bn.running_var, before, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="returned NoneType"):
        call_rule(lambda d, m: None, updates, [], opt)

    def scaled(d, m, scale=None):  # a None default, but the caller sets it: not the optimizers
        seen.append(scale)
        return {}

    assert call_rule(scaled, updates, [], opt, scale=2.0) == {} and seen[-1] == 2.0


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


# --------------------------------------------------------------------- running mean


def test_running_equals_list_form_and_numpy():
    net = make_net()
    updates = make_updates(net, 6, seed=4)
    weights = [3, 1, 4, 1, 5, 9]
    list_net, running_net = make_net(), make_net()
    sd_list, sd_running = tensors(list_net), tensors(running_net)
    # the same updates, keyed by each net's own tensors / by name
    names = {p: n for n, p in tensors(net).items()}
    list_updates = [{sd_list[names[p]]: s for p, s in u.items()} for u in updates]
    named_updates = [{names[p]: s for p, s in u.items()} for u in updates]

    ref = naive_aggregation(list_updates, [{"instances": w} for w in weights])
    install_aggregate(ref)  # apply() installs too: buffers into the model
    acc = RunningFedAvg(sd_running)
    for u, w in zip(named_updates, weights, strict=True):
        acc.add(u, weight=w)
    got = acc.apply()
    assert acc.count == 6 and len(acc) == 6
    for name in sd_list:
        for k, v in ref[sd_list[name]].items():
            torch.testing.assert_close(got[sd_running[name]][k], v, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sd_running[name].detach(), sd_list[name].detach())
    assert acc.total_weight("0.weight") == sum(weights)


def test_running_memory_is_independent_of_n():
    net = make_net()
    sizes = []
    for n in (1, 40):
        acc = RunningFedAvg()
        for u in make_updates(net, n):
            acc.add(u, 1.0)
        sizes.append((acc.num_tensors, acc.nbytes))
    assert sizes[0] == sizes[1]
    per_model = sum(p.numel() * 4 for p in net.parameters())
    assert sizes[0][0] == len(tensors(net)) + len(list(net.parameters()))  # param + exp_avg
    assert sizes[0][1] < 3 * per_model + 64


def test_running_leaves_updates_alone_and_rejects_bad_updates_atomically():
    p = nn.Parameter(torch.zeros(3))
    q = nn.Parameter(torch.zeros(2))
    u = {p: {"param": torch.ones(3)}, q: {"param": torch.ones(2), "m": torch.ones(2)}}
    acc = RunningFedAvg()
    acc.add(u, 2.0)
    torch.testing.assert_close(u[p]["param"], torch.ones(3))  # the upload is not modified
    bad = {p: {"param": torch.full((3,), 5.0)}, q: {"param": torch.ones(2), "m": torch.ones(5)}}
    with pytest.raises(ConfigError, match="shape"):
        acc.add(bad, 1.0)
    assert acc.count == 1
    torch.testing.assert_close(acc.result()[p]["param"], torch.ones(3))  # p was not folded in
    with pytest.raises(ConfigError, match="not in the aggregator"):
        RunningFedAvg({"w": p}).add({"nope": torch.ones(3)})
    with pytest.raises(ConfigError, match="shape"):
        RunningFedAvg({"w": p}).add({"w": torch.ones(1, 3)})
    with pytest.raises(ConfigError, match=">= 0"):
        acc.add(u, float("nan"))
    acc.reset()
    assert acc.count == 0 and acc.num_tensors == 0 and acc.result() == {}


def test_running_reuses_its_buffers_across_rounds_without_aliasing_results():
    p = nn.Parameter(torch.zeros(1000))
    acc = RunningFedAvg()
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


def test_running_name_keyed_without_state_dict_cannot_apply():
    acc = RunningFedAvg()
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


def test_running_result_in_place_matches_and_consumes():
    p = torch.zeros(3, requires_grad=True)
    updates = [({p: {"param": torch.full((3,), float(v))}}, w) for v, w in ((1, 1), (4, 2))]
    fresh, in_place = RunningFedAvg(), RunningFedAvg()
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
