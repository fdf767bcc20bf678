"""Checks that the shared fixtures in tests/conftest.py do what they promise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"


def test_req_rep_round_trip_on_free_tcp_endpoint(zmq_ctx, free_tcp_endpoint, slow_factor):
    import zmq

    timeout_ms = int(5000 * slow_factor)
    with zmq_ctx.socket(zmq.REP) as rep, zmq_ctx.socket(zmq.REQ) as req:
        rep.bind(free_tcp_endpoint)
        req.connect(free_tcp_endpoint)
        assert req.getsockopt(zmq.LINGER) == 0

        req.send(b"ping")
        assert rep.poll(timeout_ms), "REP got nothing"
        rep.send(b"pong:" + rep.recv())
        assert req.poll(timeout_ms), "REQ got no reply"
        assert req.recv() == b"pong:ping"


def test_pair_on_ipc_endpoint(zmq_ctx, ipc_endpoint, slow_factor):
    import zmq

    assert ipc_endpoint.startswith("ipc://")
    assert len(os.fsencode(ipc_endpoint[len("ipc://") :])) <= 107
    with zmq_ctx.socket(zmq.PAIR) as a, zmq_ctx.socket(zmq.PAIR) as b:
        a.bind(ipc_endpoint)
        b.connect(ipc_endpoint)
        b.send(b"x")
        assert a.poll(int(5000 * slow_factor))
        assert a.recv() == b"x"


def test_run_python_environment(run_python, slow_factor):
    proc = run_python(
        "import os, sys, zmqfed; print(os.environ['OMP_NUM_THREADS']); print(sys.argv[1:])",
        args=["a", "b"],
    )
    out, err = proc.communicate(timeout=30 * slow_factor)
    assert proc.returncode == 0, err
    assert out.split("\n")[:2] == ["1", "['a', 'b']"]


def _is_gone(pid: int) -> bool:
    """True when *pid* no longer exists or is a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_run_python_kills_process_group_at_teardown(tmp_path, slow_factor):
    """An inner pytest run leaves a child and a grandchild sleeping; both must die."""
    inner = tmp_path / "inner"
    inner.mkdir()
    pids_file = tmp_path / "pids"
    (inner / "pytest.ini").write_text("[pytest]\n")
    (inner / "conftest.py").write_text(CONFTEST.read_text())
    (inner / "test_leak.py").write_text(
        textwrap.dedent(
            f"""
            import time
            from pathlib import Path

            CHILD = '''
            import os, subprocess, sys, time
            grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            tmp = {str(pids_file)!r} + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{{os.getpid()}} {{grandchild.pid}}")
            os.replace(tmp, {str(pids_file)!r})
            time.sleep(600)
            '''

            def test_leave_sleepers(run_python):
                proc = run_python(CHILD)
                deadline = time.monotonic() + 30
                while not Path({str(pids_file)!r}).exists():
                    assert proc.poll() is None, proc.communicate()
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(inner)],
        cwd=inner,
        capture_output=True,
        text=True,
        timeout=120 * slow_factor,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 2
    # Teardown has already run; a group member that outlives it by a few
    # seconds is a leak. Kill survivors ourselves so a failure leaks nothing.
    deadline = time.monotonic() + 10 * slow_factor
    try:
        while not all(_is_gone(pid) for pid in pids):
            assert time.monotonic() < deadline, f"still alive after teardown: {pids}"
            time.sleep(0.05)
    finally:
        for pid in pids:
            if not _is_gone(pid):
                os.kill(pid, signal.SIGKILL)
