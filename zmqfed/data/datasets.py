"""Federated datasets: one dataset, ``total_parts`` parts, one part visible at a time."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from zmqfed.data.partitioner import Partitioner
from zmqfed.errors import ConfigError

__all__ = ["FederatedDataset", "PartitionerDataset", "samples_distribution"]


class FederatedDataset(Dataset):
    """Base of datasets split into parts, as in OpenFed.

    ``len()`` and indexing see the current part only; :meth:`set_part_id`
    switches parts (a simulated collaborator picks a part per round).
    """

    total_parts: int = 1
    _part_id: int = 0

    @property
    def part_id(self) -> int:
        """The part currently visible."""
        return self._part_id

    def set_part_id(self, part_id: int) -> None:
        """Make part ``part_id`` (``0 <= part_id < total_parts``) the visible one."""
        if isinstance(part_id, bool) or not isinstance(part_id, (int, np.integer)):
            raise ConfigError(f"part_id must be an integer, got {part_id!r}")
        if not 0 <= part_id < self.total_parts:
            raise ConfigError(f"part_id must be in [0, {self.total_parts}), got {part_id}")
        self._part_id = int(part_id)

    def total_samples(self) -> int:
        """Samples in the whole underlying dataset."""
        raise NotImplementedError


def _targets_array(dataset: Any) -> np.ndarray | None:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    if hasattr(targets, "detach"):
        targets = targets.detach().cpu().numpy()
    return np.asarray(targets).reshape(-1)


def _num_classes(classes: Any) -> int:
    return int(classes) if isinstance(classes, (int, np.integer)) else len(classes)


class PartitionerDataset(FederatedDataset):
    """Split any dataset with ``targets`` and ``classes`` with a :class:`Partitioner`.

    Parameters
    ----------
    dataset:
        A map-style dataset. Label-based partitioners need
        ``dataset.targets`` (labels ``0 .. K-1``) and ``dataset.classes``
        (a list of K names, or K); :class:`IIDPartitioner` works without them.
    total_parts:
        Number of parts.
    partitioner:
        How to split, e.g. ``DirichletPartitioner(alpha=0.5, seed=0)``.

    Attributes
    ----------
    parts_index_list:
        Sorted sample indices of every part.
    """

    def __init__(self, dataset: Any, total_parts: int, partitioner: Partitioner) -> None:
        self.dataset = dataset
        self.partitioner = partitioner
        self._targets = _targets_array(dataset)
        classes = getattr(dataset, "classes", None)
        missing = [
            name for name, v in (("targets", self._targets), ("classes", classes)) if v is None
        ]
        if missing and partitioner.needs_targets:
            raise ConfigError(
                f"{type(partitioner).__name__} splits by label, but the {type(dataset).__name__} has no "
                f"{' or '.join(repr(m) for m in missing)} attribute"
            )
        self.num_classes: int | None = None
        if self._targets is not None and classes is not None:
            self.num_classes = _num_classes(classes)
            t = self._targets
            if t.size and (
                not np.issubdtype(t.dtype, np.integer) or t.min() < 0 or t.max() >= self.num_classes
            ):
                raise ConfigError(
                    f"{type(dataset).__name__}.targets must be labels in [0, {self.num_classes}) "
                    f"(len(classes)); got values in [{t.min()}, {t.max()}]"
                )
        data: Any = (
            self._targets if (self._targets is not None and classes is not None) else len(dataset)
        )
        self.total_parts = int(total_parts)
        self.parts_index_list: list[list[int]] = partitioner(total_parts, data)
        self._part_id = 0

    def __len__(self) -> int:
        return len(self.parts_index_list[self._part_id])

    def __getitem__(self, index: int) -> Any:
        part = self.parts_index_list[self._part_id]
        if not -len(part) <= index < len(part):
            raise IndexError(
                f"index {index} out of range for part {self._part_id} of {len(part)} samples"
            )
        return self.dataset[part[index]]

    def total_samples(self) -> int:
        return len(self.dataset)

    def part_indices(self, part_id: int | None = None) -> list[int]:
        """Sample indices (into the underlying dataset) of a part, the current one by default."""
        return list(self.parts_index_list[self._part_id if part_id is None else part_id])

    def samples_distribution(self, verbose: bool = True) -> list[list[int]]:
        """Per-part class counts: row ``p`` holds part ``p``'s count of each class.

        Without labels each row holds just the part size. With ``verbose`` a
        table (classes as columns, plus totals) is printed.
        """
        if self._targets is not None and self.num_classes is not None:
            rows = [
                np.bincount(
                    self._targets[np.asarray(p, dtype=np.int64)], minlength=self.num_classes
                ).tolist()
                for p in self.parts_index_list
            ]
            header = [str(c) for c in range(self.num_classes)]
        else:
            rows = [[len(p)] for p in self.parts_index_list]
            header = ["samples"]
        if verbose:
            print(format_distribution(rows, header))
        return rows

    def __repr__(self) -> str:
        return (
            f"PartitionerDataset({type(self.dataset).__name__}, total_parts={self.total_parts}, "
            f"partitioner={self.partitioner!r}, part_id={self._part_id})"
        )


def format_distribution(rows: list[list[int]], header: list[str]) -> str:
    """A plain-text table of per-part counts with a total column and row."""
    head = ["part", *header, "total"]
    body = [[str(i), *map(str, r), str(sum(r))] for i, r in enumerate(rows)]
    col_totals = [sum(col) for col in zip(*rows, strict=True)] if rows else [0] * len(header)
    body.append(["total", *map(str, col_totals), str(sum(col_totals))])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(head), rule, *(line(r) for r in body[:-1]), rule, line(body[-1])])


def samples_distribution(
    federated_dataset: PartitionerDataset, verbose: bool = True
) -> list[list[int]]:
    """Per-part class counts of ``federated_dataset`` (OpenFed's function form of the method)."""
    if not isinstance(federated_dataset, PartitionerDataset):
        raise ConfigError(
            "samples_distribution needs a PartitionerDataset, "
            f"got {type(federated_dataset).__name__}"
        )
    return federated_dataset.samples_distribution(verbose)
