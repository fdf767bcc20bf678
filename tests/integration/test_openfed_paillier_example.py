"""OpenFed's Paillier notebook, ported (examples/openfed_paillier): two processes, encrypted rounds.

The script starts the aggregator and the collaborator with
``multiprocessing.Process(target=main_function, args=(zmqfed.federated.aggregator,
...))``, as the notebook does; the aggregator's ``main_function`` returns
right after ``api.start()``, so its process lives on only because the API
thread is not a daemon, and flushes its last replies from multiprocessing's
exit finalizers. The collaborator encrypts every upload; the aggregator
decrypts only the sum.
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "examples" / "openfed_paillier" / "paillier_crypto.py"


def test_paillier_notebook_runs_as_written(
    run_python, tmp_path: Path, slow_factor: float, free_tcp_endpoint: str
) -> None:
    env = {"TMPDIR": str(tmp_path), "ZMQFED_DEFAULT_TCP": free_tcp_endpoint}
    for attempt, first_line in enumerate(
        ["Generate new public and private key.", f"Found public and private key under '{tmp_path}'"]
    ):
        proc = run_python(script=SCRIPT, env=env)
        out, err = proc.communicate(timeout=240 * slow_factor)
        assert proc.returncode == 0, err
        assert out.splitlines()[0] == first_line, attempt
        assert "3/3" in err  # the aggregator's progress bar reached the last round
        losses = torch.load(tmp_path / "outter_losses")
        assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert sorted(p.name for p in tmp_path.glob("*.key")) == ["private.key", "public.key"]
