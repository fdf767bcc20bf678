"""Every update counted exactly once, every wait bounded: the unkind cases, over real sockets.

An aggregator runs in a thread of the test process (it owns its sockets);
collaborators are Maintainers in threads or in child processes, and raw
DEALERs stand in for buggy or hostile members.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import zmq
from torch import nn

import zmqfed.topo as topo
from zmqfed.api import API, run_collaborator
from zmqfed.core import Maintainer, StepContext, aggregator_side, step_points
from zmqfed.errors import ConfigError, PeerTimeout, RemoteError
from zmqfed.federated import Curve, ErrorCode, aggregator_streams, create_keys
from zmqfed.functional import count_step, naive_aggregation
from zmqfed.optim import FederatedOptimizer
from zmqfed.props import AGGREGATOR
from zmqfed.wire import PROTOCOL_VERSION, Envelope, Limits, StreamConfig, decode, encode

NAMES = ("client0", "client1")


def _star(endpoint: str, names: tuple[str, ...] = NAMES) -> topo.Topology:
    topology = topo.Topology()
    aggregator = topology.add_node(topo.Node("aggregator", endpoint))
    for name in names:
        topology.add_edge(topo.Node(name), aggregator)
    return topology


def _props(endpoint: str, name: str, names: tuple[str, ...] = NAMES) -> Any:
    return topo.analysis(_star(endpoint, names), name)[0]


def _model(fill: float = 0.25) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), fill), "n": torch.tensor(0, dtype=torch.int64)}


class Aggregator(threading.Thread):
    """Runs ``steps`` aggregator steps (``configure(m)`` sets the policy), then closes."""

    def __init__(
        self,
        endpoint: str,
        configure: Callable[[Maintainer], None],
        *,
        timeout: float,
        steps: int = 1,
        model: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.configure, self.timeout = endpoint, configure, timeout
        self.steps, self.kwargs = steps, kwargs
        self.model = model if model is not None else _model()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.senders: list[list[str]] = []
        self.metas: list[list[dict[str, Any]]] = []
        self.results: list[Any] = []
        self.durations: list[float] = []

    def run(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:  # a socket closed a moment ago may still hold the port
                m = Maintainer(_props(self.endpoint, "aggregator"), self.model, **self.kwargs)
                break
            except ConfigError as exc:
                if "already in use" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                self.error = exc
            except BaseException as exc:
                self.error = exc
            self.ready.set()
            return
        try:
            self.configure(m)
            self.ready.set()
            for _ in range(self.steps):
                tic = time.monotonic()
                self.results.append(m.step(timeout=self.timeout))
                self.durations.append(time.monotonic() - tic)
                self.senders.append(list(m.sender_list))
                self.metas.append([dict(meta) for meta in m.meta_list])
                m.clear()
                m.update_version()
        except BaseException as exc:
            self.error = exc
        finally:
            m.close()

    def finish(self, timeout: float = 30.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the aggregator's step did not end"
        if self.error is not None:
            raise self.error


@pytest.fixture
def start_aggregator(slow_factor: float) -> Iterator[Callable[..., Aggregator]]:
    made: list[Aggregator] = []

    def start(endpoint: str, configure: Callable[[Maintainer], None], **kwargs: Any) -> Aggregator:
        kwargs.setdefault("timeout", 60 * slow_factor)
        agg = Aggregator(endpoint, configure, **kwargs)
        agg.start()
        assert agg.ready.wait(20 * slow_factor)
        made.append(agg)
        return agg

    yield start
    for agg in made:
        agg.join(30)


def _counting(n: int) -> Callable[[Maintainer], None]:
    def configure(m: Maintainer) -> None:
        with m:
            count_step(n)

    return configure


def _upload(endpoint: str, name: str, fill: float, *, timeout: float, **kw: Any) -> Maintainer:
    m = Maintainer(_props(endpoint, name), _model(fill), timeout=timeout, **kw)
    m.update_version(1)
    m.meta["instances"] = 1
    m.package()
    m.step(download=False)
    return m


# ---------------------------------------------------------------------------- 1. restart

RESTARTED = """
import json, os, signal, sys
import torch
import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.errors import RemoteError

endpoint, stage = sys.argv[1], sys.argv[2]
topology = topo.Topology()
agg = topology.add_node(topo.Node("aggregator", endpoint))
for name in ("client0", "client1"):
    topology.add_edge(topo.Node(name), agg)
m = Maintainer(topo.analysis(topology, "client0")[0],
               {"w": torch.zeros(4), "n": torch.tensor(0)}, timeout=60)
m.step(upload=False)
print("CONTRIBUTED", m.meta.get("contributed"), flush=True)
m.update_version(1)
m.meta["instances"] = 1
with torch.no_grad():
    m.state_dict["w"].fill_(1.0 if stage == "first" else 2.0)
m.package()
try:
    m.step(download=False)
    print("UPLOADED", flush=True)
except RemoteError as exc:
    print("REFUSED", exc.code, flush=True)
if stage == "first":
    os.kill(os.getpid(), signal.SIGKILL)  # dies without a word, its round still open
"""


def test_a_member_restarted_in_an_open_round_is_counted_once(
    free_tcp_endpoint, start_aggregator, run_python, slow_factor
):
    agg = start_aggregator(free_tcp_endpoint, _counting(2))
    first = run_python(RESTARTED, args=[free_tcp_endpoint, "first"])
    out, err = first.communicate(timeout=60 * slow_factor)
    assert "UPLOADED" in out, err
    second = run_python(RESTARTED, args=[free_tcp_endpoint, "second"])
    out, err = second.communicate(timeout=60 * slow_factor)
    assert second.returncode == 0, err
    assert "CONTRIBUTED True" in out  # told at download: its update is in already
    assert "REFUSED already-counted" in out  # and a second update is not counted
    _upload(free_tcp_endpoint, "client1", 3.0, timeout=30 * slow_factor).close()
    agg.finish()
    assert agg.senders == [["client0", "client1"]]
    assert agg.results[0].uploads == 2


# ------------------------------------------------------------------------- 2 and 11. retries


def test_a_retried_upload_is_acknowledged_not_counted(free_tcp_endpoint, start_aggregator):
    slow_once = threading.Event()

    def configure(m: Maintainer) -> None:
        with m:
            count_step(2)

        def delay_first(ctx: StepContext) -> None:  # the ACK comes after the client gave up
            if not slow_once.is_set():
                slow_once.set()
                time.sleep(1.5)

        m.on(step_points.upload_received, delay_first, nice=0)

    agg = start_aggregator(free_tcp_endpoint, configure)
    col = Maintainer(_props(free_tcp_endpoint, "client0"), _model(1.0), timeout=0.5)
    col.update_version(1)
    col.meta["instances"] = 1
    col.package()
    with pytest.raises(PeerTimeout):
        col.step(download=False)
    assert col.step(download=False, timeout=20)  # the user's retry: a new request
    for _ in range(3):  # a member uploading again and again fills no round
        assert col.step(download=False, timeout=20)
    col.close()
    _upload(free_tcp_endpoint, "client1", 3.0, timeout=20).close()
    agg.finish()
    assert agg.senders == [["client0", "client1"]]


def test_a_process_playing_several_clients_counts_up_to_its_quota(
    free_tcp_endpoint, start_aggregator
):
    """count_step(K) above the group's size: one process may contribute K / members uploads.

    OpenFed's examples simulate several clients in one collaborator process
    (download, train, upload, again within one version). The quota is what
    the policy needs, not more; a retry of one request still counts once, and
    another process of the member is still refused.
    """
    seen: dict[str, int] = {}

    def configure(m: Maintainer) -> None:
        with m:
            count_step(4)  # two members: each may count twice per version
        seen["quota"] = m.uploads_per_member

    agg = start_aggregator(free_tcp_endpoint, configure)
    col = Maintainer(_props(free_tcp_endpoint, "client0"), _model(1.0), timeout=20)
    col.update_version(1)
    col.meta["instances"] = 1
    for fill in (1.0, 2.0, 3.0):  # the third is beyond the quota: acknowledged, not counted
        with torch.no_grad():
            col.state_dict["w"].fill_(fill)
        col.package()
        assert col.step(download=False)
    twin = Maintainer(_props(free_tcp_endpoint, "client0"), _model(9.0), timeout=20)
    twin.update_version(1)
    twin.meta["instances"] = 1
    twin.package()
    with pytest.raises(RemoteError) as refused:  # another process of client0
        twin.step(download=False)
    twin.close()
    assert refused.value.code == ErrorCode.ALREADY_COUNTED
    col.close()
    other = _upload(free_tcp_endpoint, "client1", 5.0, timeout=20)
    other.package()
    assert other.step(download=False)  # its second, within the quota: the round closes
    other.close()
    agg.finish()
    assert seen["quota"] == 2
    assert agg.senders == [["client0", "client0", "client1", "client1"]]
    assert [meta.get("instances") for meta in agg.metas[0]] == [1, 1, 1, 1]


# ---------------------------------------------------------------------------- 3. lost HELLO


def test_a_hello_lost_with_a_dying_aggregator_is_said_again(start_aggregator, zmq_ctx, slow_factor):
    for trial in range(4):
        dying = zmq_ctx.socket(zmq.ROUTER)
        endpoint = f"tcp://127.0.0.1:{dying.bind_to_random_port('tcp://127.0.0.1')}"
        col = Maintainer(_props(endpoint, "client0"), _model(), timeout=30 * slow_factor)
        result: dict[str, Any] = {}

        def download(col: Maintainer = col, result: dict[str, Any] = result) -> None:
            try:
                result["ok"] = bool(col.step(upload=False))
            except BaseException as exc:
                result["error"] = exc

        thread = threading.Thread(target=download, daemon=True)
        thread.start()
        assert dying.poll(10_000), "no HELLO reached the dying aggregator"
        dying.recv_multipart()  # swallowed: never answered
        dying.close(linger=0)
        agg = start_aggregator(endpoint, lambda m: m.on(step_points.download_served, _stop))
        thread.join(30 * slow_factor)
        assert not thread.is_alive(), f"trial {trial}: the collaborator never said HELLO again"
        col.close()
        agg.finish()
        assert result == {"ok": True}, result


def _stop(ctx: StepContext) -> None:
    ctx.maintainer.manual_stop()


# ------------------------------------------------------------------------- 4. test rounds


def test_rounds_with_test_rounds_end_on_both_sides(free_tcp_endpoint, slow_factor):
    timeout = 60 * slow_factor
    net = nn.Linear(4, 1)
    agg = Maintainer(_props(free_tcp_endpoint, "aggregator"), net.state_dict(keep_vars=True))
    with agg:
        count_step(2)
    fed = FederatedOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), AGGREGATOR)
    api = API(agg, fed, 2, naive_aggregation, with_test_round=True, progress=False)
    api.step_timeout = timeout
    answered: dict[str, int] = {}

    def collaborate(name: str) -> None:
        local = nn.Linear(4, 1)
        m = Maintainer(_props(free_tcp_endpoint, name), local.state_dict(keep_vars=True))
        try:
            answered[name] = run_collaborator(
                m,
                lambda meta: {"instances": 1},
                test=lambda meta: {"instances": 1, "accuracy": 0.5},
                timeout=timeout,
            )
        finally:
            m.close()

    threads = [threading.Thread(target=collaborate, args=(n,), daemon=True) for n in NAMES]
    for t in threads:
        t.start()
    api.run()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a collaborator still waits after the last test round"
    agg.close()
    assert [(r.round, r.mode) for r in api.records] == [
        (0, "train"),
        (0, "test"),
        (1, "train"),
        (1, "test"),
    ]
    assert answered == {"client0": 4, "client1": 4}


# ----------------------------------------------------------- 8. the first upload's frame bound


def test_the_first_upload_heeds_the_frame_bound_announced_in_welcome(
    free_tcp_endpoint, start_aggregator, slow_factor
):
    small = Limits(max_frame_bytes=2**20, max_message_bytes=64 * 2**20)
    agg = start_aggregator(
        free_tcp_endpoint,
        _counting(1),
        limits=small,
        model={"w": torch.zeros(2**19), "n": torch.tensor(0)},
    )
    # a 2 MiB tensor, above the aggregator's 1 MiB frames; no download before it
    col = Maintainer(
        _props(free_tcp_endpoint, "client0"),
        {"w": torch.ones(2**19), "n": torch.tensor(0)},
        timeout=30 * slow_factor,
    )
    col.meta["instances"] = 1
    col.package()
    col.step(download=False)  # decided after WELCOME: streamed, not dropped and resent
    col.close()
    agg.finish()
    assert agg.senders == [["client0"]]


# ------------------------------------------------------------------- 9. one name, two processes

TWIN = """
import os, sys, time
import torch
import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.errors import RemoteError
from zmqfed.federated import Curve, SocketOptions

endpoint, role = sys.argv[1], sys.argv[2]
keys = sys.argv[3] if len(sys.argv) > 3 else None
topology = topo.Topology()
agg = topology.add_node(topo.Node("aggregator", endpoint))
for name in ("client0", "client1"):
    topology.add_edge(topo.Node(name), agg)
m = Maintainer(topo.analysis(topology, "client0")[0], {"w": torch.zeros(4), "n": torch.tensor(0)},
               timeout=60, socket_options=SocketOptions(probe_silence_ms=1000),
               curve=Curve(keys) if keys else None)
try:
    m.step(upload=False)
    print("FIRST DOWNLOAD", flush=True)
    if role == "older":  # asks again once the newer process took the name
        deadline = time.monotonic() + 60
        while not os.path.exists("newer-downloaded") and time.monotonic() < deadline:
            time.sleep(0.05)
    elif role == "parked":  # asks at once for a version not made yet: parked, then dropped
        m.update_version(1)
    else:
        open("newer-downloaded", "w").close()
        time.sleep(4)
    m.step(upload=False)
    print("SECOND DOWNLOAD", flush=True)
except RemoteError as exc:
    print("REFUSED", exc.code, flush=True)
"""


@pytest.mark.parametrize(
    ("curve", "older_role"),
    [(False, "older"), (True, "older"), (True, "parked")],
    ids=["plaintext", "curve", "curve-parked"],
)
def test_two_live_processes_with_one_name_are_told(
    free_tcp_endpoint,
    start_aggregator,
    run_python,
    slow_factor,
    caplog,
    tmp_path,
    curve,
    older_role,
):
    """Plaintext: the newer process takes the routing id over, the older is told
    when it connects anew. CURVE: both processes hold client0's key and keep
    their own connections; the older one's next request is refused until it
    says HELLO again, and then it is told. ``parked``: the older one waits in
    a request when the newer says HELLO; that request is dropped, and the
    older one's probe is refused, which sends it to HELLO too. Either way
    the newer one goes on."""
    stop = threading.Event()
    extra: list[str] = []
    kwargs: dict[str, Any] = {}
    if curve:
        keys = tmp_path / "keys"
        for name in ("aggregator", "client0", "client1"):
            create_keys(keys, name)
        extra, kwargs = [str(keys)], {"curve": Curve(keys)}

    def configure(m: Maintainer) -> None:
        m.on(
            step_points.after_peer,
            lambda ctx: ctx.maintainer.manual_stop() if stop.is_set() else None,
        )

    agg = start_aggregator(free_tcp_endpoint, configure, idle_interval=0.1, **kwargs)
    older = run_python(TWIN, args=[free_tcp_endpoint, older_role, *extra])
    first = older.stdout.readline()  # the older is welcomed first, whatever the start-up times
    assert first == "FIRST DOWNLOAD\n", first + older.communicate(timeout=30)[1]
    newer = run_python(TWIN, args=[free_tcp_endpoint, "newer", *extra])  # same cwd: the marker
    out_old, err_old = older.communicate(timeout=90 * slow_factor)
    out_old = first + out_old
    out_new, err_new = newer.communicate(timeout=90 * slow_factor)
    stop.set()
    agg.finish()
    # The newer process took the name over; the older, answered nothing on its
    # orphaned connection, connected anew and was told; the newer goes on.
    assert "REFUSED name-in-use" in out_old, (out_old, err_old)
    assert "SECOND DOWNLOAD" in out_new, (out_new, err_new)
    assert any("two processes use the name 'client0'" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------- 12 and 13. bad uploads refused


@pytest.mark.parametrize(
    ("tensors", "meta", "match"),
    [
        ({"w": {"param": torch.ones(4), "exp_avg": torch.ones(4)}}, {}, "not accepted"),
        ({"w": {"param": torch.ones(4)}}, {"instances": "many"}, "instances"),
        ({"w": {"param": torch.ones(4)}}, {"instances": -1}, "instances"),
        ({"w": {"param": torch.ones(5)}}, {}, "shape"),
        ({"w": {"param": torch.ones(4, dtype=torch.int64)}}, {}, "integer"),
    ],
    ids=["planted-state", "instances-text", "instances-negative", "shape", "int-for-float"],
)
def test_a_bad_upload_is_refused_before_it_is_acknowledged(
    free_tcp_endpoint, start_aggregator, tensors, meta, match
):
    agg = start_aggregator(free_tcp_endpoint, _counting(2))
    bad = Maintainer(_props(free_tcp_endpoint, "client0"), _model(), timeout=20)
    bad.update_version(1)
    bad.packaged_data = {"n": {"param": bad.state_dict["n"]}, **tensors}
    bad.meta.update(meta)
    with pytest.raises(RemoteError) as info:
        bad.step(download=False)
    assert info.value.code == ErrorCode.BAD_UPLOAD and match in info.value.reason
    bad.close()
    for name, fill in (("client0", 1.0), ("client1", 3.0)):  # the round goes on
        _upload(free_tcp_endpoint, name, fill, timeout=20).close()
    agg.finish()
    assert agg.senders == [["client0", "client1"]]


def test_a_poisoned_update_is_dropped_and_the_round_aggregates_the_rest(
    free_tcp_endpoint, slow_factor, caplog
):
    names = ("client0", "client1", "client2")
    timeout = 60 * slow_factor
    agg_model = _model(0.0)
    agg = Maintainer(_props(free_tcp_endpoint, "aggregator", names), agg_model)
    with agg:
        count_step(3)
    params = [agg_model["w"].requires_grad_()]
    fed = FederatedOptimizer(torch.optim.SGD(params, lr=1.0), AGGREGATOR)
    api = API(
        agg, fed, 1, naive_aggregation, reduce_func=_loss_mean, progress=False, step_timeout=timeout
    )
    uploads = {"client0": (1.0, 1.0), "client1": (3.0, 2.0), "client2": (float("nan"), "x")}

    def collaborate(name: str) -> None:
        m = Maintainer(_props(free_tcp_endpoint, name, names), _model(), timeout=timeout)
        fill, loss = uploads[name]

        def train(meta: Any) -> dict[str, Any]:
            with torch.no_grad():
                m.state_dict["w"].fill_(fill)
            return {"instances": 1, "loss": loss}

        try:
            run_collaborator(m, train, timeout=timeout)
        finally:
            m.close()

    threads = [threading.Thread(target=collaborate, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    api.run()
    for t in threads:
        t.join(timeout)
    agg.close()
    assert api.error is None
    (record,) = api.records
    assert record.participants == 2  # the NaN upload was dropped from the aggregation
    torch.testing.assert_close(agg_model["w"].detach(), torch.full((4,), 2.0))
    assert record.metrics == {"loss": 1.5}
    assert any("client2" in r.getMessage() for r in caplog.records)


def _loss_mean(meta_list: list[Any]) -> dict[str, float]:
    losses = [float(m["loss"]) for m in meta_list]  # a text loss raises ValueError
    return {"loss": sum(losses) / len(losses)}


# ------------------------------------------------ 15 and 16. members cannot hold a step or budget


def _raw_member(ctx: zmq.Context, endpoint: str, name: str, fingerprint: str, **meta: Any):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    sock.connect(endpoint)
    hello = {"protocol": PROTOCOL_VERSION, "fingerprint": fingerprint, "session": uuid.uuid4().hex}
    hello.update(meta)
    sock.send_multipart(encode(Envelope(kind="HELLO", sender=name, seq=1, meta=hello)))
    while True:
        assert sock.poll(10_000), "no WELCOME"
        reply = decode(sock.recv_multipart())
        if reply.kind == "WELCOME":
            return sock, reply.incarnation


def test_a_member_that_takes_no_credit_cannot_hold_the_step(
    free_tcp_endpoint, start_aggregator, zmq_ctx, monkeypatch, slow_factor
):
    monkeypatch.setattr(aggregator_side, "DRAIN_LIMIT", 1.0)
    agg = start_aggregator(
        free_tcp_endpoint,
        lambda m: m.on(step_points.download_served, _stop),
        model={"w": torch.ones(2**18), "n": torch.tensor(0)},  # 1 MiB: above a 64 KiB frame
        idle_interval=0.05,
    )
    props = _props(free_tcp_endpoint, "client0")
    sock, incarnation = _raw_member(
        zmq_ctx, free_tcp_endpoint, "client0", props.fingerprint, max_frame_bytes=65536
    )
    sock.send_multipart(
        encode(Envelope(kind="PULL", sender="client0", seq=2, incarnation=incarnation))
    )
    agg.finish()  # served as a stream the member never takes credit for
    kinds = []
    while sock.poll(1000):
        kinds.append(decode(sock.recv_multipart()).kind)
    sock.close(linger=0)
    assert agg.durations[0] < 10 * slow_factor  # the drain bound ended it, not the stall bound
    assert "DATA" in kinds and "ERROR" in kinds  # announced, then aborted


def test_an_abandoned_streamed_upload_releases_its_budget(
    free_tcp_endpoint, start_aggregator, zmq_ctx, monkeypatch, slow_factor
):
    monkeypatch.setattr(aggregator_streams, "IN_STREAM_IDLE", 1.0)
    # the honest upload (24 bytes) streams too, and does not fit beside the abandoned one
    config = StreamConfig(threshold=16, chunk_bytes=64, window_bytes=128, receive_budget=16)
    agg = start_aggregator(free_tcp_endpoint, _counting(1), stream=config)
    props = _props(free_tcp_endpoint, "client1")
    sock, incarnation = _raw_member(zmq_ctx, free_tcp_endpoint, "client1", props.fingerprint)
    from zmqfed.wire import encode_tensors

    def replies(kind: str) -> list[Envelope]:
        got = []
        while sock.poll(int(10_000 * slow_factor)):
            reply = decode(sock.recv_multipart())
            got.append(reply)
            if reply.kind == kind:
                return got
        raise AssertionError(f"no {kind} from the aggregator; got {got}")

    # an announce naming tensors the model does not have: refused before allocation
    unknown = encode_tensors({"nope": {"param": torch.ones(4)}}, streamed=True)
    announce = Envelope(kind="PUSH", sender="client1", seq=2, incarnation=incarnation)
    sock.send_multipart(encode(announce, encoded=unknown, stream=("t" * 8, 64)))
    refused = replies("ERROR")[-1]
    assert refused.seq == 2 and "unknown tensors" in refused.meta["reason"], refused.meta
    # an announced upload whose chunks never come: it takes the whole budget
    encoded = encode_tensors({"w": {"param": torch.ones(4)}}, streamed=True)
    announce = Envelope(kind="PUSH", sender="client1", seq=3, incarnation=incarnation)
    sock.send_multipart(encode(announce, encoded=encoded, stream=("s" * 8, 64)))
    assert replies("CREDIT")[-1].seq == 3  # admitted: the budget is taken
    tic = time.monotonic()
    honest = _upload(
        free_tcp_endpoint, "client0", 1.0, timeout=30 * slow_factor, stream=config
    )  # streamed too: waits for the budget until the abandoned stream expires
    waited = time.monotonic() - tic
    honest.close()
    agg.finish()
    sock.close(linger=0)
    assert agg.senders == [["client0"]]
    assert waited >= 0.5, waited  # IN_STREAM_IDLE is 1 s here: it did wait for the expiry
