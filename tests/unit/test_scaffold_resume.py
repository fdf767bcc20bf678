"""SCAFFOLD's control variates survive a checkpoint (``state_dict`` / ``load_state_dict``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zmqfed.checkpoint import load_checkpoint, save_checkpoint
from zmqfed.errors import ConfigError
from zmqfed.functional import average_aggregation
from zmqfed.optim import ScaffoldOptimizer
from zmqfed.props import AGGREGATOR


def _server() -> tuple[nn.Parameter, ScaffoldOptimizer]:
    w = nn.Parameter(torch.zeros(2))
    return w, ScaffoldOptimizer(torch.optim.SGD([w], lr=1.0), role=AGGREGATOR)


def _round(w: nn.Parameter, server: ScaffoldOptimizer, delta_c: float | None) -> None:
    """One aggregation: the uploads' mean Δc (None: uploads without 'c'), then the server step."""
    upload = {"param": w.detach().clone()}
    if delta_c is not None:
        upload["c"] = torch.full((2,), delta_c)
    server.zero_grad()
    average_aggregation([{w: upload}], optim_list=server)
    server.step()


def test_the_global_control_variate_resumes_from_a_checkpoint(tmp_path):
    w, server = _server()
    _round(w, server, 1.0)
    _round(w, server, 2.0)
    assert server.state[w]["c"].tolist() == [3.0, 3.0]  # c: 0 -> 1 -> 3
    save_checkpoint(tmp_path / "agg.ckpt", {"server_optim": server.state_dict()})

    w2, resumed = _server()  # a new process: fresh model and optimizer
    resumed.load_state_dict(load_checkpoint(tmp_path / "agg.ckpt")["server_optim"])
    assert resumed.state[w2]["c"].tolist() == [3.0, 3.0]  # what the next DATA serves
    _round(w2, resumed, 3.0)
    assert resumed.state[w2]["c"].tolist() == [6.0, 6.0]  # 3 -> 6, not 0 -> 3
    assert resumed.global_control[w2].tolist() == [6.0, 6.0]
    _round(w2, resumed, None)  # a round without any Δc leaves c alone, not doubled
    assert resumed.state[w2]["c"].tolist() == [6.0, 6.0]


def test_a_checkpoint_without_scaffold_state_resumes_from_the_optimizer_state(tmp_path):
    w, server = _server()
    _round(w, server, 1.0)
    inner_only = server.optim.state_dict()  # as checkpoints written before 'scaffold' existed
    w2, resumed = _server()
    resumed.load_state_dict(inner_only)
    _round(w2, resumed, 2.0)
    assert resumed.state[w2]["c"].tolist() == [3.0, 3.0]
    _round(w2, resumed, None)
    assert resumed.state[w2]["c"].tolist() == [3.0, 3.0]


def test_a_collaborators_local_control_variate_resumes_too():
    w = nn.Parameter(torch.zeros(2))
    client = ScaffoldOptimizer(torch.optim.SGD([w], lr=0.5))
    client.state[w]["c"] = torch.tensor([0.5, -0.5])  # the downloaded global c
    w.grad = torch.tensor([1.0, 2.0])
    client.step()
    client.round()  # c_i <- c_i - c + (x - y) / lr_sum
    c_i = client.local_control[w].clone()
    state = client.state_dict()
    w2 = nn.Parameter(torch.zeros(2))
    again = ScaffoldOptimizer(torch.optim.SGD([w2], lr=0.5))
    again.load_state_dict(state)
    torch.testing.assert_close(again.local_control[w2], c_i)
    state["scaffold"]["local_control"] = {0: torch.zeros(3)}
    with pytest.raises(ConfigError, match=r"parameter 0 has shape \[3\], expected \[2\]"):
        again.load_state_dict(state)


def _local_round(client: ScaffoldOptimizer, w: nn.Parameter, version: int) -> None:
    """Training on version ``version``'s model (w = 0): three steps on ||w - t||^2 / 2, round()."""
    client.begin_round(version)
    with torch.no_grad():
        w.zero_()
    for _ in range(3):  # later gradients depend on the corrected steps, so on c_i
        client.zero_grad()
        (0.5 * (w - torch.tensor([1.0, 2.0])).pow(2).sum()).backward()
        client.step()
    client.round()
    client.clear_state_dict()


def test_a_redone_round_starts_from_the_c_i_it_had_before():
    """The aggregator lost version 2 and serves version 1 again: c_i is not advanced twice."""
    w = nn.Parameter(torch.zeros(2))
    client = ScaffoldOptimizer(torch.optim.SGD([w], lr=0.5))
    _local_round(client, w, 0)
    before_v1 = client.local_control[w].clone()
    _local_round(client, w, 1)
    after_v1 = client.local_control[w].clone()
    assert not torch.equal(before_v1, after_v1)  # training on version 1 moved c_i
    client.rewind_to(1)
    torch.testing.assert_close(client.local_control[w], before_v1)
    _local_round(client, w, 1)  # the redone round gives what the first one gave
    torch.testing.assert_close(client.local_control[w], after_v1)


def test_a_rewind_further_back_than_kept_undoes_what_it_can_and_says_so(caplog):
    w = nn.Parameter(torch.zeros(2))
    client = ScaffoldOptimizer(torch.optim.SGD([w], lr=0.5))
    before: list[torch.Tensor] = []
    for version in range(4):
        before.append(client.local_control.get(w, torch.zeros(2)).clone())
        _local_round(client, w, version)
    advanced = client.local_control[w].clone()
    client.rewind_to(5)  # ahead of every round trained: nothing to undo, nothing said
    torch.testing.assert_close(client.local_control[w], advanced)
    assert "SCAFFOLD" not in caplog.text
    client.rewind_to(0)  # only versions 2 and 3 are kept: back to before version 2
    torch.testing.assert_close(client.local_control[w], before[2])
    assert "rewound to version 0" in caplog.text
    assert "versions 0 to 1 advance it a second time" in caplog.text


def test_a_rewind_past_a_round_without_training_restores_the_next_one(caplog):
    """No snapshot for the version rewound to (a test round): the next round's is the same c_i."""
    w = nn.Parameter(torch.zeros(2))
    client = ScaffoldOptimizer(torch.optim.SGD([w], lr=0.5))
    _local_round(client, w, 0)
    before_v2 = client.local_control[w].clone()
    _local_round(client, w, 2)  # version 1 was a test round: no training, no snapshot
    client.rewind_to(1)
    torch.testing.assert_close(client.local_control[w], before_v2)
    assert "SCAFFOLD" not in caplog.text


def test_loading_a_state_forgets_the_snapshots():
    w = nn.Parameter(torch.zeros(2))
    client = ScaffoldOptimizer(torch.optim.SGD([w], lr=0.5))
    _local_round(client, w, 0)
    _local_round(client, w, 1)
    state = client.state_dict()
    client.load_state_dict(state)
    loaded = client.local_control[w].clone()
    client.rewind_to(1)  # the snapshot of version 1 predates the load: not put back
    torch.testing.assert_close(client.local_control[w], loaded)
