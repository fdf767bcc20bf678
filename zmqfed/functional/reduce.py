"""Reduce the metas of a round (accuracy, loss, ...) to instance-weighted averages.

``meta_reduce`` is OpenFed's function; ``AutoReducer`` is the buffered helper
OpenFed had in its earlier releases (reduce some keys, sum the weight, keep
the rest from the first meta, optionally append each result to a JSON-lines
log).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from zmqfed.errors import ConfigError
from zmqfed.functional.agg_common import check_weight
from zmqfed.meta import Meta

__all__ = ["AutoReducer", "meta_reduce"]


def _key_list(keys: str | Iterable[str]) -> list[str]:
    return [keys] if isinstance(keys, str) else list(keys)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        item = getattr(value, "item", None)
        if callable(item) and getattr(value, "ndim", 1) == 0:
            return _number(item(), what)
        raise ConfigError(f"{what} = {value!r} is not a number and cannot be averaged")
    return float(value)


def meta_reduce(
    meta_list: Sequence[Mapping[str, Any]],
    keys: str | Iterable[str] | None = None,
    weight_key: str | None = "instances",
    *,
    reduce_keys: str | Iterable[str] | None = None,
) -> dict[str, float]:
    """Weighted averages of ``keys`` over ``meta_list``.

    Parameters
    ----------
    meta_list:
        The metas received this round.
    keys:
        Key (or keys) to average, e.g. ``['accuracy', 'loss']``; OpenFed's
        keyword ``reduce_keys`` is accepted too.
    weight_key:
        Meta key holding each meta's weight; ``None`` for a plain mean.

    Returns
    -------
    dict
        ``{key: average}`` for every key at least one meta carries. Unlike
        OpenFed, a key is averaged over the metas that carry it (a missing key
        is not counted as 0) and absent keys are left out rather than 0.0.

    Raises
    ------
    ConfigError
        A meta lacks ``weight_key``, a value is not a number, or the metas
        carrying a key weigh 0 in total.
    """
    chosen = keys if keys is not None else reduce_keys
    if chosen is None or (keys is not None and reduce_keys is not None):
        raise ConfigError("meta_reduce needs the keys to average: keys= (or reduce_keys=), once")
    wanted = _key_list(chosen)
    weights: list[float] = []
    for i, meta in enumerate(meta_list):
        if weight_key is None:
            weights.append(1.0)
        elif weight_key not in meta:
            raise ConfigError(f"meta_list[{i}] has no {weight_key!r} to weight it by")
        else:
            weights.append(check_weight(meta[weight_key], f"meta_list[{i}][{weight_key!r}]"))
    out: dict[str, float] = {}
    for key in wanted:
        total = acc = 0.0
        seen = False
        for i, (meta, w) in enumerate(zip(meta_list, weights, strict=True)):
            if key in meta:
                seen = True
                acc += w * _number(meta[key], f"meta_list[{i}][{key!r}]")
                total += w
        if not seen:
            continue
        if total <= 0.0:
            raise ConfigError(f"the metas carrying {key!r} weigh 0 in total")
        out[key] = acc / total
    return out


class AutoReducer:
    """Collects metas and reduces them to one ``Meta`` per round.

    Parameters
    ----------
    reduce_keys:
        Keys averaged (weighted by ``weight_key``).
    weight_key:
        Key of each meta's weight; summed in the result. ``None`` for plain means.
    ignore_keys:
        Keys dropped from the result.
    log_file:
        If given, every reduced meta is appended to it as one JSON line.

    Example
    -------
    >>> r = AutoReducer(["accuracy"])
    >>> r.add({"accuracy": 0.5, "instances": 10, "version": 3})
    >>> r.add({"accuracy": 1.0, "instances": 30, "version": 3})
    >>> m = r.reduce()
    >>> m["accuracy"], m["instances"], m["version"]
    (0.875, 40.0, 3)
    """

    def __init__(
        self,
        reduce_keys: str | Iterable[str] = ("accuracy",),
        weight_key: str | None = "instances",
        ignore_keys: str | Iterable[str] = (),
        log_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.reduce_keys = _key_list(reduce_keys)
        if not self.reduce_keys:
            raise ConfigError("AutoReducer needs at least one key to reduce")
        self.weight_key = weight_key
        self.ignore_keys = _key_list(ignore_keys)
        self.log_file = log_file
        self.buffer: list[Mapping[str, Any]] = []

    def add(self, meta: Mapping[str, Any]) -> None:
        """Buffer one meta."""
        self.buffer.append(meta)

    def __call__(self, meta_list: Sequence[Mapping[str, Any]]) -> Meta:
        """Reduce ``meta_list`` (the buffer is not touched)."""
        if not meta_list:
            raise ConfigError("nothing to reduce: the meta list is empty")
        result = Meta()
        for key, value in meta_list[0].items():
            if key not in self.reduce_keys:
                result[key] = value
        result.update(meta_reduce(meta_list, self.reduce_keys, self.weight_key))
        if self.weight_key is not None:
            result[self.weight_key] = sum(float(m[self.weight_key]) for m in meta_list)
        for key in self.ignore_keys:
            result.pop(key, None)
        if self.log_file is not None:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(result.to_json_dict()) + "\n")
        return result

    def reduce(self) -> Meta:
        """Reduce the buffered metas and clear the buffer."""
        try:
            return self(self.buffer)
        finally:
            self.buffer = []

    def __repr__(self) -> str:
        return f"AutoReducer(reduce_keys={self.reduce_keys!r}, weight_key={self.weight_key!r})"
