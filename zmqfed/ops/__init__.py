"""Operating a federation: metrics, a live dashboard, and machine-readable status.

``zmqfed-node run --metrics ADDR:PORT --dashboard ADDR:PORT`` serves them
from the node's own process (``docs/operations.md``):

* :class:`Telemetry` -- the node's state as immutable snapshots, published by
  its loop thread and read by every other thread;
* :class:`MetricsExporter` -- ``/metrics`` in the Prometheus text format
  (the ``metrics`` extra);
* :class:`OpsServer` -- the read-only HTTP server of ``/metrics``,
  ``/status.json`` and the dashboard;
* :class:`StatusFile` and :func:`health` -- ``NAME.status.json`` with its
  heartbeat, and the verdict (with an exit code) a monitoring check acts on;
* :class:`NodeOps` -- all of it wired to a :class:`~zmqfed.node.NodeRunner`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zmqfed.ops.metrics import MetricsExporter
    from zmqfed.ops.node_ops import NodeOps, OpsOptions
    from zmqfed.ops.server import OpsServer, parse_listen
    from zmqfed.ops.status import HEALTH_CODES, StatusFile, health, read_status
    from zmqfed.ops.telemetry import Snapshot, Telemetry

__all__ = [
    "HEALTH_CODES",
    "MetricsExporter",
    "NodeOps",
    "OpsOptions",
    "OpsServer",
    "Snapshot",
    "StatusFile",
    "Telemetry",
    "health",
    "parse_listen",
    "read_status",
]

# Imported on first use: ``zmqfed-node status`` reads status files without
# paying for torch, which the node-side modules import.
_HOMES = {
    "HEALTH_CODES": "status",
    "MetricsExporter": "metrics",
    "NodeOps": "node_ops",
    "OpsOptions": "node_ops",
    "OpsServer": "server",
    "Snapshot": "telemetry",
    "StatusFile": "status",
    "Telemetry": "telemetry",
    "health": "status",
    "parse_listen": "server",
    "read_status": "status",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'zmqfed.ops' has no attribute {name!r}")
    return getattr(importlib.import_module(f"zmqfed.ops.{home}"), name)
