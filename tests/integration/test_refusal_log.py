"""Refused uploads cannot flood the aggregator's log (or the offender's ERROR replies).

"refused an upload" used to be logged once per upload, with the full reason,
which quotes what the sender chose (tensor names): 13.5 MB of log in 2.3 s.
It now goes through the transport's rate-limited refusal log, which cuts and
escapes what it echoes, and ERROR reasons are cut too.
"""

from __future__ import annotations

import logging

import torch
import zmq

from tests.integration.test_protocol_faults import _ask, _dealer, _hello, aggregator  # noqa: F401
from zmqfed.federated.events import REFUSAL_LOG_CHARS
from zmqfed.federated.protocol import MAX_REASON_CHARS
from zmqfed.wire import Envelope, encode

UPLOADS = 300


def _bad_upload(seq: int, incarnation: str) -> list:
    """A PUSH with the model's tensors plus one with a 10,000-character name and a newline."""
    tensors = {
        "weight": {"param": torch.zeros(1, 4)},
        "bias": {"param": torch.zeros(1)},
        f"evil\n{'x' * 10_000}{seq}": {"param": torch.zeros(1)},
    }
    env = Envelope(
        kind="PUSH",
        sender="alpha",
        seq=seq,
        version=1,
        incarnation=incarnation,
        tensors=tensors,
        meta={"instances": 1},
    )
    return encode(env)


def test_a_member_sending_bad_uploads_makes_a_bounded_log(aggregator, caplog):  # noqa: F811
    ctx = zmq.Context()
    sock = _dealer(ctx, aggregator.endpoint, "alpha")
    try:
        with caplog.at_level(logging.INFO):
            welcome = _hello(sock, aggregator.fingerprint)
            assert welcome.kind == "WELCOME"
            for seq in range(2, 2 + UPLOADS):
                reply = _ask(sock, _bad_upload(seq, welcome.incarnation))
                assert (reply.kind, reply.meta["code"]) == ("ERROR", "bad-upload"), reply.meta
                assert "unknown tensors" in reply.meta["reason"]
                assert len(reply.meta["reason"]) <= MAX_REASON_CHARS + 40
    finally:
        sock.close(0)
        ctx.term()
        aggregator.finish()
    refused = [r.getMessage() for r in caplog.records if "refused an upload" in r.getMessage()]
    total = sum(len(r.getMessage()) for r in caplog.records)
    assert 1 <= len(refused) <= 2, len(refused)  # one line per 10 s, the rest counted
    assert all(len(line) < REFUSAL_LOG_CHARS + 200 and "\n" not in line for line in refused)
    assert total < 20_000, f"{total} characters of log for {UPLOADS} refused uploads"
