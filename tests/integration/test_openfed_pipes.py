"""OpenFed's pipe-level example (its federated.md), renamed to zmqfed: three processes.

``examples/openfed_pipe/`` holds the aggregator's, alpha's and beta's
scripts as OpenFed documents them, with ``openfed`` renamed to ``zmqfed``:
messages by key (``direct_set``/``direct_get``), then a tensor each way
(``upload``/``download`` inside ``with pipe.dist_props:``). Each runs in its
own process over real sockets, in any start order, and prints what
OpenFed's documentation shows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "examples" / "openfed_pipe"

# Runs a script unchanged (runpy), then reports what its pipes saw.
REPORT = """
import faulthandler, json, runpy, sys
faulthandler.dump_traceback_later(90, exit=True)  # a hang shows every thread's stack
g = runpy.run_path(sys.argv[1], run_name="__main__")
pipes = g["pipes"]
out = {"pipes": [[p.nick_name, p.role, sorted(p.channel.values), len(p.channel.inbox),
                  p.bytes_in > 0, p.bytes_out > 0] for p in pipes]}
print("RESULT " + json.dumps(out), flush=True)
"""

OUTPUT = {
    "aggregator": ["hello world from alpha to aggregator", "hello world from beta to aggregator"],
    "alpha": ["hello world from aggregator to alpha"],
    "beta": ["hello world from aggregator to beta"],
}


@pytest.mark.parametrize(
    "order",
    [
        ("aggregator", "alpha", "beta"),
        ("beta", "alpha", "aggregator"),
        ("alpha", "aggregator", "beta"),
    ],
)
def test_openfed_pipe_example_any_start_order(run_python, slow_factor, free_tcp_endpoint, order):
    env = {"ZMQFED_DEFAULT_TCP": free_tcp_endpoint}  # a free port keeps parallel runs apart
    procs = {}
    for name in order:
        procs[name] = run_python(REPORT, args=[str(SCRIPTS / f"{name}.py")], env=env)
        time.sleep(0.3)  # make the start order real
    outputs = {name: proc.communicate(timeout=120 * slow_factor) for name, proc in procs.items()}
    failed = {name: err for name, (_, err) in outputs.items() if procs[name].returncode}
    assert not failed, failed
    results = {}
    for name, (out, _) in outputs.items():
        printed = [line for line in out.splitlines() if not line.startswith("RESULT ")]
        assert printed == OUTPUT[name], name
        results[name] = json.loads(out.splitlines()[-1].removeprefix("RESULT "))
    # every pipe kept the peer's message, downloaded what came and moved tensors both ways
    assert results["aggregator"]["pipes"] == [
        ["alpha", "aggregator", ["message_1"], 0, True, True],
        ["beta", "aggregator", ["message_1"], 0, True, True],
    ]
    for name in ("alpha", "beta"):
        assert results[name]["pipes"] == [
            ["aggregator", "collaborator", ["message_0"], 0, True, True]
        ]


def test_openfed_pipe_scripts_run_as_written(run_python, slow_factor, free_tcp_endpoint):
    """Plain ``python aggregator.py`` etc.: the literal scripts print OpenFed's output, exit 0."""
    env = {"ZMQFED_DEFAULT_TCP": free_tcp_endpoint}
    procs = {
        name: run_python(script=SCRIPTS / f"{name}.py", env=env)
        for name in ("beta", "aggregator", "alpha")
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120 * slow_factor)
        assert proc.returncode == 0, f"{name}: {err}"
        assert out.splitlines() == OUTPUT[name], name
