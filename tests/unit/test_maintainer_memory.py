"""The Maintainer and its hooks over an in-memory network: the real protocol code, no sockets.

The aggregator runs ``step()`` in the test's thread; collaborators run in
threads of their own.  Everything below the ports (handshake, requests,
parking, de-duplication, chunked streams) is the same code that runs on
ZeroMQ; integration tests cover the sockets themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import zmqfed.topo as topo
from zmqfed.core import Maintainer, StepContext, StepResult, step_points
from zmqfed.errors import ConfigError, RemoteError
from zmqfed.federated import ErrorCode, MemoryNetwork
from zmqfed.functional import count_step, version_check
from zmqfed.wire import Kind, StreamConfig

TIMEOUT = 20.0


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


class Federation:
    """An aggregator and ``n`` collaborators on one MemoryNetwork."""

    def __init__(self, n: int, **kwargs: Any) -> None:
        self.network = MemoryNetwork()
        star = topo.star(n, "ipc:///memory/federation")
        self.names = [f"client{i}" for i in range(n)]
        kw = dict(network=self.network, timeout=TIMEOUT, **kwargs)
        self.agg = Maintainer(topo.analysis(star, "aggregator")[0], _model(0), **kw)
        self.cols = {
            name: Maintainer(topo.analysis(star, name)[0], _model(i + 1), **kw)
            for i, name in enumerate(self.names)
        }
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def run(self, name: str, work: Callable[[Maintainer], None]) -> None:
        """Run ``work(collaborator)`` in a thread; its exception fails :meth:`join`."""

        def target() -> None:
            try:
                work(self.cols[name])
            except BaseException as exc:  # reported by join()
                self.errors.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "a collaborator thread hangs"
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        for m in (self.agg, *self.cols.values()):
            m.close()


@pytest.fixture
def federation() -> Iterator[Callable[..., Federation]]:
    made: list[Federation] = []

    def make(n: int, **kwargs: Any) -> Federation:
        made.append(Federation(n, **kwargs))
        return made[-1]

    yield make
    for fed in made:
        fed.close()


def _round_trip(col: Maintainer) -> None:
    col.step(upload=False)
    col.unpackage()
    with torch.no_grad():
        for p in col.state_dict.values():
            p.add_(1.0)
    col.meta["instances"] = 2
    col.update_version(1)
    col.package()
    col.step(download=False)


def test_a_round_serves_the_model_and_collects_every_upload(federation):
    fed = federation(2)
    with fed.agg:
        count_step(2)
    served = {k: v.clone() for k, v in fed.agg.state_dict.items()}
    for name in fed.names:
        fed.run(name, _round_trip)
    result = fed.agg.step()
    fed.join()
    assert isinstance(result, StepResult) and result
    assert (result.uploads, result.downloads) == (2, 2)
    assert sorted(p.nick_name for p in fed.agg.pipes) == fed.names
    assert [m["instances"] for m in fed.agg.meta_list] == [2, 2]
    for update in fed.agg.data_list:  # every upload is the served model plus one
        for p, state in update.items():
            name = next(k for k, v in fed.agg.state_dict.items() if v is p)
            torch.testing.assert_close(state["param"], served[name] + 1)
    col = fed.cols["client0"]
    assert col.stats["bytes_in"] > 0 and col.stats["bytes_out"] > 0
    assert fed.agg.stats["messages_in"] >= 6  # 2 x HELLO, PULL, PUSH


def test_hooks_get_names_peers_and_flags(federation):
    fed = federation(1)
    seen: dict[str, list[Any]] = {"named": [], "openfed": [], "ctx": []}

    def named(state: dict[str, torch.Tensor], p: torch.Tensor, *, name: str):
        seen["named"].append(name)
        return state

    def openfed(m: Maintainer, flag: bool) -> None:
        seen["openfed"].append((m.current_step, m.pipe.nick_name, flag))

    def ctx_hook(ctx: StepContext) -> None:
        seen["ctx"].append((ctx.point, ctx.pipe.nick_name if ctx.pipe else None, ctx.flag))

    fed.agg.register_package_hook(0, named)
    fed.agg.register_step_hook(0, openfed, "after_download")  # OpenFed's name
    fed.agg.on(step_points.upload_handled, ctx_hook)
    fed.agg.on(step_points.download_served, ctx_hook)
    with fed.agg:
        count_step(1)
    fed.run("client0", _round_trip)
    fed.agg.step()
    fed.join()
    assert sorted(seen["named"]) == ["b", "w"]
    assert seen["openfed"] == [(step_points.upload_handled, "client0", True)]
    assert seen["ctx"] == [
        (step_points.download_served, "client0", True),
        (step_points.upload_handled, "client0", True),
    ]


def test_unknown_step_point_is_refused(federation):
    fed = federation(1)
    with pytest.raises(ConfigError, match="unknown step point"):
        fed.agg.on("before_lunch", lambda ctx: None)


def test_a_pull_for_a_future_version_is_parked_then_served(federation):
    fed = federation(1)
    fed.agg.on(step_points.download_requested, version_check)
    stops = iter([step_points.request_parked, step_points.download_served])
    target = {"point": next(stops)}

    def stop_at(ctx: StepContext) -> None:
        if ctx.point == target["point"]:
            ctx.maintainer.manual_stop()

    fed.agg.on(step_points.request_parked, stop_at)
    fed.agg.on(step_points.download_served, stop_at)

    def pull_version_1(col: Maintainer) -> None:
        col.update_version(1)
        col.step(upload=False)

    fed.run("client0", pull_version_1)
    first = fed.agg.step()  # parks the request: version 1 is not reached
    assert first.parked == 1 and first.downloads == 0
    fed.agg.update_version(1)
    target["point"] = next(stops)
    second = fed.agg.step()
    fed.join()
    assert second.downloads == 1
    assert fed.cols["client0"].meta["version"] == 1


def test_a_discarded_upload_reaches_the_collaborator_as_remote_error(federation):
    fed = federation(1)

    def refuse(ctx: StepContext) -> bool:
        ctx.maintainer.discard("not today")
        ctx.maintainer.manual_stop()
        return False

    fed.agg.on(step_points.upload_received, refuse)
    failures: list[RemoteError] = []

    def upload(col: Maintainer) -> None:
        col.package()
        try:
            col.step(download=False)
        except RemoteError as exc:
            failures.append(exc)

    fed.run("client0", upload)
    fed.agg.step()
    fed.join()
    assert [(e.code, e.reason) for e in failures] == [(ErrorCode.DISCARDED, "not today")]
    assert fed.agg.data_list == []


def test_streams_run_the_chunk_protocol_both_ways(federation):
    # A threshold below the model's size streams every PUSH and DATA in chunks.
    config = StreamConfig(threshold=32, chunk_bytes=16, window_bytes=32)
    fed = federation(1, stream=config)
    with fed.agg:
        count_step(1)
    fed.agg.meta["note"] = "served with the model"
    fed.run("client0", _round_trip)
    fed.agg.step()
    fed.join()
    assert fed.agg.stats["chunks_out"] > 1 and fed.agg.stats["chunks_in"] > 1
    (update,) = fed.agg.data_list
    for name, p in fed.agg.state_dict.items():
        torch.testing.assert_close(update[p]["param"], p.detach() + 1, msg=name)
    # the collaborator's meta is the streamed DATA's, not a stale one
    col = fed.cols["client0"]
    assert col.meta["note"] == "served with the model"


def test_a_retried_upload_is_acknowledged_once_and_counted_once(federation):
    fed = federation(1)
    fed.agg.on(step_points.download_served, lambda ctx: ctx.maintainer.manual_stop())
    col = fed.cols["client0"]
    link = col._side.transport.link  # the collaborator's own connection, driven by hand

    def upload_twice_then_pull(col: Maintainer) -> None:
        col.package()
        col.step(download=False)
        # The same request again, as after a lost ACK (same session and seq),
        # then a download: the aggregator reads all three in order.
        ((_, seq),) = fed.agg.all_pipes()[0].accepted  # the upload's (session, seq)
        link.port.send(_push_frames(link, seq, col))
        col.step(upload=False)

    fed.run("client0", upload_twice_then_pull)
    fed.agg.step()
    fed.join()
    assert len(fed.agg.meta_list) == 1


def _push_frames(link: Any, seq: int, col: Maintainer) -> list[Any]:
    from zmqfed.federated.protocol import stamp
    from zmqfed.wire import encode

    env = stamp(
        Kind.PUSH,
        col.nick_name,
        seq=seq,
        incarnation=link.incarnation,
        version=col.version,
        meta=col.meta.to_json_dict(),
        tensors=col.apply_hooks(col.packaged_data, unpackage=False),
    )
    return encode(env)


def test_memory_network_keeps_router_semantics():
    net = MemoryNetwork()
    dealer = net.dealer("ipc:///memory/x", "alpha")
    dealer.send([b"early"])  # queued until a ROUTER is bound (IMMEDIATE=0)
    router = net.router("ipc:///memory/x")
    assert router.wait(1000)
    assert [router.recv_frame().bytes, router.recv_frame().bytes] == [b"alpha", b"early"]
    with pytest.raises(ConfigError, match="already in use"):
        net.router("ipc:///memory/x")
    from zmqfed.federated.ports import LinkEventKind, Unreachable

    with pytest.raises(Unreachable):
        router.send([b"ghost", b"x"])
    takeover = net.dealer("ipc:///memory/x", "alpha")  # ROUTER_HANDOVER
    router.send([b"alpha", b"to the new one"])
    assert takeover.wait(1000) and takeover.recv_frame().bytes == b"to the new one"
    # the old connection stays up but is no longer routed: no event, its sends vanish
    assert LinkEventKind.DISCONNECTED not in [e.kind for e in dealer.link_events()]
    dealer.send([b"lost"])
    assert not router.wait(100) and not dealer.wait(100)
    for port in (dealer, takeover, router):
        port.close()
