"""``tools/soak.py`` still runs: a short soak with restarts completes and reports finite RSS."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_short_soak_completes_with_restarts(run_python, tmp_path, slow_factor):
    out = tmp_path / "soak.jsonl"
    proc = run_python(
        script=REPO_ROOT / "tools" / "soak.py",
        args=["--rounds", "15", "--restart-every", "5", "--seed", "1", "--out", str(out)],
    )
    stdout, stderr = proc.communicate(timeout=240 * slow_factor)
    assert proc.returncode == 0, stdout + stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    summary = lines[-1]
    assert summary["summary"] is True
    assert summary["rounds_completed"] == 15
    assert summary["restarts"] >= 1
    for key in ("rss_kb_start", "rss_kb_end", "rss_kb_max"):
        assert math.isfinite(summary[key]) and summary[key] > 0, (key, summary)
    assert all(s["rss_kb"] > 0 for s in lines[:-1])
    assert "rounds completed: 15/15" in stdout
