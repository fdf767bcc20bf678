"""OpenFed's public names that zmqfed provides, pinned with their call shapes.

OpenFed programs port by renaming ``openfed`` to ``zmqfed`` (the rename also
turns ``openfed_*`` names into ``zmqfed_*``). Every name of every
``__all__`` of OpenFed is listed here; ``docs/openfed-migration.md`` says
what each one means in zmqfed. The parameter lists are OpenFed's, written out by hand:
zmqfed's signature must start with them (it may add optional parameters
after them), except for the names in ``DIFFERENT_PARAMETERS``.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

COMPLETED: dict[str, list[str]] = {
    "zmqfed": [
        "core", "data", "federated", "functional", "optim", "topo", "API", "Address",
        "default_file_address", "default_tcp_address", "empty_address", "Meta", "tablist",
        "time_string", "seed_everything", "FMT", "__version__",
    ],
    "zmqfed.common": ["Address", "default_file_address", "default_tcp_address", "empty_address", "Meta"],
    "zmqfed.core": ["fed_context", "DefaultMaintainer", "Maintainer"],
    "zmqfed.data": [
        "Partitioner", "PowerLawPartitioner", "DirichletPartitioner", "IIDPartitioner",
        "FederatedDataset", "PartitionerDataset", "samples_distribution",
    ],
    "zmqfed.federated": [
        "aggregator", "collaborator", "is_aggregator", "is_collaborator", "push", "pull",
        "zombie", "offline", "zmqfed_identity", "zmqfed_status", "zmqfed_meta", "zmqfed_lock",
        "nick_name", "aggregator_rank", "collaborator_rank", "DistributedProperties",
        "build_point2point_group", "joint_federated_group", "FederatedProperties",
        "set_store_value", "get_store_value", "Pipe", "init_federated_group", "DeviceOffline",
    ],
    "zmqfed.functional": [
        "after_destroy", "after_download", "after_upload", "at_first", "at_failed",
        "at_invalid_state", "at_last", "at_new_episode", "at_zombie", "before_destroy",
        "before_download", "before_upload", "device_alignment", "sign_gradient_clip",
        "PublicKey", "PrivateKey", "Ciphertext", "key_gen", "paillier_enc", "paillier_dec",
        "float_to_long", "long_to_float", "paillier_package", "count_step", "period_step",
        "dispatch_step", "load_param_states", "average_aggregation", "naive_aggregation",
        "elastic_aggregation", "paillier_aggregation", "meta_reduce",
    ],
    "zmqfed.optim": ["ElasticOptimizer", "FederatedOptimizer", "ProxOptimizer", "ScaffoldOptimizer"],
    "zmqfed.topo": ["Node", "Edge", "FederatedGroup", "Topology", "analysis"],
    "zmqfed.utils": ["tablist", "time_string", "seed_everything", "FMT", "string_trim"],
    # not in an __all__: OpenFed's launcher and topology builder modules
    "zmqfed.tools.simulator": ["build_centralized_topology", "main"],
    "zmqfed.tools.topo_builder": ["TopoBuilder", "main"],
}  # fmt: skip

#: OpenFed's parameters of every completed callable, in order.
PARAMETERS: dict[str, list[str]] = {
    "zmqfed.API": [
        "maintainer", "fed_optim", "rounds", "agg_func", "agg_func_kwargs", "reduce_func",
        "reduce_func_kwargs", "with_test_round",
    ],
    "zmqfed.Address": ["backend", "init_method", "world_size", "rank"],
    "zmqfed.Meta": [],
    "zmqfed.tablist": ["head", "data", "items_per_row", "force_in_one_row"],
    "zmqfed.time_string": [],
    "zmqfed.seed_everything": ["seed"],
    "zmqfed.core.Maintainer": ["fed_props", "state_dict"],
    "zmqfed.core.fed_context": ["func"],
    "zmqfed.core.DefaultMaintainer": [],
    "zmqfed.federated.DistributedProperties": ["lock"],
    "zmqfed.federated.build_point2point_group": ["rank"],
    "zmqfed.federated.joint_federated_group": ["backend", "init_method", "world_size", "rank"],
    "zmqfed.federated.set_store_value": ["store", "key", "value"],
    "zmqfed.federated.get_store_value": ["store", "key"],
    "zmqfed.data.PowerLawPartitioner": ["min_samples", "min_classes", "mean", "sigma"],
    "zmqfed.data.DirichletPartitioner": ["alpha", "min_samples"],
    "zmqfed.data.IIDPartitioner": [],
    "zmqfed.data.PartitionerDataset": ["dataset", "total_parts", "partitioner"],
    "zmqfed.data.samples_distribution": ["federated_dataset", "verbose"],
    "zmqfed.federated.is_aggregator": ["role"],
    "zmqfed.federated.is_collaborator": ["role"],
    "zmqfed.federated.FederatedProperties": ["role", "nick_name", "address"],
    "zmqfed.federated.init_federated_group": ["fed_props"],
    "zmqfed.functional.device_alignment": [],
    "zmqfed.functional.sign_gradient_clip": ["epsilon"],
    "zmqfed.functional.key_gen": [],  # OpenFed's examples call key_gen() only
    "zmqfed.functional.paillier_enc": ["public_key", "m"],
    "zmqfed.functional.paillier_dec": ["private_key", "c"],
    "zmqfed.functional.float_to_long": ["public_key", "tensor"],
    "zmqfed.functional.long_to_float": ["private_key", "tensor", "denominator"],
    "zmqfed.functional.paillier_package": ["public_key"],
    "zmqfed.functional.count_step": ["counts"],
    "zmqfed.functional.period_step": ["period"],
    "zmqfed.functional.dispatch_step": ["counts", "parts_list"],
    "zmqfed.functional.load_param_states": ["optim", "param_states"],
    "zmqfed.functional.average_aggregation": ["data_list", "meta_list", "optim_list"],
    "zmqfed.functional.naive_aggregation": ["data_list", "meta_list", "optim_list"],
    "zmqfed.functional.elastic_aggregation": ["data_list", "meta_list", "quantile", "optim_list"],
    "zmqfed.functional.paillier_aggregation": ["data_list", "private_key", "meta_list", "optim_list"],
    "zmqfed.functional.meta_reduce": ["meta_list"],  # + reduce_keys, by position or keyword
    "zmqfed.optim.ElasticOptimizer": ["optim", "role", "momentum", "max_acg_step"],
    "zmqfed.optim.ProxOptimizer": ["optim", "role", "mu", "max_acg_step"],
    "zmqfed.topo.Node": ["nick_name", "address"],
    "zmqfed.topo.Edge": ["start", "end"],
    "zmqfed.topo.FederatedGroup": ["role", "node"],
    "zmqfed.topo.Topology": ["nodes", "edges"],
    "zmqfed.topo.analysis": ["topo", "node"],
    "zmqfed.utils.string_trim": ["string", "length"],
    "zmqfed.tools.simulator.build_centralized_topology": ["nproc", "tcp"],
}  # fmt: skip

#: Callables whose parameters differ from OpenFed's on purpose (see the migration guide).
DIFFERENT_PARAMETERS = {
    # Paillier keys and ciphertexts, where OpenFed's were LWE matrices
    "zmqfed.functional.PublicKey",
    "zmqfed.functional.PrivateKey",
    "zmqfed.functional.Ciphertext",
    # positional calls as in OpenFed's docs work; the keyword is `optim`, as in the other optimizers
    "zmqfed.optim.FederatedOptimizer",
    # acg_loss_fn is keyword-only in practice: acg_loader and acg_epoch come before it
    "zmqfed.optim.ScaffoldOptimizer",
    # a ZeroMQ pipe, made by the transport, not by users
    "zmqfed.federated.Pipe",
}


#: Required parameters zmqfed adds: both ends check the group's members when they connect,
#: so hand-made props must name them (topo.analysis and props files always do).
REQUIRED_EXTRAS = {"zmqfed.federated.FederatedProperties": ["aggregator_name", "collaborators"]}


def _resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_openfed_name_is_listed() -> None:
    in_all = [
        f"{k}.{name}"
        for k, v in COMPLETED.items()
        if not k.startswith("zmqfed.tools.")
        for name in v
    ]
    assert len(in_all) == len(set(in_all)) == 102


@pytest.mark.parametrize("module", sorted(COMPLETED))
def test_completed_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [name for name in COMPLETED[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lacks {missing}"


@pytest.mark.parametrize("path", sorted(PARAMETERS))
def test_call_shapes_start_with_openfed_parameters(path: str) -> None:
    params = [
        p.name
        for p in inspect.signature(_resolve(path)).parameters.values()  # type: ignore[arg-type]
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    want = PARAMETERS[path]
    assert params[: len(want)] == want, f"{path}{params} should start with {want}"
    extra = inspect.signature(_resolve(path)).parameters  # type: ignore[arg-type]
    required = [n for n in params[len(want) :] if extra[n].default is inspect.Parameter.empty]
    assert required == REQUIRED_EXTRAS.get(path, []), (
        f"{path}: parameters OpenFed did not have must be optional: {required}"
    )


def test_every_completed_callable_is_pinned_or_declared_different() -> None:
    callables = {
        f"{module}.{name}"
        for module, names in COMPLETED.items()
        for name in names
        if inspect.isfunction(_resolve(f"{module}.{name}"))
        or inspect.isclass(_resolve(f"{module}.{name}"))
    }
    steps = {
        p
        for p in callables
        if p.startswith("zmqfed.functional.")
        and p.split(".")[-1].startswith(("at_", "after_", "before_"))
    }
    same_object = {
        p
        for p in callables
        if p.startswith(
            ("zmqfed.common.", "zmqfed.utils.tablist", "zmqfed.utils.seed", "zmqfed.utils.time")
        )
    }
    unpinned = callables - set(PARAMETERS) - DIFFERENT_PARAMETERS - steps - same_object
    unpinned -= {  # abstract bases, command-line entry points, an exception (any arguments)
        "zmqfed.data.Partitioner",
        "zmqfed.federated.DeviceOffline",
        "zmqfed.data.FederatedDataset",
        "zmqfed.tools.simulator.main",
        "zmqfed.tools.topo_builder.main",
        "zmqfed.tools.topo_builder.TopoBuilder",
    }
    assert not unpinned, f"pin these call shapes: {sorted(unpinned)}"


def test_federated_constants_keep_openfeds_meaning() -> None:
    import zmqfed.federated as f
    from zmqfed.errors import ConfigError, PeerOffline

    assert f.is_aggregator(f.aggregator) and f.is_collaborator(f.collaborator)
    assert not f.is_aggregator(f.collaborator)
    # the pipe states are the values Pipe.state takes, with OpenFed's spelling
    assert (f.push, f.pull, f.zombie, f.offline) == ("push", "pull", "zombie", "offline")
    assert (f.push, f.pull, f.zombie, f.offline) == (f.PUSHING, f.PULLING, f.ZOMBIE, f.OFFLINE)
    # OpenFed's store keys after the rename, and the meta key of a node's name
    assert (f.zmqfed_identity, f.zmqfed_status, f.zmqfed_meta, f.nick_name) == (
        "zmqfed_identity",
        "zmqfed_status",
        "zmqfed_meta",
        "nick_name",
    )
    assert (f.aggregator_rank, f.collaborator_rank) == (0, 1)
    assert f.DeviceOffline is PeerOffline
    with f.zmqfed_lock:  # a threading.Lock
        assert not f.zmqfed_lock.acquire(blocking=False)
    assert f.zmqfed_lock.acquire(blocking=False)
    f.zmqfed_lock.release()
    calls = {
        "build_point2point_group": (lambda: f.build_point2point_group(0), "init_federated_group"),
        "joint_federated_group": (
            lambda: f.joint_federated_group("gloo", "tcp://localhost:1994", 2, 0),
            "Maintainer",
        ),
        "set_store_value": (lambda: f.set_store_value(None, "k", 1), "direct_set"),
        "get_store_value": (lambda: f.get_store_value(None, "k"), "direct_get"),
    }
    for name, (call, instead) in calls.items():
        with pytest.raises(ConfigError, match=instead) as info:
            call()
        assert name in str(info.value)
