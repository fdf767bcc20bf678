"""Partitioners, PartitionerDataset and the scikit-learn toy datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import zmqfed.data
from zmqfed.data import (
    DirichletPartitioner,
    IIDPartitioner,
    PartitionerDataset,
    PowerLawPartitioner,
    ShardPartitioner,
    breast_cancer_dataset,
    digits_dataset,
    wine_dataset,
)
from zmqfed.errors import ConfigError


@pytest.fixture(scope="module")
def digits():
    return digits_dataset(train=True)


def test_all_is_pinned():
    assert sorted(zmqfed.data.__all__) == [
        "DirichletPartitioner",
        "FederatedDataset",
        "IIDPartitioner",
        "LabeledTensorDataset",
        "Partitioner",
        "PartitionerDataset",
        "PowerLawPartitioner",
        "ShardPartitioner",
        "breast_cancer_dataset",
        "digits_dataset",
        "samples_distribution",
        "wine_dataset",
    ]


# ---------------------------------------------------------------------- datasets


def test_digits_dataset(digits):
    test = digits_dataset(train=False)
    assert len(digits) + len(test) == 1797
    assert len(test) == pytest.approx(1797 * 0.25, abs=1)
    assert digits.data.shape == (len(digits), 64) and digits.data.dtype == torch.float32
    assert float(digits.data.min()) >= 0.0 and float(digits.data.max()) == 1.0
    assert digits.targets.dtype == torch.int64 and set(digits.targets.tolist()) == set(range(10))
    assert digits.classes == [str(i) for i in range(10)]
    x, y = digits[3]
    assert x.shape == (64,) and y.dtype == torch.int64
    again = digits_dataset(train=True)
    assert torch.equal(again.data, digits.data) and torch.equal(again.targets, digits.targets)
    other = digits_dataset(train=True, seed=1)
    assert not torch.equal(other.targets, digits.targets)
    # stratified: every class keeps roughly its share in the test split
    counts = np.bincount(test.targets.numpy(), minlength=10)
    assert counts.min() >= 40
    with pytest.raises(ConfigError, match="test_fraction"):
        digits_dataset(test_fraction=1.0)


@pytest.mark.parametrize(
    ("factory", "n", "features", "classes"),
    [(breast_cancer_dataset, 569, 30, 2), (wine_dataset, 178, 13, 3)],
)
def test_other_toy_datasets(factory, n, features, classes):
    train, test = factory(train=True), factory(train=False)
    assert len(train) + len(test) == n
    assert train.data.shape[1] == features and len(train.classes) == classes
    assert float(train.data.min()) == 0.0 and float(train.data.max()) == 1.0


# ------------------------------------------------------------------- partitioners

PARTITIONERS = [
    IIDPartitioner(seed=0),
    DirichletPartitioner(alpha=0.5, min_samples=10, seed=0),
    PowerLawPartitioner(seed=0, min_samples=10),
    ShardPartitioner(classes_per_part=2, seed=0),
]


@pytest.mark.parametrize("partitioner", PARTITIONERS, ids=lambda p: type(p).__name__)
def test_partitioners_deterministic_disjoint_complete(partitioner, digits):
    targets = digits.targets
    parts = partitioner(10, targets)
    assert len(parts) == 10
    assert parts == partitioner(10, targets)  # same seed, same split
    assert parts == partitioner(10, targets.numpy().tolist())  # any targets form
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))  # disjoint
    assert set(flat) == set(range(len(targets)))  # every sample used
    assert all(p == sorted(p) for p in parts)
    assert min(len(p) for p in parts) >= partitioner.min_samples
    reseeded = type(partitioner)(**{**vars(partitioner), "seed": 1})
    assert reseeded(10, targets) != parts


def test_openfed_index_list_input_matches_targets(digits):
    t = digits.targets.numpy()
    index_list = [np.flatnonzero(t == c) for c in range(10)]
    part = DirichletPartitioner(alpha=1.0, seed=3)
    assert part(5, index_list) == part(5, t)
    with pytest.raises(ConfigError, match="overlap"):
        part(5, [np.array([0, 1]), np.array([1, 2])])


def test_iid_is_balanced_and_stratified(digits):
    parts = IIDPartitioner(seed=0)(7, digits.targets)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    t = digits.targets.numpy()
    global_share = np.bincount(t, minlength=10) / len(t)
    for p in parts:
        share = np.bincount(t[p], minlength=10) / len(p)
        assert np.abs(share - global_share).max() < 0.02
    # a sample count works for IID
    assert sorted(i for p in IIDPartitioner(seed=0)(3, 10) for i in p) == list(range(10))


def skew(parts, targets):
    t = np.asarray(targets)
    g = np.bincount(t, minlength=10) / len(t)
    return np.mean(
        [0.5 * np.abs(np.bincount(t[p], minlength=10) / len(p) - g).sum() for p in parts]
    )


def test_dirichlet_lower_alpha_is_more_skewed(digits):
    t = digits.targets.numpy()
    s = {
        a: skew(DirichletPartitioner(alpha=a, min_samples=5, seed=0)(10, t), t)
        for a in (0.1, 1.0, 100.0)
    }
    assert s[0.1] > s[1.0] > s[100.0]
    assert s[0.1] > 0.4 and s[100.0] < 0.1


def test_shard_and_power_law_limit_classes_per_part(digits):
    t = digits.targets.numpy()
    power = PowerLawPartitioner(seed=0, min_samples=10, min_classes=2)(20, t)
    assert max(len(set(t[p].tolist())) for p in power) == 2
    # a shard may straddle two classes, so a part holds at most 2 x classes_per_part
    shards = ShardPartitioner(classes_per_part=2, seed=0)(20, t)
    n_classes = [len(set(t[p].tolist())) for p in shards]
    assert max(n_classes) <= 4 and np.mean(n_classes) <= 3.0
    sizes = [len(p) for p in PowerLawPartitioner(seed=0, min_samples=10)(20, t)]
    assert max(sizes) > 3 * min(sizes)  # heavy-tailed


def test_min_samples_errors(digits):
    t = digits.targets
    with pytest.raises(ConfigError, match="at least 100 samples"):
        DirichletPartitioner(min_samples=100)(50, t)
    with pytest.raises(ConfigError, match="draws"):
        DirichletPartitioner(alpha=0.01, min_samples=60, seed=0, max_retries=3)(20, t)
    with pytest.raises(ConfigError, match="too few"):
        PowerLawPartitioner(min_samples=100, min_classes=1)(12, t)
    with pytest.raises(ConfigError, match="shards"):
        ShardPartitioner(classes_per_part=2, min_samples=0)(1000, t)
    with pytest.raises(ConfigError, match="targets"):
        DirichletPartitioner()(3, 100)
    with pytest.raises(ConfigError, match="integer"):
        IIDPartitioner(seed=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="alpha"):
        DirichletPartitioner(alpha=0)
    with pytest.raises(ConfigError, match="labels"):
        IIDPartitioner()(2, np.array([0.5, 1.5]))


# ------------------------------------------------------------- PartitionerDataset


def test_partitioner_dataset(digits, capsys):
    ds = PartitionerDataset(
        digits, total_parts=4, partitioner=DirichletPartitioner(alpha=0.5, seed=0)
    )
    assert ds.total_parts == 4 and ds.part_id == 0 and ds.total_samples() == len(digits)
    ds.set_part_id(2)
    assert ds.part_id == 2 and len(ds) == len(ds.parts_index_list[2])
    x, y = ds[0]
    j = ds.parts_index_list[2][0]
    assert torch.equal(x, digits.data[j]) and int(y) == int(digits.targets[j])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ConfigError, match="part_id"):
        ds.set_part_id(4)
    rows = ds.samples_distribution(verbose=True)
    assert len(rows) == 4 and all(len(r) == 10 for r in rows)
    assert [sum(r) for r in rows] == [len(p) for p in ds.parts_index_list]
    out = capsys.readouterr().out
    assert "part" in out and "total" in out and str(len(digits)) in out


class Plain(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.tensor([float(i)])


def test_dataset_without_targets():
    with pytest.raises(ConfigError, match="'targets' or 'classes'"):
        PartitionerDataset(Plain(), 3, DirichletPartitioner(min_samples=1))
    ds = PartitionerDataset(Plain(), 3, IIDPartitioner(seed=0))
    assert sum(len(p) for p in ds.parts_index_list) == 12
    assert ds.samples_distribution(verbose=False) == [[4], [4], [4]]


def test_targets_must_fit_classes():
    bad = Plain()
    bad.targets = torch.tensor([0, 1, 5] * 4)  # type: ignore[attr-defined]
    bad.classes = ["a", "b"]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        PartitionerDataset(bad, 2, IIDPartitioner())


def test_openfed_positional_power_law_arguments():
    # OpenFed's order: min_samples, min_classes, mean, sigma
    p = PowerLawPartitioner(5, 3, 0.5, 1.0)
    assert (p.min_samples, p.min_classes, p.mean, p.sigma) == (5, 3, 0.5, 1.0)
