"""``RaySimulation``: a simulation's nodes as Ray actors, on a local or an existing Ray cluster.

``zmqfed-sim --ray [ADDRESS]`` runs each node of the topology (what
``zmqfed-node run`` runs: :class:`~zmqfed.node.NodeRunner`) inside a Ray
actor, so a simulation that outgrows one machine spreads over a cluster.
Ray only places the processes: the nodes still talk over zmqfed's own
sockets.  Without an address a Ray cluster local to this machine is started
on the loopback interface and stopped at the end; with one (``auto``,
``ray://HOST:PORT`` or ``HOST:PORT``) the actors go to that cluster.

Aggregators are placed first; for a generated star the aggregator's
endpoint is a free port on the host Ray put it on, so collaborators on other
hosts can reach it.  Every node's log lines go to ``LOGDIR/NAME.log`` on
the host that ran it (the driver's ``LOGDIR`` on a local cluster).

Needs the optional extra ``zmqfed[ray]``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zmqfed.errors import ConfigError
from zmqfed.sim import NodeFailed
from zmqfed.topo import Topology, star

__all__ = ["NodeActor", "RaySimulation", "import_ray"]

log = logging.getLogger(__name__)


def import_ray() -> Any:
    """``ray``, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "--ray needs Ray: pip install 'zmqfed[ray]' (or pip install ray)"
        ) from exc
    return ray


class NodeActor:
    """One node of a simulation, inside a Ray actor (``ray.remote(NodeActor)``)."""

    def __init__(self, name: str, logdir: str, log_level: str = "INFO") -> None:
        self.name = name
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.logdir / f"{name}.log")
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
        )
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(log_level.upper())

    def host(self) -> str:
        """The IP address of the host this actor runs on (as Ray knows it)."""
        import ray

        # the address the node was started with (loopback for a local cluster),
        # not the one the OS would route to
        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == node_id:
                return str(node["NodeManagerAddress"])
        return str(ray.util.get_node_ip_address())

    def free_endpoint(self) -> str:
        """``tcp://HOST:PORT`` with a port free on this actor's host."""
        host = self.host()
        with socket.socket() as probe:
            probe.bind((host, 0))
            return f"tcp://{host}:{probe.getsockname()[1]}"

    def run(
        self,
        topology: dict[str, Any],
        app: str,
        rounds: int | None,
        options: dict[str, str],
        cwd: str,
    ) -> dict[str, Any]:
        """Run the node to its end; returns its round and last record (raises on failure)."""
        if cwd not in sys.path:
            sys.path.insert(0, cwd)  # the app module, as zmqfed-sim's children import it
        from zmqfed.app import load_factory
        from zmqfed.node import NodeRunner

        runner = NodeRunner(
            Topology.unserialize(topology),
            self.name,
            load_factory(app),
            state_dir=self.logdir,
            rounds=rounds,
            options=options,
            progress=False,
        )
        runner.run()
        return {
            "node": self.name,
            "round": runner.round,
            "last_record": runner.records[-1] if runner.records else None,
        }


class RaySimulation:
    """Run every node of ``topology`` as a Ray actor and wait for all of them.

    Parameters
    ----------
    topology:
        The federation; ``None`` with ``star``: a star of that many
        collaborators whose endpoint is chosen on the aggregator's host.
    app:
        ``MODULE:FACTORY``, importable on every host (from the working
        directory on a local cluster).
    logdir:
        Per-node logs, checkpoints and status files.
    address:
        A Ray cluster to join; ``None`` starts one on this machine's loopback.
    cpus_per_node:
        Ray CPUs each node's actor reserves (fractions allowed).
    """

    def __init__(
        self,
        topology: Topology | None,
        app: str,
        logdir: str | os.PathLike[str],
        *,
        star_size: int | None = None,
        address: str | None = None,
        rounds: int | None = None,
        options: Sequence[str] = (),
        log_level: str = "INFO",
        cpus_per_node: float = 0.25,
    ) -> None:
        if (topology is None) == (star_size is None):
            raise ConfigError("RaySimulation needs a topology or star_size, not both")
        self.topology = topology
        self.star_size = star_size
        self.app = app
        self.logdir = Path(logdir).resolve()
        self.address = address
        self.rounds = rounds
        self.options = dict(_pair(o) for o in options)
        self.log_level = log_level
        self.cpus_per_node = cpus_per_node
        self._started_ray = False
        self.results: dict[str, dict[str, Any]] = {}

    def _init(self, ray: Any) -> None:
        if ray.is_initialized():
            return
        cwd = os.getcwd()
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [cwd, os.environ.get("PYTHONPATH")]))}
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
        if self.address is None:
            # Ray's agents are Python processes that take tens of seconds to
            # start on a busy machine; the raylet gives up on them after 30 s.
            os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
            ray.init(
                include_dashboard=False,
                runtime_env={"env_vars": env},
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
            self._started_ray = True
        else:
            ray.init(
                address=self.address, runtime_env={"env_vars": env}, logging_level=logging.WARNING
            )

    def run(self, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """Place and run every node; returns each node's result. Raises ``NodeFailed``."""
        if self.address is None:
            # A cluster of this one machine: Ray then keeps every address on
            # the loopback (read when ray is imported) instead of the host's.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray = import_ray()
        self._init(ray)
        try:
            return self._run(ray, timeout)
        finally:
            if self._started_ray:
                ray.shutdown()

    def _run(self, ray: Any, timeout: float | None) -> dict[str, dict[str, Any]]:
        actor_cls = ray.remote(num_cpus=self.cpus_per_node)(NodeActor)
        logdir = str(self.logdir)
        actors: dict[str, Any] = {}
        topology = self.topology
        if topology is None:
            assert self.star_size is not None
            hub = actor_cls.remote("aggregator", logdir, self.log_level)
            actors["aggregator"] = hub
            endpoint = ray.get(hub.free_endpoint.remote())
            topology = star(self.star_size, endpoint)
        topology.validate(acyclic=True)
        self.topology = topology
        self.logdir.mkdir(parents=True, exist_ok=True)
        topology.save(self.logdir / "topology.json")
        data = topology.serialize()
        aggregators = {n.nick_name for n in topology.aggregators}
        order = sorted(
            (n.nick_name for n in topology.nodes), key=lambda n: (n not in aggregators, n)
        )
        refs = {}
        for name in order:
            if name not in actors:
                actors[name] = actor_cls.remote(name, logdir, self.log_level)
            refs[name] = actors[name].run.remote(
                data, self.app, self.rounds, self.options, os.getcwd()
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = dict(refs)
        try:
            while pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = ray.wait(list(pending.values()), num_returns=1, timeout=left)
                if not done:
                    raise ConfigError(
                        f"simulation did not finish within {timeout:.0f} s (logs in {logdir})"
                    )
                name = next(n for n, r in pending.items() if r == done[0])
                del pending[name]
                try:
                    self.results[name] = ray.get(done[0])
                except Exception as exc:  # the actor's error, wrapped by Ray
                    raise NodeFailed(
                        name, 1, _tail(self.logdir / f"{name}.log") or repr(exc)
                    ) from exc
        finally:
            for actor in actors.values():
                ray.kill(actor)
        return self.results


def _pair(option: str) -> tuple[str, str]:
    key, sep, value = option.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set needs KEY=VALUE, got {option!r}")
    return key.strip(), value


def _tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])
