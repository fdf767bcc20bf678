"""Partitioners: split a labelled dataset into disjoint parts, IID or not, reproducibly.

A partitioner is called as OpenFed's were, ``partitioner(total_parts, data)``,
and returns one sorted list of sample indices per part. ``data`` may be

* the targets (a 1-D integer sequence, numpy array or tensor),
* OpenFed's ``data_index_list``: one array of sample indices per class, or
* an ``int``: the number of samples, for partitioners that ignore labels.

Every partitioner draws from its own ``numpy.random.Generator`` seeded with
``seed`` (never the global numpy state), so the same arguments always give the
same split; every sample lands in at most one part; every part gets at least
``min_samples`` samples or a ``ConfigError`` says why it cannot.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from zmqfed.errors import ConfigError

__all__ = [
    "DirichletPartitioner",
    "IIDPartitioner",
    "Partitioner",
    "PowerLawPartitioner",
    "ShardPartitioner",
]

PartitionData = Any  # int | targets | per-class index arrays


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _is_index_list(data: Any) -> bool:
    return (
        isinstance(data, (list, tuple)) and len(data) > 0 and all(not np.isscalar(x) for x in data)
    )


def class_indices(data: PartitionData, needs_targets: bool, who: str) -> list[np.ndarray]:
    """Sample indices per class (sorted), from targets, an index list or a count."""
    if isinstance(data, (int, np.integer)) and not isinstance(data, bool):
        if needs_targets:
            raise ConfigError(f"{who} splits by label: pass the targets, not a sample count")
        return [np.arange(_check_int(data, "total_samples", 0))]
    if _is_index_list(data):
        out = [np.sort(np.asarray(x).reshape(-1)) for x in data]
        for i, x in enumerate(out):
            if x.size and (not np.issubdtype(x.dtype, np.integer) or x.min() < 0):
                raise ConfigError(f"class {i} of the index list holds non-index values")
        flat = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
        if np.unique(flat).size != flat.size:
            raise ConfigError("the per-class index lists overlap: a sample is in two classes")
        return out
    if hasattr(data, "detach"):  # a torch tensor
        data = data.detach().cpu().numpy()
    targets = np.asarray(data)
    if targets.ndim != 1:
        raise ConfigError(f"targets must be 1-D, got shape {targets.shape}")
    if targets.size and not (np.issubdtype(targets.dtype, np.integer) or targets.dtype == np.bool_):
        raise ConfigError(f"targets must be integer class labels, got dtype {targets.dtype}")
    labels = np.unique(targets)
    return [np.flatnonzero(targets == label) for label in labels]


class Partitioner:
    """Base class: validates input, seeds the generator, checks the result.

    Subclasses implement :meth:`partition`.

    Parameters
    ----------
    seed:
        Seed of the partitioner's own random generator.
    min_samples:
        Smallest acceptable part.
    """

    #: Whether :meth:`partition` needs class labels (an int sample count is refused).
    needs_targets: bool = True

    def __init__(self, seed: int = 0, min_samples: int = 1) -> None:
        self.seed = _check_int(seed, "seed", 0)
        self.min_samples = _check_int(min_samples, "min_samples", 0)

    def __call__(self, total_parts: int, data: PartitionData) -> list[list[int]]:
        total_parts = _check_int(total_parts, "total_parts", 1)
        classes = class_indices(data, self.needs_targets, type(self).__name__)
        total = sum(len(c) for c in classes)
        if total < total_parts * self.min_samples:
            raise ConfigError(
                f"{type(self).__name__}: {total} samples cannot give {total_parts} parts "
                f"at least {self.min_samples} samples each"
            )
        rng = np.random.default_rng(self.seed)
        parts = [
            sorted(int(i) for i in np.asarray(p).reshape(-1))
            for p in self.partition(total_parts, classes, rng)
        ]
        if len(parts) != total_parts:  # a bug in a subclass, not in the input
            raise RuntimeError(
                f"{type(self).__name__} returned {len(parts)} parts, expected {total_parts}"
            )
        sizes = [len(p) for p in parts]
        if min(sizes) < self.min_samples:
            raise ConfigError(
                f"{type(self).__name__}: part {int(np.argmin(sizes))} got {min(sizes)} samples, "
                f"fewer than min_samples={self.min_samples}"
            )
        return parts

    def partition(
        self, total_parts: int, classes: list[np.ndarray], rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Split the per-class index arrays ``classes`` into ``total_parts`` parts."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class IIDPartitioner(Partitioner):
    """Shuffled, class-stratified, balanced parts (sizes differ by at most one).

    Each class is shuffled, the classes are laid end to end and the samples
    are dealt round-robin, so every part gets the global class mix. Unlike
    OpenFed's, no sample is dropped. Works without labels (an int count).
    """

    needs_targets = False

    def __init__(self, seed: int = 0, min_samples: int = 1) -> None:
        super().__init__(seed, min_samples)

    def partition(
        self, total_parts: int, classes: list[np.ndarray], rng: np.random.Generator
    ) -> list[np.ndarray]:
        order = np.concatenate([rng.permutation(c) for c in classes])
        return [order[j::total_parts] for j in range(total_parts)]


class DirichletPartitioner(Partitioner):
    """Label skew from a Dirichlet prior (Hsu et al., 2019, arXiv:1909.06335).

    For every class, part shares are drawn from ``Dirichlet(alpha)``; a part
    that already holds ``total / total_parts`` samples gets no more (keeps
    sizes in check, as in OpenFed). Lower ``alpha`` means more skew. Draws
    are repeated until every part has ``min_samples`` (at most
    ``max_retries`` times).
    """

    def __init__(
        self, alpha: float = 0.5, min_samples: int = 10, seed: int = 0, max_retries: int = 1000
    ) -> None:
        super().__init__(seed, min_samples)
        if not float(alpha) > 0.0:
            raise ConfigError(f"DirichletPartitioner needs alpha > 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.max_retries = _check_int(max_retries, "max_retries", 1)

    def partition(
        self, total_parts: int, classes: list[np.ndarray], rng: np.random.Generator
    ) -> list[np.ndarray]:
        total = sum(len(c) for c in classes)
        cap = total / total_parts
        for _ in range(self.max_retries):
            chunks: list[list[np.ndarray]] = [[] for _ in range(total_parts)]
            sizes = np.zeros(total_parts, dtype=np.int64)
            for c in classes:
                idx = rng.permutation(c)
                shares = rng.dirichlet(np.full(total_parts, self.alpha))
                masked = shares * (sizes < cap)
                shares = masked if masked.sum() > 0 else shares
                cuts = (np.cumsum(shares / shares.sum()) * len(idx)).astype(np.int64)[:-1]
                for j, chunk in enumerate(np.split(idx, cuts)):
                    chunks[j].append(chunk)
                    sizes[j] += len(chunk)
            if sizes.min() >= self.min_samples:
                return [np.concatenate(ch) if ch else np.zeros(0, dtype=np.int64) for ch in chunks]
        raise ConfigError(
            f"DirichletPartitioner(alpha={self.alpha}) found no split giving each of {total_parts} parts "
            f">= {self.min_samples} samples in {self.max_retries} draws; raise alpha or max_retries, "
            "lower min_samples or use fewer parts"
        )


class PowerLawPartitioner(Partitioner):
    """Few classes per part, part sizes heavy-tailed (FedProx's synthetic MNIST split).

    Part ``p`` owns the classes ``(p + c) % K`` for ``c < min_classes``. Each
    part first gets ``ceil(min_samples / min_classes)`` samples of each of its
    classes; the rest of every class is shared between its owners in
    lognormal(``mean``, ``sigma``) proportions. Classes no part owns (fewer
    parts x classes than K) are left out.

    Parameters
    ----------
    min_classes:
        Classes per part (OpenFed's name), ``1 <= min_classes <= K``.
    mean, sigma:
        Parameters of the lognormal share distribution.
    seed:
        Seeds the split (last, so OpenFed's positional calls keep their meaning).
    """

    def __init__(
        self,
        min_samples: int = 10,
        min_classes: int = 2,
        mean: float = 0.0,
        sigma: float = 2.0,
        seed: int = 0,
    ) -> None:
        super().__init__(seed, min_samples)
        self.min_classes = _check_int(min_classes, "min_classes", 1)
        if not float(sigma) >= 0.0:
            raise ConfigError(f"sigma must be >= 0, got {sigma!r}")
        self.mean = float(mean)
        self.sigma = float(sigma)

    def partition(
        self, total_parts: int, classes: list[np.ndarray], rng: np.random.Generator
    ) -> list[np.ndarray]:
        k = len(classes)
        if self.min_classes > k:
            raise ConfigError(
                f"PowerLawPartitioner: min_classes={self.min_classes} but the data has {k} classes"
            )
        base = math.ceil(self.min_samples / self.min_classes)
        owners: list[list[int]] = [[] for _ in range(k)]
        for p in range(total_parts):
            for c in range(self.min_classes):
                owners[(p + c) % k].append(p)
        chunks: list[list[np.ndarray]] = [[] for _ in range(total_parts)]
        for label, (idx, who) in enumerate(zip(classes, owners, strict=True)):
            if not who:
                continue
            if len(who) * base > len(idx):
                raise ConfigError(
                    f"PowerLawPartitioner: class #{label} has {len(idx)} samples, too few for "
                    f"{len(who)} parts x {base} samples each; lower min_samples or use fewer parts"
                )
            idx = rng.permutation(idx)
            rest = len(idx) - len(who) * base
            weights = rng.lognormal(self.mean, self.sigma, size=len(who))
            extra = np.floor(weights / weights.sum() * rest).astype(np.int64)
            extra[int(np.argmax(weights))] += rest - int(extra.sum())
            cuts = np.cumsum(base + extra)[:-1]
            for p, chunk in zip(who, np.split(idx, cuts), strict=True):
                chunks[p].append(chunk)
        return [np.concatenate(ch) if ch else np.zeros(0, dtype=np.int64) for ch in chunks]


class ShardPartitioner(Partitioner):
    """Pathological non-IID shards (McMahan et al., 2017).

    Samples are sorted by label (shuffled within each class), cut into
    ``total_parts * classes_per_part`` equal shards, and every part gets
    ``classes_per_part`` random shards: most parts see only that many classes.
    """

    def __init__(self, classes_per_part: int = 2, seed: int = 0, min_samples: int = 1) -> None:
        super().__init__(seed, min_samples)
        self.classes_per_part = _check_int(classes_per_part, "classes_per_part", 1)

    def partition(
        self, total_parts: int, classes: list[np.ndarray], rng: np.random.Generator
    ) -> list[np.ndarray]:
        order = np.concatenate([rng.permutation(c) for c in classes])
        shards = total_parts * self.classes_per_part
        if shards > len(order):
            raise ConfigError(
                f"ShardPartitioner: {len(order)} samples cannot make {shards} shards "
                f"({total_parts} parts x {self.classes_per_part})"
            )
        pieces = np.array_split(order, shards)
        deal = rng.permutation(shards)
        k = self.classes_per_part
        return [
            np.concatenate([pieces[s] for s in deal[j * k : (j + 1) * k]])
            for j in range(total_parts)
        ]
