"""The repository stands on its own: no half-merged files, no pointers outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEXT = (".py", ".md", ".toml", ".ini", ".txt", ".yaml", ".yml", ".json", ".cfg", ".service", "")


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / p for p in out.splitlines() if Path(p).suffix in TEXT]


def test_no_merge_conflict_markers():
    marker = re.compile(r"^(<{7}|>{7}) ", re.M)
    bad = [
        str(p.relative_to(REPO))
        for p in _tracked()
        if p.is_file() and marker.search(p.read_text(encoding="utf-8", errors="replace"))
    ]
    assert bad == []


def test_no_references_to_notes_outside_the_repository():
    # The founding notes lived beside the repository, never in it; their file
    # names are assembled here so that this test does not cite them itself.
    notes = [
        "ZMQ-" + "NOTES",
        "PERF-" + "NOTES",
        "DES" + "IGN.md",
        "STY" + "LE.md",
        "../" + "shared",
    ]
    outside = re.compile("|".join(re.escape(n) for n in notes))
    bad = [
        str(p.relative_to(REPO))
        for p in _tracked()
        if p.is_file() and outside.search(p.read_text(encoding="utf-8", errors="replace"))
    ]
    assert bad == []
