"""``tune_malloc``: opt-out, deference to the environment, once per process."""

from __future__ import annotations

import pytest

from zmqfed.federated import sockets


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(sockets, "_malloc_tuned", None)
    for name in (
        "ZMQFED_TUNE_MALLOC",
        "GLIBC_TUNABLES",
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TRIM_THRESHOLD_",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("value", ["0", "false", "off", "NO"])
def test_opt_out(fresh: pytest.MonkeyPatch, value: str) -> None:
    fresh.setenv("ZMQFED_TUNE_MALLOC", value)
    assert sockets.tune_malloc() is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
        ("MALLOC_TRIM_THRESHOLD_", "0"),
        ("MALLOC_MMAP_THRESHOLD_", "65536"),
    ],
)
def test_user_settings_win(fresh: pytest.MonkeyPatch, name: str, value: str) -> None:
    fresh.setenv(name, value)
    assert sockets.tune_malloc() is False


def test_once_per_process(fresh: pytest.MonkeyPatch) -> None:
    first = sockets.tune_malloc()
    fresh.setenv("ZMQFED_TUNE_MALLOC", "0")  # too late: the answer is remembered
    assert sockets.tune_malloc() is first
