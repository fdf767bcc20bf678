"""CurveZMQ end to end: who may join a group, and who may speak as whom."""

from __future__ import annotations

import shutil
import socket
import stat
import time

import pytest
import torch

import zmqfed
from tests.integration._helpers import download_then_upload
from zmqfed.address import Address
from zmqfed.core import Maintainer
from zmqfed.errors import ConfigError, PeerTimeout, RemoteError, SecurityError
from zmqfed.federated import Curve, create_keys
from zmqfed.props import FederatedProperties
from zmqfed.wire import Limits

AGGREGATOR = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO)
import zmqfed
from zmqfed.address import Address
from zmqfed.core import Maintainer
from zmqfed.federated import Curve
from zmqfed.props import FederatedProperties
endpoint, keys = sys.argv[1], sys.argv[2]
props = FederatedProperties("aggregator", "aggregator", Address(endpoint), "aggregator",
                            ("alpha", "beta"))
m = Maintainer(props, {"w": torch.zeros(3)}, curve=Curve(keys), timeout=90)
uploaders = []
m.register_step_hook(90, lambda mm, ok: uploaders.append(mm.pipe.nick_name), "after_download")
with m:
    zmqfed.functional.count_step(2)
m.step()
print("UPLOADS", sorted(uploaders), len(m.meta_list), flush=True)
"""


def _upload(name: str, endpoint: str, curve: Curve | None, timeout: float) -> None:
    props = _props(name, endpoint)
    download_then_upload(props, {"w": torch.ones(3)}, curve=curve, timeout=timeout)


def _props(name: str, endpoint: str) -> FederatedProperties:
    return FederatedProperties(
        "collaborator", name, Address(endpoint), "aggregator", ("alpha", "beta")
    )


def _wait_listening(endpoint: str, timeout: float) -> None:
    """Block until the aggregator's port accepts TCP connections."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {endpoint}")


def test_key_files_are_private(tmp_path):
    public, secret = create_keys(tmp_path, "alpha")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    with pytest.raises(SecurityError, match="already exists"):
        create_keys(tmp_path, "alpha")
    secret.chmod(0o644)
    with pytest.raises(SecurityError, match="readable by others"):
        Curve(tmp_path).key_pair("alpha")
    with pytest.raises(SecurityError, match="no public key for node 'zed'"):
        Curve(tmp_path).public_key("zed")


def test_pickle_needs_curve(free_tcp_endpoint):
    props = FederatedProperties(
        "aggregator", "aggregator", Address(free_tcp_endpoint), "aggregator", ("alpha",)
    )
    with pytest.raises(ConfigError, match="only allowed behind CURVE"):
        Maintainer(props, {"w": torch.zeros(1)}, limits=Limits(allow_pickle=True))


def test_only_group_keys_get_in_and_nobody_speaks_for_another(
    tmp_path, free_tcp_endpoint, run_python, slow_factor
):
    keys = tmp_path / "keys"
    for name in ("aggregator", "alpha", "beta"):
        create_keys(keys, name)
    agg = run_python(AGGREGATOR, args=[free_tcp_endpoint, str(keys)])
    _wait_listening(free_tcp_endpoint, 60 * slow_factor)

    # 1. A stranger with its own key pair, claiming to be alpha: ZAP refuses the key.
    stranger = tmp_path / "stranger"
    create_keys(stranger, "alpha")
    shutil.copy(keys / "aggregator.key", stranger / "aggregator.key")
    with pytest.raises(SecurityError, match="refused this node's key"):
        _upload("alpha", free_tcp_endpoint, Curve(stranger), timeout=30 * slow_factor)

    # 2. Plaintext: no CURVE handshake can complete, nothing reaches the aggregator.
    with pytest.raises(PeerTimeout):
        _upload("alpha", free_tcp_endpoint, None, timeout=3)

    # 3. An insider (beta's valid key) using alpha's routing id is told off.
    insider = tmp_path / "insider"
    insider.mkdir()
    shutil.copy(keys / "aggregator.key", insider / "aggregator.key")
    shutil.copy(keys / "beta.key", insider / "alpha.key")
    shutil.copy(keys / "beta.key_secret", insider / "alpha.key_secret")
    with pytest.raises(RemoteError) as info:
        _upload("alpha", free_tcp_endpoint, Curve(insider), timeout=30 * slow_factor)
    assert info.value.code == "identity"

    # 4. The real members complete the round: exactly their two uploads count.
    for name in ("alpha", "beta"):
        _upload(name, free_tcp_endpoint, Curve(keys), timeout=60 * slow_factor)
    out, err = agg.communicate(timeout=60 * slow_factor)
    assert agg.returncode == 0, err
    assert "UPLOADS ['alpha', 'beta'] 2" in out
    assert "refused a CURVE client in group 'aggregator': unknown key" in err
    assert "claiming to be 'alpha' from key of 'beta'" in err


def test_zap_handler_does_not_keep_the_process_alive(run_python, slow_factor):
    """A script that started the ZAP handler and just ends must exit.

    pyzmq < 26 starts the handler thread as a non-daemon; Python joins those
    before running atexit handlers, i.e. before the one that stops the thread.
    """
    proc = run_python(
        "import zmqfed.core\n"  # registers the atexit handler that stops the ZAP thread
        "from zmqfed.federated.sockets import context\n"
        "from zmqfed.federated.zap import zap_handler\n"
        "handler = zap_handler(context())\n"
        "handler.allow('d', 'g', {})\n"
        "assert handler is not None and handler._thread.is_alive()\n"
        "print('started', flush=True)\n"
    )
    out, err = proc.communicate(timeout=30 * slow_factor)
    assert proc.returncode == 0, err
    assert out == "started\n"


def test_default_addresses_are_exported():
    assert zmqfed.default_tcp_address == Address(zmqfed.default_tcp_address.endpoint)
