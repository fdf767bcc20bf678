"""rounds.jsonl after a crash: a round redone after a restart is recorded once."""

from __future__ import annotations

import json

from zmqfed.node import trim_records


def test_records_of_rounds_to_redo_are_dropped(tmp_path):
    path = tmp_path / "agg.rounds.jsonl"
    records = [{"round": 0, "mode": "train"}, {"round": 0, "mode": "test"}, {"round": 1}]
    # round 1 was appended, then the node died before its checkpoint (at round 1) was written
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"round": 2, "mo')
    assert trim_records(path, before_round=1) == 2  # round 1 and the torn line
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:2]
    assert trim_records(path, before_round=1) == 0  # idempotent
    assert trim_records(tmp_path / "missing.jsonl", 3) == 0
