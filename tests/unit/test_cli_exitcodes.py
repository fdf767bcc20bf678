"""The exit codes shared by the console scripts and the error-to-code mapping."""

from __future__ import annotations

import pytest

from zmqfed.cli import exitcodes
from zmqfed.errors import (
    ConfigError,
    PeerTimeout,
    ProtocolError,
    SecurityError,
    TopologyError,
)


def test_the_table_is_pinned() -> None:
    codes = {n: getattr(exitcodes, n) for n in exitcodes.__all__ if n.isupper()}
    assert codes == {
        "OK": 0,
        "FAILURE": 1,
        "USAGE": 2,
        "INVALID_INPUT": 3,
        "CONFIG_ERROR": 4,
        "INTERRUPTED": 130,
    }


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (TopologyError("x"), 3),
        (ConfigError("x"), 4),
        (ProtocolError("x"), 1),
        (SecurityError("x"), 1),
        (PeerTimeout("agg", 1.0), 1),
        (OSError(2, "No such file or directory", "f.yaml"), 1),
        (KeyboardInterrupt(), 130),
    ],
)
def test_exit_code_for(exc: BaseException, code: int) -> None:
    assert exitcodes.exit_code_for(exc) == code


def test_run_reports_one_line_and_returns_the_code(capsys: pytest.CaptureFixture[str]) -> None:
    def fail() -> int:
        raise TopologyError("edges[1] references unknown node 'ghost'")

    assert exitcodes.run("zmqfed-x", fail) == 3
    assert capsys.readouterr().err == (
        "zmqfed-x: error: edges[1] references unknown node 'ghost'\n"
    )

    def missing() -> None:
        raise FileNotFoundError(2, "No such file or directory", "t.yaml")

    assert exitcodes.run("zmqfed-x", missing) == 1
    assert capsys.readouterr().err == "zmqfed-x: error: t.yaml: No such file or directory\n"
    assert exitcodes.run("zmqfed-x", lambda: None) == 0
    assert exitcodes.run("zmqfed-x", lambda: 4) == 4


def test_run_lets_bugs_through() -> None:
    def bug() -> int:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        exitcodes.run("zmqfed-x", bug)
