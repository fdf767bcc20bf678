"""Lossy compression hooks: error bounds, pass-through rules, validation, bytes.

Each test builds an aggregator and a collaborator Maintainer on an in-memory
network (no sockets) and runs their package/unpackage hooks and
received-data checks exactly as ``step()`` does (``Maintainer.receive``:
names, the unpackage hooks, then shapes).
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

import zmqfed.topo as topo
from zmqfed.core import Maintainer
from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.federated import MemoryNetwork
from zmqfed.functional import (
    CompressionStats,
    device_alignment,
    half_precision,
    int8_quantization,
    topk_sparsification,
)


def _state(seed: int = 0, n: int = 4096) -> dict[str, torch.Tensor]:
    """A float weight, a small float bias, an int buffer (like BatchNorm's counter)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(n, generator=g) * 3,
        "b": torch.randn(10, generator=g),
        "n": torch.tensor(7, dtype=torch.int64),
    }


@pytest.fixture
def nodes():
    """``make(agg_state, col_state) -> (aggregator, collaborator)`` Maintainers."""
    made: list[Maintainer] = []
    network = MemoryNetwork()

    def make(agg_state, col_state):
        star = topo.star(1, f"ipc:///memory/compress-{len(made)}")
        agg = Maintainer(topo.analysis(star, "aggregator")[0], agg_state, network=network)
        col = Maintainer(topo.analysis(star, "client0")[0], col_state, network=network)
        made.extend((agg, col))
        return agg, col

    yield make
    for m in made:
        m.close()


def upload(col: Maintainer, agg: Maintainer, optim=None):
    """The collaborator's hooks, the aggregator's check and hooks: (wire state, decoded)."""
    col.package(optim)
    sent = col.apply_hooks(col.packaged_data, unpackage=False)
    return sent, agg.receive(sent, "client0")


def download(agg: Maintainer, col: Maintainer):
    agg.package()
    sent = agg.apply_hooks(agg.packaged_data, unpackage=False)
    return sent, col.receive(sent, "aggregator")


def _copy(data):
    """A fresh nested dict (hooks edit the field dicts they are given)."""
    return {k: dict(v) for k, v in data.items()}


def nbytes(data) -> int:
    return sum(t.numel() * t.element_size() for s in data.values() for t in s.values())


# --------------------------------------------------------------------------- arguments


def test_bad_arguments_raise_config_error(nodes):
    agg, col = nodes(_state(), _state())
    with col:
        for fraction in (0, 0.0, -0.1, 1.5, float("nan"), True, "0.1", None):
            with pytest.raises(ConfigError, match="fraction"):
                topk_sparsification(fraction)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="error_feedback"):
            topk_sparsification(0.1, error_feedback="yes")  # type: ignore[arg-type]
        for dtype in (torch.float32, torch.int8, "int8", "float32"):
            with pytest.raises(ConfigError, match="dtype"):
                half_precision(dtype)
        for fields in ((), ("",), (1,)):
            with pytest.raises(ConfigError, match="fields"):
                int8_quantization(fields=fields)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="symmetric"):
            int8_quantization(symmetric="no")  # type: ignore[arg-type]
    for register in (half_precision, int8_quantization, topk_sparsification):
        with pytest.raises(ConfigError, match="with maintainer"):
            register()
    # the refused calls registered nothing
    sent, _ = upload(col, agg)
    assert all(s["param"].dtype in (torch.float32, torch.int64) for s in sent.values())


def test_one_compressor_per_direction(nodes):
    agg, col = nodes(_state(), _state())
    with col:
        half_precision()
        with pytest.raises(ConfigError, match="one compressor per direction"):
            int8_quantization()
        with pytest.raises(ConfigError, match="one compressor per direction"):
            topk_sparsification()
    # the collaborator's downloads are still free: decoders never conflict
    with col:
        int8_quantization(upload=False)
    # the aggregator: int8 for downloads, top-k decodes uploads
    with agg:
        int8_quantization(upload=False)
        topk_sparsification(0.1)
        with pytest.raises(ConfigError, match="downloads are already compressed"):
            half_precision()


def test_download_int8_with_topk_uploads(nodes):
    agg, col = nodes(_state(0), _state(1))
    with agg:
        int8_quantization()
        topk_sparsification(0.1)
    with col:
        int8_quantization(upload=False)
        topk_sparsification(0.1)
    sent, got = download(agg, col)
    assert sent["w"]["param"].dtype == torch.int8
    scale = float(sent["w"]["param.scale"])
    assert (got["w"]["param"] - agg.state_dict["w"]).abs().max() <= scale / 2 * (1 + 1e-6)
    col.data = got
    with torch.no_grad():
        col.state_dict["w"].copy_(got["w"]["param"] + 0.01)
    sent, back = upload(col, agg)
    assert "param.index" in sent["w"]
    assert back["w"]["param"].shape == agg.state_dict["w"].shape


# --------------------------------------------------------------------------- half precision


@pytest.mark.parametrize(
    ("dtype", "unit"), [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8), ("bf16", 2.0**-8)]
)
def test_half_precision_round_trip_error_bound(nodes, dtype, unit):
    x = _state()
    agg, col = nodes(_state(5), {k: v.clone() for k, v in x.items()})
    with agg:
        agg_stats = half_precision(dtype)
    with col:
        col_stats = half_precision(dtype)
    sent, got = upload(col, agg)
    wire = torch.bfloat16 if unit == 2.0**-8 else torch.float16
    assert sent["w"]["param"].dtype == wire and sent["b"]["param"].dtype == wire
    assert sent["n"]["param"].dtype == torch.int64  # integer buffer untouched
    for key in ("w", "b"):
        value = got[key]["param"]
        assert value.dtype == torch.float32
        err = (value - x[key]).abs()
        # round to nearest: relative error <= 2**-(mantissa bits + 1); fp16 subnormals absolute
        assert (err <= unit * x[key].abs() + 2.0**-25).all()
    assert (got["w"]["param"] - x["w"]).abs().max() > 0  # really lossy: the bound is not vacuous
    assert torch.equal(got["n"]["param"], x["n"])
    raw = nbytes(col.packaged_data)
    assert col_stats.raw_bytes_out == raw == agg_stats.raw_bytes_in
    assert col_stats.bytes_out == (4096 + 10) * 2 + 8 == agg_stats.bytes_in == nbytes(sent)
    assert col_stats.saved_bytes == raw - col_stats.bytes_out
    assert col_stats.ratio == pytest.approx(raw / col_stats.bytes_out)

    # downloads too: the aggregator serves cast, the collaborator casts back
    sent, got = download(agg, col)
    assert sent["w"]["param"].dtype == wire
    assert got["w"]["param"].dtype == torch.float32
    err = (got["w"]["param"] - agg.state_dict["w"]).abs()
    assert (err <= unit * agg.state_dict["w"].abs() + 2.0**-25).all()


def test_half_precision_fields_optimizer_state_and_overflow(nodes):
    x = _state()
    agg, col = nodes(_state(5), {k: v.clone() for k, v in x.items()})
    w = col.state_dict["w"]
    # what Maintainer.package reads of an optimizer (a real Adam's first step costs seconds)
    optim = SimpleNamespace(
        state={w: {"exp_avg": torch.randn(4096), "exp_avg_sq": torch.rand(4096)}},
        upload_keys=("exp_avg", "exp_avg_sq"),  # the optimizer-state contract
    )
    agg.upload_fields.update(optim.upload_keys)
    with agg:
        half_precision(torch.float16, fields=("param", "exp_avg"))
    with col:
        half_precision(torch.float16, fields=("param", "exp_avg"))
    sent, got = upload(col, agg, optim)
    assert sent["w"]["exp_avg"].dtype == torch.float16  # listed: cast
    assert sent["w"]["exp_avg_sq"].dtype == torch.float32  # not listed: untouched
    assert got["w"]["exp_avg"].dtype == torch.float32
    assert torch.equal(got["w"]["exp_avg_sq"], optim.state[w]["exp_avg_sq"])

    # beyond float16's range: sent as it is, not as inf
    with torch.no_grad():
        w[0] = 1e6
    sent, got = upload(col, agg)
    assert sent["w"]["param"].dtype == torch.float32
    assert torch.equal(got["w"]["param"], w.detach())


@pytest.mark.parametrize("register", [half_precision, int8_quantization])
def test_float_fields_of_integer_tensors_are_not_compressed(nodes, register):
    """The receiver refuses compressed data for integer tensors, so it is never sent."""
    x = _state()
    x["n"] = torch.arange(4096)  # an integer buffer large enough to be worth compressing
    agg, col = nodes({k: v.clone() for k, v in x.items()}, x)
    optim = SimpleNamespace(
        state={x["n"]: {"exp_avg": torch.randn(4096)}}, upload_keys=("exp_avg",)
    )
    agg.upload_fields.add("exp_avg")
    for m in (agg, col):
        with m:
            register(fields=("param", "exp_avg"))
    sent, got = upload(col, agg, optim)
    assert sent["n"]["exp_avg"].dtype == torch.float32 and set(sent["n"]) == {"param", "exp_avg"}
    assert torch.equal(got["n"]["exp_avg"], optim.state[x["n"]]["exp_avg"])
    assert sent["w"]["param"].dtype in (torch.float16, torch.int8)


def test_half_precision_flags_choose_what_is_sent(nodes):
    agg, col = nodes(_state(5), _state())
    with agg:
        half_precision(upload=False)  # downloads only; still decodes uploads
    with col:
        half_precision(upload=False)
    sent, _ = upload(col, agg)
    assert sent["w"]["param"].dtype == torch.float32
    sent, got = download(agg, col)
    assert sent["w"]["param"].dtype == torch.float16
    assert got["w"]["param"].dtype == torch.float32


# --------------------------------------------------------------------------- int8


@pytest.mark.parametrize("local_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_int8_symmetric_error_at_most_half_a_step(nodes, local_dtype):
    x = {k: v.to(local_dtype) if v.is_floating_point() else v for k, v in _state().items()}
    agg, col = nodes(
        {k: torch.zeros_like(v) for k, v in x.items()}, {k: v.clone() for k, v in x.items()}
    )
    with agg:
        stats = int8_quantization()
    with col:
        int8_quantization()
    sent, got = upload(col, agg)
    q, scale = sent["w"]["param"], sent["w"]["param.scale"]
    assert q.dtype == torch.int8 and q.shape == x["w"].shape
    assert scale.dtype == torch.float32 and scale.dim() == 0
    amax = float(x["w"].float().abs().max())
    assert float(scale) == pytest.approx(amax / 127, rel=1e-6)
    assert int(q.abs().max()) == 127
    assert set(got["w"]) == {"param"}  # the extra field is consumed
    value = got["w"]["param"]
    assert value.dtype == local_dtype
    err = (value.double() - x["w"].double()).abs().max()
    slack = 2.0**-8 * amax if local_dtype == torch.bfloat16 else 1e-6 * amax
    assert err <= float(scale) / 2 + slack
    assert err > float(scale) / 10  # lossy: the bound is tight, not vacuous
    # too small to pay for the scale's header entry, and integers: unchanged
    assert sent["b"]["param"].dtype == local_dtype and "param.scale" not in sent["b"]
    assert torch.equal(got["n"]["param"], x["n"])
    assert stats.bytes_in == 4096 + 4 + 10 * x["b"].element_size() + 8


def test_int8_affine_uses_the_range_and_beats_symmetric_off_centre(nodes):
    g = torch.Generator().manual_seed(3)
    x = {"w": 5 + torch.rand(4096, generator=g)}  # in [5, 6): far from 0
    agg, col = nodes({"w": torch.zeros(4096)}, {"w": x["w"].clone()})
    with agg:
        int8_quantization(symmetric=False)
    with col:
        int8_quantization(symmetric=False)
    sent, got = upload(col, agg)
    q = sent["w"]["param"]
    assert q.dtype == torch.uint8 and int(q.min()) == 0 and int(q.max()) == 255
    lo, hi = float(x["w"].min()), float(x["w"].max())
    assert float(sent["w"]["param.offset"]) == lo
    step = float(sent["w"]["param.scale"])
    assert step == pytest.approx((hi - lo) / 255, rel=1e-6)
    err = float((got["w"]["param"] - x["w"]).abs().max())
    assert err <= step / 2 + 1e-6
    assert err < (hi / 127) / 2 / 10  # symmetric's bound here is ~25x coarser


def test_int8_special_values(nodes):
    state = {"zero": torch.zeros(1000), "bad": torch.randn(1000), "empty": torch.zeros(0)}
    state["bad"][3] = float("inf")
    agg, col = nodes({k: v.clone() for k, v in state.items()}, state)
    with agg:
        int8_quantization()
    with col:
        int8_quantization()
    sent, got = upload(col, agg)
    assert sent["zero"]["param"].dtype == torch.int8
    assert torch.equal(got["zero"]["param"], state["zero"])  # exact, no 0/0
    assert sent["bad"]["param"].dtype == torch.float32  # inf: sent as it is
    assert torch.equal(got["bad"]["param"], state["bad"])
    assert got["empty"]["param"].numel() == 0


def test_int8_runs_outside_device_alignment(nodes):
    """device_alignment's unpackage (nice 0) casts 'param' to the local dtype:
    the decoder must run first, or int8 codes would be read as values."""
    x = _state()
    agg, col = nodes({k: torch.zeros_like(v) for k, v in x.items()}, x)
    for m in (agg, col):
        with m:
            device_alignment()
            int8_quantization()
    sent, got = upload(col, agg)
    assert sent["w"]["param"].dtype == torch.int8  # encoded after device_alignment's cast
    err = (got["w"]["param"] - x["w"]).abs().max()
    assert err <= float(sent["w"]["param.scale"]) / 2 * (1 + 1e-6)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"param": torch.zeros(4096, dtype=torch.int8), "param.scale": torch.ones(3)}, "one"),
        (
            {"param": torch.zeros(4096, dtype=torch.int8), "param.scale": torch.tensor(math.inf)},
            "finite",
        ),
        ({"param": torch.zeros(4096, dtype=torch.int16), "param.scale": torch.tensor(1.0)}, "int8"),
        ({"param": torch.zeros(4096, dtype=torch.int8), "param.scale": torch.tensor(1)}, "one"),
        ({"param": torch.zeros(4096), "param.offset": torch.tensor(1.0)}, "without"),
        (
            {
                "param": torch.zeros(4096, dtype=torch.int8),
                "param.scale": torch.tensor(1.0),
                "param.offset": torch.tensor(0.0),
            },
            "uint8",
        ),
        ({"param": torch.zeros(4096), "exp_avg.scale": torch.tensor(1.0)}, "without"),
    ],
)
def test_int8_malformed_data_is_refused(nodes, fields, match):
    agg, _ = nodes({"w": torch.zeros(4096)}, {"w": torch.zeros(4096)})
    with agg:
        int8_quantization()
    with pytest.raises(ProtocolError, match=match) as refused:
        agg.receive({"w": dict(fields)}, "client0")
    assert "'client0'" in str(refused.value)
    with pytest.raises(ProtocolError, match=match):  # the decoder refuses it on its own too
        agg.apply_hooks({"w": dict(fields)}, unpackage=True)


# --------------------------------------------------------------------------- top-k


def _topk_pair(nodes, fraction, *, error_feedback=True, n=1000):
    """Aggregator at ``ref``; collaborator downloaded ``ref`` and holds ``ref + delta``."""
    g = torch.Generator().manual_seed(11)
    ref = torch.randn(n, generator=g)
    # distinct magnitudes, mixed signs: the top k is unambiguous
    delta = torch.linspace(0.001, 1.0, n)[torch.randperm(n, generator=g)]
    delta *= torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    agg, col = nodes(
        {"w": ref.clone(), "n": torch.tensor(3)}, {"w": ref + delta, "n": torch.tensor(4)}
    )
    with agg:
        agg_stats = topk_sparsification(fraction)
    with col:
        col_stats = topk_sparsification(fraction, error_feedback=error_feedback)
    col.data = {"w": {"param": ref.clone()}, "n": {"param": torch.tensor(3)}}
    return agg, col, ref, delta, agg_stats, col_stats


def _scatter(sent, n):
    out = torch.zeros(n)
    out[sent["param.index"].long()] = sent["param"]
    return out


def test_topk_sends_exactly_the_k_largest_and_the_aggregator_adds_them(nodes):
    agg, col, ref, delta, agg_stats, col_stats = _topk_pair(nodes, 0.05)
    sent, got = upload(col, agg)
    k = math.ceil(0.05 * 1000)
    index = sent["w"]["param.index"]
    assert index.dtype == torch.int32 and index.shape == (k,)
    assert set(index.tolist()) == set(delta.abs().topk(k).indices.tolist())
    assert torch.allclose(sent["w"]["param"], delta[index.long()], atol=1e-6)
    assert torch.equal(sent["n"]["param"], torch.tensor(4))  # integer: dense, untouched
    assert set(got["w"]) == {"param"}
    kept = torch.zeros(1000, dtype=torch.bool)
    kept[index.long()] = True
    expected = ref + torch.where(kept, delta, torch.zeros(()))
    assert torch.allclose(got["w"]["param"], expected, atol=1e-6)
    # what is lost is at most the k-th largest change
    threshold = float(delta.abs().topk(k).values.min())
    assert (got["w"]["param"] - (ref + delta)).abs().max() < threshold
    assert col_stats.raw_bytes_out == 1000 * 4 + 8
    assert col_stats.bytes_out == k * (4 + 4) + 8 == agg_stats.bytes_in
    assert agg_stats.raw_bytes_in == 1000 * 4 + 8


def test_topk_error_feedback_sends_the_rest_later(nodes):
    agg, col, ref, delta, _, _ = _topk_pair(nodes, 0.1)
    order = delta.abs().argsort(descending=True)
    first, _ = upload(col, agg)
    assert set(first["w"]["param.index"].tolist()) == set(order[:100].tolist())
    # no further training (local == reference): only the residual is left to send,
    # so the next upload carries the next 100 largest changes, and so on
    with torch.no_grad():
        col.state_dict["w"].copy_(ref)
    total = _scatter(first["w"], 1000)
    for i in range(1, 10):
        sent, _ = upload(col, agg)
        assert set(sent["w"]["param.index"].tolist()) == set(
            order[100 * i : 100 * (i + 1)].tolist()
        )
        total += _scatter(sent["w"], 1000)
    assert torch.allclose(total, delta, atol=1e-6)  # every change arrived, exactly once
    sent, _ = upload(col, agg)
    assert sent["w"]["param"].abs().max() < 1e-6  # nothing left


def test_topk_without_error_feedback_forgets_the_rest(nodes):
    agg, col, ref, _, _, _ = _topk_pair(nodes, 0.1, error_feedback=False)
    upload(col, agg)
    with torch.no_grad():
        col.state_dict["w"].copy_(ref)
    sent, got = upload(col, agg)
    assert sent["w"]["param"].abs().max() == 0
    assert torch.equal(got["w"]["param"], ref)


def test_topk_is_upload_only(nodes):
    agg, col, ref, _, agg_stats, _ = _topk_pair(nodes, 0.01)
    sent, got = download(agg, col)
    assert set(sent["w"]) == {"param"} and sent["w"]["param"].shape == ref.shape
    assert torch.equal(got["w"]["param"], ref)
    assert agg_stats.raw_bytes_out == agg_stats.bytes_out == 0  # no encoder on the aggregator


@pytest.mark.parametrize("fraction", [1.0, 0.6])  # k * 8 bytes >= n * 4 bytes
def test_topk_dense_when_sparse_is_not_smaller(nodes, fraction):
    agg, col, ref, delta, _, stats = _topk_pair(nodes, fraction)
    sent, got = upload(col, agg)
    assert set(sent["w"]) == {"param"} and sent["w"]["param"].shape == ref.shape
    assert torch.allclose(got["w"]["param"], ref + delta)
    assert stats.ratio == 1.0


def test_topk_before_any_download_uploads_dense_and_warns(nodes, caplog):
    agg, col, ref, delta, _, _ = _topk_pair(nodes, 0.1)
    col.data = {}
    with caplog.at_level(logging.WARNING, logger="zmqfed.functional.compress"):
        sent, got = upload(col, agg)
        upload(col, agg)
    assert set(sent["w"]) == {"param"}
    assert torch.equal(got["w"]["param"], ref + delta)
    assert len([r for r in caplog.records if "no downloaded model" in r.message]) == 1


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"param": torch.ones(3), "param.index": torch.tensor([0, 1, 1000])}, "outside"),
        ({"param": torch.ones(3), "param.index": torch.tensor([-1, 1, 2])}, "outside"),
        ({"param": torch.ones(3), "param.index": torch.tensor([0.0, 1.0, 2.0])}, "int32"),
        ({"param": torch.ones(3), "param.index": torch.zeros(3, 1, dtype=torch.int64)}, "1-d"),
        ({"param": torch.ones(2), "param.index": torch.tensor([0, 1, 2])}, "one floating"),
        (
            {"param": torch.ones(3, dtype=torch.int64), "param.index": torch.tensor([0, 1, 2])},
            "one floating",
        ),
        ({"param": torch.ones(1001), "param.index": torch.arange(1001)}, "1001 sparse"),
        ({"param": torch.ones(1000), "exp_avg.index": torch.arange(3)}, "only 'param'"),
    ],
)
def test_topk_malformed_uploads_are_refused(nodes, fields, match):
    agg, _, *_ = _topk_pair(nodes, 0.1)
    data = {"w": fields, "n": {"param": torch.tensor(3)}}
    with pytest.raises(ProtocolError, match=match):
        agg.receive(data, "client0")
    with pytest.raises(ProtocolError, match=match):
        agg.apply_hooks({"w": dict(fields)}, unpackage=True)


def test_sparse_upload_refused_without_topk_on_the_aggregator(nodes):
    agg, col = nodes({"w": torch.zeros(1000)}, {"w": torch.ones(1000)})
    with col:
        topk_sparsification(0.1)
    col.data = {"w": {"param": torch.zeros(1000)}}
    col.package()
    sent = col.apply_hooks(col.packaged_data, unpackage=False)
    assert sent["w"]["param"].shape == (100,)
    with pytest.raises(ProtocolError, match="shape"):
        agg.receive(_copy(sent), "client0")
    with agg:
        int8_quantization()  # another decoder does not make sparse uploads acceptable
    with pytest.raises(ProtocolError):
        agg.receive(_copy(sent), "client0")
    with agg:
        topk_sparsification(0.1)
    got = agg.receive(_copy(sent), "client0")["w"]["param"]
    index = sent["w"]["param.index"].long()
    assert torch.equal(got[index], torch.ones(100)) and float(got.sum()) == 100


def test_stats_type_and_reset():
    stats = CompressionStats("x", raw_bytes_out=100, bytes_out=25, bytes_in=3, raw_bytes_in=9)
    assert (stats.saved_bytes, stats.ratio) == (75, 4.0)
    stats.reset()
    assert (stats.raw_bytes_out, stats.bytes_out, stats.bytes_in, stats.raw_bytes_in) == (0,) * 4
    assert stats.ratio == 1.0
