"""Nick names: the alphabet every node name is written in, and the one way to make a path of one.

A nick name is a node's identity everywhere: its ZeroMQ routing id, the
``User-Id`` its CURVE key is admitted under, and the stem of the files kept
for it (``NAME.key``, ``NAME.key_secret``, ``NAME.ckpt``,
``NAME.status.json``, ``NAME.rounds.jsonl``, ``NAME.log``). So the alphabet
admits no path syntax at all: letters and digits of any script, ``_``,
``-``, ``.`` and spaces (OpenFed's examples name nodes ``'alpha node'``),
starting with a letter, a digit or ``_`` (hence never ``.``, ``..`` or a
hidden file) and not ending with a space, in Unicode normal form C, 1 to
255 UTF-8 bytes (a routing id's limit). Every entry point checks it: ``Node``
(topologies and their files), ``FederatedProperties`` (props files), and
the command lines; :func:`name_path` checks it again wherever a file name
is made of a nick name, so no caller can forget (docs/security.md).
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from zmqfed.errors import ConfigError

__all__ = ["MAX_NAME_BYTES", "check_name", "name_path", "nick_name_problem"]

#: ZeroMQ routing ids are 1 to 255 bytes.
MAX_NAME_BYTES = 255
#: Punctuation a nick name may hold, besides letters and digits (never first).
_PUNCTUATION = frozenset("_-. ")


def _allowed(char: str, first: bool) -> bool:
    category = unicodedata.category(char)
    if category[0] in "LN":  # letters and numbers of any script
        return True
    if first:
        return char == "_"
    return char in _PUNCTUATION or category[0] == "M"  # combining marks (NFC keeps some)


def nick_name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid nick name (a sentence naming the fault), or None."""
    if not isinstance(name, str):
        return f"nick name must be a string, got {type(name).__name__} {name!r}"
    if not name or name.isspace():
        return f"nick name {name!r} is empty or whitespace only"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return f"nick name {name[:32]!r} is not valid UTF-8 ({exc.reason})"
    if size > MAX_NAME_BYTES:
        return (
            f"nick name {name[:32]!r}... is {size} bytes in UTF-8; "
            f"a routing id holds at most {MAX_NAME_BYTES}"
        )
    for i, char in enumerate(name):
        if not _allowed(char, i == 0):
            where = "start with" if i == 0 else "contain"
            return (
                f"nick name {name[:64]!r} may not {where} {char!r}: nick names are letters "
                "and digits (any script), '_', '-', '.' and spaces, starting with a letter, "
                "a digit or '_'"
            )
    if name.endswith(" "):
        return f"nick name {name[:64]!r} may not end with a space"
    if unicodedata.normalize("NFC", name) != name:
        return (
            f"nick name {name!r} is not in Unicode normal form C; write it as "
            f"{unicodedata.normalize('NFC', name)!r}"
        )
    return None


def check_name(name: object, error: type[Exception] = ConfigError) -> str:
    """Return ``name`` if it is a valid nick name, else raise ``error`` saying why."""
    problem = nick_name_problem(name)
    if problem is not None:
        raise error(problem)
    assert isinstance(name, str)
    return name


def name_path(directory: str | os.PathLike[str], name: str, suffix: str = "") -> Path:
    """``directory / (name + suffix)``, for a valid nick name only, and never outside ``directory``.

    Raises
    ------
    ConfigError
        ``name`` is not a valid nick name (:func:`nick_name_problem`), or
        the result would not be a file directly inside ``directory``.
    """
    check_name(name)
    base = Path(directory)
    path = base / f"{name}{suffix}"
    if path.parent != base or path.name in (".", "..") or os.sep in f"{name}{suffix}":
        raise ConfigError(f"{name + suffix!r} would not be a file inside {base}")
    return path
