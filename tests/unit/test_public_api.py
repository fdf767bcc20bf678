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
            "AdaptiveClipping",
            "AggregationRule",
            "AutoReducer",
            "CKKSKeys",
            "Ciphertext",
            "ClientSampling",
            "CompressionStats",
            "DPMechanism",
            "DPSGD",
            "PrivacyBudgetSpent",
            "RDPAccountant",
            "RunningFedAvg",
            "SecAggAborted",
            "SecAggConfig",
            "PrivateKey",
            "PublicKey",
            "StreamingFedAvg",
            "after_destroy",
            "after_download",
            "after_peer",
            "after_upload",
            "aggregated",
            "at_failed",
            "at_first",
            "at_invalid_state",
            "at_last",
            "at_new_episode",
            "at_zombie",
            "average_aggregation",
            "before_destroy",
            "before_download",
            "before_peer",
            "before_upload",
            "call_rule",
            "central_dp",
            "ckks_aggregation",
            "ckks_key_gen",
            "ckks_package",
            "client_sampling",
            "count_step",
            "deadline_step",
            "device_alignment",
            "dispatch_step",
            "dp_sgd",
            "download_requested",
            "download_served",
            "elastic_aggregation",
            "exchange_answered",
            "exchange_requested",
            "float_to_long",
            "half_precision",
            "install_aggregate",
            "int8_quantization",
            "key_gen",
            "krum_aggregation",
            "krum_select",
            "load_param_states",
            "local_dp",
            "long_to_float",
            "median_aggregation",
            "meta_reduce",
            "naive_aggregation",
            "peer_idle",
            "peer_invalid",
            "peer_leaving",
            "peer_left",
            "paillier_aggregation",
            "paillier_dec",
            "paillier_enc",
            "paillier_package",
            "period_step",
            "request_parked",
            "running_fedavg",
            "secure_aggregation",
            "sign_gradient_clip",
            "step_started",
            "streaming_fedavg",
            "topk_sparsification",
            "trimmed_mean_aggregation",
            "upload_handled",
            "upload_received",
            "version_check",
        ]
    )
    for name in f.__all__:
        assert hasattr(f, name), name


def test_step_point_names_keep_openfeds_as_aliases():
    points = zmqfed.core.step_points
    assert zmqfed.core.steps is points
    for openfed, ours in points.OPENFED_NAMES.items():
        assert getattr(points, openfed) == ours == getattr(zmqfed.functional, openfed)
        assert points.canonical(openfed) == ours
        assert ours in points.STEP_NAMES
    assert points.before_download == points.upload_received
    assert points.before_upload == points.download_requested
    assert points.canonical("nonsense") is None


def test_core_and_federated_all_are_pinned():
    assert sorted(zmqfed.core.__all__) == [
        "DefaultMaintainer",
        "Maintainer",
        "StepContext",
        "StepResult",
        "current_maintainer",
        "fed_context",
        "step_points",
        "steps",
    ]
    assert sorted(zmqfed.federated.__all__) == sorted(
        [
            "AGGREGATOR",
            "COLLABORATOR",
            "ASKING",
            "OFFLINE",
            "PULLING",
            "PUSHING",
            "ZOMBIE",
            "AggregatorPipe",
            "AggregatorTransport",
            "CollaboratorPipe",
            "CollaboratorTransport",
            "Curve",
            "DeviceOffline",
            "DistributedProperties",
            "ErrorCode",
            "FederatedProperties",
            "Kind",
            "MemoryNetwork",
            "Multiplexer",
            "Network",
            "PeerEvent",
            "PeerEventKind",
            "Pipe",
            "PipeChannel",
            "Port",
            "SocketOptions",
            "TransportStats",
            "ZmqNetwork",
            "context",
            "create_keys",
            "default_network",
            "init_federated_group",
            "is_aggregator",
            "is_collaborator",
            "make_dealer",
            "make_router",
            # OpenFed's names (zmqfed.federated.openfed_names)
            "aggregator",
            "aggregator_rank",
            "build_point2point_group",
            "collaborator",
            "collaborator_rank",
            "get_store_value",
            "joint_federated_group",
            "nick_name",
            "offline",
            "pull",
            "push",
            "set_store_value",
            "zmqfed_identity",
            "zmqfed_lock",
            "zmqfed_meta",
            "zmqfed_status",
            "zombie",
        ]
    )
    for module in (zmqfed.core, zmqfed.federated):
        for name in module.__all__:
            assert hasattr(module, name), name


def test_scale_modules_all_are_pinned():
    from zmqfed import fedbuff, loadgen, ray_sim
    from zmqfed.federated import multiplex, sockets
    from zmqfed.functional import sampling

    assert sorted(fedbuff.__all__) == ["FedBuff", "ServerStep", "inverse_sqrt_staleness"]
    assert sorted(loadgen.__all__) == [
        "CROWD_SOCKET_OPTIONS",
        "Crowd",
        "CrowdReport",
        "process_usage",
    ]
    assert sorted(multiplex.__all__) == ["Gate", "Multiplexer", "sleep_cycle"]
    assert sorted(sampling.__all__) == ["ClientSampling", "RoundSample", "client_sampling"]
    assert sorted(ray_sim.__all__) == ["NodeActor", "RaySimulation", "import_ray"]
    assert "raise_fd_limit" in sockets.__all__
    for module in (fedbuff, loadgen, multiplex, ray_sim, sampling, sockets):
        for name in module.__all__:
            assert hasattr(module, name), name


def test_running_mean_keeps_its_earlier_names_as_aliases():
    from zmqfed.functional import aggregate, hooks, running_mean

    f = zmqfed.functional
    assert f.StreamingFedAvg is f.RunningFedAvg is running_mean.RunningFedAvg
    assert aggregate.StreamingFedAvg is aggregate.RunningFedAvg is f.RunningFedAvg
    assert f.streaming_fedavg is f.running_fedavg is hooks.running_fedavg


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


def test_names_all_is_pinned():
    from zmqfed import names

    assert sorted(names.__all__) == [
        "MAX_NAME_BYTES",
        "check_name",
        "name_path",
        "nick_name_problem",
    ]
    assert zmqfed.topo.graph.check_nick_name("a-b.c_1") == "a-b.c_1"


def test_security_and_zap_all_are_pinned():
    from zmqfed.federated import security, zap

    assert sorted(security.__all__) == [
        "ClientSecurity",
        "Curve",
        "ServerSecurity",
        "create_keys",
        "require_curve_for_pickle",
    ]
    assert sorted(zap.__all__) == ["ZAP_ENDPOINT", "ZapHandler", "stop_handlers", "zap_handler"]
    for module in (security, zap):
        for name in module.__all__:
            assert hasattr(module, name), name


def test_partial_all_is_pinned():
    from zmqfed import partial

    assert partial.__all__ == ["trainable_state_dict"]
    assert callable(partial.trainable_state_dict)


def test_error_codes_are_pinned():
    from zmqfed.federated import ErrorCode

    assert sorted(code.value for code in ErrorCode) == sorted(
        [
            "protocol",
            "unknown-peer",
            "identity",
            "fingerprint",
            "hello-first",
            "stale-incarnation",
            "unexpected",
            "bad-upload",
            "already-counted",
            "name-in-use",
            "discarded",
            "stream",
            "stream-aborted",
            "over-capacity",
            "channel",
            "subset",
        ]
    )
