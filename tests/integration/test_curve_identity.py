"""Behind CURVE a member is its key: one group's table, and nobody else's connection.

* Per-group ZAP tables: two federations in one process, with the same
  aggregator name and one key pair known under different names in each.
  Before, the second group's allow-list replaced the first's (its members
  were refused) and ``User-Id`` names were merged across groups (the key
  named ``client3`` in one group spoke as ``client0`` in the other).
* Handover only for the same key: a member with a valid key connecting
  again and again with another member's routing id. Before, each
  connection took the victim's connection over (ROUTER_HANDOVER) before any
  message was checked; now the victim never notices.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

import zmqfed.topo as topo
from tests.integration._helpers import download_then_upload, node_results
from tests.integration.test_protocol_faults import _star
from tests.integration.test_security import _wait_listening
from zmqfed.core import Maintainer
from zmqfed.errors import RemoteError
from zmqfed.federated import Curve, create_keys
from zmqfed.functional import count_step


class _Aggregator(threading.Thread):
    """An aggregator with CURVE in this process, one step of ``count_step(n)``."""

    def __init__(self, props, keys: Path, n: int, timeout: float) -> None:
        super().__init__(daemon=True)
        self.props, self.keys, self.n, self.timeout = props, keys, n, timeout
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.uploaders: list[str] = []

    def run(self) -> None:
        try:
            m = Maintainer(self.props, {"w": torch.zeros(3)}, curve=Curve(self.keys))
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return
        try:
            with m:
                count_step(self.n)
            m.register_step_hook(
                90, lambda mm, ok: self.uploaders.append(mm.pipe.nick_name), "after_download"
            )
            self.ready.set()
            m.step(timeout=self.timeout)
        except BaseException as exc:
            self.error = exc
        finally:
            m.close()


def _in_thread(fn, *args, **kwargs) -> dict:
    out: dict = {}

    def run() -> None:
        try:
            fn(*args, **kwargs)
            out["ok"] = True
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    out["thread"] = thread
    return out


def test_two_federations_in_one_process_keep_their_own_zap_tables(tmp_path, slow_factor):
    from tests.conftest import free_tcp_port

    a_keys, b_keys, forged = tmp_path / "a", tmp_path / "b", tmp_path / "forged"
    for name in ("agg", "client0", "client3"):
        create_keys(a_keys, name)
    create_keys(b_keys, "agg")
    forged.mkdir()
    # One key pair: client3 in group A, client0 in group B.
    for suffix in (".key", ".key_secret"):
        shutil.copy(a_keys / f"client3{suffix}", b_keys / f"client0{suffix}")
        shutil.copy(a_keys / f"client3{suffix}", forged / f"client0{suffix}")
    shutil.copy(a_keys / "agg.key", forged / "agg.key")  # to reach group A as "client0"

    a_end, b_end = (f"tcp://127.0.0.1:{free_tcp_port()}" for _ in range(2))
    group_a = topo.Topology()
    agg_a = group_a.add_node(topo.Node("agg", a_end))
    for name in ("client0", "client3"):
        group_a.add_edge(topo.Node(name), agg_a)
    group_b = _star(b_end, ("client0",))
    group_b = topo.Topology()
    agg_b = group_b.add_node(topo.Node("agg", b_end))
    group_b.add_edge(topo.Node("client0"), agg_b)

    wait = 60 * slow_factor
    a = _Aggregator(topo.analysis(group_a, "agg")[0], a_keys, 2, wait)
    a.start()
    assert a.ready.wait(wait) and a.error is None, a.error
    b = _Aggregator(topo.analysis(group_b, "agg")[0], b_keys, 1, wait)  # registered after A
    b.start()
    assert b.ready.wait(wait) and b.error is None, b.error

    def member(group, name, keys) -> dict:
        return _in_thread(
            download_then_upload,
            topo.analysis(group, name)[0],
            {"w": torch.ones(3)},
            curve=Curve(keys),
            timeout=wait,
        )

    # The key that is client0 in group B, claiming to be client0 in group A: refused.
    impostor = member(group_a, "client0", forged)
    impostor["thread"].join(wait)
    error = impostor.get("error")
    assert isinstance(error, RemoteError) and error.code == "identity", error
    # Group A's own members, B's table notwithstanding; and B's client0.
    runs = [member(group_a, "client0", a_keys), member(group_a, "client3", a_keys)]
    runs.append(member(group_b, "client0", b_keys))
    for run in runs:
        run["thread"].join(wait)
        assert run.get("ok"), run.get("error")
    for agg in (a, b):
        agg.join(wait)
        assert agg.error is None, agg.error
    assert sorted(a.uploaders) == ["client0", "client3"]
    assert b.uploaders == ["client0"]


# -- handover only for the same key, between real processes --------------------------

AGGREGATOR = """
import json, sys, torch
import zmqfed
from zmqfed.address import Address
from zmqfed.core import Maintainer
from zmqfed.federated import Curve
from zmqfed.props import FederatedProperties
endpoint, keys, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
props = FederatedProperties("aggregator", "aggregator", Address(endpoint), "aggregator",
                            ("alpha", "beta", "mallory"))
m = Maintainer(props, {"w": torch.zeros(3)}, curve=Curve(keys), timeout=120)
uploaders = []
m.register_step_hook(90, lambda mm, ok: uploaders[-1].append(mm.pipe.nick_name), "after_download")
with m:
    zmqfed.functional.count_step(2)
for r in range(rounds):
    uploaders.append([])
    m.step()
    m.clear()
    m.update_version()
m.close(final=True)
print("RESULT " + json.dumps({"uploaders": uploaders, "stats": m.stats["refused"]}), flush=True)
"""

COLLABORATOR = """
import json, logging, sys, time, torch
logging.basicConfig(level=logging.INFO)
from zmqfed.address import Address
from zmqfed.core import Maintainer
from zmqfed.federated import Curve
from zmqfed.props import FederatedProperties
endpoint, keys, name, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
props = FederatedProperties("collaborator", name, Address(endpoint), "aggregator",
                            ("alpha", "beta", "mallory"))
m = Maintainer(props, {"w": torch.ones(3)}, curve=Curve(keys), timeout=120)
uploads = []
for r in range(rounds):
    m.update_version(r)
    m.step(upload=False)
    time.sleep(0.25)  # local training
    m.package()
    m.update_version(r + 1)
    tic = time.perf_counter()
    m.step(download=False)
    uploads.append(time.perf_counter() - tic)
m.close()
print("RESULT " + json.dumps({"uploads": uploads, "resends": m.stats["resends"]}), flush=True)
"""

# A member with a valid key (mallory's) that connects with alpha's routing id over
# and over, says HELLO as alpha, and hangs up half a second later.
IMPOSTOR = """
import json, sys, time, uuid
from pathlib import Path
import zmq, zmq.auth
from zmqfed.wire import PROTOCOL_VERSION, Envelope, decode, encode
endpoint, keys, fingerprint, log, stop = sys.argv[1:6]
keys, log, stop = Path(keys), Path(log), Path(stop)
ctx = zmq.Context()
replies = []
deadline = time.monotonic() + 120
while not stop.exists() and time.monotonic() < deadline:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey = zmq.auth.load_certificate(keys / "aggregator.key")[0]
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(keys / "mallory.key_secret")
    sock.routing_id = b"alpha"
    sock.connect(endpoint)
    meta = {"protocol": PROTOCOL_VERSION, "fingerprint": fingerprint, "session": uuid.uuid4().hex}
    sock.send_multipart(encode(Envelope(kind="HELLO", sender="alpha", seq=1, meta=meta)))
    reply = "none"
    if sock.poll(500):
        env = decode(sock.recv_multipart())
        reply = env.meta.get("code", env.kind)
    replies.append(reply)
    with log.open("a") as f:
        f.write(reply + "\\n")
    sock.close()
    time.sleep(0.1)
ctx.term()
print("RESULT " + json.dumps({"replies": replies}), flush=True)
"""


@pytest.mark.slow
def test_a_member_cannot_take_over_another_members_connection(
    tmp_path, free_tcp_endpoint, run_python, slow_factor
):
    keys = tmp_path / "keys"
    for name in ("aggregator", "alpha", "beta", "mallory"):
        create_keys(keys, name)
    mallory = tmp_path / "mallory"  # what the impostor holds: its own key pair, valid
    mallory.mkdir()
    for name in ("aggregator.key", "mallory.key", "mallory.key_secret"):
        shutil.copy(keys / name, mallory / name)
    rounds = 8
    props = topo.analysis(_star(free_tcp_endpoint, ("alpha", "beta", "mallory")), "aggregator")[0]
    attempts, stop = tmp_path / "attempts.log", tmp_path / "stop"
    agg = run_python(AGGREGATOR, args=[free_tcp_endpoint, str(keys), str(rounds)])
    _wait_listening(free_tcp_endpoint, 60 * slow_factor)
    impostor = run_python(
        IMPOSTOR,
        args=[free_tcp_endpoint, str(mallory), props.fingerprint, str(attempts), str(stop)],
    )
    deadline = time.monotonic() + 60 * slow_factor
    while not (attempts.exists() and attempts.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert attempts.exists(), "the impostor never got an answer"
    procs = {
        name: run_python(COLLABORATOR, args=[free_tcp_endpoint, str(keys), name, str(rounds)])
        for name in ("alpha", "beta")
    }
    results = node_results({"aggregator": agg, **procs}, timeout=180 * slow_factor)
    stop.touch()
    out, err = impostor.communicate(timeout=60 * slow_factor)
    assert impostor.returncode == 0, err
    replies = json.loads(out.split("RESULT ", 1)[1])["replies"]

    # Every round counted alpha and beta; the impostor was never welcomed as alpha
    # (after the aggregator finished, its HELLOs went unanswered: "none").
    uploaders = results["aggregator"]["uploaders"]
    assert len(uploaders) == rounds and all(sorted(u) == ["alpha", "beta"] for u in uploaders)
    assert replies.count("identity") >= 5 and set(replies) <= {"identity", "none"}, replies
    # alpha never lost its connection: no reconnect, nothing sent twice.
    assert results["alpha"]["resends"] == 0
    print(
        f"\nimpostor attempts {len(replies)}; alpha's uploads took "
        f"{max(results['alpha']['uploads']):.3f} s at most, beta's "
        f"{max(results['beta']['uploads']):.3f} s"
    )


def test_the_port_names_every_message_by_its_senders_key(tmp_path, free_tcp_endpoint):
    """The first frame is the sender's name, and the rest of the message arrives whole.

    A collaborator behind CURVE sets a random routing id of its own; libzmq
    4.3.4 (pyzmq 25) gives the routing id frame of such a peer no
    ``User-Id``, so the port reads the name from the next frame.
    """
    import zmq

    from zmqfed.federated.zmq_port import ZmqNetwork
    from zmqfed.wire import Limits

    keys = tmp_path / "keys"
    for name in ("agg", "alpha"):
        create_keys(keys, name)
    curve = Curve(keys)
    network = ZmqNetwork()
    port = network.router(
        free_tcp_endpoint,
        options=None,
        limits=Limits(),
        security=curve.server("agg", "agg", ["alpha"]),
    )
    client = curve.client("alpha", "agg")
    sock = network.ctx.socket(zmq.DEALER)
    try:
        sock.linger = 0
        for option, value in client.socket_options().items():  # as a collaborator's DEALER
            sock.setsockopt(option, value)
        sock.connect(free_tcp_endpoint)
        sock.send_multipart([b"head", b"payload"])
        sock.send_multipart([b"again", b"x" * 10])
        assert port.wait(10_000)
        named = port.recv_frame()
        assert named.bytes == b"alpha" and named.more
        assert port.has_more()
        head = port.recv_frame()
        assert head.bytes == b"head" and port.user_id(head) == "alpha"
        assert port.recv_frame().bytes == b"payload" and not port.has_more()
        # the frame after the name may also be received into a buffer
        assert port.wait(10_000)
        assert port.recv_frame().bytes == b"alpha"
        target = bytearray(8)
        assert port.recv_into(memoryview(target)) == 5 and target[:5] == b"again"
        assert port.has_more()
        assert port.recv_into(memoryview(bytearray(10))) == 10 and not port.has_more()
    finally:
        sock.close()
        port.close()
