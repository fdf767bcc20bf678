"""Exchanges (ASK/REPLY) and upload wrappers over the in-memory network.

The aggregator runs ``step()`` in the test's thread, collaborators in
threads (``Federation`` from test_maintainer_memory): the same transport and
protocol code that runs on ZeroMQ.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.unit.test_maintainer_memory import Federation, federation  # noqa: F401
from zmqfed.core import Maintainer, StepContext, step_points
from zmqfed.errors import ConfigError, RemoteError
from zmqfed.federated import ErrorCode
from zmqfed.functional import count_step
from zmqfed.wire import Envelope


def _upload(col: Maintainer) -> None:
    """The collaborator's upload of round 1 (the aggregator's count_step ends its step)."""
    col.package()
    col.update_version(1)
    col.step(download=False)


def test_an_exchange_is_parked_until_every_peer_asked_then_answered_with_meta_and_tensors(
    federation,  # noqa: F811
):
    fed: Federation = federation(2)
    asked: dict[str, float] = {}
    answers: dict[str, Envelope] = {}

    def answer(ctx: StepContext) -> bool | None:
        if ctx.pipe is None or ctx.pipe.meta.get("topic") != "sum":
            return None
        value = ctx.pipe.request.tensors["x"]["v"]  # type: ignore[attr-defined]
        asked[ctx.pipe.nick_name] = float(value.sum())
        if len(asked) < 2:
            return False  # park until both asked
        ctx.pipe.set_meta({"total": sum(asked.values())})
        ctx.pipe.set_tensors({"x": {"echo": value * 2}})
        return True

    fed.agg.on(step_points.exchange_requested, answer)
    with fed.agg:
        count_step(2)

    def work(i: int):
        def run(col: Maintainer) -> None:
            answers[col.nick_name] = col.exchange(
                "sum", {"i": i}, {"x": {"v": torch.full((3,), float(i + 1))}}
            )
            _upload(col)

        return run

    for i, name in enumerate(fed.names):
        fed.run(name, work(i))
    fed.agg.step()
    fed.join()
    assert asked == {"client0": 3.0, "client1": 6.0}
    for i, name in enumerate(fed.names):
        reply = answers[name]
        assert reply.kind == "REPLY" and reply.meta["total"] == 9.0
        torch.testing.assert_close(reply.tensors["x"]["echo"], torch.full((3,), 2.0 * (i + 1)))
    assert fed.agg.stats["parked"] >= 1
    assert len(fed.agg.data_list) == 2  # exchanges are not uploads


def test_an_exchange_no_hook_answers_is_refused_naming_the_topic(federation):  # noqa: F811
    fed: Federation = federation(1)
    with fed.agg:
        count_step(1)
    errors: list[RemoteError] = []

    def run(col: Maintainer) -> None:
        with pytest.raises(RemoteError) as info:
            col.exchange("nobody-knows")
        errors.append(info.value)
        _upload(col)

    fed.run("client0", run)
    fed.agg.step()
    fed.join()
    assert errors[0].code == ErrorCode.UNEXPECTED and "nobody-knows" in errors[0].reason


def test_upload_wrappers_nest_and_may_replace_the_upload(federation):  # noqa: F811
    fed: Federation = federation(1)
    with fed.agg:
        count_step(1)
    order: list[str] = []

    def outer(m: Maintainer, tensors: dict, meta: dict, send: Any) -> Envelope:
        order.append("outer in")
        reply = send({k: {"param": v["param"] * 10} for k, v in tensors.items()}, meta)
        order.append("outer out")
        return reply

    def inner(m: Maintainer, tensors: dict, meta: dict, send: Any) -> Envelope:
        order.append("inner in")
        reply = send(tensors, {**meta, "wrapped": True})
        assert reply.kind == "ACK"
        order.append("inner out")
        return reply

    col = fed.cols["client0"]
    col.register_upload_wrapper(outer)
    col.register_upload_wrapper(inner)
    expected = {k: v.detach() * 10 for k, v in col.state_dict.items()}

    fed.run("client0", _upload)
    fed.agg.step()
    fed.join()
    assert order == ["outer in", "inner in", "inner out", "outer out"]
    assert fed.agg.meta_list[0]["wrapped"] is True
    (update,) = fed.agg.data_list
    for name, p in fed.agg.state_dict.items():
        torch.testing.assert_close(update[p]["param"], expected[name])


def test_exchange_and_wrappers_are_for_collaborators(federation):  # noqa: F811
    fed: Federation = federation(1)
    with pytest.raises(ConfigError, match="collaborators"):
        fed.agg.exchange("x")
    with pytest.raises(ConfigError, match="collaborator"):
        fed.agg.register_upload_wrapper(lambda *a: None)
    with pytest.raises(ConfigError, match="topic"):
        fed.cols["client0"].exchange("")
