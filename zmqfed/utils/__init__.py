"""Small helpers kept from OpenFed: tables, seeding, time stamps, output format.

``tablist`` and ``string_trim`` format values as ASCII tables,
``seed_everything`` seeds every random generator a training script uses,
``time_string`` stamps logs, and ``FMT.color`` switches coloured titles on.
"""

from __future__ import annotations

from zmqfed.utils.table import string_trim, tablist
from zmqfed.utils.utils import FMT, seed_everything, time_string

__all__ = ["FMT", "seed_everything", "string_trim", "tablist", "time_string"]
