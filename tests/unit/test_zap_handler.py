"""The ZAP handler's answers: per-domain tables, CURVE only, malformed requests refused."""

from __future__ import annotations

import logging

import zmq
from zmq.utils import z85

from zmqfed.federated.zap import ZapHandler

KEY_A, KEY_B = (zmq.curve_keypair()[0] for _ in range(2))


def _request(domain: bytes, key: bytes, mechanism: bytes = b"CURVE") -> list[bytes]:
    return [b"1.0", b"7", domain, b"127.0.0.1", b"", mechanism, z85.decode(key)]


def test_names_are_resolved_in_the_domain_asked_about(zmq_ctx):
    zap = ZapHandler(zmq_ctx)  # not started: answer() is the whole decision
    zap.allow("d1", "agg", {"client3": KEY_A})
    zap.allow("d2", "agg", {"client0": KEY_A, "other": KEY_B})
    assert zap.answer(_request(b"d1", KEY_A)) == (b"200", b"OK", "client3")
    assert zap.answer(_request(b"d2", KEY_A)) == (b"200", b"OK", "client0")
    assert zap.answer(_request(b"d1", KEY_B))[:2] == (b"400", b"unknown key")
    zap.forget("d2")
    assert zap.answer(_request(b"d2", KEY_A))[:2] == (b"400", b"unknown domain")
    assert zap.answer(_request(b"d1", KEY_A))[2] == "client3"  # the other table is intact


def test_anything_but_a_well_formed_curve_request_is_refused(zmq_ctx, caplog):
    zap = ZapHandler(zmq_ctx)
    zap.allow("d", "agg", {"a": KEY_A})
    assert zap.answer([b"1.0", b"1"])[0] == b"400"
    assert zap.answer([b"9.9", *_request(b"d", KEY_A)[1:]])[0] == b"400"
    assert zap.answer(_request(b"d", KEY_A, mechanism=b"NULL"))[0] == b"400"
    assert zap.answer([*_request(b"d", KEY_A)[:6], b"short"])[0] == b"400"
    with caplog.at_level(logging.WARNING, logger="zmqfed.security.zap"):
        for _ in range(500):  # a flood of unknown keys: one log line, not 500
            zap.answer(_request(b"d", KEY_B))
    lines = [r for r in caplog.records if "unknown key" in r.getMessage()]
    assert len(lines) == 1 and "refused a CURVE client in group 'agg'" in lines[0].getMessage()
