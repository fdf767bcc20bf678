"""Small real datasets that ship with scikit-learn (no download), as torch datasets.

For tests, examples and simulations: ``digits_dataset`` (8x8 handwritten
digits, 1797 samples, 10 classes), ``breast_cancer_dataset`` (569 samples, 30
features, 2 classes) and ``wine_dataset`` (178 samples, 13 features, 3
classes). Each returns a :class:`LabeledTensorDataset` with ``targets`` and
``classes``, ready for :class:`~zmqfed.data.PartitionerDataset`.
scikit-learn is imported only when one of these is called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from zmqfed.errors import ConfigError

__all__ = ["LabeledTensorDataset", "breast_cancer_dataset", "digits_dataset", "wine_dataset"]


class LabeledTensorDataset(Dataset):
    """Features and labels held as tensors; items are ``(features[i], targets[i])``.

    Attributes
    ----------
    data:
        float32 tensor ``(n, features)``.
    targets:
        int64 tensor ``(n,)`` of labels ``0 .. len(classes) - 1``.
    classes:
        Class names.
    """

    def __init__(self, data: Tensor, targets: Tensor, classes: Sequence[str]) -> None:
        if data.shape[0] != targets.shape[0]:
            raise ConfigError(f"{data.shape[0]} samples but {targets.shape[0]} targets")
        self.data = data
        self.targets = targets
        self.classes = list(classes)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.data[index], self.targets[index]

    def __repr__(self) -> str:
        return f"LabeledTensorDataset(samples={len(self)}, features={self.data.shape[1:]}, classes={len(self.classes)})"


def _split(
    loader: Callable[[], Any],
    train: bool,
    test_fraction: float,
    seed: int,
    scale: Callable[[np.ndarray, np.ndarray], np.ndarray],
    classes: Callable[[Any], Sequence[str]],
) -> LabeledTensorDataset:
    from sklearn.model_selection import train_test_split

    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = loader()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=float(test_fraction), random_state=int(seed), stratify=y
    )
    x = scale(x, x[idx_train])
    idx = np.sort(idx_train if train else idx_test)
    return LabeledTensorDataset(
        torch.from_numpy(x[idx].astype(np.float32)),
        torch.from_numpy(y[idx]),
        classes(bunch),
    )


def _min_max(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Scale each feature to [0, 1] with the training split's min and max."""
    lo, hi = reference.min(axis=0), reference.max(axis=0)
    return (x - lo) / np.where(hi > lo, hi - lo, 1.0)


def digits_dataset(
    train: bool = True, test_fraction: float = 0.25, seed: int = 0
) -> LabeledTensorDataset:
    """scikit-learn's handwritten digits: 64 float32 features in [0, 1] (pixel / 16), 10 classes.

    The train/test split is stratified and fixed by ``seed``; ``train``
    selects which side is returned.
    """
    from sklearn.datasets import load_digits

    return _split(
        load_digits,
        train,
        test_fraction,
        seed,
        lambda x, _: x / 16.0,
        lambda b: [str(int(n)) for n in b.target_names],
    )


def breast_cancer_dataset(
    train: bool = True, test_fraction: float = 0.25, seed: int = 0
) -> LabeledTensorDataset:
    """Wisconsin breast cancer: 30 features min-max scaled by the train split (test values may leave [0, 1])."""
    from sklearn.datasets import load_breast_cancer

    return _split(
        load_breast_cancer,
        train,
        test_fraction,
        seed,
        _min_max,
        lambda b: [str(n) for n in b.target_names],
    )


def wine_dataset(
    train: bool = True, test_fraction: float = 0.25, seed: int = 0
) -> LabeledTensorDataset:
    """UCI wine: 13 features min-max scaled by the train split, 3 classes."""
    from sklearn.datasets import load_wine

    return _split(
        load_wine, train, test_fraction, seed, _min_max, lambda b: [str(n) for n in b.target_names]
    )
