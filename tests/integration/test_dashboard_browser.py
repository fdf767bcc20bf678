"""The dashboard as a person sees it: a real federation, headless Chromium, what is on screen.

Three collaborators and an aggregator run as ``zmqfed-node`` processes, the
aggregator with ``--dashboard``. Selenium drives Debian's chromium (and its
chromedriver), which ``.ci/run`` installs. The test reads what the page
shows: the round counter advancing, the topology's nodes and their colours,
a killed collaborator turning red, and the chart's points, which must be the
rounds in ``aggregator.rounds.jsonl``. The last screenshot is kept in
``out/artifacts/dashboard.png`` (and in the test's tmp dir).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from zmqfed.ops.telemetry import CHART_POINTS
from zmqfed.topo import star
from zmqfed.topo.svg import STATE_COLOURS

APP = "tests.integration.toy_app:factory"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "out" / "artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1300",
]


def _rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        if os.environ.get("CI") == "true":  # .ci/run installs them: never skip there
            pytest.fail(f"missing {missing}: .ci/run should have installed chromium")
        pytest.skip(f"needs Debian's chromium and chromium-driver ({missing} missing)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # the page may be between two redraws
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _status(state: Path, node: str) -> dict:
    try:
        return json.loads((state / f"{node}.status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _round_shown(driver) -> int:
    done, _, _total = driver.find_element("id", "round").text.partition(" / ")
    return int(done)


def _node_colours(driver) -> dict[str, tuple[str, str]]:
    """Each topology node's data-state and the fill the browser actually paints."""
    nodes = driver.execute_script(
        "return Array.from(document.querySelectorAll('#topology .node')).map("
        "n => [n.dataset.node, n.dataset.state, getComputedStyle(n.querySelector('.shape')).fill])"
    )
    return {name: (state, fill) for name, state, fill in nodes}


def _chart_points(driver, metric: str) -> list[tuple[int, float, float]]:
    """(round, value, pixel y) of every point drawn in ``metric``'s chart."""
    return [
        (int(r), float(v), float(y))
        for r, v, y in driver.execute_script(
            "return Array.from(document.querySelectorAll("
            f"'#charts svg[data-metric=\"{metric}\"] circle.point')).map("
            "c => [c.dataset.round, c.dataset.value, c.getAttribute('cy')])"
        )
    ]


def test_dashboard_shows_rounds_peers_and_the_round_records(
    browser, tmp_path, free_tcp_endpoint, run_python, slow_factor
):
    topology = tmp_path / "topology.json"
    star(3, free_tcp_endpoint).save(topology)
    state = tmp_path / "state"
    common = ["--topology", str(topology), "--app", APP, "--state-dir", str(state)]
    common += ["--no-progress", "--rounds", "12", "--set", "delay=0.8"]
    # Once client2 is killed, rounds close at their deadline with the two others.
    common += ["--set", "min_clients=2", "--set", "round_timeout=2.0"]
    clients = {
        f"client{i}": run_python(
            module="zmqfed.cli.node", args=["run", "--node", f"client{i}", *common]
        )
        for i in range(3)
    }
    agg = run_python(
        module="zmqfed.cli.node",
        args=["run", "--node", "aggregator", *common, "--dashboard", "127.0.0.1:0"],
    )
    url = _wait_for(
        lambda: (_status(state, "aggregator").get("endpoints") or {}).get("dashboard"),
        60 * slow_factor,
        "the dashboard's address in the status file",
    )
    assert url.startswith("http://127.0.0.1:")  # the default: loopback only
    browser.get(url)
    assert browser.title == "zmqfed dashboard"
    _wait_for(
        lambda: browser.find_element("id", "node").text == "aggregator",
        30 * slow_factor,
        "the page's first update",
    )

    # Every collaborator is drawn online (green), the aggregator as itself.
    online = _rgb(STATE_COLOURS["online"])
    colours = _wait_for(
        lambda: (
            (c := _node_colours(browser))
            and all(c[f"client{i}"] == ("online", online) for i in range(3))
            and c
        ),
        30 * slow_factor,
        "three green collaborators",
    )
    assert colours["aggregator"][0] == "self"
    assert browser.find_element("id", "peers").text == "3 / 3 online"

    # The round counter advances without reloading the page.
    _wait_for(lambda: _round_shown(browser) >= 1, 90 * slow_factor, "a first round")
    first = _round_shown(browser)
    _wait_for(lambda: _round_shown(browser) > first, 60 * slow_factor, "the counter to advance")
    assert browser.find_element("id", "round").text.endswith(" / 12")

    # A killed collaborator turns red.
    clients["client2"].send_signal(signal.SIGKILL)
    offline = _rgb(STATE_COLOURS["offline"])
    _wait_for(
        lambda: _node_colours(browser)["client2"] == ("offline", offline),
        60 * slow_factor,
        "client2 drawn offline",
    )
    assert browser.find_element("id", "peers").text == "2 / 3 online"
    assert "client2" in browser.find_element("id", "offline").text

    # The chart's points are the rounds of rounds.jsonl (those published so far).
    _wait_for(lambda: _round_shown(browser) >= first + 3, 90 * slow_factor, "more rounds")
    shown = _round_shown(browser)
    points = _wait_for(
        lambda: len(p := _chart_points(browser, "loss")) >= shown and p,
        30 * slow_factor,
        "the chart to catch up with the counter",
    )
    records = [json.loads(x) for x in (state / "aggregator.rounds.jsonl").read_text().splitlines()]
    assert len(points) <= min(len(records), CHART_POINTS)
    assert [p[0] for p in points] == [r["round"] for r in records[: len(points)]]
    for (_, value, _), record in zip(points, records, strict=False):
        assert value == pytest.approx(record["metrics"]["loss"], rel=1e-12)
    # drawn where their values say: a higher loss is higher on screen (smaller y)
    by_value = sorted(points, key=lambda p: p[1])
    assert all(a[2] >= b[2] for a, b in itertools.pairwise(by_value))
    bars = browser.execute_script(
        "return document.querySelectorAll('#bytes-chart rect.bar-in').length"
    )
    assert bars == len(points)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    shutil.copy(shot, ARTIFACTS / "dashboard.png")
    assert shot.stat().st_size > 10_000

    _, err = agg.communicate(timeout=120 * slow_factor)
    assert agg.returncode == 0, err
    _wait_for(
        lambda: (
            browser.find_element("id", "state").text == "finished"
            or browser.find_element("id", "connection").text == "node unreachable"
        ),
        30 * slow_factor,
        "the page to show the end",
    )
    for name in ("client0", "client1"):
        clients[name].communicate(timeout=60 * slow_factor)
        assert clients[name].returncode == 0
