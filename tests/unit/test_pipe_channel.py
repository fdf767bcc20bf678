"""OpenFed's pipe-level API over an in-memory network: the real transports, no sockets.

The aggregator's pipes are used from the test's thread, each collaborator
runs in a thread of its own (a transport belongs to one thread). The same
scripts over real sockets and processes: tests/integration/test_openfed_pipes.py;
hostile channel messages: tests/integration/test_pipe_channel_sockets.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import zmqfed.topo as topo
from zmqfed.core import DefaultMaintainer, Maintainer, current_maintainer, fed_context
from zmqfed.errors import ConfigError, PeerOffline, PeerTimeout, ProtocolError
from zmqfed.federated import (
    AggregatorTransport,
    CollaboratorTransport,
    DistributedProperties,
    MemoryNetwork,
    Pipe,
    init_federated_group,
    zmqfed_lock,
)
from zmqfed.federated.pipe_channel import MAX_INBOX, MAX_PATH, parse_set, unpack
from zmqfed.functional import count_step
from zmqfed.meta import Meta
from zmqfed.wire import DEFAULT_LIMITS, Envelope, Limits

TIMEOUT = 20.0
NAMES = ("alpha", "beta")


class Group:
    """An aggregator's transport and one transport per collaborator, on one MemoryNetwork."""

    def __init__(self) -> None:
        self.network = MemoryNetwork()
        topology = topo.Topology()
        agg = topology.add_node(topo.Node("aggregator", "ipc:///memory/pipes"))
        for name in NAMES:
            topology.add_edge(topo.Node(name), agg)
        self.topology = topology
        self.agg = AggregatorTransport(
            topo.analysis(topology, "aggregator")[0],
            network=self.network,
            served=dict,
            limits=DEFAULT_LIMITS,
        )
        self.cols = {
            name: CollaboratorTransport(
                topo.analysis(topology, name)[0], network=self.network, limits=DEFAULT_LIMITS
            )
            for name in NAMES
        }
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def pipe(self, name: str) -> Pipe:
        """The aggregator's pipe to ``name``."""
        return self.agg.roster[name]

    def run(self, name: str, work: Callable[[Pipe], None]) -> None:
        """Run ``work(collaborator's pipe)`` in a thread; its exception fails :meth:`join`."""

        def target() -> None:
            try:
                work(self.cols[name].pipe)
            except BaseException as exc:
                self.errors.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "a collaborator thread hangs"
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        for col in self.cols.values():
            col.close()
        self.agg.close()


@pytest.fixture
def group() -> Iterator[Group]:
    g = Group()
    yield g
    g.close()


def test_values_and_uploads_travel_both_ways(group: Group) -> None:
    got: dict[str, Any] = {}

    def collaborator(pipe: Pipe) -> None:
        got["m0"] = pipe.direct_get("m0", timeout=TIMEOUT)
        pipe.direct_set("m1", {"from": pipe.fed_props.nick_name, "list": [1, 2.5, None, True]})
        pipe.set_meta({"instances": 3})
        pipe.upload(
            {
                "w": torch.arange(6.0).reshape(2, 3),
                "nested": [torch.tensor(7), {"k": torch.ones(2, dtype=torch.int8)}],
                "pair": (1, "two"),
            },
            timeout=TIMEOUT,
        )
        got["down"] = pipe.download(timeout=TIMEOUT)
        got["meta"] = dict(pipe.meta)
        got["roles"] = (pipe.role, pipe.anti_role, pipe.collaborator, pipe.aggregator)

    group.run("alpha", collaborator)
    alpha = group.pipe("alpha")
    alpha.direct_set("m0", "hello alpha", timeout=TIMEOUT)
    assert alpha.direct_get("m1", timeout=TIMEOUT) == {
        "from": "alpha",
        "list": [1, 2.5, None, True],
    }
    item = alpha.download(timeout=TIMEOUT)
    assert alpha.meta["instances"] == 3  # the meta set with set_meta came with the upload
    torch.testing.assert_close(item["w"], torch.arange(6.0).reshape(2, 3))
    assert item["nested"][0].item() == 7 and item["nested"][0].dtype == torch.int64
    assert item["nested"][1]["k"].dtype == torch.int8 and item["nested"][1]["k"].tolist() == [1, 1]
    assert item["pair"] == [1, "two"]  # JSON has no tuples
    alpha.set_meta({"round": 9})
    alpha.upload(torch.tensor(-1), timeout=TIMEOUT)
    group.join()
    assert got["m0"] == "hello alpha"
    assert got["down"].item() == -1 and got["meta"]["round"] == 9
    assert got["roles"] == ("collaborator", "aggregator", True, False)
    assert (alpha.role, alpha.anti_role, alpha.aggregator) == ("aggregator", "collaborator", True)
    assert alpha.bytes_in > 0 and group.cols["alpha"].pipe.bytes_in > 0


def test_uploads_arrive_in_order_and_a_full_inbox_makes_the_sender_wait(group: Group) -> None:
    room = threading.Event()
    returned_after_room: list[bool] = []

    def collaborator(pipe: Pipe) -> None:
        for i in range(MAX_INBOX + 1):
            pipe.upload({"i": i, "t": torch.full((3,), float(i))}, timeout=TIMEOUT)
        returned_after_room.append(room.is_set())

    group.run("beta", collaborator)
    beta = group.pipe("beta")
    deadline = time.monotonic() + TIMEOUT
    while len(beta.channel.inbox) < MAX_INBOX and time.monotonic() < deadline:
        for _ in group.agg.events(50):
            pass
    assert len(beta.channel.inbox) == MAX_INBOX
    settle = time.monotonic() + 0.5
    while time.monotonic() < settle:  # the last upload is sent, but not kept
        for _ in group.agg.events(50):
            pass
    assert len(beta.channel.inbox) == MAX_INBOX
    room.set()
    items = [beta.download(timeout=TIMEOUT) for _ in range(MAX_INBOX + 1)]
    group.join()
    assert [item["i"] for item in items] == list(range(MAX_INBOX + 1))
    assert all(item["t"].tolist() == [float(item["i"])] * 3 for item in items)
    assert returned_after_room == [True]  # the last upload waited for room
    assert not beta.channel.inbox and beta.channel.inbox_bytes == 0


def test_a_full_collaborator_inbox_makes_the_aggregator_resend(group: Group) -> None:
    got: dict[str, Any] = {}

    def collaborator(pipe: Pipe) -> None:
        def pump(seconds: float) -> None:  # read and keep what comes, download nothing
            with pytest.raises(PeerTimeout):
                pipe.direct_get("never", timeout=seconds)

        deadline = time.monotonic() + TIMEOUT
        while len(pipe.channel.inbox) < MAX_INBOX and time.monotonic() < deadline:
            pump(0.1)
        pump(0.5)
        got["held"] = len(pipe.channel.inbox)
        got["items"] = [pipe.download(timeout=TIMEOUT) for _ in range(MAX_INBOX + 1)]

    group.run("alpha", collaborator)
    alpha = group.pipe("alpha")
    for i in range(MAX_INBOX + 1):
        alpha.upload(i, timeout=TIMEOUT)
    group.join()
    assert got["held"] == MAX_INBOX  # the last one was not kept until there was room
    assert got["items"] == list(range(MAX_INBOX + 1))


def test_waits_end_with_peer_timeout(group: Group) -> None:
    alpha = group.pipe("alpha")
    started = time.monotonic()
    with pytest.raises(PeerTimeout, match="'alpha' did not come online to take the value"):
        alpha.direct_set("k", 1, timeout=0.3)
    with pytest.raises(PeerTimeout, match="'alpha' did not set 'k'"):
        alpha.direct_get("k", timeout=0.3)
    with pytest.raises(PeerTimeout, match="'alpha' did not upload"):
        alpha.download(timeout=0.3)
    assert time.monotonic() - started < 5.0

    def collaborator(pipe: Pipe) -> None:
        pipe.direct_set("ready", True, timeout=TIMEOUT)
        with pytest.raises(PeerTimeout, match="'aggregator' did not set 'never'"):
            pipe.direct_get("never", timeout=0.5)

    group.run("alpha", collaborator)
    assert alpha.direct_get("ready", timeout=TIMEOUT) is True
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # keep answering while alpha waits in vain
        for _ in group.agg.events(50):
            pass
    group.join()


def test_closed_pipes_raise_device_offline(group: Group) -> None:
    col = group.cols["alpha"]
    col.close()
    with pytest.raises(PeerOffline, match="closed"):
        col.pipe.direct_get("k", timeout=1.0)
    group.agg.close()
    with pytest.raises(PeerOffline, match="closed"):
        group.pipe("beta").download(timeout=1.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: p.direct_set("", 1), "a key must be a str of 1-256"),
        (lambda p: p.direct_set("k" * 257, 1), "a key must be a str of 1-256"),
        (lambda p: p.direct_set("k", {"a": object()}), r"value\['a'\] has a object value"),
        (lambda p: p.direct_set("k", float("nan")), "non-finite"),
        (lambda p: p.upload({1: torch.ones(1)}), "key 1 is not a str"),
        (lambda p: p.upload({"x": [object()]}), r"upload data\['x'\]\[0\] has a object"),
        (lambda p: p.upload(_nested(MAX_PATH + 1)), "nested deeper than 32"),
    ],
)
def test_bad_values_are_named_before_anything_is_sent(
    group: Group, call: Callable[[Pipe], None], match: str
) -> None:
    pipe = group.pipe("alpha")
    with pytest.raises(ConfigError, match=match):
        call(pipe)
    assert pipe.channel.next_seq() == 1  # nothing was numbered, so nothing was sent


def _nested(depth: int) -> Any:
    value: Any = torch.zeros(1)
    for _ in range(depth):
        value = [value]
    return value


def test_pickle_needs_curve_and_pipes_need_a_transport() -> None:
    star = topo.star(1, "ipc:///memory/pickle")
    with pytest.raises(ConfigError, match="only allowed behind CURVE"):
        init_federated_group(
            topo.analysis(star, "aggregator")[0],
            limits=Limits(allow_pickle=True),
            network=MemoryNetwork(),
        )
    with pytest.raises(ConfigError, match="not connected to a transport"):
        Pipe("nobody").direct_get("k")


def _transfer(meta: dict[str, Any], tensors: dict[str, Any] | None = None, obj: Any = None):
    return Envelope(kind="TRANSFER", sender="alpha", meta=meta, tensors=tensors or {}, obj=obj)


def _frames(n: int) -> dict[str, dict[str, torch.Tensor]]:
    return {str(i): {"tensor": torch.zeros(1)} for i in range(n)}


@pytest.mark.parametrize(
    ("env", "match"),
    [
        (_transfer({"value": None}), "fields value, paths and meta"),
        (_transfer({"value": None, "paths": [], "extra": 1}), "fields value, paths and meta"),
        (_transfer({"value": None, "paths": {}}), "paths must be a list"),
        (_transfer({"value": None, "paths": []}, _frames(1)), "needs the tensor frames 0..-1"),
        (_transfer({"value": None, "paths": [[]]}), "needs the tensor frames 0..0"),
        (
            _transfer({"value": None, "paths": [[]]}, {"0": {"param": torch.zeros(1)}}),
            "of field 'tensor'",
        ),
        (_transfer({"value": 3, "paths": [[]]}, _frames(1)), "names the value, which is not"),
        (_transfer({"value": {"a": 1}, "paths": [["a"]]}, _frames(1)), "slot that is not empty"),
        (
            _transfer({"value": {"a": None}, "paths": [["b"]]}, _frames(1)),
            "leads nowhere at step 0",
        ),
        (_transfer({"value": [None], "paths": [[1]]}, _frames(1)), "leads nowhere at step 0"),
        (_transfer({"value": [None], "paths": [[True]]}, _frames(1)), "leads nowhere at step 0"),
        (_transfer({"value": [None], "paths": [["0"]]}, _frames(1)), "leads nowhere at step 0"),
        (
            _transfer({"value": {"a": None}, "paths": [["a"], ["a"]]}, _frames(2)),
            "path 1 names a slot that is not empty",
        ),
        (_transfer({"value": None, "paths": ["a"]}, _frames(1)), "path 0 must be a list"),
        (
            _transfer({"value": None, "paths": [[0] * (MAX_PATH + 1)]}, _frames(1)),
            "at most 32 steps",
        ),
        (_transfer({"value": None, "paths": [], "meta": 5}), "TRANSFER meta must be an object"),
        (_transfer({"value": 1, "paths": []}, obj=["x"]), "with an object carries nothing else"),
    ],
)
def test_received_transfers_are_checked(env: Envelope, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        unpack(env)


def test_received_sets_are_checked() -> None:
    assert parse_set({"key": "k", "value": [1]}) == ("k", [1])
    for meta, match in [
        ({"key": "k"}, "fields key and value"),
        ({"key": "k", "value": 1, "x": 2}, "fields key and value"),
        ({"key": 5, "value": 1}, "a key must be a str"),
        ({"key": "", "value": 1}, "a key must be a str"),
    ]:
        with pytest.raises(ProtocolError, match=match):
            parse_set(meta)


def test_a_set_sent_while_a_collaborator_waits_for_data_is_kept() -> None:
    """Channel messages do not disturb a Maintainer's round, on either end."""
    network = MemoryNetwork()
    star = topo.star(1, "ipc:///memory/round")
    kw: dict[str, Any] = {"network": network, "timeout": TIMEOUT}
    agg = Maintainer(topo.analysis(star, "aggregator")[0], {"w": torch.zeros(3)}, **kw)
    col = Maintainer(topo.analysis(star, "client0")[0], {"w": torch.ones(3)}, **kw)
    got: dict[str, Any] = {}
    errors: list[BaseException] = []

    def collaborator() -> None:
        try:
            col.step(upload=False)  # its PULL waits: the aggregator is not stepping yet
            got["during"] = col.pipe.direct_get("hello", timeout=0.1)  # kept meanwhile
            got["data"] = col.data["w"]["param"].tolist()
            col.package()
            col.pipe.direct_set("bye", "after the download", timeout=TIMEOUT)
            col.step(download=False)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=collaborator, daemon=True)
    try:
        with agg:
            count_step(1)
        thread.start()
        # Sent while the collaborator waits for DATA: its PULL stays pending here.
        aggregator_pipe = agg._side.pipes()[0]  # the roster: agg.pipes fills during a step
        aggregator_pipe.direct_set("hello", "during the round", timeout=TIMEOUT)
        assert aggregator_pipe.is_pulling  # the request the channel's wait saw is still there
        result = agg.step()
        thread.join(TIMEOUT)
        assert not thread.is_alive() and not errors, errors
        assert (result.uploads, result.downloads) == (1, 1)
        assert got == {"during": "during the round", "data": [0.0, 0.0, 0.0]}
        assert aggregator_pipe.direct_get("bye", timeout=0.1) == "after the download"
        assert len(agg.data_list) == 1
    finally:
        col.close()
        agg.close()


def test_fed_context_turns_a_peer_gone_into_false(group: Group) -> None:
    class Worker:
        def __init__(self, pipe: Pipe) -> None:
            self.pipe = pipe

        @fed_context
        def fetch(self) -> Any:
            assert self.pipe.dist_props.lock.locked()  # inside the pipe's context
            return self.pipe.direct_get("x", timeout=0.2)

        @fed_context
        def gone(self) -> Any:
            raise PeerOffline("left")

        @fed_context
        def broken(self) -> Any:
            raise ValueError("not about the peer")

    worker = Worker(group.pipe("alpha"))
    with pytest.warns(RuntimeWarning, match="Worker.fetch failed: peer 'alpha' did not set 'x'"):
        assert worker.fetch() is False
    with pytest.warns(RuntimeWarning, match="Worker.gone failed: left"):
        assert worker.gone() is False
    with pytest.raises(ValueError, match="not about the peer"):
        worker.broken()
    with worker.pipe.dist_props, pytest.warns(RuntimeWarning):  # held already: not taken again
        assert worker.gone() is False
    assert not zmqfed_lock.locked()


def test_dist_props_holds_its_lock() -> None:
    own = DistributedProperties()
    with own as entered:
        assert entered is own and own.lock.locked() and "held" in repr(own)
    assert not own.lock.locked() and "free" in repr(own)
    assert Pipe("x").dist_props.lock is zmqfed_lock


def test_default_maintainer_is_the_innermost_with_block() -> None:
    network = MemoryNetwork()
    star = topo.star(1, "ipc:///memory/default")
    outer = Maintainer(topo.analysis(star, "aggregator")[0], {"w": torch.zeros(1)}, network=network)
    inner = Maintainer(topo.analysis(star, "client0")[0], {"w": torch.zeros(1)}, network=network)
    try:
        assert DefaultMaintainer._default_maintainer is None
        with outer:
            assert DefaultMaintainer._default_maintainer is outer
            with inner:
                assert DefaultMaintainer._default_maintainer is inner is current_maintainer()
            assert DefaultMaintainer._default_maintainer is outer
        assert DefaultMaintainer._default_maintainer is None
        with pytest.raises(ConfigError, match="enter that block"):
            DefaultMaintainer._default_maintainer = outer
    finally:
        inner.close()
        outer.close()


def test_meta_of_a_download_replaces_the_pipe_meta_only_when_sent(group: Group) -> None:
    def collaborator(pipe: Pipe) -> None:
        pipe.set_meta(Meta(step=1))
        pipe.upload("first", timeout=TIMEOUT)
        pipe.upload("second", timeout=TIMEOUT)  # no meta set: none sent

    group.run("alpha", collaborator)
    alpha = group.pipe("alpha")
    assert alpha.download(timeout=TIMEOUT) == "first" and alpha.meta["step"] == 1
    assert alpha.download(timeout=TIMEOUT) == "second" and alpha.meta["step"] == 1
    group.join()
