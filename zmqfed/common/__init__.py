"""OpenFed's ``common``: addresses and the meta dictionary, under their OpenFed names.

The same objects as ``zmqfed.Address``, ``zmqfed.Meta`` and the default
addresses (defined in ``zmqfed.address`` and ``zmqfed.meta``).
"""

from __future__ import annotations

from zmqfed.address import (
    Address,
    default_file_address,
    default_ipc_address,
    default_tcp_address,
    empty_address,
)
from zmqfed.meta import Meta

__all__ = [
    "Address",
    "Meta",
    "default_file_address",
    "default_ipc_address",
    "default_tcp_address",
    "empty_address",
]
