"""Command-line tools, one module per console script.

=============== ======================== ======================================
script          module                   what it does
=============== ======================== ======================================
``zmqfed-topo`` :mod:`zmqfed.cli.topo`   check, compile, draw and build topologies
``zmqfed-node`` ``zmqfed.cli.node``      run one node of a federation
``zmqfed-sim``  ``zmqfed.cli.sim``       simulate a federation on one machine
``zmqfed-keys`` ``zmqfed.cli.keys``      make CURVE key pairs
=============== ======================== ======================================

The scripts are thin: they parse arguments, call one library function and map
exceptions to the shared exit codes of :mod:`zmqfed.cli.exitcodes` (0 ok, 1
runtime failure, 2 usage, 3 invalid input/topology, 4 config error, 130
interrupted). Logging handlers are configured here and nowhere in the library.
"""

from __future__ import annotations

from zmqfed.cli.exitcodes import (
    CONFIG_ERROR,
    FAILURE,
    INTERRUPTED,
    INVALID_INPUT,
    OK,
    USAGE,
)

__all__ = ["CONFIG_ERROR", "FAILURE", "INTERRUPTED", "INVALID_INPUT", "OK", "USAGE"]
