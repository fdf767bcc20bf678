"""Smoke test of ``tools/privacy_bench.py`` on the digits model: every mechanism yields sane costs.

No timing assertions (a loaded machine's numbers mean nothing); the bytes are
exact, so they are checked: DP adds none, CKKS ciphertexts take whole 4096-slot
ciphertexts per tensor.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("tenseal")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

pytestmark = pytest.mark.slow


def test_every_mechanism_on_digits() -> None:
    from tools import privacy_bench as bench
    from zmqfed.functional import ckks_key_gen

    keys = ckks_key_gen(n_threads=1)
    rows = {m: bench.measure(m, "digits", keys, 2) for m in bench.MECHANISMS}
    for row in rows.values():
        assert row["params"] == 4810
        for key in ("serve_s", "download_s", "upload_s", "take_s"):
            assert math.isfinite(row[key]) and row[key] >= 0
    plain = rows["plain"]
    assert 4810 * 4 < plain["bytes_up"] < 4810 * 4 + 4096  # float32 plus headers
    for mech in ("central", "local"):  # DP adds no bytes (a few bytes of meta at most)
        assert abs(rows[mech]["bytes_up"] - plain["bytes_up"]) < 256
    # 4 tensors: 4 ciphertexts of ~131 kB each way; the head (2 tensors) half of that
    assert 4 * 100_000 < rows["he-all"]["bytes_up"] < 4 * 300_000
    assert 2 * 100_000 < rows["he-head"]["bytes_up"] < 2 * 300_000 + 4096 * 4
    assert rows["he-all"]["bytes_down"] > 4 * 100_000  # the encrypted sum is served
    seconds, nbytes = bench.per_round(rows["he-all"], 100)
    assert seconds > 0 and nbytes == 100 * (
        rows["he-all"]["bytes_up"] + rows["he-all"]["bytes_down"]
    )
    text = bench.table(list(rows.values()), [8, 100])
    assert text.count("| digits (4,810) |") == 10
