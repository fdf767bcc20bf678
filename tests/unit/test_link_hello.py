"""Every HELLO a collaborator says, a probe's too, declares the same subset (in memory)."""

from __future__ import annotations

import zmqfed.topo as topo
from zmqfed.federated.collaborator_link import CollaboratorLink
from zmqfed.federated.memory import MemoryNetwork
from zmqfed.federated.protocol import recv_message
from zmqfed.wire import Kind, Limits, decode


def _hellos(monitor: bool) -> list[dict]:
    net = MemoryNetwork()
    star = topo.star(1, "ipc:///memory/hello")
    router = net.router("ipc:///memory/hello", limits=Limits())
    link = CollaboratorLink(
        topo.analysis(star, "client0")[0],
        network=net,
        limits=Limits(),
        monitor=monitor,
        declared=lambda: ["head.weight", "head.bias"],
    )
    link.port.send(link._hello(link.next_seq()))  # what ensure_welcome says
    link._hello_probe()  # what an unmonitored link says after a silence
    metas = []
    for _ in range(2):
        assert router.wait(1000)
        frames = recv_message(router, lambda frames: False)
        env = decode(frames[1:], limits=Limits())
        assert env.kind == Kind.HELLO
        metas.append(dict(env.meta))
    link.port.close()
    router.close()
    return metas


def test_a_probe_hello_declares_the_subset_like_the_first():
    first, probe = _hellos(monitor=False)
    assert first["tensors"] == probe["tensors"] == ["head.weight", "head.bias"]
    assert first["session"] == probe["session"]
