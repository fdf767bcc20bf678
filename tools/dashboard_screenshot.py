"""Take the dashboard screenshot of ``docs/operations.md`` from a real federation.

Starts an aggregator and ``--clients`` collaborators of the digits app
(``examples/digits/daemon.py``) as ``zmqfed-node`` processes on 127.0.0.1,
the aggregator with ``--dashboard`` and ``--metrics``; opens the dashboard in
headless Debian chromium (Selenium, as the browser test does); kills one
collaborator after ``--kill-after`` rounds so the drawing shows a node
offline; and saves the page once ``--rounds-shown`` rounds are charted::

    .venv/bin/python tools/dashboard_screenshot.py --out docs/img/dashboard.png

Everything it started is stopped before it returns.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
APP = "examples.digits.daemon:factory"


def _status(state: Path, node: str) -> dict:
    try:
        return json.loads((state / f"{node}.status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/dashboard.png")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--kill-after", type=int, default=6)
    parser.add_argument("--rounds-shown", type=int, default=14)
    args = parser.parse_args(argv)

    import socket

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    sys.path.insert(0, str(REPO_ROOT))
    from zmqfed.topo import star

    work = Path(tempfile.mkdtemp(prefix="zmqfed-shot-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    star(args.clients, endpoint).save(work / "topology.json")
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    common = ["--topology", str(work / "topology.json"), "--app", APP, "--state-dir", str(work)]
    common += ["--no-progress", "--rounds", str(args.rounds)]
    common += ["--set", f"min_clients={args.clients - 1}", "--set", "round_timeout=3"]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    names = [f"client{i}" for i in range(args.clients)] + ["aggregator"]
    for name in names:
        extra = ["--dashboard", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
        cmd = [sys.executable, "-m", "zmqfed.cli.node", "run", "--node", name, *common]
        with open(work / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(
                cmd + (extra if name == "aggregator" else []),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1500",
        f"--user-data-dir={work / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        url = _wait(
            lambda: (_status(work, "aggregator").get("endpoints") or {}).get("dashboard"),
            120,
            "the dashboard",
        )
        driver.get(url)
        _wait(lambda: _status(work, "aggregator").get("round", 0) >= args.kill_after, 300, "rounds")
        victim = f"client{args.clients - 1}"
        procs[victim].send_signal(signal.SIGKILL)
        _wait(
            lambda: _status(work, "aggregator").get("round", 0) >= args.rounds_shown, 300, "rounds"
        )
        time.sleep(2.5)  # two polls of the page
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        print(f"saved {out} ({url}, logs in {work})")
    finally:
        driver.quit()
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
