"""``Meta``: the small JSON-safe dictionary that travels beside the tensors."""

from __future__ import annotations

import json
import math
from typing import Any

from zmqfed.errors import ConfigError

__all__ = ["Meta", "check_json_safe"]


def check_json_safe(value: Any, path: str = "meta") -> None:
    """Raise ``ConfigError`` naming the first value that JSON cannot carry exactly."""
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{path} = {value!r}: non-finite floats cannot be sent")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_json_safe(v, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{path}: key {k!r} is not a string")
            check_json_safe(v, f"{path}[{k!r}]")
        return
    # numbers from numpy / torch scalars are common in metrics: accept them as floats
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 1) == 0:
        check_json_safe(item(), path)
        return
    raise ConfigError(
        f"{path} has a {type(value).__name__} value; meta carries JSON-safe values only "
        "(send tensors as package data instead)"
    )


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 1) == 0:
        return item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Meta(dict):
    """Attribute dictionary of JSON-safe values sent with every request.

    ``mode`` defaults to ``'train'`` and ``version`` to ``-1`` as in OpenFed.

    >>> m = Meta(instances=10)
    >>> m.instances, m["version"], m.mode
    (10, -1, 'train')
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setdefault("mode", "train")
        self.setdefault("version", -1)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_json_dict(self) -> dict[str, Any]:
        """A plain dict with numpy/torch scalars converted, checked JSON-safe."""
        plain = _plain(dict(self))
        check_json_safe(plain)
        return plain

    def copy(self) -> Meta:
        return Meta(json.loads(json.dumps(self.to_json_dict())))

    def __repr__(self) -> str:
        return f"Meta({dict.__repr__(self)})"
