"""The public names are a contract: changing them must be a conscious decision."""

from __future__ import annotations

import json

import pytest

import zmqfed
from zmqfed import Address, Meta
from zmqfed.errors import ConfigError
from zmqfed.props import FederatedProperties


def test_top_level_all_is_pinned():
    assert sorted(zmqfed.__all__) == sorted(
        [
            "API",
            "FMT",
            "AggregatorRewound",
            "Address",
            "ConfigError",
            "Meta",
            "PeerOffline",
            "PeerTimeout",
            "PipeError",
            "ProtocolError",
            "RemoteError",
            "SecurityError",
            "TopologyError",
            "ZmqfedError",
            "__version__",
            "common",
            "core",
            "data",
            "default_file_address",
            "default_ipc_address",
            "default_tcp_address",
            "empty_address",
            "federated",
            "functional",
            "optim",
            "seed_everything",
            "tablist",
            "time_string",
            "tools",
            "topo",
            "utils",
            "wire",
        ]
    )
    for name in zmqfed.__all__:
        assert hasattr(zmqfed, name), name


def test_seed_names_exist():
    f = zmqfed.functional
    for name in (
        "device_alignment",
        "count_step",
        "period_step",
        "dispatch_step",
        "sign_gradient_clip",
        "at_new_episode",
        "at_first",
        "before_download",
        "after_download",
        "before_upload",
        "after_upload",
        "at_zombie",
        "at_invalid_state",
        "at_failed",
        "before_destroy",
        "after_destroy",
        "at_last",
    ):
        assert hasattr(f, name), name
    assert zmqfed.core.Maintainer.__name__ == "Maintainer"
    assert zmqfed.federated.FederatedProperties is FederatedProperties


def test_functional_all_is_pinned():
    f = zmqfed.functional
    assert sorted(f.__all__) == sorted(
        [
            "AutoReducer",
            "Ciphertext",
            "CompressionStats",
            "PrivateKey",
            "PublicKey",
            "StreamingFedAvg",
            "after_destroy",
            "after_download",
            "after_upload",
            "at_failed",
            "at_first",
            "at_invalid_state",
            "at_last",
            "at_new_episode",
            "at_zombie",
            "average_aggregation",
            "before_destroy",
            "before_download",
            "before_upload",
            "count_step",
            "deadline_step",
            "device_alignment",
            "dispatch_step",
            "elastic_aggregation",
            "float_to_long",
            "half_precision",
            "int8_quantization",
            "key_gen",
            "krum_aggregation",
            "krum_select",
            "load_param_states",
            "long_to_float",
            "median_aggregation",
            "meta_reduce",
            "naive_aggregation",
            "paillier_aggregation",
            "paillier_dec",
            "paillier_enc",
            "paillier_package",
            "period_step",
            "sign_gradient_clip",
            "streaming_fedavg",
            "topk_sparsification",
            "trimmed_mean_aggregation",
            "version_check",
        ]
    )
    for name in f.__all__:
        assert hasattr(f, name), name


def test_addresses():
    assert zmqfed.default_tcp_address.endpoint == "tcp://127.0.0.1:1994"
    assert zmqfed.empty_address.empty
    assert zmqfed.default_ipc_address.scheme == "ipc"
    assert Address.unserialize(Address("tcp://h:1").serialize()) == Address("tcp://h:1")
    for bad in ("udp://x:1", "tcp://nohost", "tcp://h:99999", "tcp://", 5):
        with pytest.raises(ConfigError):
            Address(bad)  # type: ignore[arg-type]


def test_meta_defaults_and_json_safety():
    m = Meta(instances=3)
    assert (m.mode, m.version, m.instances) == ("train", -1, 3)
    m.loss = 0.5
    assert json.loads(json.dumps(m.to_json_dict()))["loss"] == 0.5
    m.bad = object()
    with pytest.raises(ConfigError, match="bad"):
        m.to_json_dict()
    with pytest.raises(ConfigError, match="non-finite"):
        Meta(x=float("nan")).to_json_dict()


def test_props_round_trip_and_fingerprint(tmp_path):
    a = FederatedProperties("aggregator", "agg", Address("tcp://127.0.0.1:5"), "agg", ("b", "a"))
    c = FederatedProperties("collaborator", "a", Address("tcp://127.0.0.1:5"), "agg", ("a", "b"))
    assert a.collaborators == ("a", "b") and a.world_size == 3 and a.address.world_size == 3
    assert a.fingerprint == c.fingerprint
    assert c.peers == ("agg",) and a.peers == ("a", "b")
    other = FederatedProperties("collaborator", "a", Address("tcp://127.0.0.1:5"), "agg", ("a",))
    assert other.fingerprint != c.fingerprint
    FederatedProperties.save([a, c], tmp_path / "p.json")
    assert FederatedProperties.load(tmp_path / "p.json") == [a, c]
    with pytest.raises(ConfigError, match="nick_name"):
        FederatedProperties.unserialize({"role": "aggregator"})
    with pytest.raises(ConfigError, match="not a collaborator"):
        FederatedProperties("collaborator", "z", Address("tcp://h:1"), "agg", ("a",))
