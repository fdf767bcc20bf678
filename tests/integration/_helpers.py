"""Helpers shared by the integration tests."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from typing import Any

from zmqfed.core import Maintainer
from zmqfed.federated import Curve
from zmqfed.props import FederatedProperties


def node_results(procs: Mapping[str, subprocess.Popen[str]], timeout: float) -> dict[str, Any]:
    """Wait for every node process; parse each one's ``RESULT <json>`` line.

    On any failure the assertion shows every node's output, not just the first.
    """
    outputs = {name: proc.communicate(timeout=timeout) for name, proc in procs.items()}
    failed = [name for name, proc in procs.items() if proc.returncode != 0]
    assert not failed, "\n".join(
        f"--- {name} (exit {procs[name].returncode})\n{out}\n{err}"
        for name, (out, err) in outputs.items()
    )
    results = {}
    for name, (out, _) in outputs.items():
        line = next(line for line in out.splitlines() if line.startswith("RESULT "))
        results[name] = json.loads(line[len("RESULT ") :])
    return results


def download_then_upload(
    props: FederatedProperties,
    state_dict: dict[str, Any],
    *,
    timeout: float,
    curve: Curve | None = None,
) -> None:
    """One collaborator round: download the model, upload the state dict, close."""
    m = Maintainer(props, state_dict, curve=curve, timeout=timeout)
    try:
        m.step(upload=False)
        m.package()
        m.step(download=False)
    finally:
        m.close()
