"""Traffic and upload counters, and the telemetry built from them, over an in-memory network.

Both ends of every exchange count what they send and read, so the two
ends' counts must agree message for message and byte for byte; the
snapshots and ``/metrics`` derived from them are checked against the same
exchanges.  The protocol code is the one that runs on sockets.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import zmqfed.topo as topo
from zmqfed.api import stale_check
from zmqfed.core import Maintainer, StepContext, step_points
from zmqfed.errors import RemoteError
from zmqfed.federated import MemoryNetwork
from zmqfed.functional import count_step
from zmqfed.ops import MetricsExporter, Telemetry
from zmqfed.wire import StreamConfig

TIMEOUT = 20.0


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


class Star:
    """An aggregator and ``n`` collaborators on one MemoryNetwork."""

    def __init__(self, n: int, **kwargs: Any) -> None:
        network = MemoryNetwork()
        star = topo.star(n, "ipc:///memory/ops")
        self.names = [f"client{i}" for i in range(n)]
        kw = dict(network=network, timeout=TIMEOUT, **kwargs)
        self.agg = Maintainer(topo.analysis(star, "aggregator")[0], _model(0), **kw)
        self.cols = {
            name: Maintainer(topo.analysis(star, name)[0], _model(i + 1), **kw)
            for i, name in enumerate(self.names)
        }
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def run(self, name: str, work: Callable[[Maintainer], None]) -> None:
        def target() -> None:
            try:
                work(self.cols[name])
            except BaseException as exc:  # reported by join()
                self.errors.append(exc)

        self.threads.append(threading.Thread(target=target, daemon=True))
        self.threads[-1].start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "a collaborator thread hangs"
        self.threads.clear()
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        for m in (self.agg, *self.cols.values()):
            m.close()


@pytest.fixture
def make_star() -> Iterator[Callable[..., Star]]:
    made: list[Star] = []

    def make(n: int, **kwargs: Any) -> Star:
        made.append(Star(n, **kwargs))
        return made[-1]

    yield make
    for star in made:
        star.close()


def _round_trip(col: Maintainer) -> None:
    col.step(upload=False)
    col.unpackage()
    col.meta["instances"] = 1
    col.update_version(1)
    col.package()
    col.step(download=False)


def _summed(stats: list[dict[str, Any]], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in stats:
        for kind, n in s[key].items():
            out[kind] = out.get(kind, 0) + n
    return out


@pytest.mark.parametrize("streamed", [False, True])
def test_both_ends_count_the_same_messages_and_bytes(make_star, streamed):
    stream = StreamConfig(threshold=32, chunk_bytes=16, window_bytes=32) if streamed else None
    star = make_star(2, **({"stream": stream} if stream else {}))
    with star.agg:
        count_step(2)
    for name in star.names:
        star.run(name, _round_trip)
    star.agg.step()
    star.join()
    agg = star.agg.stats
    cols = [m.stats for m in star.cols.values()]
    # What the collaborators sent is what the aggregator read, kind by kind, and back.
    assert agg["messages_received"] == _summed(cols, "messages_sent")
    assert agg["bytes_received"] == _summed(cols, "bytes_sent")
    assert _summed(cols, "messages_received") == agg["messages_sent"]
    assert _summed(cols, "bytes_received") == agg["bytes_sent"]
    assert agg["messages_received"]["HELLO"] == 2 and agg["messages_received"]["PULL"] == 2
    assert agg["uploads"] == {"accepted": 2} and agg["joins"] == 2
    if streamed:
        assert (
            agg["messages_received"]["CHUNK"]
            == agg["chunks_in"]
            == sum(c["chunks_out"] for c in cols)
        )
        assert (
            agg["messages_sent"]["CHUNK"] == agg["chunks_out"] == sum(c["chunks_in"] for c in cols)
        )
        # the streamed upload's tensor bytes all travelled in chunks
        assert agg["bytes_received"]["CHUNK"] == agg["bytes_in"]
    else:
        assert "CHUNK" not in agg["messages_received"]
        assert agg["bytes_received"]["PUSH"] > agg["bytes_in"]  # headers on top of tensors


def test_refused_uploads_are_counted_by_reason(make_star):
    star = make_star(2)
    star.agg.on(step_points.upload_received, stale_check, nice=40)

    def refuse_client1(ctx: StepContext) -> bool | None:
        if ctx.pipe is not None and ctx.pipe.nick_name == "client1":
            ctx.maintainer.discard("not today")
            return False
        return None

    star.agg.on(step_points.upload_received, refuse_client1, nice=45)
    done = {"n": 0}

    def stop_after_two(ctx: StepContext) -> None:
        done["n"] += 1
        if done["n"] == 2:
            ctx.maintainer.manual_stop()

    star.agg.on(step_points.upload_handled, stop_after_two)
    star.agg.on(step_points.request_parked, stop_after_two)
    star.agg.update_version(3)
    failures: list[str] = []

    def upload(version: int) -> Callable[[Maintainer], None]:
        def work(col: Maintainer) -> None:
            col.update_version(version)
            col.package()
            try:
                col.step(download=False)
            except RemoteError as exc:
                failures.append(f"{col.nick_name}: {exc.code}")

        return work

    star.run("client0", upload(2))  # answers a model older than version 3: stale
    star.run("client1", upload(4))  # fresh, but a hook discards it
    star.agg.step()
    star.join()
    assert sorted(failures) == ["client0: discarded", "client1: discarded"]
    assert star.agg.stats["uploads"] == {"stale": 1, "discarded": 1}
    assert star.agg.stats["refused"] == {"discarded": 2}


def test_telemetry_publishes_a_group_view_and_bounded_per_peer_metrics(make_star):
    prom = pytest.importorskip("prometheus_client.parser")
    star = make_star(6)
    with star.agg:
        count_step(4)
    for name in star.names[:4]:  # two collaborators never join
        star.run(name, _round_trip)
    star.agg.step()
    star.join()
    telemetry = Telemetry("aggregator", ["aggregator"], rounds=5, top_peers=3)
    telemetry.record(
        {"round": 0, "mode": "train", "participants": 4, "seconds": 0.5, "metrics": {"loss": 0.25}}
    )
    snap = telemetry.publish(state="running", round=1, groups=[(star.agg, 4)])
    st = snap.status
    assert st["online_peers"] == star.names[:4] and st["offline_peers"] == star.names[4:]
    (group,) = st["groups"]
    assert (group["peers"], group["online"], group["quorum"]) == (6, 4, 4)
    assert (group["uploads"], group["expected"]) == (4, 6)
    assert len(group["top_peers"]) == 3  # bounded, however large the group
    assert {p["peer"] for p in group["top_peers"]} <= set(star.names[:4])
    assert st["eta_seconds"] == pytest.approx(0.5 * 4, abs=0.2)  # 4 rounds left at 0.5 s

    text = MetricsExporter(telemetry).render().decode()
    families = {f.name: f for f in prom.text_string_to_metric_families(text)}
    online = families["zmqfed_peer_online"].samples
    assert len(online) == 3 and all(s.value == 1.0 for s in online)
    accepted = families["zmqfed_uploads_accepted"].samples
    assert [(s.labels["group"], s.value) for s in accepted] == [("aggregator", 4.0)]
    pushes = [s for s in families["zmqfed_received_bytes"].samples if s.labels["kind"] == "PUSH"]
    assert pushes[0].value == star.agg.stats["bytes_received"]["PUSH"]
    assert families["zmqfed_rounds_completed"].samples[0].value == 1.0
    loss = families["zmqfed_last_round_metric"].samples
    assert [(s.labels["metric"], s.value) for s in loss] == [("loss", 0.25)]
    assert families["process_resident_memory_bytes"].samples[0].value > 0

    telemetry.top_peers = 0  # the default: no per-peer series at all
    telemetry.publish(state="running", round=1, groups=[(star.agg, 4)])
    text = MetricsExporter(telemetry).render().decode()
    samples = [s for f in prom.text_string_to_metric_families(text) for s in f.samples]
    assert not [s for s in samples if "peer" in s.labels]


def test_watch_publishes_a_running_step_at_most_once_per_interval(make_star):
    star = make_star(1)
    with star.agg:
        count_step(1)
    telemetry = Telemetry("aggregator", ["aggregator"], rounds=3, publish_interval=0.3)
    published: list[tuple[float, int]] = []

    def publish() -> None:
        snap = telemetry.publish(state="running", round=0, groups=[(star.agg, 1)])
        published.append((time.monotonic(), snap.status["progress"]["uploads"]))

    telemetry.watch(star.agg, publish)

    def slow_round(col: Maintainer) -> None:
        time.sleep(1.2)  # the aggregator's loop idles meanwhile (every 0.5 s)
        _round_trip(col)

    star.run("client0", slow_round)
    tic = time.monotonic()
    star.agg.step()
    star.join()
    elapsed = time.monotonic() - tic
    assert published and published[0][1] == 0  # the step's start, nothing received yet
    assert telemetry.latest.status["progress"]["round_started"] is not None
    assert len(published) <= elapsed / 0.3 + 1
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(published)]
    assert all(gap >= 0.3 for gap in gaps)
