"""OpenFed's tools: the simulator launcher (``python -m zmqfed.tools.simulator``).

``build_centralized_topology(nproc, tcp)`` builds the one-aggregator star the
launcher runs and writes each node's props file (defined in
``zmqfed.tools.simulator``, as in OpenFed, and re-exported here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zmqfed.tools.simulator import build_centralized_topology

__all__ = ["build_centralized_topology"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `python -m zmqfed.tools.simulator` does not find
    # its own module already imported by this package (runpy warns about that).
    if name == "build_centralized_topology":
        from zmqfed.tools.simulator import build_centralized_topology

        return build_centralized_topology
    raise AttributeError(f"module 'zmqfed.tools' has no attribute {name!r}")
