"""``NodeOps``: what a :class:`~zmqfed.node.NodeRunner` shows its operators.

It owns the node's :class:`~zmqfed.ops.telemetry.Telemetry`, the status file
and its heartbeat thread, and the HTTP servers of ``--metrics`` and
``--dashboard``.  The runner calls it from its loop thread at the moments
that matter (a round done, a state change); on an aggregator it also hooks
``step_started`` and ``after_peer`` so a running step publishes its progress
at most once a second (a clock read per hook call otherwise).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zmqfed.meta import Meta
from zmqfed.ops.server import OpsServer, parse_listen
from zmqfed.ops.status import StatusFile
from zmqfed.ops.telemetry import Snapshot, Telemetry

if TYPE_CHECKING:
    from zmqfed.core import Maintainer
    from zmqfed.node import NodeRunner
    from zmqfed.topo import Topology

__all__ = ["NodeOps", "OpsOptions"]

log = logging.getLogger(__name__)

#: Runs after every other hook of a point (the verdicts are in).
HOOK_NICE = 1000


@dataclass(frozen=True)
class OpsOptions:
    """What ``zmqfed-node run`` was asked to show.

    Attributes
    ----------
    metrics, dashboard:
        ``ADDR:PORT`` to serve ``/metrics`` or the dashboard on (None: off;
        the same address serves both).
    metrics_peers:
        Per-peer series for at most this many peers per group (0: none).
    heartbeat:
        Seconds between rewrites of the status file.
    """

    metrics: str | None = None
    dashboard: str | None = None
    metrics_peers: int = 0
    heartbeat: float = 5.0


class NodeOps:
    """Telemetry, status file, heartbeat and HTTP servers of one node."""

    def __init__(self, runner: NodeRunner, topology: Topology, options: OpsOptions) -> None:
        from zmqfed.errors import ConfigError

        if options.heartbeat <= 0:
            raise ConfigError(f"--heartbeat must be positive seconds, got {options.heartbeat!r}")
        if options.metrics_peers < 0:
            raise ConfigError(f"--metrics-peers must be >= 0, got {options.metrics_peers!r}")
        self.runner = runner
        self.topology = topology
        self.options = options
        self.listen: dict[str, tuple[str, int]] = {}
        if options.metrics is not None:
            self.listen["metrics"] = parse_listen(options.metrics, "--metrics")
        if options.dashboard is not None:
            self.listen["dashboard"] = parse_listen(options.dashboard, "--dashboard")
        roles = [
            r for r in ("aggregator", "collaborator") if any(getattr(p, r) for p in runner.props)
        ]
        self.telemetry = Telemetry(
            runner.name,
            roles,
            runner.rounds,
            heartbeat_interval=options.heartbeat,
            top_peers=options.metrics_peers,
        )
        self.status_file = (
            None
            if runner.state_dir is None
            else StatusFile(runner.state_dir / f"{runner.name}.status.json")
        )
        self.servers: list[OpsServer] = []
        self.state = "starting"
        self.failure: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """Someone may look: a status file or a server."""
        return self.status_file is not None or bool(self.listen)

    # -- life ---------------------------------------------------------------------
    def start(self) -> None:
        """Listen, start the heartbeat, and keep the process's warnings for the dashboard."""
        if self.listen:
            self._serve()
        logging.getLogger().addHandler(self.telemetry.errors)
        if self.status_file is not None:
            self._heartbeat = threading.Thread(
                target=self._beat, daemon=True, name="zmqfed-heartbeat"
            )
            self._heartbeat.start()

    def _serve(self) -> None:
        from zmqfed.ops.metrics import MetricsExporter
        from zmqfed.topo import to_svg

        exporter = MetricsExporter(self.telemetry) if "metrics" in self.listen else None
        svg = to_svg(self.topology, title=f"topology seen from {self.runner.name}")
        wanted: dict[tuple[str, int], set[str]] = {}
        for name, address in self.listen.items():
            wanted.setdefault(address, set()).add(name)
        for (host, port), what in wanted.items():
            server = OpsServer(
                self.telemetry,
                host,
                port,
                metrics=exporter if "metrics" in what else None,
                dashboard="dashboard" in what,
                topology_svg=svg,
            ).start()
            self.servers.append(server)
            for name in sorted(what):
                url = server.url + ("/metrics" if name == "metrics" else "/")
                self.telemetry.endpoints[name] = url
                log.info("%s: %s at %s", self.runner.name, name, url)

    def stop(self) -> None:
        """Stop the heartbeat and the servers (the final status is written by the runner)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5.0)
            self._heartbeat = None
        for server in self.servers:
            server.close()
        self.servers.clear()
        logging.getLogger().removeHandler(self.telemetry.errors)

    def _beat(self) -> None:
        while not self._stop.wait(self.options.heartbeat):
            snap = self.telemetry.latest
            try:
                assert self.status_file is not None
                self.status_file.write(snap.status, snap.seq)
            except OSError as exc:
                log.warning("%s: cannot write the status file: %s", self.runner.name, exc)

    # -- what the runner reports (loop thread) ------------------------------------------
    def publish(self, state: str | None = None, *, write: bool = True) -> Snapshot:
        """Publish the node's state now (and write the status file, if any)."""
        if state is not None:
            self.state = state
        runner = self.runner
        groups = [(m, self._quorum(m)) for m in runner.maintainers]
        snap = self.telemetry.publish(
            state=self.state, round=runner.round, groups=groups, failure=self.failure
        )
        if write and self.status_file is not None:
            self.status_file.write(snap.status, snap.seq)
        return snap

    def _quorum(self, m: Maintainer) -> int:
        if not m.aggregator:
            return 1
        min_clients = self.runner.app.min_clients
        n = len(m.fed_props.collaborators)
        return n if min_clients is None or self.runner.app.round_timeout is None else min_clients

    def round_done(self, record: Mapping[str, Any]) -> None:
        """A round completed: count it, chart it, publish."""
        self.telemetry.record(record)
        self.telemetry.phase = "between rounds"
        self.publish()

    def restore(self, records: list[dict[str, Any]]) -> None:
        """Rounds done before a restart (from the checkpoint), for the charts."""
        self.telemetry.restore(records)

    def watch(self, m: Maintainer) -> None:
        """Publish an aggregator's progress while its steps run."""
        if m.aggregator and self.active:
            self.telemetry.watch(m, self._step_publish, nice=HOOK_NICE)

    def _step_publish(self) -> None:
        self.telemetry.phase = "collecting uploads"
        self.publish(write=False)

    def timed_train(
        self, m: Maintainer, train: Callable[[Meta], Mapping[str, Any]]
    ) -> Callable[[Meta], Mapping[str, Any]]:
        """``train`` recording each local round (duration, traffic, metrics) for the charts."""
        traffic = [0, 0]

        def timed(meta: Meta) -> Mapping[str, Any]:
            self.telemetry.phase = "training"
            self.publish(write=False)
            tic = time.perf_counter()
            metrics = train(meta)
            stats = m.stats
            record = {
                "round": int(meta.get("round", self.runner.round) or 0),
                "mode": str(meta.get("mode", "train")),
                "version": m.version,
                "participants": 1,
                "bytes_in": stats["bytes_in"] - traffic[0],
                "bytes_out": stats["bytes_out"] - traffic[1],
                "seconds": time.perf_counter() - tic,
                "metrics": {k: v for k, v in (metrics or {}).items() if k != "instances"},
            }
            traffic[:] = [stats["bytes_in"], stats["bytes_out"]]
            self.runner.round = record["round"] + 1
            self.round_done(record)
            self.telemetry.phase = "uploading and waiting"
            return metrics

        return timed
