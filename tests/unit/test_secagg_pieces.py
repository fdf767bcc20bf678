"""The pieces of secure aggregation, without a network: crypto, ring, graph, config."""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import pytest
import torch
import zmq

from zmqfed.errors import ConfigError, ProtocolError, SecurityError
from zmqfed.functional.secagg import crypto
from zmqfed.functional.secagg.client import SecAggClient
from zmqfed.functional.secagg.ring import (
    SecAggConfig,
    decode_sum,
    encode_update,
    from_wire,
    layout_of,
    neighbourhoods,
    to_wire,
)


def test_any_threshold_of_shares_rebuilds_the_secret_and_fewer_do_not():
    secret = os.urandom(32)
    xs = [1, 2, 3, 4, 5, 6, 7]
    shares = dict(zip(xs, crypto.split_secret(secret, xs, 4), strict=True))
    for pick in ([1, 2, 3, 4], [7, 5, 3, 1], [2, 4, 6, 7]):
        assert crypto.combine_shares({x: shares[x] for x in pick}, 4) == secret
    assert crypto.combine_shares(shares, 4) == secret  # extra shares are checked, and agree
    with pytest.raises(SecurityError, match="3 shares, 4 needed"):
        crypto.combine_shares({x: shares[x] for x in (1, 2, 3)}, 4)
    # three shares with a guess for the fourth rebuild some other value, not the secret
    forged = {**{x: shares[x] for x in (1, 2, 3)}, 4: (5).to_bytes(crypto.SHARE_BYTES, "big")}
    with contextlib.suppress(SecurityError):  # or they rebuild nothing valid at all
        assert crypto.combine_shares(forged, 4) != secret
    tampered = dict(shares)
    tampered[6] = (int.from_bytes(shares[6], "big") ^ 1).to_bytes(crypto.SHARE_BYTES, "big")
    with pytest.raises(SecurityError, match="disagree"):
        crypto.combine_shares(tampered, 4)


def test_key_agreement_is_symmetric_and_sealing_detects_tampering():
    a, b, c = crypto.KeyPair.generate(), crypto.KeyPair.generate(), crypto.KeyPair.generate()
    shared = crypto.agree(a, b.public)
    assert shared == crypto.agree(b, a.public) != crypto.agree(a, c.public)
    key = crypto.derive(shared, "enc", b"round")
    assert key != crypto.derive(shared, "mask", b"round") != crypto.derive(shared, "enc", b"other")
    sealed = crypto.seal(key, b"share bytes", b"a>b")
    assert crypto.unseal(key, sealed, b"a>b") == b"share bytes"
    with pytest.raises(SecurityError, match="authentication"):
        crypto.unseal(key, sealed, b"b>a")  # meant for another direction
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SecurityError, match="authentication"):
        crypto.unseal(key, flipped, b"a>b")
    with pytest.raises(SecurityError, match="32 bytes"):
        crypto.agree(a, b"short")
    with pytest.raises(SecurityError, match="refused"):
        crypto.agree(a, bytes(32))  # a low-order point gives the all-zero secret


def test_curve_keys_agree_as_x25519_keys():
    pub_a, sec_a = zmq.curve_keypair()
    pub_b, sec_b = zmq.curve_keypair()
    a, b = crypto.curve_key_pair(sec_a), crypto.curve_key_pair(sec_b)
    assert a.public == crypto.curve_public_key(pub_a)  # zmq's public key is X25519's
    assert crypto.agree(a, crypto.curve_public_key(pub_b)) == crypto.agree(
        b, crypto.curve_public_key(pub_a)
    )
    with pytest.raises(SecurityError, match="Curve25519"):
        crypto.curve_public_key(b"not a key")


@pytest.mark.parametrize("bits", [16, 32, 62])
def test_mask_streams_are_reproducible_uniform_elements_of_the_ring(bits):
    seed = os.urandom(32)
    mask = crypto.mask_stream(seed, 40_000, bits)
    assert torch.equal(mask, crypto.mask_stream(seed, 40_000, bits))
    assert not torch.equal(mask, crypto.mask_stream(os.urandom(32), 40_000, bits))
    assert mask.dtype == torch.int64 and int(mask.min()) >= 0 and int(mask.max()) < 2**bits
    bins = torch.bincount(torch.div(mask, 2 ** (bits - 4), rounding_mode="floor"), minlength=16)
    assert bins.min() > 2000 and bins.max() < 3000  # 2500 expected in each of 16 bins


def test_the_harary_graph_is_k_regular_symmetric_and_follows_the_seed():
    members = [f"c{i:02d}" for i in range(20)]
    graph = neighbourhoods(b"seed", members, 6)
    assert set(graph) == set(members)
    for name, peers in graph.items():
        assert len(peers) == 6 and name not in peers
        assert all(name in graph[p] for p in peers)
    assert graph == neighbourhoods(b"seed", list(reversed(members)), 6)
    assert graph != neighbourhoods(b"other seed", members, 6)
    full = neighbourhoods(b"seed", members[:5], 4)
    assert all(len(p) == 4 for p in full.values())


def test_config_resolves_log_neighbourhoods_and_refuses_unsafe_thresholds():
    cfg = SecAggConfig()
    assert cfg.resolve(8) == (6, 4)
    assert cfg.resolve(100) == (14, 8)  # O(log n) neighbours
    assert cfg.resolve(3) == (2, 2)
    assert SecAggConfig(threshold=0.75).resolve(100) == (14, 11)
    with pytest.raises(ConfigError, match="exceed half"):
        SecAggConfig(threshold=3).resolve(8)  # 3 of 6: both secrets could be rebuilt
    with pytest.raises(ConfigError, match="even"):
        SecAggConfig(neighbours=5).resolve(20)
    with pytest.raises(ConfigError, match="overflow the ring"):
        SecAggConfig(quantization_range=2**22, modulus_range=2**24).resolve(8)
    with pytest.raises(ConfigError, match="at least 2"):
        cfg.resolve(1)
    for bad in (
        dict(modulus_range=3 * 2**20),
        dict(modulus_range=2**63),
        dict(threshold=0),
        dict(threshold=1.5),
        dict(clipping_range=0.0),
        dict(max_weight=-1.0),
        dict(timeout=0),
    ):
        with pytest.raises(ConfigError):
            SecAggConfig(**bad)


@pytest.mark.parametrize("modulus", [2**32, 2**48])
def test_ring_sums_give_the_weighted_mean_within_the_quantization_error(modulus):
    cfg = SecAggConfig(modulus_range=modulus)
    g = torch.Generator().manual_seed(0)
    updates = [
        {
            "w": {"param": torch.randn(50, 20, generator=g), "exp_avg": torch.rand(50, 20)},
            "steps": {"param": torch.tensor(7 + i)},
        }
        for i in range(5)
    ]
    weights = [10.0, 30.0, 100.0, 5.0, 55.0]
    layout = layout_of(updates[0])
    total = torch.zeros(50 * 20 * 2 + 2, dtype=torch.int64)
    for update, w in zip(updates, weights, strict=True):
        vector = encode_update(update, w, cfg, g)
        wire = to_wire(vector, layout, cfg)
        assert wire["steps"]["param"].dtype == cfg.wire_dtype
        assert torch.equal(from_wire(wire, layout, cfg), vector)
        total = (total + vector) % modulus
    like = {"w": torch.zeros(50, 20), "steps": torch.tensor(0)}
    mean, weight = decode_sum(total, layout, 5, cfg, like)
    factors = sum(weights) / cfg.max_weight
    step = 2 * cfg.clipping_range / cfg.quantization_range
    bound = (5 * step + 8 * 5 / cfg.quantization_range) / (factors - 5 / cfg.quantization_range)
    for field in ("param", "exp_avg"):
        ref = sum(u["w"][field] * w for u, w in zip(updates, weights, strict=True)) / sum(weights)
        assert (mean["w"][field] - ref).abs().max() <= bound
    assert abs(weight - sum(weights)) <= 5 * cfg.max_weight / cfg.quantization_range
    assert int(mean["steps"]["param"]) == 9  # the integer mean of 7..11
    with pytest.raises(ProtocolError, match="layout"):
        from_wire({"w": {"param": torch.zeros(3)}, "steps": {"param": torch.zeros(1)}}, layout, cfg)


def test_weights_above_max_weight_are_refused_before_anything_is_sent():
    cfg = SecAggConfig(max_weight=100.0)
    with pytest.raises(ConfigError, match="max_weight"):
        encode_update({"w": {"param": torch.zeros(3)}}, 101.0, cfg, torch.Generator())


def test_a_client_never_reveals_both_kinds_of_share_of_one_client():
    check = SecAggClient.check_unmask_request
    members = {"a", "b", "c", "d"}
    check("a", {"a", "b", "c"}, {"d"}, members, 2)  # a consistent request passes
    with pytest.raises(SecurityError, match="both the self-mask and the pairwise"):
        check("a", {"a", "b", "c"}, {"c"}, members, 2)
    with pytest.raises(SecurityError, match="dropout after it uploaded"):
        check("a", {"b", "c"}, {"a"}, members, 2)
    with pytest.raises(SecurityError, match="fewer than the threshold"):
        check("a", {"a"}, {"b"}, members, 2)
    with pytest.raises(SecurityError, match="not in the round"):
        check("a", {"a", "b", "x"}, set(), members, 2)


def test_masked_vectors_are_uniform_whatever_the_update():
    """One masked upload: every residue class of the ring is about equally likely."""
    cfg = SecAggConfig()
    g = torch.Generator().manual_seed(1)
    update = {"w": {"param": torch.full((20_000,), 0.5)}}  # a constant update
    vector = encode_update(update, 100.0, cfg, g)
    masked = (vector + crypto.mask_stream(os.urandom(32), vector.numel(), cfg.bits)) % 2**32
    counts = Counter((masked // 2**28).tolist())
    assert len(set(vector[:-1].tolist())) <= 2  # the update itself takes two values
    assert len(counts) == 16 and min(counts.values()) > 1000  # the masked one all 16 bins


@pytest.mark.parametrize("bits", [32, 48])
def test_masks_made_in_pieces_equal_the_whole_mask(bits):
    seed, other = os.urandom(32), os.urandom(32)
    n = crypto.MASK_PIECE * 2 + 1000
    whole = crypto.mask_stream(seed, n, bits)
    start = crypto.MASK_PIECE + 16
    assert torch.equal(crypto.mask_stream(seed, 500, bits, start), whole[start : start + 500])
    with pytest.raises(ConfigError, match="64-byte block"):
        crypto.mask_stream(seed, 10, bits, 3)
    vector = torch.randint(0, 2**bits, (n,), dtype=torch.int64)
    expected = (vector + whole - crypto.mask_stream(other, n, bits)) % 2**bits
    crypto.add_masks(vector, [(seed, 1), (other, -1)], bits)
    assert torch.equal(vector, expected)
