"""CKKS aggregation (TenSEAL): the arithmetic, the wire checks, the keys, what a ciphertext shows."""

from __future__ import annotations

import contextlib
import stat
from pathlib import Path

import pytest
import torch

pytest.importorskip("tenseal")  # the `he` extra; `make test` installs it

import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.federated import MemoryNetwork
from zmqfed.functional import CKKSKeys, ckks_aggregation, ckks_key_gen, ckks_package
from zmqfed.functional.ckks import CKKSCiphertext, CKKSScheme


@pytest.fixture(scope="module")
def keys() -> tuple[CKKSKeys, CKKSKeys]:
    return ckks_key_gen()


def test_sum_decrypts_to_the_mean(keys):
    public, secret = keys
    gen = torch.Generator().manual_seed(0)
    updates = [
        torch.randn(3, 5000, generator=gen) for _ in range(5)
    ]  # 15,000 values: 4 ciphertexts
    aggregator, holder = CKKSScheme(public), CKKSScheme(secret)
    total = None
    for u in updates:  # as on the aggregator: rebuilt from the wire, added without a key
        c = holder.encrypt(u)
        received = aggregator.from_wire(c.data, c.marker())
        total = received if total is None else total + received
    assert total.summands == 5 and len(total.vectors) == 4
    back = holder.from_wire(total.data, total.marker())
    mean = torch.stack(updates).double().mean(0)
    assert float((holder.decrypt_mean(back) - mean).abs().max()) < 1e-6


def test_the_aggregator_context_holds_no_secret_key(keys):
    public, secret = keys
    assert secret.has_secret_key and not public.has_secret_key
    assert not public.context.is_private()
    assert public.fingerprint == secret.fingerprint
    c = CKKSScheme(secret).encrypt(torch.ones(10))
    received = CKKSScheme(public).from_wire(c.data, c.marker())  # as the aggregator holds it
    with pytest.raises(ConfigError, match="secret CKKS key"):
        CKKSScheme(public).decrypt_mean(received)
    with pytest.raises(ValueError, match="secret_key"):
        received.vectors[0].decrypt()  # TenSEAL itself finds no key in the context


def test_keys_save_and_load(keys, tmp_path: Path):
    public, secret = keys
    public.save(tmp_path / "public.ckks")
    secret.save(tmp_path / "secret.ckks")
    assert stat.S_IMODE((tmp_path / "secret.ckks").stat().st_mode) == 0o600
    loaded_public = CKKSKeys.load(tmp_path / "public.ckks")
    loaded_secret = CKKSKeys.load(tmp_path / "secret.ckks")
    assert not loaded_public.has_secret_key and loaded_secret.has_secret_key
    assert loaded_public.key_id == public.key_id == loaded_secret.key_id
    c = CKKSScheme(loaded_public).encrypt(torch.full((7,), 0.25))
    back = CKKSScheme(secret).from_wire(c.data, c.marker())
    assert float((CKKSScheme(secret).decrypt_mean(back) - 0.25).abs().max()) < 1e-6
    (tmp_path / "junk").write_bytes(b"not a context")
    with pytest.raises(ConfigError, match="not a TenSEAL CKKS context"):
        CKKSKeys.load(tmp_path / "junk")


def test_malformed_ciphertexts_are_refused(keys):
    public, secret = keys
    scheme = CKKSScheme(public)
    c = CKKSScheme(secret).encrypt(torch.randn(5000))
    data, marker = c.data, c.marker()
    other = ckks_key_gen()[1]
    foreign = CKKSScheme(other).encrypt(torch.randn(5000))

    def with_marker(**change: int) -> torch.Tensor:
        m = marker.clone()
        for index, value in change.items():
            m[int(index[1:])] = value
        return m

    cases = [
        (data.to(torch.int8), marker, "uint8"),
        (data, marker.to(torch.int32), "int64"),
        (data, with_marker(i0=0), "sums 1"),
        (data, with_marker(i1=12345), "another key"),
        (data, with_marker(i3=10**9), "ciphertexts, not 2"),  # a huge shape for 2 ciphertexts
        (data[:-1], marker, "add up to"),
        (data, with_marker(i4=10), "must take"),  # a tiny ciphertext
        (torch.zeros_like(data), marker, "does not parse"),
        (foreign.data, foreign.marker(), "another key"),
    ]
    for d, m, match in cases:
        with pytest.raises(ProtocolError, match=match):
            scheme.from_wire(d, m)
    # a foreign ciphertext relabelled with this key id is refused by SEAL's own checks or decrypts to noise,
    # never crashes
    relabelled = foreign.marker().clone()
    relabelled[1] = public.key_id
    with contextlib.suppress(ProtocolError):
        scheme.from_wire(foreign.data, relabelled)


def test_a_ciphertext_reveals_nothing_usable(keys):
    public, _ = keys
    gen = torch.Generator().manual_seed(1)
    values = torch.rand(300, generator=gen) * 2 - 1
    scheme = CKKSScheme(public)  # anyone with the public key encrypts
    blobs = [scheme.encrypt(torch.full((4096,), float(v))).blobs[0] for v in values]
    width = min(len(b) for b in blobs)
    positions = torch.linspace(64, width - 1, 256).long()  # byte positions across the ciphertext

    def max_correlation(features: torch.Tensor) -> float:
        x = (values.double() - values.double().mean()) / values.double().std()
        f = features - features.mean(0)
        f = f / f.std(0).clamp_min(1e-12)
        return float((x @ f / (len(x) - 1)).abs().max())

    data = torch.tensor([list(b[:width]) for b in blobs], dtype=torch.float64)[:, positions]
    summary = torch.tensor([[len(b), sum(b[64:4160]) / 4096] for b in blobs], dtype=torch.float64)
    assert max_correlation(data) < 0.3  # 256 noise correlations of 300 samples stay below ~0.25
    assert max_correlation(summary) < 0.3
    # the same statistic sees the value in an 8-bit fixed-point encoding of it
    plain = torch.round((values + 1) * 127).to(torch.float64)[:, None]
    assert max_correlation(plain) > 0.9
    # two encryptions of the same value differ
    again = scheme.encrypt(torch.full((4096,), float(values[0]))).blobs[0]
    assert again != blobs[0]


def _maintainers(network: MemoryNetwork) -> tuple[Maintainer, Maintainer, dict[str, torch.Tensor]]:
    star = topo.star(1, "ipc:///memory/ckks")
    state = {"0.weight": torch.randn(4, 3), "1.weight": torch.randn(2, 4), "steps": torch.tensor(3)}
    agg = Maintainer(topo.analysis(star, "aggregator")[0], state, network=network)
    col = Maintainer(
        topo.analysis(star, "client0")[0], {k: v.clone() for k, v in state.items()}, network=network
    )
    return agg, col, state


def test_layers_select_what_is_encrypted_and_aggregator_refuses_secret_keys(keys):
    public, secret = keys
    agg, col, _ = _maintainers(MemoryNetwork())
    with col:
        ckks_package(secret, layers=["1.*"])
    col.package()
    sent = col.apply_hooks(col.packaged_data, unpackage=False)
    assert set(sent["1.weight"]) == {"param", "param.ckks"}
    assert sent["1.weight"]["param"].dtype == torch.uint8
    assert set(sent["0.weight"]) == {"param"} and sent["0.weight"]["param"].dtype == torch.float32
    assert sent["steps"]["param"].dtype == torch.int64  # integers are never encrypted
    with agg, pytest.raises(ConfigError, match="must not hold the secret key"):
        ckks_package(secret)
    with pytest.raises(ConfigError, match="must not hold the secret key"):
        ckks_aggregation([], keys=secret)
    with agg:
        ckks_package(public)
    received = agg.receive(sent, "client0")
    assert isinstance(received["1.weight"]["param.ckks"], CKKSCiphertext)
    assert received["1.weight"]["param"].stride() == (0, 0)  # a placeholder: nothing to read
    with pytest.raises(ConfigError, match="layers must be name patterns"), col:
        ckks_package(secret, layers=[""])
    agg.close()
    col.close()


def test_blind_aggregation_installs_only_the_clear_part(keys):
    public, secret = keys
    network = MemoryNetwork()
    agg, col, state = _maintainers(network)
    with col:
        ckks_package(secret, layers=["1.*"])
    with agg:
        ckks_package(public)
    params = [state["0.weight"].requires_grad_(), state["1.weight"].requires_grad_()]
    optim = torch.optim.SGD(params, lr=1.0)
    col.package()
    upload = agg.receive(col.apply_hooks(col.packaged_data, unpackage=False), "client0")
    agg.record_upload(upload, {}, "c")
    agg.record_upload(upload, {}, "c")
    result = ckks_aggregation(agg.data_list, agg.meta_list, optim_list=optim, keys=public)
    w1 = state["1.weight"]
    assert (
        isinstance(result[w1]["param.ckks"], CKKSCiphertext)
        and result[w1]["param.ckks"].summands == 2
    )
    # the encrypted layer gets no gradient (it cannot be read); the clear one its pseudo-gradient
    assert w1.grad is None and state["0.weight"].grad is not None
    # ciphertexts are served, never loaded as optimizer state (nor checkpointed with it)
    assert all(isinstance(v, torch.Tensor) for s in optim.state.values() for v in s.values())
    agg.close()
    col.close()
