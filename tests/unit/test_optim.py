"""Federated optimizers against their papers' update rules on toy problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import zmqfed.optim
from zmqfed.errors import ConfigError
from zmqfed.functional.aggregate import average_aggregation, naive_aggregation
from zmqfed.optim import (
    ElasticOptimizer,
    FederatedOptimizer,
    FedYogi,
    ProxOptimizer,
    ScaffoldOptimizer,
)
from zmqfed.props import AGGREGATOR, COLLABORATOR


def test_all_is_pinned():
    assert sorted(zmqfed.optim.__all__) == [
        "ElasticOptimizer",
        "FedYogi",
        "FederatedOptimizer",
        "ProxOptimizer",
        "ScaffoldOptimizer",
    ]


def quad_grad(w: torch.Tensor, a: torch.Tensor) -> None:
    """Set w.grad for f(w) = 0.5 * |w - a|^2."""
    w.grad = (w.detach() - a).clone()


# ------------------------------------------------------------------------- wrapper


def test_wrapper_pass_throughs_and_roles():
    w = nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    fed = FederatedOptimizer(sgd)
    assert fed.collaborator and not fed.aggregator and fed.role == COLLABORATOR
    assert fed.param_groups is sgd.param_groups and fed.state is sgd.state and fed.optimizer is sgd
    quad_grad(w, torch.zeros(3))
    assert fed.step(closure=lambda: torch.tensor(1.5)) == pytest.approx(1.5)
    assert "momentum_buffer" in fed.state[w]
    sd = fed.state_dict()
    fed.zero_grad()
    assert w.grad is None
    fed.load_state_dict(sd)
    fed.clear_state_dict(["momentum_buffer"])
    assert "momentum_buffer" not in fed.state[w]
    assert "SGD" in repr(fed) and "collaborator" in repr(fed)
    assert FederatedOptimizer(sgd, role=AGGREGATOR).aggregator
    with pytest.raises(ConfigError, match="role"):
        FederatedOptimizer(sgd, role="leader")
    with pytest.raises(ConfigError, match="not an optimizer"):
        FederatedOptimizer(object())
    with pytest.raises(ConfigError, match="acg_epoch"):
        FederatedOptimizer(sgd, acg_epoch=0)


def test_plain_wrapper_acg_and_round_are_noops():
    net = nn.Linear(2, 1)
    fed = FederatedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    assert fed.acg(net) == 0
    fed.round()


def test_foreign_state_does_not_break_lazy_optimizers():
    # SCAFFOLD's 'c' sits in the state before Adam's first step: Adam must still initialise
    w = nn.Parameter(torch.ones(4))
    fed = ScaffoldOptimizer(torch.optim.Adam([w], lr=0.1))
    fed.state[w]["c"] = torch.full((4,), 0.5)
    quad_grad(w, torch.zeros(4))
    fed.step()
    st = fed.state[w]
    assert {"exp_avg", "exp_avg_sq", "step", "c"} <= set(st)
    torch.testing.assert_close(st["c"], torch.full((4,), 0.5))
    # checkpointed Adam state is not reset by the shield
    w2 = nn.Parameter(torch.ones(2))
    adam = torch.optim.Adam([w2], lr=0.1)
    quad_grad(w2, torch.zeros(2))
    adam.step()
    fed2 = FederatedOptimizer(adam)
    quad_grad(w2, torch.zeros(2))
    fed2.step()
    assert int(adam.state[w2]["step"]) == 2


# ------------------------------------------------------------------------- FedProx


def test_fedprox_matches_recurrence():
    a = torch.tensor([1.0, -2.0, 0.5])
    w = nn.Parameter(torch.tensor([0.3, 0.3, 0.3]))
    lr, mu, steps = 0.1, 0.5, 6
    fed = ProxOptimizer(torch.optim.SGD([w], lr=lr), mu=mu)
    ref = w.detach().double().numpy().copy()
    w0 = ref.copy()
    an = a.double().numpy()
    for _ in range(steps):
        quad_grad(w, a)
        fed.step()
        ref = ref - lr * ((ref - an) + mu * (ref - w0))
    np.testing.assert_allclose(w.detach().numpy(), ref, rtol=1e-5)
    assert "init_p" not in fed.state[w]  # the anchor is never uploaded
    fed.round()
    # a new round anchors at the current weights: the first step has no proximal pull
    before = w.detach().clone()
    quad_grad(w, a)
    fed.step()
    torch.testing.assert_close(w.detach(), before - lr * (before - a))
    with pytest.raises(ConfigError, match="mu"):
        ProxOptimizer(torch.optim.SGD([w], lr=lr), mu=-1.0)


def test_fedprox_aggregator_is_plain():
    w = nn.Parameter(torch.ones(2))
    fed = ProxOptimizer(torch.optim.SGD([w], lr=1.0), role=AGGREGATOR)
    w.grad = torch.full((2,), 0.25)
    fed.step()
    torch.testing.assert_close(w.detach(), torch.full((2,), 0.75))


# ------------------------------------------------------------------------ SCAFFOLD


def test_scaffold_collaborator_option2_matches_paper():
    a = torch.tensor([2.0, -1.0])
    w = nn.Parameter(torch.tensor([0.0, 0.0]))
    lr, k_steps = 0.1, 4
    fed = ScaffoldOptimizer(torch.optim.SGD([w], lr=lr))
    torch.testing.assert_close(fed.state[w]["c"], torch.zeros(2))  # unpackage target exists
    c = torch.tensor([0.3, -0.2])
    c_i = torch.zeros(2)
    for _round in range(2):
        fed.state[w]["c"] = c.clone()  # what unpackage writes after a download
        x = w.detach().double().numpy().copy()
        y = x.copy()
        for _ in range(k_steps):
            quad_grad(w, a)
            fed.step()
            y = y - lr * ((y - a.double().numpy()) - c_i.double().numpy() + c.double().numpy())
        np.testing.assert_allclose(w.detach().numpy(), y, rtol=1e-5)
        fed.round()
        c_plus = c_i.double().numpy() - c.double().numpy() + (x - y) / (k_steps * lr)
        np.testing.assert_allclose(fed.local_control[w].numpy(), c_plus, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            fed.state[w]["c"].numpy(), c_plus - c_i.numpy(), rtol=1e-4, atol=1e-6
        )
        fed.clear_state_dict()  # after the upload: the round's c is back
        torch.testing.assert_close(fed.state[w]["c"], c)
        c_i = torch.from_numpy(c_plus).float()
        assert "c_i" not in fed.state[w] and len(fed.state[w]) == 1  # c_i never travels


def test_scaffold_clear_keeps_a_fresh_download():
    w = nn.Parameter(torch.zeros(2))
    fed = ScaffoldOptimizer(torch.optim.SGD([w], lr=0.1))
    quad_grad(w, torch.ones(2))
    fed.step()
    fed.round()
    fed.state[w]["c"].copy_(torch.full((2,), 7.0))  # an in-place unpackage came first
    fed.clear_state_dict()
    torch.testing.assert_close(fed.state[w]["c"], torch.full((2,), 7.0))


def test_scaffold_option1_uses_gradient_at_x():
    torch.manual_seed(0)
    net = nn.Linear(3, 1, bias=False)
    x = torch.randn(8, 3)
    y = torch.randn(8, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    fed = ScaffoldOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), acg_loss_fn="mse_loss")
    w = net.weight
    w0 = w.detach().clone()
    expect = 2.0 / 8 * ((x @ w0.T - y).T @ x)  # full-batch gradient of mse at x
    assert fed.acg(net, loader) == 2
    assert w.grad is None
    net.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    fed.step()
    fed.round()
    torch.testing.assert_close(fed.local_control[w], expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fed.state[w]["c"], expect)  # Δc_i = c_i+ - 0
    with pytest.raises(ConfigError, match="acg_loss_fn"):
        ScaffoldOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), acg_loss_fn="no_such_loss")


def test_scaffold_server_update():
    w = nn.Parameter(torch.tensor([1.0, 1.0]))
    fed = ScaffoldOptimizer(torch.optim.SGD([w], lr=1.0), role=AGGREGATOR)
    c0 = fed.state[w]["c"]
    ups = [
        {w: {"param": torch.tensor([0.0, 2.0]), "c": torch.tensor([0.2, 0.0])}},
        {w: {"param": torch.tensor([2.0, 4.0]), "c": torch.tensor([0.4, -0.6])}},
    ]
    fed.zero_grad()
    average_aggregation(ups, optim_list=fed)
    fed.step()
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(fed.state[w]["c"], c0 + torch.tensor([0.3, -0.3]))
    # a round whose uploads carry no 'c' leaves the control variate alone
    fed.zero_grad()
    average_aggregation([{w: {"param": torch.zeros(2)}}], optim_list=fed)
    fed.step()
    torch.testing.assert_close(fed.state[w]["c"], torch.tensor([0.3, -0.3]))
    # partial participation: c <- c + |S|/N mean(Δc)
    v = nn.Parameter(torch.zeros(1))
    half = ScaffoldOptimizer(torch.optim.SGD([v], lr=1.0), role=AGGREGATOR, c_lr=0.5)
    half.zero_grad()
    average_aggregation([{v: {"param": torch.zeros(1), "c": torch.ones(1)}}], optim_list=half)
    half.step()
    torch.testing.assert_close(half.state[v]["c"], torch.full((1,), 0.5))


def run_federation(client_cls) -> torch.Tensor:
    """Two heterogeneous quadratics, 30 rounds; state moved as package/unpackage would."""
    optima = [torch.tensor([4.0, 0.0]), torch.tensor([0.0, -2.0])]
    server_w = nn.Parameter(torch.zeros(2))
    server = ScaffoldOptimizer(torch.optim.SGD([server_w], lr=1.0), role=AGGREGATOR)
    clients = []
    for _ in optima:
        cw = nn.Parameter(torch.zeros(2))
        clients.append((cw, client_cls(torch.optim.SGD([cw], lr=0.05))))
    for _ in range(30):
        uploads = []
        for (cw, opt), a in zip(clients, optima, strict=True):
            with torch.no_grad():
                cw.copy_(server_w)
            opt.state[cw]["c"] = server.state[server_w]["c"].clone()
            for _ in range(10):
                # client curvatures differ, so local steps drift away from the global optimum
                cw.grad = (cw.detach() - a) * (1.0 + 3.0 * float(a[0] > 0))
                opt.step()
            opt.round()
            uploads.append(
                {server_w: {"param": cw.detach().clone(), "c": opt.state[cw]["c"].clone()}}
            )
            opt.clear_state_dict()
        server.zero_grad()
        average_aggregation(uploads, optim_list=server)
        server.step()
    return server_w.detach()


def test_scaffold_end_to_end_removes_client_drift():
    # global objective 4 * 0.5|w - a0|^2 + 0.5|w - a1|^2  ->  w* = (4 a0 + a1) / 5
    w_star = torch.tensor([3.2, -0.4])
    torch.testing.assert_close(run_federation(ScaffoldOptimizer), w_star, atol=1e-3, rtol=0)
    assert float((run_federation(FederatedOptimizer) - w_star).norm()) > 0.3  # FedAvg drifts


# ------------------------------------------------------------------------- Elastic


def test_elastic_importance_ema():
    torch.manual_seed(1)
    net = nn.Linear(3, 2, bias=False)
    xs = torch.randn(4, 3)
    loader = DataLoader(TensorDataset(xs, torch.zeros(4)), batch_size=2)
    m = 0.7
    fed = ElasticOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), momentum=m, acg_loader=loader)
    expect = torch.zeros_like(net.weight)
    for xb in (xs[:2], xs[2:]):
        out = xb @ net.weight.detach().T
        g = 2.0 / out.numel() * out.T @ xb  # d mean(out^2) / dW
        expect = m * expect + (1 - m) * g.abs()
    assert fed.acg(net) == 2
    torch.testing.assert_close(fed.state[net.weight]["importance"], expect)
    fed.clear_state_dict()
    assert "importance" not in fed.state[net.weight]
    with pytest.raises(ConfigError, match="momentum"):
        ElasticOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), momentum=2.0)


def test_acg_respects_max_steps_epochs_and_needs_a_loader():
    net = nn.Linear(2, 1)
    loader = DataLoader(TensorDataset(torch.randn(10, 2), torch.zeros(10)), batch_size=2)
    fed = ElasticOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), max_acg_step=3, acg_epoch=2)
    net.eval()
    assert fed.acg(net, loader) == 6
    assert not net.training  # mode restored
    with pytest.raises(ConfigError, match="dataloader"):
        fed.acg(net)


def test_elastic_with_adam_local_optimizer():
    net = nn.Linear(2, 1)
    loader = DataLoader(TensorDataset(torch.randn(4, 2), torch.zeros(4)), batch_size=2)
    fed = ElasticOptimizer(torch.optim.Adam(net.parameters(), lr=0.1), acg_loader=loader)
    fed.acg(net)
    nn.functional.mse_loss(net(torch.randn(4, 2)), torch.zeros(4, 1)).backward()
    fed.step()
    assert {"importance", "exp_avg"} <= set(fed.state[net.weight])


# ------------------------------------------------------- server adaptive optimizers


def pseudo_grad_round(fed, w, targets):
    fed.zero_grad()
    naive_aggregation(
        [{w: {"param": t}} for t in targets], [{"instances": 1}] * len(targets), optim_list=fed
    )
    fed.step()


def test_fedyogi_matches_paper():
    w = nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    fed = FederatedOptimizer(FedYogi([w], lr=lr, betas=(b1, b2), eps=tau), role=AGGREGATOR)
    x = w.detach().double().numpy().copy()
    m = np.zeros(3)
    v = np.full(3, tau**2)
    rng = np.random.default_rng(0)
    for _ in range(4):
        targets = [torch.from_numpy(x + rng.normal(size=3)).float() for _ in range(3)]
        delta = np.mean([t.double().numpy() for t in targets], axis=0) - x
        pseudo_grad_round(fed, w, targets)
        m = b1 * m + (1 - b1) * delta
        v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
        x = x + lr * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(w.detach().numpy(), x, rtol=1e-4, atol=1e-6)
    assert float(fed.state[w]["step"]) == 4.0
    with pytest.raises(ConfigError):
        FedYogi([w], lr=0.0)


def test_fedadam_is_wrapped_torch_adam():
    w = nn.Parameter(torch.tensor([0.5, -0.5]))
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    fed = FederatedOptimizer(torch.optim.Adam([w], lr=lr, betas=(b1, b2), eps=eps), role=AGGREGATOR)
    x = w.detach().double().numpy().copy()
    m = np.zeros(2)
    v = np.zeros(2)
    for t, shift in enumerate((1.0, -0.5, 0.25), start=1):
        targets = [torch.from_numpy(x + shift).float(), torch.from_numpy(x + 3 * shift).float()]
        g = x - np.mean([tt.double().numpy() for tt in targets], axis=0)  # the pseudo-gradient
        pseudo_grad_round(fed, w, targets)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        np.testing.assert_allclose(w.detach().numpy(), x, rtol=1e-5, atol=1e-6)


def test_fedadagrad_and_fedavgm():
    w = nn.Parameter(torch.zeros(2))
    fed = FederatedOptimizer(torch.optim.Adagrad([w], lr=0.5, eps=1e-10), role=AGGREGATOR)
    acc, x = np.zeros(2), np.zeros(2)
    for target in (np.array([1.0, 2.0]), np.array([-1.0, 0.5])):
        g = x - target
        pseudo_grad_round(fed, w, [torch.from_numpy(target).float()])
        acc += g * g
        x = x - 0.5 * g / (np.sqrt(acc) + 1e-10)
        np.testing.assert_allclose(w.detach().numpy(), x, rtol=1e-5)

    u = nn.Parameter(torch.zeros(2))
    fedm = FederatedOptimizer(torch.optim.SGD([u], lr=1.0, momentum=0.9), role=AGGREGATOR)
    buf, x = None, np.zeros(2)
    for target in (np.array([1.0, 1.0]), np.array([2.0, 0.0])):
        g = x - target
        pseudo_grad_round(fedm, u, [torch.from_numpy(target).float()])
        buf = g if buf is None else 0.9 * buf + g
        x = x - buf
        np.testing.assert_allclose(u.detach().numpy(), x, rtol=1e-6)
