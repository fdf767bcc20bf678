"""Atomic checkpoints: a crash leaves either the old file or the new one, never half."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from zmqfed.errors import ConfigError

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` to a temp file, fsync it, rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (tensors and plain data only), or None if there is none."""
    target = Path(path)
    if not target.exists():
        return None
    try:
        state = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read checkpoint {target}: {exc}") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {target} does not hold a dict")
    return state
