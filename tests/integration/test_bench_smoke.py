"""Smoke test of ``tools/bench``: every family runs in quick mode and yields sane rows.

No timing assertions: the numbers of a loaded CI machine mean nothing. Each
family must produce rows whose numbers are finite and positive, and ``run.py``
must write the Markdown table and the JSON lines.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

pytestmark = pytest.mark.slow

KEYS = {"name", "value", "unit", "baseline", "ratio", "target", "met"}


def _grpc_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("grpc") is not None


def _check_rows(rows: list[dict]) -> None:
    assert rows, "the family produced no rows"
    for r in rows:
        assert set(r) >= KEYS, f"row lacks {KEYS - set(r)}: {r}"
        assert isinstance(r["name"], str) and r["name"]
        if "not installed" in r.get("note", ""):
            # an optional baseline whose extra is missing (e.g. tox's test-only env)
            assert not _grpc_available(), f"{r['name']} says not installed, but it is"
            continue
        for key in ("value", "baseline", "ratio"):
            x = r[key]
            if x is None:
                continue
            assert isinstance(x, (int, float)), f"{r['name']}: {key} = {x!r}"
            if key == "value" and r["unit"] in ("B", "count", "bool") and x == 0:
                continue  # a count or a yes/no may be 0 in a tiny run
            assert math.isfinite(x) and x > 0, f"{r['name']}: {key} = {x!r}"
        assert r["met"] in (None, True, False)


def _rows(family: str) -> list[dict]:
    from tools.bench import run

    return run._family(family, quick=True)


def test_codec_quick() -> None:
    _check_rows(_rows("codec"))


def test_aggregate_quick() -> None:
    rows = _rows("aggregate")
    _check_rows(rows)
    assert any("RunningFedAvg" in r["name"] for r in rows)


def test_overhead_quick() -> None:
    _check_rows(_rows("overhead"))


def test_fanout_quick() -> None:
    rows = _rows("fanout")
    _check_rows(rows)
    encodes = next(r for r in rows if "encodes" in r["name"])
    assert encodes["value"] == 1  # one encoding served every download of the step


def test_transfer_quick() -> None:
    from tools.bench import transfer
    from tools.bench.common import MiB

    rows = transfer.run(quick=True, sizes=[1 * MiB], log=lambda msg: None)
    _check_rows(rows)
    names = " ".join(r["name"] for r in rows)
    assert "raw TCP" in names and "gloo" in names
    if _grpc_available():  # make test installs it; the Flower baseline must then be measured
        assert "Flower np.save+gRPC" in names


def test_run_writes_outputs(tmp_path, run_python) -> None:
    proc = run_python(
        script=REPO_ROOT / "tools" / "bench" / "run.py",
        args=["--quick", "--only", "codec", "--out", str(tmp_path)],
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{out}\n{err}"
    md = (tmp_path / "benchmarks.md").read_text()
    assert "| family | benchmark |" in md and "--quick" in md
    lines = (tmp_path / "bench" / "results.jsonl").read_text().splitlines()
    assert lines
    for line in lines:
        assert set(json.loads(line)) >= KEYS


def test_huge_quick() -> None:
    rows = _rows("huge")
    _check_rows(rows)
    # the smoke run streams a 48 MiB model: values arrive intact, memory stays bounded
    speeds = [r for r in rows if r["unit"] == "GB/s"]
    assert len(speeds) == 2 and all(r["note"] == "values checked on arrival" for r in speeds)
    assert all(r["met"] for r in rows if "peak RSS" in r["name"] and "sender" in r["name"])


def test_header_quick() -> None:
    rows = _rows("header")
    _check_rows(rows)
    sized = [r for r in rows if r["name"].startswith("header bytes per tensor")]
    assert len(sized) == 3 and all(r["met"] for r in sized)  # every header fits its bound


def test_layouts_quick() -> None:
    rows = _rows("layouts")
    _check_rows(rows)
    speeds = [r for r in rows if r["unit"] == "GB/s"]
    assert len(speeds) == 3 and not any("NOT LANDED" in r.get("note", "") for r in speeds)


def test_alloc_quick() -> None:
    rows = _rows("alloc")
    _check_rows(rows)
    assert [r["name"].split(", ")[1] for r in rows] == [
        "warm buffer",
        "fresh torch.empty",
        "fresh_tensor (huge pages)",
    ]
