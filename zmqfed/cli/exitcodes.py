"""Exit codes shared by every zmqfed console script, and the error-to-code mapping.

===== ================== ==================================================
code  name               meaning
===== ================== ==================================================
0     ``OK``             success
1     ``FAILURE``        runtime failure (I/O, a peer, a missing extra)
2     ``USAGE``          bad command line (argparse uses 2 as well)
3     ``INVALID_INPUT``  invalid input file or topology (``TopologyError``)
4     ``CONFIG_ERROR``   invalid setting or argument value (``ConfigError``)
130   ``INTERRUPTED``    interrupted by SIGINT (128 + 2, as shells report it)
===== ================== ==================================================

``zmqfed-node status`` exits with the nodes' health instead, for monitoring
checks: 10 finished, 11 stopped, 12 failed, 13 stale heartbeat (0 running);
they are :data:`zmqfed.ops.HEALTH_CODES`, outside the range above.

A console script's ``main`` returns the code; :func:`run` wraps a command so
that zmqfed errors become one ``PROG: error: ...`` line on stderr and the
matching code, instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TextIO

from zmqfed.errors import ConfigError, TopologyError, ZmqfedError

__all__ = [
    "CONFIG_ERROR",
    "FAILURE",
    "INTERRUPTED",
    "INVALID_INPUT",
    "OK",
    "USAGE",
    "exit_code_for",
    "report",
    "run",
]

OK = 0
FAILURE = 1
USAGE = 2
INVALID_INPUT = 3
CONFIG_ERROR = 4
INTERRUPTED = 130

# First match wins; anything else (PipeError, SecurityError, OSError, ...) is FAILURE.
_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (KeyboardInterrupt, INTERRUPTED),
    (TopologyError, INVALID_INPUT),
    (ConfigError, CONFIG_ERROR),
)

logger = logging.getLogger(__name__)


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an exception (see the module table)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return FAILURE


def _message(exc: BaseException) -> str:
    """One line describing ``exc``; OS errors keep their file name."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{exc.strerror}"
    return str(exc) or type(exc).__name__


def report(prog: str, exc: BaseException | str, stream: TextIO | None = None) -> int:
    """Print ``PROG: error: MESSAGE`` to stderr; return the exit code for ``exc``.

    A plain string is reported as a runtime failure.
    """
    message = exc if isinstance(exc, str) else _message(exc)
    print(f"{prog}: error: {message}", file=stream or sys.stderr)
    return FAILURE if isinstance(exc, str) else exit_code_for(exc)


def run(prog: str, command: Callable[[], int | None]) -> int:
    """Call ``command`` and return its code (``None`` means ``OK``).

    ``ZmqfedError``, ``OSError``, ``ImportError`` (a missing optional extra)
    and ``KeyboardInterrupt`` are reported with :func:`report`; a closed
    stdout pipe ends quietly with ``FAILURE``; any other exception is a bug
    and propagates with its traceback.
    """
    try:
        code = command()
        sys.stdout.flush()  # surface a closed pipe here, not at interpreter exit
    except BrokenPipeError:  # e.g. `zmqfed-topo compile x.yaml | head -1`: not worth a message
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the final flush at exit cannot fail again
        os.close(devnull)
        return FAILURE
    except (ZmqfedError, OSError, ImportError, KeyboardInterrupt) as exc:
        logger.debug("%s failed", prog, exc_info=True)
        return report(prog, exc)
    return OK if code is None else code
