"""Paillier keys, fixed point, packing, ciphertext checks and the aggregation rule, in process."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

import zmqfed.functional.paillier as paillier
from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.functional import (
    Ciphertext,
    PrivateKey,
    PublicKey,
    float_to_long,
    install_aggregate,
    key_gen,
    long_to_float,
    paillier_aggregation,
    paillier_dec,
    paillier_enc,
)


@pytest.fixture(scope="module")
def keys() -> tuple[PublicKey, PrivateKey]:
    return key_gen(1024)  # the arithmetic of 2048-bit keys, faster


def mean_of(private: PrivateKey, *tensors: torch.Tensor) -> torch.Tensor:
    total = sum(paillier_enc(private.public_key, float_to_long(private, t)) for t in tensors)
    assert isinstance(total, Ciphertext) and total.summands == len(tensors)
    return long_to_float(private, paillier_dec(private, total), total.summands)


def test_keys_save_and_load(keys: tuple[PublicKey, PrivateKey], tmp_path: Path) -> None:
    public, private = keys
    assert private.public_key == public and public.key_size == 1024
    assert (public.slot_bytes, public.slots) == (5, 25)  # 127 plaintext bytes / 5
    public.save(tmp_path / "pub.json")
    private.save(tmp_path / "priv.json")
    assert PublicKey.load(tmp_path / "pub.json") == public
    assert PrivateKey.load(tmp_path / "priv.json") == private
    assert stat.S_IMODE(os.stat(tmp_path / "priv.json").st_mode) == 0o600
    assert "p" not in json.loads((tmp_path / "pub.json").read_text())
    assert str(private.p) not in repr(private)
    with pytest.raises(ConfigError, match="expected a zmqfed-paillier-public-key"):
        PublicKey.load(tmp_path / "priv.json")
    with pytest.raises(ConfigError, match="n_lwe belonged to OpenFed's LWE-based scheme"):
        key_gen(n_lwe=3000)
    with pytest.raises(ConfigError, match="key_size must be an even number of bits >= 1024"):
        key_gen(512)


def test_encrypted_mean_matches_the_plain_one(keys: tuple[PublicKey, PrivateKey]) -> None:
    public, private = keys
    gen = torch.Generator().manual_seed(0)
    updates = [torch.randn(7, 11, generator=gen) * 2 for _ in range(5)]
    got = mean_of(private, *updates)
    want = torch.stack([u.double() for u in updates]).mean(0)
    assert got.shape == (7, 11)
    # rounding to 2**-24 per value, averaged: within half a step
    assert float((got - want).abs().max()) <= 2.0**-25 + 1e-12
    # the key holder's CRT encryption decrypts the same
    c = paillier_enc(private, float_to_long(public, updates[0]))
    torch.testing.assert_close(
        long_to_float(private, paillier_dec(private, c), 1),
        updates[0].double(),
        atol=2.0**-24,
        rtol=0,
    )
    empty = paillier_enc(public, float_to_long(public, torch.zeros(0)))
    assert (
        empty.data.shape == (0, public.ciphertext_bytes)
        and paillier_dec(private, empty).numel() == 0
    )


def test_ranges_and_limits(keys: tuple[PublicKey, PrivateKey]) -> None:
    public, private = keys
    edge = torch.tensor([-8.0, 8.0, 0.0])
    torch.testing.assert_close(mean_of(private, edge, edge), edge.double())
    with pytest.raises(ValueError, match=r"cannot encrypt 9\.0.*\[-8, 8\]"):
        float_to_long(public, torch.tensor([1.0, -9.0]))
    with pytest.raises(ValueError, match="cannot encrypt nan"):
        float_to_long(public, torch.tensor([float("nan")]))
    small = PrivateKey(private.p, private.q, max_summands=2)
    a = paillier_enc(small.public_key, float_to_long(small, torch.ones(3)))
    with pytest.raises(ConfigError, match="overflows the key's slots"):
        _ = a + a + a
    other_public, _ = key_gen(1024)
    b = paillier_enc(other_public, float_to_long(other_public, torch.ones(3)))
    with pytest.raises(ConfigError, match="different keys"):
        _ = paillier_enc(public, float_to_long(public, torch.ones(3))) + b
    with pytest.raises(ConfigError, match="cannot be decrypted with key"):
        paillier_dec(private, b)


def test_received_ciphertexts_are_checked(keys: tuple[PublicKey, PrivateKey]) -> None:
    public, _ = keys
    c = paillier_enc(public, float_to_long(public, torch.ones(30)))
    marker = c.marker()
    assert marker.tolist() == [1, 30]
    assert Ciphertext.from_wire(c.data, marker, public).shape == (30,)
    with pytest.raises(ProtocolError, match=r"must be uint8 \[2, 256\]"):
        Ciphertext.from_wire(c.data[:1], marker, public)
    with pytest.raises(ProtocolError, match="int64"):
        Ciphertext.from_wire(c.data, marker.to(torch.int32), public)
    with pytest.raises(ProtocolError, match=r"sums 1\.\.4095 updates"):
        Ciphertext.from_wire(c.data, torch.tensor([0, 30]), public)
    too_big = torch.full_like(c.data, 255)  # >= n**2
    with pytest.raises(ProtocolError, match="not below n\\*\\*2"):
        _ = Ciphertext.from_wire(too_big, marker, public).ints


def test_a_ciphertext_reveals_nothing_usable(keys: tuple[PublicKey, PrivateKey]) -> None:
    public, private = keys
    gen = torch.Generator().manual_seed(1)
    values = torch.rand(300, generator=gen) * 16 - 8
    cts = [paillier_enc(public, float_to_long(public, v.reshape(1))) for v in values]
    data = torch.stack([c.data[0] for c in cts]).double()  # [300 ciphertexts, 128 bytes]

    def max_correlation(features: torch.Tensor) -> float:
        x = (values.double() - values.double().mean()) / values.double().std()
        f = features - features.mean(0)
        f = f / f.std(0).clamp_min(1e-12)
        return float((x @ f / (len(x) - 1)).abs().max())

    # every ciphertext byte position, and the ciphertext as a number: about 0
    as_number = torch.tensor([int(c.ints[0]) / public.nsquare for c in cts], dtype=torch.float64)[
        :, None
    ]
    assert max_correlation(data) < 0.3  # 128 noise correlations of 300 samples stay below ~0.25
    assert max_correlation(as_number) < 0.3
    # the same test sees the plaintext through an encryption without randomness
    deterministic = [
        (1 + int(float_to_long(public, v.reshape(1))) * public.n) % public.nsquare for v in values
    ]
    raw = torch.tensor(
        [list(m.to_bytes(public.ciphertext_bytes, "little")) for m in deterministic]
    ).double()
    assert max_correlation(raw) > 0.9
    # two encryptions of the same value differ, and both decrypt to it
    again = paillier_enc(public, float_to_long(public, values[:1]))
    assert not torch.equal(again.data, cts[0].data)
    assert paillier_dec(private, again).tolist() == paillier_dec(private, cts[0]).tolist()


def test_pure_python_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paillier, "gmpy2", None)
    monkeypatch.setattr(paillier, "_mpz", int)
    monkeypatch.setattr(paillier, "_powmod", pow)
    public, private = key_gen(1024)
    assert isinstance(private._hp, int) and type(public._n) is int
    x = torch.linspace(-3, 3, 60)
    torch.testing.assert_close(
        mean_of(private, x, -x), torch.zeros(60, dtype=torch.float64), atol=1e-7, rtol=0
    )
    c = paillier_enc(private, float_to_long(public, x))  # CRT randomness, in Python ints
    torch.testing.assert_close(
        long_to_float(private, paillier_dec(private, c), 1), x.double(), atol=2.0**-24, rtol=0
    )


def test_aggregation_blind_and_with_the_private_key(keys: tuple[PublicKey, PrivateKey]) -> None:
    public, private = keys
    w = torch.zeros(4, 2, requires_grad=True)
    count = torch.tensor(5)  # an integer buffer: sent in the clear
    uploads = [torch.full((4, 2), 1.0), torch.full((4, 2), 2.0)]

    def update(t: torch.Tensor, n: int) -> dict:
        ct = paillier_enc(public, float_to_long(public, t))
        placeholder = torch.zeros(()).expand(4, 2)
        return {w: {"param": placeholder, "param.paillier": ct}, count: {"param": torch.tensor(n)}}

    data_list = [update(uploads[0], 7), update(uploads[1], 9)]
    with pytest.raises(ConfigError, match="needs private_key"):
        paillier_aggregation(data_list)
    blind = paillier_aggregation(data_list, public_key=public)
    total = blind[w]["param.paillier"]
    assert isinstance(total, Ciphertext) and total.summands == 2 and w.grad is None
    assert paillier._served.get(w) == {"param": total}  # what the next downloads carry
    assert int(count) == 5  # without optimizers the rule only computes
    install_aggregate(blind)
    assert int(count) == 9  # the clear buffer takes the (integer) aggregate as usual
    optim = torch.optim.SGD([w], lr=1.0)
    states = paillier_aggregation(data_list, private, None, optim)
    torch.testing.assert_close(states[w]["param"], torch.full((4, 2), 1.5))
    optim.step()
    torch.testing.assert_close(w.detach(), torch.full((4, 2), 1.5))
    assert paillier._served.get(w) == {}  # the model is served in the clear again


def test_api_calls_openfed_rules_by_keyword() -> None:
    from zmqfed.functional import call_rule

    seen = {}

    def openfed_rule(data_list, private_key, meta_list=None, optim_list=None):
        seen.update(
            data_list=data_list, private_key=private_key, meta_list=meta_list, optim_list=optim_list
        )

    call_rule(openfed_rule, "D", "M", "O", private_key="K")
    assert seen == {"data_list": "D", "private_key": "K", "meta_list": "M", "optim_list": "O"}

    def positional(a, b, c):
        seen["positional"] = (a, b, c)

    call_rule(positional, "D", "M", "O")
    assert seen["positional"] == ("D", "M", "O")
