"""The seed document's three scripts, each in its own process, in any start order."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration._helpers import node_results

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed"

# Runs a seed script unchanged (runpy), then reports what it left behind.
REPORT = """
import faulthandler, json, logging, runpy, sys
faulthandler.dump_traceback_later(45, exit=True)  # a hang shows every thread's stack
logging.basicConfig(level=logging.INFO, format="%(created).3f %(name)s %(message)s")
g = runpy.run_path(sys.argv[1], run_name="__main__")
m = g["maintainer"]
out = {"role": m.role, "meta_list": len(m.meta_list),
       "weights": {k: v.tolist() for k, v in g["network"].state_dict().items()}}
if m.collaborator:
    out["data"] = {k: v["param"].tolist() for k, v in m.data.items()}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize(
    "order",
    [
        ("aggregator", "alpha", "beta"),
        ("alpha", "beta", "aggregator"),
        ("beta", "aggregator", "alpha"),
    ],
)
def test_seed_scripts_any_start_order(run_python, slow_factor, free_tcp_endpoint, order):
    # The scripts use zmqfed.default_tcp_address; a free port keeps parallel runs apart.
    env = {"ZMQFED_DEFAULT_TCP": free_tcp_endpoint}
    procs = {}
    for name in order:
        procs[name] = run_python(REPORT, args=[str(SEED / f"{name}.py")], env=env)
        time.sleep(0.3)  # make the start order real
    results = node_results(procs, 60 * slow_factor)
    agg = results["aggregator"]
    assert agg["role"] == "aggregator"
    assert agg["meta_list"] == 2
    for name in ("alpha", "beta"):
        assert results[name]["role"] == "collaborator"
        # each collaborator downloaded exactly the aggregator's weights
        assert results[name]["data"] == agg["weights"]
        assert results[name]["weights"] != agg["weights"]  # (its own init differs)


def test_seed_scripts_run_as_written(run_python, slow_factor, free_tcp_endpoint):
    """Plain `python aggregator.py` etc.: the literal scripts exit 0."""
    env = {"ZMQFED_DEFAULT_TCP": free_tcp_endpoint}
    procs = [
        run_python(script=SEED / f"{name}.py", env=env) for name in ("alpha", "aggregator", "beta")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60 * slow_factor)
        assert proc.returncode == 0, err
