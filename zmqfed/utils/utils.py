"""Seeding, time stamps and the output format switch (OpenFed's ``utils``)."""

from __future__ import annotations

import random
from datetime import datetime

__all__ = ["FMT", "seed_everything", "time_string"]


def time_string() -> str:
    """The local time as ``YYYY-mm-dd HH:MM:SS``."""
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def seed_everything(seed: int = 0) -> None:
    """Seed Python's ``random``, NumPy and torch (every CUDA device too, if any).

    With CUDA, cuDNN is also made deterministic, as OpenFed did.
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True


class _FMT:
    """How zmqfed titles its tables; set ``FMT.color = True`` for ANSI colours."""

    color: bool = False

    @property
    def zmqfed_title(self) -> str:
        """``<zmqfed>``, blue when ``color`` is set."""
        return "\033[0;34m<zmqfed>\033[0m" if self.color else "<zmqfed>"

    @property
    def zmqfed_class_fmt(self) -> str:
        """A ``str.format`` template with ``{class_name}`` and ``{description}``."""
        if self.color:
            return self.zmqfed_title + " \033[0;35m{class_name}\033[0m\n{description}\n"
        return self.zmqfed_title + " {class_name}\n{description}\n"


#: The process-wide output format.
FMT = _FMT()
