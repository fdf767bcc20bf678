"""An aggregator says how many peers it can hold; a collaborator beyond that is told, not hung."""

from __future__ import annotations

import contextlib
import re
import threading
import time

import pytest
import torch

import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.errors import ConfigError, PeerTimeout, RemoteError
from zmqfed.federated import SocketOptions


def test_a_collaborator_beyond_capacity_gets_a_clear_error(free_tcp_endpoint, slow_factor, caplog):
    topology = topo.star(3, free_tcp_endpoint)
    agg = Maintainer(
        topo.analysis(topology, "aggregator")[0],
        {"w": torch.zeros(2)},
        socket_options=SocketOptions(max_peers=2),
        timeout=60 * slow_factor,
    )
    assert any("can hold 2 peers" in r.getMessage() for r in caplog.records)
    from zmqfed.functional import count_step

    with agg:
        count_step(2)
    results: dict[str, object] = {}
    release = threading.Event()

    def collaborator(name: str) -> None:
        m = Maintainer(
            topo.analysis(topology, name)[0], {"w": torch.ones(2)}, timeout=60 * slow_factor
        )
        try:
            m.package()
            m.step(download=False)
            results[name] = "counted"
        except BaseException as exc:
            results[name] = exc
        finally:
            release.wait(60 * slow_factor)  # stay online until the third was answered
            m.close()

    first = [threading.Thread(target=collaborator, args=(n,)) for n in ("client0", "client1")]
    for t in first:
        t.start()
    agg.step()
    # both seats are taken (the two stay online): the third is refused at HELLO
    late = threading.Thread(target=collaborator, args=("client2",))
    late.start()
    deadline = 30 * slow_factor
    tic = time.monotonic()
    while "client2" not in results and time.monotonic() - tic < deadline:
        with contextlib.suppress(PeerTimeout):  # the loop runs while the third tries
            agg.step(timeout=0.5)
    release.set()
    for t in [*first, late]:
        t.join(60 * slow_factor)
    agg.close()
    assert results["client0"] == results["client1"] == "counted"
    refused = results["client2"]
    assert isinstance(refused, RemoteError) and refused.code == "over-capacity", refused
    assert "capacity" in refused.reason
    assert agg.stats["refused"].get("over-capacity", 0) >= 1


CAPACITY = """
import logging, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))
logging.basicConfig(level=logging.INFO)
import torch, zmqfed.topo as topo
from zmqfed.core import Maintainer
m = Maintainer(topo.analysis(topo.star(500, sys.argv[1]), "aggregator")[0], {"w": torch.zeros(2)})
m.close()
"""


def test_the_aggregator_says_at_start_how_many_peers_it_can_hold(
    run_python, free_tcp_endpoint, slow_factor
):
    proc = run_python(CAPACITY, args=[free_tcp_endpoint])
    _, err = proc.communicate(timeout=60 * slow_factor)
    assert proc.returncode == 0, err
    found = re.search(r"can hold (\d+) peers .*limit 200\), fewer than the group's 500", err)
    assert found, err
    assert 0 < int(found.group(1)) < 200 - 64


def test_max_peers_is_checked():
    with pytest.raises(ConfigError, match="max_peers"):
        SocketOptions(max_peers=0)
