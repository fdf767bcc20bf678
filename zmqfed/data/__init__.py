"""Federated datasets and partitioners (IID, Dirichlet, power law, shards) plus small real datasets."""

from __future__ import annotations

from zmqfed.data.datasets import FederatedDataset, PartitionerDataset, samples_distribution
from zmqfed.data.partitioner import (
    DirichletPartitioner,
    IIDPartitioner,
    Partitioner,
    PowerLawPartitioner,
    ShardPartitioner,
)
from zmqfed.data.toy import (
    LabeledTensorDataset,
    breast_cancer_dataset,
    digits_dataset,
    wine_dataset,
)

__all__ = [
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
